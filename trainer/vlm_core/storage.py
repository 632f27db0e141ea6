"""The one storage layer: fsspec URIs (file://, s3://, gs://, plain paths) and committed checkpoints.

Torch-free, so the operator uses the same code to verify a stage's handoff that the trainer uses to
write it. Every function takes `options`: fsspec keyword options of the job's storage (endpoint,
credentials; see `s3_options`), so one process can serve jobs on different endpoints. Without them
the filesystem's own defaults apply (for S3, botocore reads AWS_* from the environment: that is how a
trainer pod, whose environment belongs to one job, gets its Secret). A checkpoint is a folder whose `manifest.json` (files, sizes, sha256, step, stage) is written
LAST: no manifest means not a checkpoint, and readers ignore such a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec
from fsspec.core import url_to_fs

from vlm_core.storage_errors import NO_BUCKET, URI_FIELD, StorageError, classify, named, named_error

# gcsfs logs its retries and fallbacks with tracebacks; without a handler of the application's they would
# reach the screen (logging's last resort). The StorageError raised in the end says what went wrong.
logging.getLogger("gcsfs").addHandler(logging.NullHandler())

MANIFEST = "manifest.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def expand_shards(patterns: Iterable[str], *, field: str = "shards") -> list[str]:
    """Shard URIs with brace patterns (`train-{000..003}.tar`) expanded, order kept: the one expansion the
    operator's planner and preflight and the trainer's data and curate readers all use. `field` names the
    spec field in the error when nothing is left."""
    urls = [u for pattern in patterns for u in braceexpand.braceexpand(pattern)]
    if not urls:
        raise ValueError(f"{field}: no shard URLs after brace expansion")
    return urls


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A file:// URI or plain path as a local filesystem path."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


Options = Mapping[str, Any]


def s3_options(
    *, endpoint_url: str | None = None, key: str | None = None, secret: str | None = None,
    token: str | None = None, region: str | None = None,
) -> dict[str, Any]:
    """fsspec/s3fs options for one job's S3 storage; unset values fall back to botocore's defaults."""
    opts: dict[str, Any] = {}
    if key and secret:
        opts.update(key=key, secret=secret)
        if token:
            opts["token"] = token
    client: dict[str, Any] = {}
    if endpoint_url:
        client["endpoint_url"] = endpoint_url
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    return opts


def filesystem(uri: str, options: Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URI. Listings are never cached: another process may just have written."""
    opts: dict[str, Any] = {}
    if uri.startswith(("s3://", "gs://", "gcs://")):
        opts = {"use_listings_cache": False, "skip_instance_cache": True, **(options or {})}
    if uri.startswith(("gs://", "gcs://")) and "token" not in opts and not os.environ.get("STORAGE_EMULATOR_HOST"):
        # Application Default Credentials or a clear "no credentials", never a silent anonymous fallback
        # that only fails after a minute of retries.
        opts["token"] = "google_default"
    return url_to_fs(uri, **opts)


@named()
def exists(uri: str, *, options: Options | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


@named()
def read_text(uri: str, *, options: Options | None = None) -> str:
    fs, path = filesystem(uri, options)
    with fs.open(path, "r") as f:
        return f.read()


@named()
def read_head(uri: str, n: int, *, options: Options | None = None) -> bytes:
    """The first `n` bytes of a file (a preflight look at a shard without reading it all)."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        return f.read(n)


def write_text(uri: str, text: str, *, options: Options | None = None) -> None:
    """Write a whole small file (reports, progress, configs)."""
    write_bytes(uri, text.encode(), options=options)


@named()
def read_bytes(uri: str, *, options: Options | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        return f.read()


@named(retry=True)
def write_bytes(uri: str, data: bytes, *, atomic: bool = False, options: Options | None = None) -> None:
    """Write a whole file; `atomic`: under a temporary name, then moved, so a reader never sees half of it."""
    fs, path = filesystem(uri, options)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    target = f"{path}.tmp-{os.getpid()}-{id(data)}" if atomic else path
    with fs.open(target, "wb") as f:
        f.write(data)
    if atomic:
        fs.mv(target, path)


def read_json(uri: str, *, options: Options | None = None) -> Any:
    return json.loads(read_text(uri, options=options))


def write_json(uri: str, obj: Any, *, options: Options | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True), options=options)


@named(retry=True)
def remove(uri: str, *, options: Options | None = None) -> None:
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(src: str, dst: str, *, options: Options | None = None) -> bool:
    """Move the folder (or file) `src` to `dst` on the same storage (a rename locally; copy, then delete on
    object stores). False when `src` does not exist."""
    fs, src_path = filesystem(src, options)
    _, dst_path = filesystem(dst, options)
    if not fs.exists(src_path):
        return False
    parent = dst_path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if local or not fs.isdir(src_path):
        fs.mv(src_path, dst_path, recursive=True)
        return True
    # An object store: copy the objects one by one (a recursive mv also copies the folder markers some
    # servers list, e.g. SeaweedFS, and fails on them), then delete. Repeating it after a crash is safe.
    root = src_path.rstrip("/") + "/"
    for key in fs.find(src_path):
        if key.startswith(root):
            fs.copy(key, f"{dst_path.rstrip('/')}/{key[len(root):]}")
    fs.rm(src_path, recursive=True)
    return True


def _sha256(f: Any) -> str:
    """sha256 of an open binary file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


@named(retry=True)
def upload_files(local_dir: str, uri: str, *, options: Options | None = None) -> list[dict[str, Any]]:
    """Upload every file under `local_dir` into `uri` (no manifest) and return their manifest entries, for
    a folder that several processes write and one commits (`commit_dir(..., uploaded=entries)`)."""
    fs, path = filesystem(uri, options)
    entries = []
    for root, _dirs, names in os.walk(local_dir):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            dst = f"{path}/{rel}"
            fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(full, dst)
            with open(full, "rb") as fh:
                entries.append({"path": rel, "size": os.path.getsize(full), "sha256": _sha256(fh)})
    return entries


@named(retry=True)
def commit_dir(
    local_dir: str,
    uri: str,
    *,
    step: int,
    stage: str,
    extra: dict[str, Any] | None = None,
    uploaded: list[dict[str, Any]] | None = None,
    options: Options | None = None,
) -> str:
    """Publish a local folder at `uri` as a committed checkpoint: files first, manifest.json last.

    A stale manifest at `uri` is removed first, so a crash mid-upload never leaves a manifest that
    lists files from another save. `uploaded`: entries of files other processes already put there
    (`upload_files`); the manifest lists them too.
    """
    files: list[dict[str, Any]] = []
    for root, _dirs, names in os.walk(local_dir):
        for n in sorted(names):
            if n == MANIFEST:
                continue
            full = os.path.join(root, n)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            with open(full, "rb") as fh:
                files.append({"path": rel, "size": os.path.getsize(full), "sha256": _sha256(fh)})
    fs, path = filesystem(uri, options)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")
    fs.makedirs(path, exist_ok=True)
    for f in files:
        src = os.path.join(local_dir, f["path"])
        dst = f"{path}/{f['path']}"
        if "/" in f["path"]:
            fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(src, dst)
    files += uploaded or []
    manifest = {"step": step, "stage": stage, "files": files, "committed_at": time.time(), **(extra or {})}
    write_text(join(uri, MANIFEST), json.dumps(manifest, indent=2), options=options)
    return uri


@named()
def read_manifest(uri: str, *, options: Options | None = None) -> dict[str, Any] | None:
    """The manifest of a committed checkpoint at `uri`, or None if it has none (or it is unreadable)."""
    fs, path = filesystem(uri, options)
    try:
        with fs.open(f"{path}/{MANIFEST}", "r") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Verification:
    ok: bool
    reason: str
    manifest: dict[str, Any] | None = None


@named()
def verify_committed(uri: str, *, check_sha256: bool = False, options: Options | None = None) -> Verification:
    """Is `uri` a complete committed checkpoint? Manifest present, every listed file present with its size
    (and, if asked, its sha256). The operator checks sizes before starting the next stage; the trainer
    checks hashes when it loads."""
    manifest = read_manifest(uri, options=options)
    if manifest is None:
        return Verification(False, f"no {MANIFEST} at {uri}")
    fs, path = filesystem(uri, options)
    for f in manifest.get("files", []):
        p = f"{path}/{f['path']}"
        try:
            size = fs.size(p)
        except FileNotFoundError:
            return Verification(False, f"{uri}: listed file {f['path']} is missing", manifest)
        if size != f["size"]:
            return Verification(False, f"{uri}: {f['path']} has {size} bytes, manifest says {f['size']}", manifest)
        if check_sha256:
            with fs.open(p, "rb") as fh:
                digest = _sha256(fh)
            if digest != f["sha256"]:
                return Verification(False, f"{uri}: {f['path']} sha256 does not match the manifest", manifest)
    return Verification(True, "committed", manifest)


@named("output")
def _checkpoint_folders(output: str, options: Options | None) -> list[tuple[int, str, bool]]:
    """(step, uri, committed) of every checkpoint-<step>/ folder under `output`, oldest first."""
    fs, path = filesystem(output, options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        name = e.rstrip("/").rsplit("/", 1)[-1]
        m = _CKPT_RE.match(name)
        if m:
            uri = join(output, name)
            found.append((int(m.group(1)), uri, read_manifest(uri, options=options) is not None))
    return sorted(found)


def list_checkpoints(output: str, *, options: Options | None = None) -> list[tuple[int, str]]:
    """(step, uri) of every committed checkpoint-<step>/ under `output`, oldest first."""
    return [(step, uri) for step, uri, committed in _checkpoint_folders(output, options) if committed]


def uncommitted_checkpoints(output: str, *, options: Options | None = None) -> list[str]:
    """checkpoint-<step>/ folders under `output` that have no manifest (never loaded; reported)."""
    return [uri for _step, uri, committed in _checkpoint_folders(output, options) if not committed]


def latest_checkpoint(output: str, *, options: Options | None = None) -> tuple[int, str] | None:
    """The newest committed checkpoint under `output` (folders without a manifest are skipped)."""
    ckpts = list_checkpoints(output, options=options)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(output: str, keep_last: int, *, options: Options | None = None) -> None:
    """Delete all but the newest `keep_last` committed checkpoints, and any uncommitted one older than them."""
    ckpts = list_checkpoints(output, options=options)
    for _step, uri in ckpts[:-keep_last]:
        remove(uri, options=options)


@named(retry=True)
def download_dir(uri: str, local_dir: str, *, options: Options | None = None) -> str:
    """Copy a folder from storage to a local folder (returned). Local URIs are returned as paths, uncopied."""
    if not is_remote(uri):
        return local_path(uri)
    fs, path = filesystem(uri, options)
    os.makedirs(local_dir, exist_ok=True)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir


PROBE_PREFIX = ".vlm-storage-probe-"


def check_writable(uri: str, *, options: Options | None = None, field: str = URI_FIELD) -> None:
    """The storage preflight: `uri`'s bucket exists, the credentials work and may write there (a small
    probe object is written and removed again). Raises a StorageError naming the field to fix."""
    import uuid

    probe = join(uri, PROBE_PREFIX + uuid.uuid4().hex[:12])
    try:
        if is_remote(uri):
            # Few tries for this first look: an endpoint that does not answer is said in about a second.
            quick = {"config_kwargs": {"retries": {"max_attempts": 3}}} if uri.startswith("s3://") else {}
            fs, path = filesystem(uri, {**quick, **(options or {})})
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)
            except FileNotFoundError as err:
                raise named_error(NO_BUCKET, "NoSuchBucket", uri, options, field=field) from err
            except PermissionError:
                pass  # may not list or head the bucket; the write below says what is wrong
        write_bytes(probe, b"probe", options=options)
        remove(probe, options=options)
    except StorageError as err:  # said of the prefix checked, not of the probe object
        raise named_error(err.kind, err.detail, uri, options, field=field) from None
    except Exception as err:
        named_err = classify(err, uri, options, field=field)
        if named_err is None:
            raise
        raise named_err from err
