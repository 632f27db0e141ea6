"""A stage's fingerprint: a digest of everything that determines what the stage produces.

Two parts, both read off the schema (no hand list of fields here):
- settings: every field of the stage's resolved config (`TrainerConfig`: the stage, the model, the storage) by
  its wire path, except fields marked `NoEffect` in the schema (where a stage runs, how it is scheduled or
  watched, how fast it goes: `resources.cpu`, `data.workers`, `checkpoint.everySteps`, ...);
- inputs: the CONTENT behind every field marked `ContentOf` in the schema: each data shard's size and etag
  (or mtime), each model folder's files, and the upstream stage's committed `final/` (its manifest's sha256
  of every file). So a change upstream (a stage rerun, a shard rewritten, a new model folder) changes
  the fingerprint of every stage after it: the chain.

The backend (`vlmctl run` or the operator) computes the fingerprint when it launches a stage and passes it in
the config; the trainer stamps it into every manifest it commits (checkpoints and `final/`) and refuses to
resume a checkpoint stamped with another. A committed stage whose fingerprint differs from the job file's is
not done: the backends refuse to reuse it and name the fields that changed (`differences`).
Torch-free: the operator computes the same fingerprint the trainer stamps.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from vlm_core import storage
from vlm_core.kinds import KINDS
from vlm_core.spec import TrainerConfig, content_of, no_effect
from vlm_core.storage_errors import named

VERSION = 1
KEY = "fingerprint"  # the manifest's (and the config's) key of the record
FEW_SHARDS = 8  # up to this many shards of one folder are asked one by one, beyond it the folder is listed
MAX_LISTED_SHARDS = 64  # beyond this, one digest per field instead of one line per shard (keeps configs small)
_SIGNATURE_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "mtime", "LastModified", "updated")


@dataclass(frozen=True)
class Fingerprint:
    """`settings`: wire path -> value of every field that counts; `inputs`: input -> content signature."""

    settings: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        doc = json.dumps({"settings": self.settings, "inputs": self.inputs}, sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        return {"version": VERSION, "digest": self.digest, "settings": self.settings, "inputs": self.inputs}


def _fields(config: TrainerConfig) -> Iterator[tuple[str, Any, Any]]:
    """The config's leaf fields that describe the stage: a stage kind that builds no model (curate: a data stage)
    does not read `model`, so the model's settings and folders are not its inputs."""
    row = KINDS.get(config.stage.type)
    reads_model = row is None or row.reads_model
    for path, info, value in _walk(config, ""):
        if reads_model or not path.startswith("model."):
            yield path, info, value


def _walk(model: BaseModel, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(wire path, FieldInfo, value) of every leaf field of `model`, sub-models and lists of them expanded."""
    for name, info in type(model).model_fields.items():
        path = f"{prefix}{info.alias or info.serialization_alias or name}"
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _walk(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, v in enumerate(value):
                yield from _walk(v, f"{path}[{i}].")
        else:
            yield path, info, value


def settings(config: TrainerConfig) -> dict[str, Any]:
    """Every field that can change the stage's output, by wire path, as JSON values."""
    out: dict[str, Any] = {}
    for path, info, value in _fields(config):
        if no_effect(info) is None:
            out[path] = json.loads(json.dumps(value, default=_json_default))
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, BaseModel):
        return v.model_dump(by_alias=True, mode="json")
    return str(v)


def content_fields(config: TrainerConfig) -> list[tuple[str, str, Any]]:
    """(wire path, content kind, value) of every set field whose content is an input."""
    out: list[tuple[str, str, Any]] = []
    for path, info, value in _fields(config):
        marker = content_of(info)
        if marker is not None and value not in (None, [], ""):
            out.append((path, marker.kind, value))
    return out


def _signature(info: Mapping[str, Any] | None) -> str:
    if info is None:
        return "missing"
    parts = [f"size={info.get('size')}"]
    for key in _SIGNATURE_KEYS:
        if info.get(key) not in (None, ""):
            parts.append(f"{key.lower()}={str(info[key]).strip(chr(34))}")
            break
    return " ".join(parts)


@named("uri")
def _info(uri: str, options: storage.Options | None) -> dict[str, Any] | None:
    fs, path = storage.filesystem(uri, options)
    try:
        return dict(fs.info(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _infos(urls: list[str], options: storage.Options | None) -> dict[str, Any]:
    """Like `_listing`, for just these URLs (one request each)."""
    found = {posixpath.basename(u.rstrip("/")): _info(u, options) for u in urls}
    return {name: info for name, info in found.items() if info is not None}


@named("uri")
def _listing(uri: str, options: storage.Options | None) -> dict[str, Any]:
    """A folder's entries by name, with their info (size, etag or mtime); {} when it does not exist."""
    fs, path = storage.filesystem(uri, options)
    try:
        return {posixpath.basename(str(e["name"]).rstrip("/")): e for e in fs.ls(path, detail=True)}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _stats(urls: list[str], options: storage.Options | None) -> dict[str, str]:
    """Each URL's signature, one listing per parent folder (not one request per shard)."""
    out: dict[str, str] = {}
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(posixpath.dirname(url.rstrip("/")), []).append(url)
    for parent, members in by_parent.items():
        # A few shards in a big folder (a storage root holding every job's outputs): one request per shard,
        # never a listing whose size grows with everything else stored there. Many shards: one listing.
        listing = _listing(parent, options) if len(members) > FEW_SHARDS else _infos(members, options)
        for url in members:
            out[url] = _signature(listing.get(posixpath.basename(url.rstrip("/"))))
    return out


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@named("uri")
def _folder(uri: str, options: storage.Options | None) -> str:
    fs, path = storage.filesystem(uri, options)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        return "missing"
    root = path.rstrip("/") + "/"
    lines = sorted(f"{name[len(root):] if name.startswith(root) else name} {_signature(info)}"
                   for name, info in found.items())
    return f"{len(lines)} files, digest {_digest(lines)}"


def _checkpoint(uri: str, options: storage.Options | None) -> str:
    manifest = storage.read_manifest(uri, options=options)
    if manifest is None:
        return "not committed"
    files = sorted(f"{f.get('path')} {f.get('sha256') or f.get('size')}" for f in manifest.get("files", []))
    return f"{len(files)} files, digest {_digest(files)}"


def inputs(config: TrainerConfig, options: storage.Options | None = None) -> dict[str, str]:
    """The content signature of every input the config names (reads storage: listings and manifests)."""
    out: dict[str, str] = {}
    for path, content_kind, value in content_fields(config):
        if content_kind == "shards":
            urls = storage.expand_shards(value, field=path)
            stats = _stats(urls, options)
            if len(urls) > MAX_LISTED_SHARDS:
                out[path] = f"{len(urls)} shards, digest {_digest([f'{u} {stats[u]}' for u in urls])}"
            else:
                out.update({f"{path}: {u}": stats[u] for u in urls})
        elif content_kind == "folder":
            out[f"{path}: {value}"] = _folder(value, options)
        elif content_kind == "file":
            out[f"{path}: {value}"] = _stats([value], options)[value]
        else:  # checkpoint
            out[path] = _checkpoint(value, options)
    return out


def compute(config: TrainerConfig, options: storage.Options | None = None) -> Fingerprint:
    """The fingerprint of the stage `config` describes, with its inputs as they are in storage now."""
    return Fingerprint(settings(config), inputs(config, options))


def stamped(config: TrainerConfig, options: storage.Options | None = None) -> TrainerConfig:
    """`config` with its fingerprint computed and set (what a backend launches)."""
    return config.model_copy(update={"fingerprint": compute(config, options).record()})


def recorded(manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The fingerprint record stamped into a committed manifest, if any."""
    record = (manifest or {}).get(KEY)
    return record if isinstance(record, dict) and "digest" in record else None


def _show(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(old: Mapping[str, Any] | None, new: Fingerprint | Mapping[str, Any]) -> list[str]:
    """What changed from the `old` record (a manifest's) to `new`, one line per field or input:
    `stage.optimizer.lr: 0.0001 -> 0.0005`. Empty when the digests agree, or when they differ only by fields one
    side lacks and the other has as null: a field a later release added (unset, so null) changes nothing that
    was committed before it existed."""
    new_record = new.record() if isinstance(new, Fingerprint) else dict(new)
    if old is None:
        return ["no fingerprint: committed by an older release, so what produced it is unknown"]
    if old.get("digest") == new_record.get("digest"):
        return []
    lines, unset_only = [], 0
    for section, label in (("settings", ""), ("inputs", "input ")):
        a, b = old.get(section) or {}, new_record.get(section) or {}
        for key in sorted(set(a) | set(b)):
            was, now = a.get(key, _ABSENT), b.get(key, _ABSENT)
            if was == now:
                continue
            if (was is None and now is _ABSENT) or (was is _ABSENT and now is None):  # unset either way
                unset_only += 1
                continue
            lines.append(f"{label}{key}: {_show(was) if key in a else '(absent)'} -> {_show(now) if key in b else '(absent)'}")
    if lines or unset_only:
        return lines
    return ["the fingerprint's format changed"]


_ABSENT = object()
