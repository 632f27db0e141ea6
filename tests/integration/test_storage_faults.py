"""Storage faults named, not crashed on: `vlmctl run` against a real S3 server (SeaweedFS) with no
credentials, wrong credentials, an endpoint that does not answer, a missing bucket and a read-only
identity; each is one line naming the spec.storage field, a non-zero exit and no traceback. The same
fault on the cluster (the Kubernetes API emulator) ends in the status, the Failed condition and an Event.

SeaweedFS expresses the read-only prefix as an identity whose actions are only ["Read", "List"]
(its -s3.config); this module starts its own server with that config (~2 s).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s_harness import NS, Cluster, wait_for
from ports import free_port
from s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3
from vlm_core import storage, storage_errors
from vlm_core.storage_errors import StorageUnavailable

READER_KEY, READER_SECRET = "vlm-reader-key", "vlm-reader-secret"


@pytest.fixture(scope="module")
def s3_with_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """SeaweedFS with two identities: the admin (read and write) and a reader (Read, List only)."""
    folder = tmp_path_factory.mktemp("seaweed-identities")
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "reader", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
         "actions": ["Read", "List"]},
    ]}))
    server = SeaweedS3(str(folder / "data"), extra_args=(f"-s3.config={config}",)).start()
    try:
        yield server
    finally:
        server.stop()


def _job(path: Path, uri: str, endpoint: str) -> Path:
    doc = {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": "faulty"},
        "spec": {
            "model": {"visionEncoder": f"{uri}/models/vision", "languageModel": f"{uri}/models/lm"},
            "storage": {"uri": uri, "endpointUrl": endpoint},
            "stages": [{"name": "align", "type": "align", "maxSteps": 2,
                        "data": {"shards": ["data/train.tar"], "format": "caption"},
                        "batch": {"globalSize": 2, "microSize": 1}}],
        },
    }
    path.write_text(json.dumps(doc))
    return path


def _vlmctl_run(job: Path, credentials: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    env.update(credentials, AWS_DEFAULT_REGION="us-east-1")
    return subprocess.run([sys.executable, "-m", "vlm_operator.cli", "run", str(job)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


ADMIN = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@pytest.mark.parametrize(
    ("case", "credentials", "bucket", "field", "words"),
    [
        ("no credentials", {}, "vlm", "spec.storage.secretRef", "no credentials"),
        ("wrong secret", {**ADMIN, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "vlm", "spec.storage.secretRef",
         "rejected the credentials for s3://vlm/runs/faulty (SignatureDoesNotMatch)"),
        ("unknown key", {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "x"}, "vlm",
         "spec.storage.secretRef", "(InvalidAccessKeyId)"),
        ("closed port", ADMIN, "vlm", "spec.storage.endpointUrl", "cannot connect to http://127.0.0.1:"),
        ("missing bucket", ADMIN, "no-such-bucket", "spec.storage.uri", "bucket 'no-such-bucket'"),
        ("read-only", {"AWS_ACCESS_KEY_ID": READER_KEY, "AWS_SECRET_ACCESS_KEY": READER_SECRET}, "vlm",
         "spec.storage.uri", "access denied"),
    ],
)
def test_vlmctl_run_names_the_storage_field_in_one_line(
    s3_with_reader: SeaweedS3, tmp_path: Path, case: str, credentials: dict[str, str], bucket: str, field: str,
    words: str,
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}" if case == "closed port" else s3_with_reader.endpoint
    job = _job(tmp_path / "job.yaml", f"s3://{bucket}/runs", endpoint)
    run = _vlmctl_run(job, credentials, tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "Traceback" not in out
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and run.stdout == "", out
    assert lines[0].startswith(f"error: {field}: ") and words in lines[0], out


def test_the_preflight_passes_and_leaves_no_probe_on_writable_storage(s3_with_reader: SeaweedS3) -> None:
    from vlm_core.spec.model import StorageSpec

    spec = StorageSpec.model_validate({"uri": "s3://vlm/ok", "endpointUrl": s3_with_reader.endpoint})
    options = spec.fsspec_options({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    storage.check_writable("s3://vlm/ok/job", options=options)
    fs, path = storage.filesystem("s3://vlm/ok", options)
    leftovers = [p for p in fs.find(path) if storage.PROBE_PREFIX in p]
    assert leftovers == []


async def test_the_operator_fails_a_job_whose_secret_is_rejected_with_status_and_event(cluster: Cluster) -> None:
    """Wrong credentials in the job's Secret: the preflight fails the job before any pod exists; the
    status message, the Failed condition and a Warning Event name spec.storage.secretRef."""
    c = cluster
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad-creds", "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in {
            "AWS_ACCESS_KEY_ID": c.s3.access_key, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}.items()},
    }
    async with c.http.post(f"api/v1/namespaces/{NS}/secrets", json=secret) as r:
        assert r.status in (200, 201)
    doc: dict[str, Any] = {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": "badcreds", "namespace": NS},
        "spec": {
            "model": {"visionEncoder": "s3://vlm/models/vision", "languageModel": "s3://vlm/models/lm"},
            "storage": {"uri": c.storage_uri, "secretRef": "bad-creds", "endpointUrl": c.s3.endpoint},
            "stages": [{"name": "align", "type": "align", "maxSteps": 2,
                        "data": {"shards": ["data/train.tar"], "format": "caption"},
                        "batch": {"globalSize": 2, "microSize": 1}, "resources": {"nodes": 1, "procsPerNode": 1}}],
        },
    }
    await c.create(doc)
    status = await c.wait_phase("badcreds", "Failed", timeout=60)
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert "spec.storage.secretRef: the storage rejected the credentials" in failed["message"]
    assert "Traceback" not in json.dumps(status)
    assert c.jobs_ever_created("badcreds") == set()

    def warning() -> list[str]:
        return [e.get("message", "") for e in c.api.list_objects("v1/events", NS)
                if e["involvedObject"]["name"] == "badcreds" and e.get("type") == "Warning"
                and "spec.storage.secretRef: the storage rejected" in e.get("message", "")]

    await wait_for(warning, 10, message="an Event naming spec.storage.secretRef")


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    """A GCS API emulator (PyPI gcp-storage-emulator, in memory) with bucket `vlm`; its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", "vlm", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            assert proc.poll() is None, "the GCS emulator exited"
            return False

    try:
        start = time.monotonic()
        while not accepting():
            assert time.monotonic() - start < 60, "the GCS emulator never listened"
            time.sleep(0.1)  # polling the port, not a fixed wait
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _gcs_env(url: str) -> dict[str, str]:
    # gcsfs' experimental bucket-type lookup speaks gRPC to the real service; the emulator has no gRPC.
    return {**os.environ, "STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


GCS_ROUND_TRIP = r"""
import os, sys, tempfile
from vlm_core import storage, storage_errors
from vlm_core.storage_errors import StorageUnavailable
storage.check_writable("gs://vlm/runs/job")
local = tempfile.mkdtemp()
with open(os.path.join(local, "weights.bin"), "wb") as f:
    f.write(os.urandom(1000))
storage.commit_dir(local, "gs://vlm/runs/job/align/final", step=3, stage="align")
v = storage.verify_committed("gs://vlm/runs/job/align/final", check_sha256=True)
assert v.ok and v.manifest["step"] == 3, v
assert storage.latest_checkpoint("gs://vlm/runs/job/align") is None
out = storage.download_dir("gs://vlm/runs/job/align/final", os.path.join(local, "back"))
assert open(os.path.join(out, "weights.bin"), "rb").read() == open(os.path.join(local, "weights.bin"), "rb").read()
print("gs ok")
"""


def test_gs_storage_works_as_installed_against_a_gcs_emulator(gcs_emulator: str, tmp_path: Path) -> None:
    """gcsfs is installed: the preflight probe, a commit, its verification and a download over gs://."""
    run = subprocess.run([sys.executable, "-c", GCS_ROUND_TRIP], env=_gcs_env(gcs_emulator), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "gs ok" in run.stdout, run.stderr[-3000:]


def test_vlmctl_run_names_a_missing_gcs_bucket(gcs_emulator: str, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    doc = json.loads(_job(job, "gs://no-such-bucket/runs", "http://unused").read_text())
    del doc["spec"]["storage"]["endpointUrl"]
    job.write_text(json.dumps(doc))
    run = subprocess.run([sys.executable, "-m", "vlm_operator.cli", "run", str(job)], env=_gcs_env(gcs_emulator),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == ["error: spec.storage.uri: bucket 'no-such-bucket' of gs://no-such-bucket/runs/faulty does not "
                     f"exist at {gcs_emulator}: create it or fix spec.storage.uri"], run.stderr


class Forwarder:
    """A TCP forwarder to the S3 server on a port chosen up front and opened on demand: until `start`,
    connections to it are refused (an S3 endpoint that is down)."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self._server: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def test_a_commit_during_an_outage_is_retried_with_backoff_and_lands(
    s3_with_reader: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer's checkpoint commit while the S3 endpoint refuses connections: the storage layer waits
    (1 s, then 4 s) and tries again; the endpoint comes back during the second wait and the commit lands."""
    forwarder = Forwarder(s3_with_reader.port)
    options = {**storage.s3_options(endpoint_url=forwarder.endpoint, key=ACCESS_KEY, secret=SECRET_KEY),
               "config_kwargs": {"retries": {"max_attempts": 1}}}  # botocore's own retries off: ours are tested
    waits: list[float] = []

    def backoff(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            forwarder.start()  # storage returns while the layer waits

    monkeypatch.setattr(storage_errors, "RETRY_DELAYS", (1.0, 4.0, 15.0))
    monkeypatch.setattr(storage_errors, "_sleep", backoff)
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "weights.bin").write_bytes(os.urandom(4096))
    try:
        storage.commit_dir(str(local), "s3://vlm/outage/align/checkpoint-2", step=2, stage="align", options=options)
        assert waits == [1.0, 4.0]
        assert storage.verify_committed("s3://vlm/outage/align/checkpoint-2", check_sha256=True, options=options).ok
        err = capsys.readouterr().err
        assert err.count("retrying in") == 2 and "spec.storage.endpointUrl: cannot connect to" in err
    finally:
        forwarder.stop()


def test_an_outage_that_outlasts_the_retries_is_named_storage_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    options = {**storage.s3_options(endpoint_url=down, key=ACCESS_KEY, secret=SECRET_KEY),
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    waits: list[float] = []
    monkeypatch.setattr(storage_errors, "RETRY_DELAYS", (2.0,))  # one retry: s3fs' own retries take ~2 s a try
    monkeypatch.setattr(storage_errors, "_sleep", waits.append)
    with pytest.raises(StorageUnavailable) as caught:
        storage.write_json("s3://vlm/outage/align/progress.json", {"step": 1}, options=options)
    assert waits == [2.0]
    assert str(caught.value).startswith(f"spec.storage.endpointUrl: cannot connect to {down}")
