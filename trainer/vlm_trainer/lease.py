"""One writer per stage output: an exclusive, expiring lease object in the stage's storage prefix.

Rank 0 of a stage takes `<stage output>/lease.json` before it writes anything, renews it while it
trains, and deletes it when the stage is committed. Taking it is a conditional create (local files:
O_EXCL; S3: `If-None-Match: *`), so of two runners exactly one wins; the other is refused with a
message naming the holder. A holder that crashed stops renewing: once its lease has expired the next
runner takes it over (delete, then the same conditional create, so two taking over still cannot both
win). Torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from vlm_core import storage

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_TTL_SECONDS = 30.0  # renewed every ttl/3: a crashed holder's lease is free within this


class LeaseHeldError(RuntimeError):
    """Another runner holds the stage's lease (a configuration problem: do not retry blindly)."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # host/pid/uuid of the runner
    job: str
    stage: str
    acquired_at: float
    expires_at: float

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires_at


def holder_identity() -> str:
    return f"{socket.gethostname()}/pid-{os.getpid()}/{uuid.uuid4().hex[:8]}"


def _create_exclusive(uri: str, text: str, options: storage.Options | None) -> bool:
    """Write `text` at `uri` only if nothing is there; False if something is."""
    fs, path = storage.filesystem(uri, options)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(path, "xb") as f:
            f.write(text.encode())
    except FileExistsError:
        return False
    except OSError as err:  # S3's 412 PreconditionFailed arrives as an OSError wrapping botocore's error
        if _precondition_failed(err):
            return False
        raise
    return True


def _precondition_failed(err: BaseException | None) -> bool:
    while err is not None:
        text = str(err)
        if "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def read(uri: str, options: storage.Options | None = None) -> LeaseRecord | None:
    try:
        doc: Any = storage.read_json(uri, options=options)
        return LeaseRecord(**{k: doc[k] for k in LeaseRecord.__dataclass_fields__})
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


class Lease:
    """A held lease; `renew()` extends it, `release()` gives it up. Use `Lease.acquire(...)`."""

    def __init__(self, uri: str, record: LeaseRecord, ttl_seconds: float, options: storage.Options | None):
        self.uri, self.record, self.ttl, self.options = uri, record, ttl_seconds, options
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, output: str, *, job: str, stage: str, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                options: storage.Options | None = None, holder: str | None = None) -> Lease:
        uri = storage.join(output, LEASE_FILE)
        now = time.time()
        record = LeaseRecord(holder or holder_identity(), job, stage, now, now + ttl_seconds)
        text = json.dumps(asdict(record))
        seen: LeaseRecord | None = None
        unreadable_since: float | None = None
        deadline = time.monotonic() + ttl_seconds + 5
        while time.monotonic() < deadline:
            if _create_exclusive(uri, text, options):
                return cls(uri, record, ttl_seconds, options)
            current = read(uri, options)
            if current is None:  # being written this instant, or corrupt: give the writer a moment
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since > 2.0:
                    storage.remove(uri, options=options)
                time.sleep(0.05)
                continue
            unreadable_since = None
            if current.expired():
                storage.remove(uri, options=options)  # a crashed holder: take over
                continue
            if seen is not None and current.holder == seen.holder and current.expires_at > seen.expires_at:
                # it renewed while we waited: a live writer, not a crashed one (a gang restart just waits)
                raise LeaseHeldError(
                    f"stage {stage!r} of job {job!r} is being written by {current.holder} (lease {uri}); "
                    "another run of this job is training this stage: wait for it to finish, or stop it"
                )
            seen = current
            time.sleep(min(1.0, max(0.05, current.expires_at - time.time())))
        raise LeaseHeldError(f"stage {stage!r} of job {job!r}: could not take the lease {uri} (contended)")

    def renew(self) -> None:
        now = time.time()
        self.record = LeaseRecord(self.record.holder, self.record.job, self.record.stage,
                                  self.record.acquired_at, now + self.ttl)
        current = read(self.uri, self.options)
        if current is not None and current.holder != self.record.holder:
            raise LeaseHeldError(f"lost the lease {self.uri} to {current.holder}")
        storage.write_json(self.uri, asdict(self.record), options=self.options)

    def keep_alive(self, interval_seconds: float | None = None) -> None:
        """Renew in a background thread every ttl/3 seconds until `release()`."""
        interval = interval_seconds or self.ttl / 3

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseHeldError as err:
                    log.error("%s", err)
                    return
                except OSError as err:  # a storage hiccup: try again at the next interval
                    log.warning("could not renew the lease %s: %s", self.uri, err)

        self._thread = threading.Thread(target=loop, name="vlm-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read(self.uri, self.options)
        if current is not None and current.holder == self.record.holder:
            storage.remove(self.uri, options=self.options)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
