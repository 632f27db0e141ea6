"""Retry only what can succeed on retry, on the Kubernetes API emulator: the pods run the real launcher
(`python -m vlm_trainer.launch -- torchrun ...`) around tests/integration/fake_trainer.py, which raises the
exception a test names through the trainer's own torchelastic record.

- A pod failing with a Python exception: its type and message (first failing rank, secrets redacted) are in
  the job's status (the stage's message, the job's message, the Failed condition) and in a Warning Event; a
  deterministic one (bad data, non-finite loss) ends the stage after one attempt, whatever maxRestarts.
- A pod evicted by a drain (DisruptionTarget): the Job's podFailurePolicy ignores it and replaces the pod,
  which resumes from the checkpoint; maxRestarts (0 here) is not spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from k8s_harness import NS, Cluster, wait_for
from test_operator_k8s import JOBS, job_doc
from vlm_core import contract, storage


def one_node(doc: dict[str, Any]) -> dict[str, Any]:
    for stage in doc["spec"]["stages"]:
        stage["resources"] = {"nodes": 1, "procsPerNode": 1}
    return doc


def warnings(c: Cluster, name: str) -> list[tuple[str, str]]:
    return [
        (e["reason"], e.get("message", ""))
        for e in c.api.list_objects("v1/events", NS)
        if e["involvedObject"]["name"] == name and e.get("type") == "Warning"
    ]


@pytest.mark.parametrize("error, reason", [
    ("BadDataError", "BadData"),
    ("NonFiniteError", "NonFiniteLoss"),
])
async def test_a_deterministic_exception_fails_the_stage_once_and_shows_in_status_and_events(
    cluster: Cluster, error: str, reason: str
) -> None:
    c = cluster
    name = f"fails-{reason.lower()}"
    message = f"{error}: step 2: 3 of 100 samples bad; AWS_SECRET_ACCESS_KEY=hunter2"
    c.kubelet.extra_env.update(FAKE_RAISE=message, FAKE_RAISE_AFTER_STEP="1")
    await c.create(one_node(job_doc(c, name, [("align", "align")], max_restarts=2)))
    status = await c.wait_phase(name, "Failed", timeout=60)

    expected = f"rank 0: {error}: step 2: 3 of 100 samples bad; AWS_SECRET_ACCESS_KEY=***"
    stage = status["stages"][0]
    assert stage["phase"] == "Failed" and stage["restarts"] == 0 and expected in stage["message"]
    assert status["message"] == f"stage 'align' failed with {_what(reason)} (not retried): {expected}"
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == reason and expected in failed["message"]
    assert c.jobs_ever_created(name) == {f"{name}-align-0"}  # one attempt, maxRestarts 2 unspent
    await wait_for(lambda: any(r == "StageFailed" and expected in m for r, m in warnings(c, name)), 10,
                   message="a Warning Event with the trainer's exception")
    assert "hunter2" not in str(status) and "hunter2" not in str(warnings(c, name))
    # the pod itself: the launcher's exit code from the contract's table, the record as termination message
    pod = next(p for p in c.api.list_objects("v1/pods", NS) if p["metadata"]["name"].startswith(f"{name}-align-0"))
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == next(f.exit_code for f in contract.FAILURES if f.reason == reason)
    assert expected.split(": ", 1)[1] in terminated["message"]
    job = c.api.get_object(JOBS, NS, f"{name}-align-0")
    assert job is not None and job["status"]["conditions"][0]["reason"] == "PodFailurePolicy"


def _what(reason: str) -> str:
    return next(f.what for f in contract.FAILURES if f.reason == reason)


async def test_a_drained_pod_is_replaced_without_spending_max_restarts(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"  # the stage holds after step 2 until the pod was drained
    c.kubelet.extra_env.update(FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    await c.create(one_node(job_doc(c, "drained", [("align", "align")], max_steps=4, every=2, max_restarts=0)))
    output = f"{c.storage_uri}/drained/align"
    await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 2, 60, message="checkpoint-2")
    drained = await c.kubelet.drain_pod("drained-align-0", index=0)
    release.touch()

    status = await c.wait_phase("drained", "Succeeded", timeout=60)
    assert status["stages"][0]["restarts"] == 0 and status["restarts"] == 0  # maxRestarts 0 and still done
    assert c.jobs_ever_created("drained") == {"drained-align-0"}  # the Job replaced its pod; no new gang
    pods = [p for p in c.api.list_objects("v1/pods", NS) if p["metadata"]["name"].startswith("drained-align-0-")]
    assert len(pods) == 2 and drained.name in {p["metadata"]["name"] for p in pods}
    assert storage.read_manifest(f"{output}/final")["resumed_from"] >= 2  # the new pod resumed


async def test_a_transient_exception_is_retried_and_each_restart_says_why(cluster: Cluster) -> None:
    c = cluster
    c.kubelet.extra_env.update(FAKE_RAISE="ConnectionResetError: storage went away")
    await c.create(one_node(job_doc(c, "flaky", [("align", "align")], max_restarts=1)))
    status = await c.wait_phase("flaky", "Failed", timeout=60)
    expected = "rank 0: ConnectionResetError: storage went away"
    assert c.jobs_ever_created("flaky") == {"flaky-align-0", "flaky-align-1"}  # retried up to maxRestarts 1
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded"
    assert status["message"] == f"stage 'align' failed after 1 restart(s) (maxRestarts 1): {expected}"
    await wait_for(lambda: any(r == "StageRestarted" and m.endswith(f"restarted after: {expected}")
                               for r, m in warnings(c, "flaky")), 10, message="the restart's reason in its Event")


async def test_a_gang_broken_by_a_drain_is_restarted_without_spending_max_restarts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Two nodes: pod 1 is evicted (its Job replaces it) and its peer then fails, as torchrun's ranks do when
    a peer vanishes; the Job fails, and the operator restarts the gang without counting it (maxRestarts 0)."""
    c = cluster
    release = tmp_path / "release"
    c.kubelet.extra_env.update(FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    doc = job_doc(c, "gang", [("align", "align")], max_steps=4, every=2, max_restarts=0)
    await c.create(doc)  # nodes: 2
    output = f"{c.storage_uri}/gang/align"
    await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 2, 60, message="checkpoint-2")
    await c.kubelet.drain_pod("gang-align-0", index=1)
    c.kubelet.kill_pod("gang-align-0", index=0)  # the peer's collective fails
    await wait_for(lambda: "gang-align-1" in c.jobs_ever_created("gang"), 30, message="the gang's relaunch")
    release.touch()

    status = await c.wait_phase("gang", "Succeeded", timeout=60)
    assert status["stages"][0]["restarts"] == 0 and status["restarts"] == 0
    assert c.jobs_ever_created("gang") == {"gang-align-0", "gang-align-1"}
    assert storage.read_manifest(f"{output}/final")["resumed_from"] >= 2
    await wait_for(lambda: any(r == "StageRescheduled" for r, _ in warnings(c, "gang")), 10,
                   message="the StageRescheduled event")
    assert not any(r == "StageRestarted" for r, _ in warnings(c, "gang"))
