"""The local backend's restart policy, with real torchrun processes through TorchX: a stage failing with
a deterministic error (bad data over its budget, by the contract's table of failures) ends after one
attempt, whatever maxRestarts, with the trainer's own error; a configuration error is not retried either
(tests/integration/test_fail_safe.py); other failures are retried up to maxRestarts (tests/unit)."""

from __future__ import annotations

import pytest
from tiny_parts import build_parts, job_file, write_imageless_shard
from vlm_core.spec import load_job
from vlm_operator.local import LocalRunner


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_parts(tmp_path_factory.mktemp("parts"))


def test_bad_data_fails_the_stage_after_one_attempt_with_the_reason(tmp_path, parts):
    bad = write_imageless_shard(tmp_path / "bad.tar")  # every sample is bad: over data.maxBadSampleShare
    job = load_job(job_file(tmp_path / "job.yaml", "broken", {**parts, "shards": [bad]},
                            tmp_path / "store", max_restarts=2))
    lines: list[str] = []
    result = LocalRunner(job, log_dir=str(tmp_path / "logs"), on_line=lambda s, line, r, e: lines.append(line)).run()
    assert not result.succeeded
    assert result.message.startswith("stage 'align' failed with bad data over its budget (not retried): ")
    assert [(s.name, s.succeeded, s.attempts) for s in result.stages] == [("align", False, 1)]  # maxRestarts 2 unspent
    # the reason a user needs is in the message: the failing rank's own exception line
    assert "trainer error (rank " in result.message and "BadDataError: " in result.message
    assert "ChildFailedError" not in result.message
    assert not (tmp_path / "store/broken/align/final").exists()
