"""End to end: the operator runs the REAL trainer (`torchrun ... -m vlm_trainer`) on tiny models.

A 4-stage job (curate -> align -> instruct -> eval): curate filters the raw caption shards into committed curated
shards on a real S3 server (SeaweedFS); align reads them (`data: {fromStage: curate}`) and, like instruct,
runs 2 nodes x 1 process (two pods, two torchrun agents meeting at a c10d rendezvous), with checkpoints
and the weights handoff through S3. Midway through align one pod is killed: the operator restarts the
gang and the trainer resumes from its last committed checkpoint (step > 0). The eval stage generates with
instruct's final/ on 2 pods and its metrics reach the status and the Succeeded Event. Tiny untrained components
come from vlm_quickstart (no hub downloads).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import pytest
from k8s_harness import NS, Cluster, Kubelet, torchrun_as_python, wait_for
from vlm_core import storage


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Untrained tiny SigLIP + Llama (with tokenizer and image processor) and a few synthetic shards."""
    from vlm_quickstart import components, shapes

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

    align = stage("align", "align", "caption", 30)
    align["data"] = {k: v for k, v in align["data"].items() if k != "shards"} | {"fromStage": "curate"}
    curate = {
        "name": "curate", "type": "curate", "input": {"shards": assets["shards"]["caption"]},
        # 32 px shapes are perceptual-hash neighbours of each other: near dedup would thin them out
        "filters": {"nearDedup": {"enabled": False}},
    }
    # the eval stage: instruct's final/ answers a few held-out prompts on 2 pods; its numbers reach the status
    evaluate = {
        "name": "eval", "type": "eval", "precision": "fp32",
        "data": {"shards": assets["shards"]["conversation"], "format": "conversation", "maxLength": 64},
        "eval": {"maxSamples": 8, "maxNewTokens": 2, "batchSize": 4},
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
            "stages": [curate, align, stage("instruct", "instruct", "conversation", 2), evaluate],
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
            240,
            interval=0.05,
            message="an align checkpoint committed",
        )
    except TimeoutError:
        raise AssertionError(f"no align checkpoint: status={c.status('tiny')}\n{c.kubelet.logs()}") from None
    c.kubelet.kill_pod("tiny-align-0", index=1)
    assert storage.read_manifest(f"{align}/final") is None, "align finished before the kill: make it longer"

    status = await c.wait_phase("tiny", "Succeeded", timeout=300)
    assert [s["restarts"] for s in status["stages"]] == [0, 1, 0, 0]
    # progress.json written by the trainer (never the Kubernetes API) reached status through the operator
    align_total = c.job("tiny")["spec"]["stages"][1]["maxSteps"]
    assert status["stages"][1]["totalSteps"] == align_total and 1 <= status["stages"][1]["step"] <= align_total
    assert status["stages"][0]["step"] == status["stages"][0]["totalSteps"] == 4  # curate: 2 shards x 2 phases
    # align read the committed curated shards, and its Job was created only after the commit
    curated = f"{c.storage_uri}/tiny/curate/final"
    committed = storage.verify_committed(curated, check_sha256=True)
    assert committed.ok, committed.reason
    funnel = storage.read_json(f"{curated}/funnel.json")
    assert funnel["input"] == 64 and funnel["kept"] == 64 and funnel["throughput"][0]["samples_per_second"] > 0
    config = next(json.loads(m["data"]["config.json"]) for m in c.owned("v1/configmaps", "tiny")
                  if m["metadata"]["labels"]["training.vlm.dev/stage"] == "align")
    assert config["stage"]["data"]["shards"] == [f"{curated}/curated-{i:06d}.tar" for i in range(2)]
    align_job = next(o for (res, _ns, n), o in c.api.objects.items() if res.plural == "jobs" and n == "tiny-align-0")
    created = next(v for v in align_job.history if v is not None).raw["metadata"]["creationTimestamp"]
    created_at = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()
    assert created_at >= committed.manifest["committed_at"]
    align_eval = storage.read_json(f"{align}/eval.json")
    # the restarted gang resumed, it did not start over
    assert (align_eval.get("resumed_from_step") or 0) >= 10, f"{align_eval}\n{c.kubelet.logs()}"
    assert align_eval["world_size"] == 2
    # the eval stage read instruct's final/ and its metrics reached the status and the Succeeded message
    report = storage.read_json(f"{c.storage_uri}/tiny/eval/final/eval.json")
    assert report["model"] == f"{c.storage_uri}/tiny/instruct/final" and report["samples"] == 8
    assert report["world_size"] == 2
    assert status["stages"][3]["metrics"]["exact_match"] == report["exact_match"]
    assert f"eval: eval exact_match {report['exact_match']:.3f}" in status["message"]
    for s in status["stages"][1:3]:
        v = storage.verify_committed(s["checkpoint"], check_sha256=True)
        assert v.ok, v.reason
        assert any(f["path"].endswith(".safetensors") for f in v.manifest["files"])  # HF format final/
    await wait_for(lambda: "Succeeded" in c.events("tiny"), 10, message="the Succeeded event")
    events = c.events("tiny")
    # Events for what a user acts on (the restart, the end), none per stage start or commit
    assert "StageRestarted" in events and events.count("Succeeded") == 1
    succeeded = next(e["message"] for e in c.api.list_objects("v1/events", NS) if e["reason"] == "Succeeded"
                     and e["involvedObject"]["name"] == "tiny")
    assert "eval: eval exact_match" in succeeded
    assert not {"StageStarted", "StageSucceeded"} & set(events)
    assert c.jobs_ever_created("tiny") == {"tiny-curate-0", "tiny-align-0", "tiny-align-1", "tiny-instruct-0",
                                           "tiny-eval-0"}
    assert os.path.exists(tiny_assets["lm"])
