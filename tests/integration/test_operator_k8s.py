"""The operator against the Kubernetes API emulator, with pods run as local torchrun processes.

Every test runs the real Kopf operator in-process, the kubelet stand-in (k8s_harness.Kubelet) and a
real S3 server (SeaweedFS). The pods run `torchrun ... -m vlm_trainer` with the trainer module swapped
for tests/integration/fake_trainer.py (same contract: config, resume, checkpoints, final/ through
vlm_core.storage); test_e2e_tiny_vlm.py runs the real trainer.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import write_stand_in_inputs
from k8s_harness import NS, Cluster, wait_for
from s3_server import SeaweedS3
from vlm_core import storage

JOBS = "batch/v1/jobs"


class Reconciles:
    """Counts the operator's reconciles of one job (the operator runs in this process): a test that checks
    that nothing happens "a while later" waits for a number of reconciles, not for a number of seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        from vlm_operator import reconcile

        self.name, self.count, self._lock = name, 0, threading.Lock()
        original = reconcile.reconcile

        def counting(namespace: str, job: str, *args: Any, **kwargs: Any) -> str | None:
            try:
                return original(namespace, job, *args, **kwargs)
            finally:
                if job == name:
                    with self._lock:
                        self.count += 1

        monkeypatch.setattr(reconcile, "reconcile", counting)

    async def more(self, n: int, timeout: float = 60) -> None:
        """Wait until the job has been reconciled `n` more times (resyncs, events, backoffs)."""
        target = self.count + n
        await wait_for(lambda: self.count >= target, timeout, message=f"{n} more reconciles of {self.name}")


def job_doc(
    c: Cluster,
    name: str,
    stages: list[tuple[str, str]],
    max_steps: int = 6,
    every: int = 2,
    max_restarts: int = 2,
) -> dict[str, Any]:
    formats = {"align": "caption", "instruct": "conversation", "dpo": "preference"}
    return {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"visionEncoder": "s3://vlm/models/vision", "languageModel": "s3://vlm/models/lm"},
            "storage": {"uri": c.storage_uri, "secretRef": "s3-creds", "endpointUrl": c.s3.endpoint},
            "stages": [
                {
                    "name": sname,
                    "type": stype,
                    "data": {"shards": ["data/train.tar"], "format": formats[stype]},
                    "maxSteps": max_steps,
                    "checkpoint": {"everySteps": every},
                    "batch": {"globalSize": 2, "microSize": 1},
                    "resources": {"nodes": 2, "procsPerNode": 1},
                }
                for sname, stype in stages
            ],
            "runPolicy": {"maxRestarts": max_restarts},
        },
    }


async def test_two_stages_hand_off_through_s3_and_report_status(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    # Each stage holds after step 1 until a resync has read its progress.json into the status.
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.4", FAKE_HOLD_AFTER_STEP="1",
                               FAKE_HOLD_UNTIL=str(tmp_path / "release-{stage}"))
    await c.create(job_doc(c, "pipe", [("align", "align"), ("instruct", "instruct")]))
    for i, stage in enumerate(("align", "instruct")):
        await wait_for(lambda i=i: len(c.status("pipe").get("stages", [])) > i
                       and c.status("pipe")["stages"][i].get("totalSteps") == 6, 60,
                       message=f"{stage}'s progress in the status")
        (tmp_path / f"release-{stage}").touch()
    status = await c.wait_phase("pipe", "Succeeded", timeout=75)

    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Succeeded"]
    # progress.json (contract.ProgressRecord, written by the trainer) reached the status: step and total
    assert [s.get("totalSteps") for s in status["stages"]] == [6, 6]
    assert status["progress"] == "2/2" and status["restarts"] == 0
    assert status["observedGeneration"] == 1
    for s in status["stages"]:
        assert s["checkpoint"] == f"{c.storage_uri}/pipe/{s['name']}/final"
        v = storage.verify_committed(s["checkpoint"], check_sha256=True)
        assert v.ok, v.reason
        assert v.manifest["world_size"] == 2  # 2 nodes x 1 process
        assert s["startTime"] and s["completionTime"]
    # stage 2 started from stage 1's committed final/
    weights = storage.read_json(f"{c.storage_uri}/pipe/instruct/final/weights.json")
    assert weights["init_from"] == f"{c.storage_uri}/pipe/align/final"
    conditions = {x["type"]: x for x in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["HandoffReady"]["reason"] == "CheckpointCommitted"

    # Events are posted right after the status write
    await wait_for(lambda: "Succeeded" in c.events("pipe"), 10, message="the Succeeded event")
    events = c.events("pipe")
    # only what a user acts on: no Event per stage start or commit (the status has them)
    assert events.count("Succeeded") == 1 and not {"StageStarted", "StageSucceeded"} & set(events)
    assert c.jobs_ever_created("pipe") == {"pipe-align-0", "pipe-instruct-0"}
    uid = c.job("pipe")["metadata"]["uid"]
    children = [*c.owned("v1/configmaps", "pipe"), *c.owned("v1/services", "pipe"), *c.owned(JOBS, "pipe")]
    assert len(children) == 6
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == uid for o in children)
    pods = c.owned("v1/pods", "pipe")
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == [
        "0",
        "0",
        "1",
        "1",
    ]


async def test_a_killed_pod_restarts_the_gang_which_resumes_from_its_checkpoint(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    release = tmp_path / "release"  # the stage holds after step 4 until the pod is killed
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.4", FAKE_HOLD_AFTER_STEP="4", FAKE_HOLD_UNTIL=str(release))
    await c.create(job_doc(c, "crash", [("align", "align")], max_steps=14, every=2))
    output = f"{c.storage_uri}/crash/align"
    await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 4, 60, message="checkpoint-4")
    c.kubelet.kill_pod("crash-align-0", index=1)
    release.touch()

    status = await c.wait_phase("crash", "Succeeded", timeout=75)
    stage = status["stages"][0]
    assert stage["restarts"] == 1 and status["restarts"] == 1
    assert stage["jobName"] == "crash-align-1"
    manifest = storage.read_manifest(f"{output}/final")
    assert manifest["resumed_from"] >= 4  # the new gang resumed, it did not start over
    await wait_for(lambda: "StageRestarted" in c.events("crash"), 10, message="the StageRestarted event")
    assert [j["metadata"]["name"] for j in c.owned(JOBS, "crash")] == ["crash-align-1"]  # failed gang deleted


async def test_max_restarts_exhausted_fails_the_job_with_the_reason(cluster: Cluster) -> None:
    c = cluster
    c.kubelet.extra_env["FAKE_FAIL_STAGE"] = "instruct"
    await c.create(job_doc(c, "doomed", [("align", "align"), ("instruct", "instruct")], max_restarts=1))
    status = await c.wait_phase("doomed", "Failed", timeout=75)
    assert status["stages"][0]["phase"] == "Succeeded"
    assert status["stages"][1]["phase"] == "Failed" and status["stages"][1]["restarts"] == 1
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded"
    assert "instruct" in failed["message"] and "maxRestarts 1" in failed["message"]
    assert c.jobs_ever_created("doomed") == {"doomed-align-0", "doomed-instruct-0", "doomed-instruct-1"}
    await wait_for(
        lambda: {"StageRestarted", "StageFailed", "Failed"} <= set(c.events("doomed")),
        10,
        message="restart and failure events",
    )


async def test_operator_restart_mid_stage_creates_no_duplicate_jobs(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"  # align holds after step 2 until the operator is back
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.4", FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    await c.create(job_doc(c, "steady", [("align", "align"), ("instruct", "instruct")], max_steps=8))
    await wait_for(
        lambda: c.status("steady").get("currentStage") == "align" and c.kubelet.running(),
        30,
        message="stage align running",
    )
    await c.operator.stop()
    await asyncio.sleep(1.0)  # the operator is down for a while (not a wait for anything)
    await c.operator.start()
    release.touch()
    status = await c.wait_phase("steady", "Succeeded", timeout=75)
    assert status["restarts"] == 0
    assert c.jobs_ever_created("steady") == {"steady-align-0", "steady-instruct-0"}


async def test_suspend_deletes_the_pods_and_resume_continues_the_stage(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"  # the stage holds after step 2 until it was suspended
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.4", FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    await c.create(job_doc(c, "pausable", [("align", "align")], max_steps=14, every=2))
    output = f"{c.storage_uri}/pausable/align"
    await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 2, 60, message="checkpoint-2")
    await c.patch_spec("pausable", {"suspend": True})
    status = await c.wait_phase("pausable", "Suspended", timeout=30)
    assert status["stages"][0]["phase"] == "Suspended"
    await wait_for(
        lambda: not c.kubelet.running() and not c.owned(JOBS, "pausable"),
        20,
        message="no Jobs or running pods while suspended",
    )
    assert not [p for p in c.owned("v1/pods", "pausable")]
    await wait_for(lambda: "Suspended" in c.events("pausable"), 10, message="the Suspended event")

    release.touch()
    await c.patch_spec("pausable", {"suspend": False})
    status = await c.wait_phase("pausable", "Succeeded", timeout=60)
    assert status["stages"][0]["restarts"] == 0  # a suspension is not a failure
    assert c.jobs_ever_created("pausable") == {"pausable-align-0", "pausable-align-1"}
    assert storage.read_manifest(f"{output}/final")["resumed_from"] >= 2


async def test_delete_removes_every_child(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    # the stage holds after step 1 for good: it is still running when the job is deleted
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.5", FAKE_HOLD_AFTER_STEP="1",
                               FAKE_HOLD_UNTIL=str(tmp_path / "never"))
    await c.create(job_doc(c, "doomed2", [("align", "align"), ("instruct", "instruct")], max_steps=40))
    await wait_for(lambda: len(c.kubelet.running()) == 2, 30, message="two pods running")
    assert c.owned("v1/configmaps", "doomed2") and c.owned("v1/services", "doomed2")
    await c.delete("doomed2")
    await wait_for(lambda: c.job("doomed2") is None, 30, message="the job (and its finalizer) gone")
    for res in (JOBS, "v1/pods", "v1/services", "v1/configmaps"):
        assert c.owned(res, "doomed2") == [], res
    await wait_for(lambda: not c.kubelet.running(), 15, message="pod processes stopped")


async def test_a_stage_that_cannot_fit_is_held_until_patched_to_a_suggested_alternative(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission: a 7B-shaped instruct stage with ddp on 80 GiB GPUs is not started (no Job), says why with
    computed alternatives, and starts once the spec is patched to the first alternative."""
    from vlm_core.spec import parse_job
    from vlm_operator import admission

    c = cluster
    reconciles = Reconciles(monkeypatch, "toobig")
    configs = {
        "vision": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336},
        "lm": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "vocab_size": 32000},
    }
    for part, cfg in configs.items():  # config.json only, on S3: the estimate reads no weights
        storage.write_json(f"{c.storage_uri}/models-7b/{part}/config.json", cfg)
    doc = job_doc(c, "toobig", [("instruct", "instruct")], max_steps=2)
    doc["spec"]["model"].update(visionEncoder=f"{c.storage_uri}/models-7b/vision",
                                languageModel=f"{c.storage_uri}/models-7b/lm", imageSize=336)
    stage = doc["spec"]["stages"][0]
    stage["data"]["maxLength"] = 1024
    stage["resources"]["gpuMemoryGiB"] = 79.6
    await c.create(doc)

    def admitted() -> dict[str, Any] | None:
        return next((x for x in c.status("toobig").get("conditions", []) if x["type"] == "Admitted"), None)

    await wait_for(lambda: admitted() is not None, 30, message="the Admitted condition")
    cond = admitted()
    assert (cond["status"], cond["reason"]) == ("False", "InsufficientGPUMemory")
    assert "stage 'instruct' needs an estimated" in cond["message"] and "alternatives that fit:" in cond["message"]
    assert c.status("toobig")["phase"] == "Pending" and c.status("toobig")["message"] == cond["message"]
    await wait_for(lambda: "InsufficientGPUMemory" in c.events("toobig"), 10, message="the Warning event")
    await reconciles.more(3)  # a few resyncs later: still held, still no Job
    assert c.jobs_ever_created("toobig") == set()

    alt = admission.checker(parse_job(doc))(0).alternatives[0]
    assert alt.text in cond["message"]
    for path, value in alt.patch.items():
        admission._set_path(stage, path, value)
    await c.patch_spec("toobig", {"stages": [stage]})
    await c.wait_phase("toobig", "Succeeded", timeout=60)
    assert admitted()["reason"] == "Fits" and admitted()["status"] == "True"
    assert c.jobs_ever_created("toobig") == {"toobig-instruct-0"}


async def test_two_jobs_on_two_s3_endpoints_are_each_verified_with_their_own(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One operator process, two jobs, two S3 servers with different credentials: each job's handoff is
    verified with that job's endpoint (spec.storage.endpointUrl) and Secret, never the process' own
    environment (which points at the first server)."""
    c = cluster
    other = SeaweedS3(str(tmp_path / "seaweed-b"), access_key="team-b-key", secret_key="team-b-secret").start()
    try:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds-b", "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in {
                "AWS_ACCESS_KEY_ID": other.access_key, "AWS_SECRET_ACCESS_KEY": other.secret_key}.items()},
        }
        async with c.http.post(f"api/v1/namespaces/{NS}/secrets", json=secret) as r:
            assert r.status in (200, 201)
        b = storage.s3_options(endpoint_url=other.endpoint, key=other.access_key, secret=other.secret_key)
        write_stand_in_inputs(f"s3://{other.bucket}", c.storage_uri, b)  # what preflight reads, on B
        stages = [("align", "align"), ("instruct", "instruct")]
        on_b = job_doc(c, "on-b", stages, max_steps=2)
        on_b["spec"]["storage"] = {"uri": c.storage_uri, "secretRef": "s3-creds-b", "endpointUrl": other.endpoint}
        await c.create(job_doc(c, "on-a", stages, max_steps=2))
        await c.create(on_b)
        await c.wait_phase("on-a", "Succeeded", timeout=90)
        await c.wait_phase("on-b", "Succeeded", timeout=90)

        final_b = f"{c.storage_uri}/on-b/instruct/final"
        assert storage.verify_committed(final_b, options=b).ok
        # the process' environment (server A) does not hold job B's outputs, and A holds job A's
        assert not storage.verify_committed(final_b).ok
        assert storage.verify_committed(f"{c.storage_uri}/on-a/instruct/final").ok
        assert not storage.verify_committed(f"{c.storage_uri}/on-a/instruct/final", options=b).ok
    finally:
        other.stop()
