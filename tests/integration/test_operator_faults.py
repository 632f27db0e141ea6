"""Operator fault suite: the faults a cluster produces daily, injected into the real operator on the API
emulator with the kubelet stand-in and a real S3 server (SeaweedFS). Each test asserts the pipeline
survives with nothing lost, prints the measured recovery time (`FAULT <name> recovered_seconds=...`),
and checks every API request the operator sent against the generated RBAC list (vlm_operator.rbac).

The standby tests run the operator as real processes (`vlmctl operator --peering`, two replicas as the
chart runs them) and end them with SIGKILL: no graceful stop, no goodbye in the peering object.

Covered elsewhere (tests/integration/test_operator_k8s.py): the operator restarted mid-stage (no
duplicate Jobs, the pipeline completes), a killed pod (gang restart resumes from its checkpoint), the
VLMTrainingJob deleted mid-stage (every child gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from k8s_harness import NS, PEERING_RESOURCE, Cluster, KubeAPI, python_executable, wait_for
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


PEERING = "vlm-operator"  # the chart's ClusterKopfPeering
# --peering-lifetime of the replicas here (the chart's default is 15 s): the takeover bound. Replicas renew
# every second; at 3 s a loaded 2-core machine delayed a renewal past the lifetime and the standby briefly
# counted the live active replica as dead, so the margin here is 5 s.
LIFETIME = 6


class OperatorProcess:
    """One operator replica: `vlmctl operator --peering` as its own process against the emulator (KUBECONFIG
    and the operator's env inherited), POD_ID as its peering identity, its log in a file."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name, self.log_path = name, log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [python_executable(), "-m", "vlm_operator.cli", "operator", "--peering", PEERING,
                 "--peering-lifetime", str(LIFETIME), "--metrics-port", "0", "--liveness-port", "0"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "POD_ID": self.name},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye (its peering record just stops being renewed)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@contextlib.asynccontextmanager
async def replicas(c: Cluster, log_dir: Path) -> AsyncIterator[dict[str, OperatorProcess]]:
    """The peering object (the chart creates it) and a pool of replicas, every one killed at the end."""
    await c.operator.stop()  # the fixture's in-process operator: these tests run the operator as processes
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
    async with c.http.post("apis/kopf.dev/v1/clusterkopfpeerings", json=peering) as r:
        assert r.status in (200, 201), await r.text()
    pool: dict[str, OperatorProcess] = {}
    try:
        yield pool
    finally:
        for op in pool.values():
            op.kill()
        for op in pool.values():
            print(f"--- {op.name} log (tail) ---\n{op.log()[-3000:]}")


def peers(c: Cluster) -> dict[str, Any]:
    return (c.api.get_object(PEERING_RESOURCE, None, PEERING) or {}).get("status") or {}  # type: ignore[arg-type]


async def start_replica(c: Cluster, pool: dict[str, OperatorProcess], name: str, log_dir: Path) -> OperatorProcess:
    op = pool[name] = OperatorProcess(name, log_dir)
    op.start()
    await wait_for(lambda: name in peers(c), 60, message=f"{name}'s keep-alive in the peering object")
    return op


ACTIVE = "Resuming operations"  # Kopf's log line when a replica (paused from its start) becomes active


async def test_sigkill_of_the_active_replica_mid_stage_the_standby_takes_over(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"  # align holds after step 2 (mid-stage) until the standby has taken over
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.3", FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    async with replicas(c, tmp_path) as pool:
        active = await start_replica(c, pool, "operator-a", tmp_path)
        standby = await start_replica(c, pool, "operator-b", tmp_path)
        await c.create(job_doc(c, "standby", [("align", "align"), ("instruct", "instruct")], max_steps=6))
        output = f"{c.storage_uri}/standby/align"
        await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 2, 60, message="align checkpoint-2")
        # operator-a did all of it; operator-b (started later: lower priority) waits, paused from its start
        assert c.jobs_ever_created("standby") == {"standby-align-0"}
        assert ACTIVE not in standby.log() and "Handler" not in standby.log() and ACTIVE in active.log()

        active.kill()
        killed = time.monotonic()
        await wait_for(lambda: ACTIVE in standby.log(), 4 * LIFETIME + 30, message="the standby took over")
        takeover = time.monotonic() - killed
        report("standby_takeover_after_sigkill", takeover)
        assert takeover < LIFETIME + 10, f"takeover took {takeover:.1f} s (peering lifetime {LIFETIME} s)"
        release.touch()
        await wait_for(lambda: "standby-instruct-0" in c.jobs_ever_created("standby"), 60, message="handoff")
        status = await c.wait_phase("standby", "Succeeded", timeout=60)
    assert status["restarts"] == 0 and status["stages"][0]["restarts"] == 0
    assert c.jobs_ever_created("standby") == {"standby-align-0", "standby-instruct-0"}  # no duplicate, no rerun
    assert not storage.read_manifest(f"{output}/final").get("resumed_from")  # align ran through, never restarted
    assert_requests_within_rbac(c.api)


async def test_both_replicas_killed_and_one_restarted_the_job_continues(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"
    c.kubelet.extra_env.update(FAKE_STEP_SECONDS="0.3", FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    async with replicas(c, tmp_path) as pool:
        await start_replica(c, pool, "operator-a", tmp_path)
        await start_replica(c, pool, "operator-b", tmp_path)
        await c.create(job_doc(c, "orphan", [("align", "align"), ("instruct", "instruct")], max_steps=6))
        output = f"{c.storage_uri}/orphan/align"
        await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 2, 60, message="align checkpoint-2")
        for op in pool.values():
            op.kill()
        release.touch()  # align finishes while no operator runs: its handoff waits for one
        await wait_for(lambda: storage.verify_committed(f"{output}/final").ok, 60, message="align final/")
        await wait_for(lambda: not c.kubelet.running(), 30, message="align pods exited")
        assert c.jobs_ever_created("orphan") == {"orphan-align-0"}

        restarted = time.monotonic()
        fresh = await start_replica(c, pool, "operator-c", tmp_path)  # the dead replicas' records are still there
        await wait_for(lambda: "orphan-instruct-0" in c.jobs_ever_created("orphan"), 4 * LIFETIME + 60,
                       message="the restarted replica did the handoff")
        report("both_replicas_killed_one_restarted", time.monotonic() - restarted)
        assert ACTIVE in fresh.log()
        status = await c.wait_phase("orphan", "Succeeded", timeout=60)
    assert status["restarts"] == 0
    assert c.jobs_ever_created("orphan") == {"orphan-align-0", "orphan-instruct-0"}
    assert not storage.read_manifest(f"{output}/final").get("resumed_from")
    assert_requests_within_rbac(c.api)
