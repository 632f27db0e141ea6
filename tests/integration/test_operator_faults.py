"""Operator fault suite: the faults a cluster produces daily, injected into the real operator on the API
emulator with the kubelet stand-in and a real S3 server (SeaweedFS). Each test asserts the pipeline
survives with nothing lost, prints the measured recovery time (`FAULT <name> recovered_seconds=...`),
and checks every API request the operator sent against the generated RBAC list (vlm_operator.rbac).

Covered elsewhere (tests/integration/test_operator_k8s.py): the operator restarted mid-stage (no
duplicate Jobs, the pipeline completes), a killed pod (gang restart resumes from its checkpoint), the
VLMTrainingJob deleted mid-stage (every child gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from k8s_harness import NS, Cluster, KubeAPI, wait_for
from ports import free_port
from test_operator_k8s import JOBS, Reconciles, job_doc
from vlm_core import storage
from vlm_operator import rbac


def assert_requests_within_rbac(api: KubeAPI) -> None:
    """Every (group, resource, verb) the operator used is granted by the chart's generated role."""
    assert api.operator_requests, "no operator requests recorded"
    denied = [key for key in api.operator_requests if not rbac.allows(*key, cluster=True)]
    assert denied == [], f"requests the chart's role would deny: {denied}"


def report(name: str, seconds: float) -> None:
    print(f"FAULT {name} recovered_seconds={seconds:.2f}")


class TcpSwitch:
    """A TCP forwarder in front of the S3 server that can go down (refuse and cut every connection)
    and come back on the same port: an S3 outage for everyone using the job's endpointUrl."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def test_s3_outage_during_a_handoff_holds_the_next_stage_until_storage_returns(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster
    reconciles = Reconciles(monkeypatch, "outage")
    host, port = c.s3.endpoint.removeprefix("http://").split(":")
    switch = TcpSwitch(host, int(port))
    await switch.up()
    gate = asyncio.Event()
    c.kubelet.completion_gate = gate
    try:
        doc = job_doc(c, "outage", [("align", "align"), ("instruct", "instruct")], max_steps=2)
        doc["spec"]["storage"]["endpointUrl"] = switch.endpoint  # trainer pods and operator both go through it
        await c.create(doc)
        align_final = f"{c.storage_uri}/outage/align/final"
        await wait_for(lambda: storage.verify_committed(align_final).ok, 60, message="align final/ committed")
        await wait_for(lambda: not c.kubelet.running(), 30, message="align pods exited")
        await switch.down()  # storage goes away between the commit and the handoff check
        gate.set()

        def waiting() -> bool:
            cond = {x["type"]: x for x in c.status("outage").get("conditions", [])}.get("HandoffReady", {})
            return cond.get("status") == "False" and cond.get("reason") == "CheckpointNotCommitted"

        await wait_for(waiting, 30, message="HandoffReady=False while storage is down")
        await reconciles.more(3)  # several reconciles later: still waiting, nothing started on unverified data
        status = c.status("outage")
        assert waiting() and status["stages"][0]["phase"] == "Succeeded"
        assert "storage check failed" in status["message"] and "align" in status["message"]
        assert c.jobs_ever_created("outage") == {"outage-align-0"}

        await switch.up()
        t0 = time.monotonic()
        await wait_for(lambda: "outage-instruct-0" in c.jobs_ever_created("outage"), 60, message="instruct started")
        report("s3_outage_handoff", time.monotonic() - t0)
        status = await c.wait_phase("outage", "Succeeded", timeout=60)
        assert status["restarts"] == 0
        assert c.jobs_ever_created("outage") == {"outage-align-0", "outage-instruct-0"}
        weights = storage.read_json(f"{c.storage_uri}/outage/instruct/final/weights.json")
        assert weights["init_from"] == align_final  # started from the verified handoff, nothing lost
        assert_requests_within_rbac(c.api)
    finally:
        gate.set()
        await switch.down()


async def test_a_stage_job_deleted_by_hand_is_recreated_and_resumes(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"  # the stage holds after step 4 until the test is done with it
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.4", FAKE_HOLD_AFTER_STEP="4", FAKE_HOLD_UNTIL=str(release))
    await c.create(job_doc(c, "handdel", [("align", "align")], max_steps=10, every=2))
    output = f"{c.storage_uri}/handdel/align"
    await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 4, 60, message="checkpoint-4")
    t0 = time.monotonic()
    async with c.http.delete(f"apis/batch/v1/namespaces/{NS}/jobs/handdel-align-0") as r:
        assert r.status == 200, await r.text()
    await wait_for(lambda: "handdel-align-1" in c.jobs_ever_created("handdel"), 30, message="Job recreated")
    report("stage_job_deleted_by_hand", time.monotonic() - t0)
    release.touch()
    status = await c.wait_phase("handdel", "Succeeded", timeout=75)
    assert status["stages"][0]["restarts"] == 0  # a deleted Job is not a failed gang
    assert c.jobs_ever_created("handdel") == {"handdel-align-0", "handdel-align-1"}
    assert storage.read_manifest(f"{output}/final")["resumed_from"] >= 4  # resumed, not restarted
    assert_requests_within_rbac(c.api)


async def test_a_pod_failing_every_time_fails_after_max_restarts_and_ttl_cleans_up_for_good(
    cluster: Cluster,
) -> None:
    c = cluster
    c.kubelet.extra_env["FAKE_FAIL_STAGE"] = "align"
    doc: dict[str, Any] = job_doc(c, "flappy", [("align", "align")], max_restarts=2)
    doc["spec"]["runPolicy"]["ttlSecondsAfterFinished"] = 2
    await c.create(doc)
    status = await c.wait_phase("flappy", "Failed", timeout=150)
    failed_at = time.monotonic()
    assert status["stages"][0]["restarts"] == 2
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded" and "exited with code 1" in failed["message"]
    assert c.jobs_ever_created("flappy") == {"flappy-align-0", "flappy-align-1", "flappy-align-2"}

    await wait_for(lambda: c.job("flappy") is None, 30, message="the TTL deleted the job")
    report("ttl_cleanup_after_failure", time.monotonic() - failed_at)
    for res in (JOBS, "v1/pods", "v1/services", "v1/configmaps", "networking.k8s.io/v1/networkpolicies"):
        assert c.owned(res, "flappy") == [], res
    await asyncio.sleep(3)  # several resync periods and Job events later: no restart loop
    assert c.jobs_ever_created("flappy") == {"flappy-align-0", "flappy-align-1", "flappy-align-2"}
    assert c.owned(JOBS, "flappy") == [] and not c.kubelet.running()
    assert c.api.operator_requests[("training.vlm.dev", "vlmtrainingjobs", "delete")] == 1
    assert_requests_within_rbac(c.api)
