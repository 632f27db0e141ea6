"""End to end: the operator runs the REAL trainer (`torchrun ... -m vlm_trainer`) on tiny models.

A 2-stage job (align -> instruct), each stage 2 nodes x 1 process (two pods, two torchrun agents meeting
at a c10d rendezvous), checkpoints and the handoff through a real S3 server (SeaweedFS). Midway through
align one pod is killed: the operator restarts the gang and the trainer resumes from its last committed
checkpoint (step > 0). Tiny untrained components come from vlm_trainer.quickstart (no hub downloads).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from k8s_harness import NS, Cluster, Kubelet, torchrun_as_python, wait_for
from vlm_trainer import storage


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Untrained tiny SigLIP + Llama (with tokenizer and image processor) and a few synthetic shards."""
    from vlm_trainer.quickstart import components, shapes

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = components.build_tokenizer()
    lm = components.build_language_model(str(root / "language_model"), tokenizer)
    vision = components.build_vision_encoder(str(root / "vision_encoder"))
    paths = shapes.write_shards(str(root / "data"), "train", 64, seed=0, per_shard=32)
    return {
        "lm": lm,
        "vision": vision,
        "shards": {
            fmt: [f"file://{p}" for p in shapes.shard_paths(paths, fmt)]
            for fmt in ("caption", "conversation")
        },
    }


def tiny_job(c: Cluster, assets: dict[str, Any], name: str) -> dict[str, Any]:
    def stage(sname: str, stype: str, fmt: str, steps: int) -> dict[str, Any]:
        return {
            "name": sname,
            "type": stype,
            "data": {"shards": assets["shards"][fmt], "format": fmt, "maxLength": 64, "shuffleBuffer": 0},
            "maxSteps": steps,
            "precision": "fp32",
            "batch": {"globalSize": 32, "microSize": 16},
            "checkpoint": {"everySteps": 10, "keepLast": 2},
            "resources": {"nodes": 2, "procsPerNode": 1},
        }

    return {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {
                "visionEncoder": f"file://{assets['vision']}",
                "languageModel": f"file://{assets['lm']}",
                "imageSize": 32,
                "visionFeatureLayer": -1,
                "visionFeatureSelectStrategy": "full",
            },
            "storage": {"uri": c.storage_uri, "secretRef": "s3-creds", "endpointUrl": c.s3.endpoint},
            "stages": [
                stage("align", "align", "caption", 30),
                stage("instruct", "instruct", "conversation", 2),
            ],
            "runPolicy": {"maxRestarts": 2},
        },
    }


async def test_real_trainer_two_stages_with_a_gang_restart(
    cluster: Cluster, tiny_assets: dict[str, Any]
) -> None:
    c = cluster
    c.kubelet.command_mapper = torchrun_as_python  # the real `-m vlm_trainer`
    assert isinstance(c.kubelet, Kubelet)
    await c.create(tiny_job(c, tiny_assets, "tiny"))
    align = f"{c.storage_uri}/tiny/align"
    try:  # the trainer logs each committed checkpoint; kill right then, mid-stage
        await wait_for(
            lambda: c.kubelet.log_contains("tiny-align-0", '"event": "checkpoint"'),
            150,
            interval=0.05,
            message="an align checkpoint committed",
        )
    except TimeoutError:
        raise AssertionError(f"no align checkpoint: status={c.status('tiny')}\n{c.kubelet.logs()}") from None
    c.kubelet.kill_pod("tiny-align-0", index=1)
    assert storage.read_manifest(f"{align}/final") is None, "align finished before the kill: make it longer"

    status = await c.wait_phase("tiny", "Succeeded", timeout=240)
    assert status["stages"][0]["restarts"] == 1 and status["stages"][1]["restarts"] == 0
    # progress.json written by the trainer (never the Kubernetes API) reached status through the operator
    align_total = c.job("tiny")["spec"]["stages"][0]["maxSteps"]
    assert status["stages"][0]["totalSteps"] == align_total and 1 <= status["stages"][0]["step"] <= align_total
    align_eval = storage.read_json(f"{align}/eval.json")
    # the restarted gang resumed, it did not start over
    assert (align_eval.get("resumed_from_step") or 0) >= 10, f"{align_eval}\n{c.kubelet.logs()}"
    assert align_eval["world_size"] == 2
    for s in status["stages"]:
        v = storage.verify_committed(s["checkpoint"], check_sha256=True)
        assert v.ok, v.reason
        assert any(f["path"].endswith(".safetensors") for f in v.manifest["files"])  # HF format final/
    await wait_for(lambda: "Succeeded" in c.events("tiny"), 10, message="the Succeeded event")
    events = c.events("tiny")
    assert (
        events.count("StageStarted") == 2
        and "StageRestarted" in events
        and events.count("StageSucceeded") == 2
    )
    assert c.jobs_ever_created("tiny") == {"tiny-align-0", "tiny-align-1", "tiny-instruct-0"}
    assert os.path.exists(tiny_assets["lm"])
