"""The local backend's restart policy, with real torchrun processes through TorchX: a stage that keeps
failing at run time is retried up to maxRestarts and then the run fails with the trainer's own error;
a configuration error is not retried at all (tests/integration/test_fail_safe.py)."""

from __future__ import annotations

import pytest
from tiny_parts import build_parts, job_file, write_imageless_shard
from vlm_core.spec import load_job
from vlm_operator.local import LocalRunner


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_parts(tmp_path_factory.mktemp("parts"))


def test_failing_stage_is_retried_then_fails_with_the_reason(tmp_path, parts):
    bad = write_imageless_shard(tmp_path / "bad.tar")
    job = load_job(job_file(tmp_path / "job.yaml", "broken", {**parts, "shards": [bad]},
                            tmp_path / "store", max_restarts=1))
    lines: list[str] = []
    result = LocalRunner(job, log_dir=str(tmp_path / "logs"), on_line=lambda s, line, r, e: lines.append(line)).run()
    assert not result.succeeded
    assert "failed after 1 restart(s) (maxRestarts 1)" in result.message
    assert [(s.name, s.succeeded, s.attempts) for s in result.stages] == [("align", False, 2)]
    # the reason a user needs is in the message: the failing rank's own exception line
    assert "trainer error (rank " in result.message and "ChildFailedError" not in result.message
    assert not (tmp_path / "store/broken/align/final").exists()
