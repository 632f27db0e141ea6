"""Integration fixtures: one SeaweedFS S3 server per session; per test a Kubernetes API emulator and,
on top of it, a whole `cluster` (kubelet stand-in + the operator).

tests/integration has no __init__.py: pytest puts this folder on sys.path, so the helpers import as
top-level modules (`k8s_harness`, `s3_server`).
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio
from s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

# The operator reads these when its handlers module is first imported (in OperatorRunner.start).
os.environ.setdefault("VLM_OPERATOR_RESYNC_SECONDS", "1")
os.environ.setdefault("VLM_OPERATOR_RETRY_SECONDS", "1")
os.environ.setdefault("VLM_OPERATOR_PROGRESS_SECONDS", "1")
# Storage backoff (1, 4, 15 s by default): short here, so an outage test waits for reconciles, not for the
# backoff; the tests of the backoff itself set RETRY_DELAYS explicitly. Read when vlm_core.storage_errors is
# first imported.
os.environ.setdefault("VLM_STORAGE_RETRY_DELAYS", "0.2,0.5,1")
FAKE_TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_trainer.py")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) on loopback, with bucket `vlm`; its AWS env is exported."""
    server = SeaweedS3(str(tmp_path_factory.mktemp("seaweedfs"))).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest_asyncio.fixture
async def kube_api(tmp_path) -> AsyncIterator:
    """A stateful Kubernetes API emulator over HTTP, with the `kubernetes` client pointed at it."""
    from k8s_harness import KubeAPI, use_kubeconfig, write_kubeconfig
    from kmock import Server

    async with KubeAPI() as api, Server(api) as server:
        path = write_kubeconfig(str(server.url), str(tmp_path / "kubeconfig"))
        with use_kubeconfig(path):
            yield api


def write_stand_in_inputs(bucket_uri: str, storage_uri: str, options: dict | None = None) -> None:
    """What the operator's preflight looks at for the jobs these tests apply (the fake trainer reads
    none of it): model config.json files at s3://<bucket>/models/{vision,lm} and a real tar shard."""
    from vlm_core import storage

    vision = {"model_type": "siglip_vision_model", "image_size": 336, "patch_size": 42, "num_hidden_layers": 2}
    storage.write_json(f"{bucket_uri}/models/vision/config.json", vision, options=options)
    storage.write_json(f"{bucket_uri}/models/lm/config.json", {"model_type": "llama", "num_hidden_layers": 2},
                       options=options)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b'{"caption": "a red circle"}'
        info = tarfile.TarInfo("000000.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fs, path = storage.filesystem(f"{storage_uri}/data/train.tar", options)
    fs.pipe(path, buf.getvalue())


@pytest_asyncio.fixture
async def cluster(kube_api, s3_server: SeaweedS3, tmp_path) -> AsyncIterator:
    """Emulator + S3 (credentials in the Secret `s3-creds`) + kubelet stand-in + the operator.

    Pods run tests/integration/fake_trainer.py in place of the trainer module; set
    `cluster.kubelet.command_mapper = k8s_harness.torchrun_as_python` to run the real one.
    """
    from k8s_harness import NS, Cluster, Kubelet, OperatorRunner, replace_trainer_module

    async with aiohttp.ClientSession(str(kube_api.url)) as http:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": NS},
            "data": {
                "AWS_ACCESS_KEY_ID": base64.b64encode(ACCESS_KEY.encode()).decode(),
                "AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET_KEY.encode()).decode(),
            },
        }
        async with http.post(f"api/v1/namespaces/{NS}/secrets", json=secret) as r:
            assert r.status in (200, 201)
        kubelet = Kubelet(
            str(kube_api.url),
            str(tmp_path / "pods"),
            command_mapper=replace_trainer_module(FAKE_TRAINER),
            extra_env={"FAKE_STEP_SECONDS": "0.2"},
        )
        async with kubelet:
            operator = OperatorRunner()
            await operator.start()
            try:
                c = Cluster(kube_api, http, kubelet, operator, s3_server, uuid.uuid4().hex[:8])
                write_stand_in_inputs(f"s3://{s3_server.bucket}", c.storage_uri)
                yield c
            finally:
                await operator.stop()
