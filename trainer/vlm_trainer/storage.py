"""The one storage layer: fsspec URIs (file://, s3://, gs://, plain paths) and committed checkpoints.

Torch-free, so the operator uses the same code to verify a stage's handoff that the trainer uses to
write it. A checkpoint is a folder whose `manifest.json` (files, sizes, sha256, step, stage) is written
LAST: no manifest means not a checkpoint, and readers ignore such a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

MANIFEST = "manifest.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A file:// URI or plain path as a local filesystem path."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URI. Listings are never cached: another process may just have written."""
    opts: dict[str, Any] = {}
    if uri.startswith("s3://"):
        opts = {"use_listings_cache": False, "skip_instance_cache": True}
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
    elif uri.startswith(("gs://", "gcs://")):
        opts = {"use_listings_cache": False, "skip_instance_cache": True}
    return url_to_fs(uri, **opts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    """Write a whole small file (reports, progress, configs)."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True))


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_files(local_dir: str, uri: str) -> list[dict[str, Any]]:
    """Upload every file under `local_dir` into `uri` (no manifest) and return their manifest entries, for
    a folder that several processes write and one commits (`commit_dir(..., uploaded=entries)`)."""
    fs, path = filesystem(uri)
    entries = []
    for root, _dirs, names in os.walk(local_dir):
        for n in sorted(names):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            dst = f"{path}/{rel}"
            fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(full, dst)
            entries.append({"path": rel, "size": os.path.getsize(full), "sha256": _sha256_file(full)})
    return entries


def commit_dir(
    local_dir: str,
    uri: str,
    *,
    step: int,
    stage: str,
    extra: dict[str, Any] | None = None,
    uploaded: list[dict[str, Any]] | None = None,
) -> str:
    """Publish a local folder at `uri` as a committed checkpoint: files first, manifest.json last.

    A stale manifest at `uri` is removed first, so a crash mid-upload never leaves a manifest that
    lists files from another save. `uploaded`: entries of files other processes already put there
    (`upload_files`); the manifest lists them too.
    """
    files = []
    for root, _dirs, names in os.walk(local_dir):
        for n in sorted(names):
            if n == MANIFEST:
                continue
            full = os.path.join(root, n)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            files.append({"path": rel, "size": os.path.getsize(full), "sha256": _sha256_file(full)})
    fs, path = filesystem(uri)
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
    with fs.open(f"{path}/{MANIFEST}", "w") as fh:
        fh.write(json.dumps(manifest, indent=2))
    return uri


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest of a committed checkpoint at `uri`, or None if it has none (or it is unreadable)."""
    fs, path = filesystem(uri)
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


def verify_committed(uri: str, *, check_sha256: bool = False) -> Verification:
    """Is `uri` a complete committed checkpoint? Manifest present, every listed file present with its size
    (and, if asked, its sha256). The operator checks sizes before starting the next stage; the trainer
    checks hashes when it loads."""
    manifest = read_manifest(uri)
    if manifest is None:
        return Verification(False, f"no {MANIFEST} at {uri}")
    fs, path = filesystem(uri)
    for f in manifest.get("files", []):
        p = f"{path}/{f['path']}"
        try:
            size = fs.size(p)
        except FileNotFoundError:
            return Verification(False, f"{uri}: listed file {f['path']} is missing", manifest)
        if size != f["size"]:
            return Verification(False, f"{uri}: {f['path']} has {size} bytes, manifest says {f['size']}", manifest)
        if check_sha256:
            h = hashlib.sha256()
            with fs.open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != f["sha256"]:
                return Verification(False, f"{uri}: {f['path']} sha256 does not match the manifest", manifest)
    return Verification(True, "committed", manifest)


def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """(step, uri) of every committed checkpoint-<step>/ under `output`, oldest first."""
    fs, path = filesystem(output)
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
            if read_manifest(uri) is not None:
                found.append((int(m.group(1)), uri))
    return sorted(found)


def latest_checkpoint(output: str) -> tuple[int, str] | None:
    """The newest committed checkpoint under `output` (folders without a manifest are skipped)."""
    ckpts = list_checkpoints(output)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(output: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints, and any uncommitted one older than them."""
    ckpts = list_checkpoints(output)
    for _step, uri in ckpts[:-keep_last]:
        remove(uri)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder from storage to a local folder (returned). Local URIs are returned as paths, uncopied."""
    if not is_remote(uri):
        return local_path(uri)
    fs, path = filesystem(uri)
    os.makedirs(local_dir, exist_ok=True)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir
