"""One writer per stage output: an exclusive, expiring lease object in the stage's storage prefix.

Rank 0 of a stage takes `<stage output>/lease.json` before it writes anything, renews it while it
trains, and gives it up when the stage is committed. Every write of the lease is conditional on what
the writer last saw, so of two runners exactly one wins and a fresh lease is never removed by another:

- taking a free lease is a conditional create (local files: under a lock, then an atomic rename;
  S3: `If-None-Match: *`);
- taking over a crashed holder's expired lease overwrites exactly the expired object it read (S3:
  `If-Match` on its ETag; local: compare-and-swap under an exclusive `flock` of the folder), never
  "delete, then create" (two takers could both delete and the second would remove the first's
  fresh lease);
- a renewal is the same compare-and-swap on the holder's own last write: if it fails, another runner
  holds the lease and this one stops loudly (`on_lost`: by default the process exits with
  LEASE_LOST_EXIT_CODE at once, before it writes anything more to the stage output);
- release deletes the lease only if it is still the holder's own write (S3: `If-Match` on delete).

Other fsspec filesystems (gs://, memory://) have no compare-and-swap here: there the lease is
best-effort (the check and the write are separate requests). Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from fsspec.asyn import sync
from vlm_core import storage

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_TTL_SECONDS = 30.0  # renewed every ttl/3: a crashed holder's lease is free within this
LEASE_LOST_EXIT_CODE = 75  # rank 0 found another runner holding its stage's lease: it stops at once


class LeaseHeldError(RuntimeError):
    """Another runner holds the stage's lease (a configuration problem: do not retry blindly)."""


class LeaseLostError(LeaseHeldError):
    """A renewal found the lease taken by another runner: this one must stop writing the stage."""


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


def _precondition_failed(err: BaseException | None) -> bool:
    while err is not None:
        text = str(err)
        if "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        doc: Any = json.loads(data)
        return LeaseRecord(**{k: doc[k] for k in LeaseRecord.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return None


# -- compare-and-swap stores: get() -> (bytes, version) | None; create/replace -> new version | None ----


class _LocalStore:
    """A local file; every change under an exclusive flock of its folder, written by an atomic rename."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path) or "."

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _current(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _write(self, data: bytes) -> str:
        tmp = f"{self.path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return hashlib.sha256(data).hexdigest()

    def get(self) -> tuple[bytes, str] | None:
        return self._current()  # writes are renames: a reader never sees half of one

    def create(self, data: bytes) -> str | None:
        with self._locked():
            return None if self._current() is not None else self._write(data)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self._current()
            return self._write(data) if current is not None and current[1] == version else None

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._current()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
            return True


class _S3Store:
    """An S3 object; conditional requests (If-None-Match / If-Match on the ETag) do the comparing."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, _, self.key = path.partition("/")

    def get(self) -> tuple[bytes, str] | None:
        async def fetch() -> tuple[bytes, str]:
            rsp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with rsp["Body"] as body:
                return await body.read(), str(rsp["ETag"])

        try:
            return sync(self.fs.loop, fetch)
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            rsp = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except (OSError, FileNotFoundError) as err:  # 412 arrives as an OSError wrapping botocore's error
            if _precondition_failed(err) or isinstance(err, FileNotFoundError):
                return None
            raise
        return str(rsp["ETag"])

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except (OSError, FileNotFoundError) as err:
            if _precondition_failed(err) or isinstance(err, FileNotFoundError):
                return False
            raise
        return True


class _BestEffortStore:
    """Any other fsspec filesystem: the same calls, but check and write are separate requests."""

    def __init__(self, uri: str, options: storage.Options | None) -> None:
        self.uri, self.options = uri, options

    def get(self) -> tuple[bytes, str] | None:
        try:
            data = storage.read_bytes(self.uri, options=self.options)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _write(self, data: bytes) -> str:
        storage.write_bytes(self.uri, data, options=self.options)
        return hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        return None if self.get() is not None else self._write(data)

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.get()
        return self._write(data) if current is not None and current[1] == version else None

    def delete(self, version: str) -> bool:
        current = self.get()
        if current is None or current[1] != version:
            return False
        storage.remove(self.uri, options=self.options)
        return True


_Store = _LocalStore | _S3Store | _BestEffortStore


def _store(uri: str, options: storage.Options | None) -> _Store:
    fs, path = storage.filesystem(uri, options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return _LocalStore(path)
    if "s3" in protocols:
        return _S3Store(fs, path)
    return _BestEffortStore(uri, options)


def read(uri: str, options: storage.Options | None = None) -> LeaseRecord | None:
    try:
        got = _store(uri, options).get()
    except FileNotFoundError:
        return None
    return _parse(got[0]) if got is not None else None


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def exit_now(err: LeaseLostError) -> None:
    """The default `on_lost`: say so loudly and end the process before it writes anything more."""
    log.critical("%s: stopping this runner now (exit code %d)", err, LEASE_LOST_EXIT_CODE)
    print(f"FATAL: {err}: this runner stops (exit code {LEASE_LOST_EXIT_CODE})", file=sys.stderr, flush=True)
    os._exit(LEASE_LOST_EXIT_CODE)


class Lease:
    """A held lease; `renew()` extends it, `release()` gives it up. Use `Lease.acquire(...)`."""

    def __init__(self, uri: str, record: LeaseRecord, ttl_seconds: float, options: storage.Options | None,
                 version: str = "") -> None:
        self.uri, self.record, self.ttl, self.options = uri, record, ttl_seconds, options
        self.version = version  # of our own last write: every later write is conditional on it
        self.lost: LeaseLostError | None = None
        self._store = _store(uri, options)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, output: str, *, job: str, stage: str, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                options: storage.Options | None = None, holder: str | None = None) -> Lease:
        uri = storage.join(output, LEASE_FILE)
        store = _store(uri, options)
        holder = holder or holder_identity()
        seen: LeaseRecord | None = None
        deadline = time.monotonic() + ttl_seconds + 5
        while time.monotonic() < deadline:
            now = time.time()
            record = LeaseRecord(holder, job, stage, now, now + ttl_seconds)  # fresh at the moment of writing
            got = store.get()
            if got is None:
                version = store.create(_encode(record))
                if version is not None:
                    return cls(uri, record, ttl_seconds, options, version)
                continue  # another runner created it first: look at theirs
            data, stale_version = got
            current = _parse(data)
            if current is None or current.expired():
                # a crashed holder (or an unreadable object: writes are atomic, so it is not half-written):
                # overwrite exactly the object we read; a second taker's write then fails its condition
                version = store.replace(_encode(record), stale_version)
                if version is not None:
                    return cls(uri, record, ttl_seconds, options, version)
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
        """Extend the lease; LeaseLostError if another runner's write replaced ours."""
        now = time.time()
        record = replace(self.record, expires_at=now + self.ttl)
        version = self._store.replace(_encode(record), self.version)
        if version is None:
            current = read(self.uri, self.options)
            who = current.holder if current is not None else "nobody (it was removed)"
            raise LeaseLostError(
                f"lost the lease {self.uri} of stage {self.record.stage!r} of job {self.record.job!r}: "
                f"it is now held by {who}"
            )
        self.record, self.version = record, version

    def keep_alive(self, interval_seconds: float | None = None,
                   on_lost: Callable[[LeaseLostError], None] = exit_now) -> None:
        """Renew in a background thread every ttl/3 seconds until `release()`. If the lease is lost (another
        runner's write replaced ours, or renewals failed until it expired), `on_lost` is called once."""
        interval = interval_seconds or self.ttl / 3

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                    continue
                except LeaseLostError as err:
                    self.lost = err
                except OSError as err:  # a storage hiccup: try again at the next interval, unless it expired
                    log.warning("could not renew the lease %s: %s", self.uri, err)
                    if not self.record.expired():
                        continue
                    self.lost = LeaseLostError(
                        f"the lease {self.uri} expired while it could not be renewed ({err}); "
                        "another runner may hold it now"
                    )
                if not self._stop.is_set():
                    log.error("%s", self.lost)
                    on_lost(self.lost)
                return

        self._thread = threading.Thread(target=loop, name="vlm-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is None and not self._store.delete(self.version):
            log.warning("the lease %s was no longer ours at release; left as it is", self.uri)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
