"""The local backend's restart policy, with real torchrun processes through TorchX: a stage that keeps
failing is retried up to maxRestarts and then the run fails with the trainer's own error."""

from __future__ import annotations

from vlm_operator.local import LocalRunner
from vlm_trainer.spec import parse_job


def test_failing_stage_is_retried_then_fails_with_the_reason(tmp_path):
    job = parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "broken"},
        "spec": {
            "model": {"visionEncoder": str(tmp_path / "no-vision"), "languageModel": str(tmp_path / "no-lm")},
            "storage": {"uri": f"file://{tmp_path}/store"},
            "runPolicy": {"maxRestarts": 1},
            "stages": [{"name": "align", "type": "align", "maxSteps": 2,
                        "data": {"shards": ["missing-{0..1}.tar"], "format": "caption"},
                        "batch": {"globalSize": 4, "microSize": 2}, "resources": {"procsPerNode": 2}}],
        },
    })
    lines: list[str] = []
    result = LocalRunner(job, log_dir=str(tmp_path / "logs"), on_line=lambda s, line, r, e: lines.append(line)).run()
    assert not result.succeeded
    assert "failed after 1 restart(s) (maxRestarts 1)" in result.message
    assert [(s.name, s.succeeded, s.attempts) for s in result.stages] == [("align", False, 2)]
    # the reason a user needs is in the message: the trainer's error naming the missing checkpoint
    assert "trainer error: ModelConfigError: spec.model.visionEncoder: no checkpoint at" in result.message
    assert "ChildFailedError" not in result.message
    assert not (tmp_path / "store/broken/align/final").exists()
