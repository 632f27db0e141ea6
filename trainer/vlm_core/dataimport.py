"""`vlmctl data import`: the formats VLM data ships in -> this project's WebDataset shards (torch-free).

Inputs (one or more files, any storage URI, brace patterns allowed), read in order as one record list:
- `.json`: a JSON list of records (LLaVA `llava_v1_5_mix665k.json`, ShareGPT / ShareGPT4V, preference JSON);
- `.jsonl`: one record per line;
- `.parquet`: Hugging Face dataset shards (images embedded as `{bytes, path}`; `messages` / `texts` /
  `conversations`, or `chosen` / `rejected` columns), read one row group at a time.
Each record goes through the one normaliser (`vlm_core.records`, which the trainer's Parquet source uses
too); image paths resolve against `image_root` (local, s3://, gs://; default: the input file's folder).
Every image is decoded once with PIL: a missing file is `image_missing`, bytes PIL cannot decode are
`image_unreadable`; PNG, JPEG and WebP bytes are written as they are, other formats (GIF, BMP, TIFF)
re-encoded as PNG.

Output: `<output>/shard-NNNNNN.tar` (WebDataset: `<key>.json` + `<key>.jpg`, or `<key>.0.jpg`,
`<key>.1.png`, ... for several images; key = the record's index, zero-padded), then `manifest.json`
LAST (the storage layer's commit protocol: files with sizes and sha256, the import's summary and the
format to train with). Samples keep the input's order; a shard closes before the sample that would
take it past `shard_bytes`, so the same inputs and size give the same shards whatever the worker count.

Parallel: worker processes normalise records and read and check images, a block of records (or one
Parquet row group) per task; the main process assembles the shards in record order.

Resumable: each shard is followed by its state file `<output>/.import/shard-NNNNNN.json` (the records it
covers, its size and sha256, the records skipped and why); a re-run with the same inputs and settings
keeps every shard whose state file and tar agree and continues after the last one. Other inputs or
settings in the same output are refused. `dry_run` reads and checks everything and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vlm_core import parquet, records, storage

SHARD = "shard-{index:06d}.tar"
STATE_DIR = ".import"
SHOWN_IDS = 5  # offending record ids kept per reason
BLOCK = 256  # JSON records per worker task
STATE_VERSION = 1
FORMAT_MISMATCH = "format_mismatch"


class ImportProblem(ValueError):
    """Bad input or a bad setting: one line naming the option or input and what is accepted."""


@dataclass
class ImportSettings:
    inputs: list[str]
    output: str
    image_root: str | None = None
    shard_bytes: int = 256 << 20
    workers: int = 2
    dry_run: bool = False
    format: str | None = None  # conversation | preference; None: the first usable record's
    options: storage.Options | None = None


@dataclass
class Summary:
    """What an import did (or, dry, would do)."""

    records: int = 0
    samples: int = 0
    shards: int = 0
    shards_kept: int = 0  # committed by an earlier run, skipped
    bytes: int = 0
    format: str = ""
    markers_added: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    dry_run: bool = False
    output: str = ""

    def skip(self, reason: str, rid: str, n: int = 1, ids: list[str] | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n
        shown = self.skipped_ids.setdefault(reason, [])
        for i in ids if ids is not None else [rid]:
            if len(shown) < SHOWN_IDS:
                shown.append(i)

    def add(self, state: dict[str, Any]) -> None:
        """Fold in a committed shard's state (a resumed run's summary covers the whole import)."""
        self.samples += state["samples"]
        self.bytes += state["size"]
        self.markers_added += state.get("markers_added", 0)
        for reason, n in state["skipped"].items():
            self.skip(reason, "", n, state["skipped_ids"].get(reason, []))

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One worker task: records [first, first + len) of the import, as records or as a Parquet row group."""

    first: int
    records: list[Any] | None = None
    group: parquet.RowGroup | None = None
    base: str = ""  # the input file's folder (image paths' default root)

    @property
    def size(self) -> int:
        return len(self.records) if self.records is not None else (self.group.rows if self.group else 0)


def _load_json(url: str, options: storage.Options | None) -> list[Any]:
    try:
        text = storage.read_bytes(url, options=options).decode("utf-8")
    except FileNotFoundError:
        raise ImportProblem(f"input: {url} does not exist") from None
    except UnicodeDecodeError as err:
        raise ImportProblem(f"input: {url} is not UTF-8 text ({err})") from None
    if url.lower().endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    out.append({"__bad_json__": f"line {n}: {err}"})
        return out
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ImportProblem(f"input: {url} is not valid JSON ({err}); a .json input is a list of records") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise ImportProblem(f"input: {url} must hold a JSON list of records, got {type(doc).__name__}")
    return doc


def _units(urls: list[str], options: storage.Options | None) -> Iterator[Unit]:
    first = 0
    for url in urls:
        base = url.rsplit("/", 1)[0] if "/" in url else "."
        if parquet.is_parquet(url):
            try:
                groups = parquet.row_groups(url, options=options)
            except FileNotFoundError:
                raise ImportProblem(f"input: {url} does not exist") from None
            except ValueError as err:
                raise ImportProblem(f"input: {url} is not a readable Parquet file ({err})") from None
            for g in groups:
                yield Unit(first, group=g, base=base)
                first += g.rows
        elif url.lower().endswith((".json", ".jsonl")):
            recs = _load_json(url, options)
            for i in range(0, len(recs), BLOCK):
                yield Unit(first + i, records=recs[i:i + BLOCK], base=base)
            first += len(recs)
        else:
            raise ImportProblem(f"input: {url}: accepted inputs are .json (a list of records), .jsonl or .parquet")


def _unit_records(unit: Unit, options: storage.Options | None) -> list[Any]:
    if unit.records is not None:
        return unit.records
    assert unit.group is not None
    return [row for _n, row in parquet.read_rows(unit.group, options=options)]


# --- one record -------------------------------------------------------------------------------------

_FS: dict[str, Any] = {}  # per process: a filesystem per image root (an S3 client is costly to create)


def _read_image(ref: records.ImageRef, root: str, options: storage.Options | None) -> bytes:
    if ref.data is not None:
        return ref.data
    assert ref.path is not None
    uri = ref.path if "://" in ref.path or ref.path.startswith("/") else storage.join(root, ref.path)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme not in _FS:
        _FS[scheme] = storage.filesystem(uri, options)[0]
    fs = _FS[scheme]
    path = fs._strip_protocol(uri)
    try:
        with fs.open(path, "rb") as f:
            return bytes(f.read())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise records.RecordError(f"image {uri} does not exist", "image_missing") from None


def _checked(data: bytes, where: str) -> tuple[bytes, str]:
    """(bytes to write, extension): decoded once with PIL; PNG/JPEG/WebP kept as they are, others as PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            ext = records.image_ext(data)
            if ext is None:
                out = io.BytesIO()
                im.convert("RGB").save(out, format="PNG")
                return out.getvalue(), "png"
            return data, ext
    except Exception as err:  # PIL raises many types for corrupt data
        raise records.RecordError(f"{where}: cannot be decoded ({type(err).__name__}: {err})"[:300],
                                  "image_unreadable") from None


Result = tuple[int, str, bytes | None, str | None, bool]  # index, id, the sample's tar members, reason, added


def tar_members(key: str, members: list[tuple[str, bytes]]) -> bytes:
    """A sample's members as tar bytes (a header per member, data padded to 512-byte blocks; mtime 0, mode
    0644, no owner): built by the worker, so the main process only concatenates them into a shard."""
    out = []
    for ext, data in members:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        out += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data,
                b"\0" * (-len(data) % tarfile.BLOCKSIZE)]
    return b"".join(out)


def process_record(record: Any, index: int, fmt: str | None, root: str,
                   options: storage.Options | None = None) -> Result:
    """One record -> (index, id, the sample as tar members or None, skip reason or None, markers added)."""
    rid = records.record_id(record, index) if isinstance(record, dict) else str(index)
    if isinstance(record, dict) and "__bad_json__" in record:
        return index, rid, None, "bad_record", False
    try:
        normal = records.normalise(record, index)
        if fmt is not None and normal.format != fmt:
            return index, rid, None, FORMAT_MISMATCH, False
        datas, exts = [], []
        for i, ref in enumerate(normal.images):
            data, ext = _checked(_read_image(ref, root, options), f"record {rid}: image[{i}]")
            datas.append(data)
            exts.append(ext)
        key = f"{index:09d}"
        raw = records.raw_sample(normal, datas, exts, key, "")
        members = [(name, raw[name]) for name in ["json", *records.member_names(exts)]]
        return index, rid, tar_members(key, members), None, normal.markers_added
    except records.RecordError as err:
        return index, rid, None, err.reason, False


_CTX: dict[str, Any] = {}


def _init(image_root: str | None, fmt: str | None, options: storage.Options | None) -> None:
    _CTX.update(image_root=image_root, fmt=fmt, options=options)


def _process_unit(unit: Unit, skip_before: int = 0) -> list[Result]:
    root = _CTX["image_root"] or unit.base
    out = []
    for i, record in enumerate(_unit_records(unit, _CTX["options"])):
        index = unit.first + i
        if index >= skip_before:
            out.append(process_record(record, index, _CTX["fmt"], root, _CTX["options"]))
    return out


def _task(args: tuple[Unit, int]) -> list[Result]:
    return _process_unit(*args)


# --- shards -----------------------------------------------------------------------------------------


_END = b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive


class _Shard:
    def __init__(self, index: int, first: int):
        self.index, self.first, self.next = index, first, first
        self.samples: list[bytes] = []  # each sample's tar members
        self.size = len(_END)
        self.summary = Summary()

    def tar(self) -> bytes:
        return b"".join([*self.samples, _END])


def _signature(settings: ImportSettings, urls: list[str], fmt: str) -> str:
    """What the shards depend on: inputs (and their sizes), image root, shard size, format."""
    sizes = []
    for u in urls:
        fs, path = storage.filesystem(u, settings.options)
        sizes.append(f"{u} {fs.size(path)}")
    key = json.dumps([STATE_VERSION, sizes, settings.image_root, settings.shard_bytes, fmt])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _state_uri(output: str, index: int) -> str:
    return storage.join(output, STATE_DIR, SHARD.format(index=index).replace(".tar", ".json"))


def _committed(settings: ImportSettings, signature: str) -> list[dict[str, Any]]:
    """States of the shards an earlier run of this import committed (in order, up to the first gap)."""
    out: list[dict[str, Any]] = []
    fs, base = storage.filesystem(settings.output, settings.options)
    while True:
        uri = _state_uri(settings.output, len(out))
        if not storage.exists(uri, options=settings.options):
            return out
        state = storage.read_json(uri, options=settings.options)
        if state.get("signature") != signature:
            raise ImportProblem(
                f"--output: {settings.output} holds shards of another import (other inputs, --image-root, "
                "--shard-size or --format); use another --output, or remove it to start again")
        try:
            if fs.size(f"{base.rstrip('/')}/{state['file']}") != state["size"]:
                return out
        except FileNotFoundError:
            return out
        out.append(state)


def detect_format(settings: ImportSettings, units: list[Unit]) -> str:
    """The format of the import: --format, else the first record that normalises (no image read)."""
    if settings.format is not None:
        if settings.format not in ("conversation", "preference"):
            raise ImportProblem(f"--format: must be conversation or preference, got {settings.format!r}")
        return settings.format
    for unit in units:
        for i, record in enumerate(_unit_records(unit, settings.options)):
            try:
                return records.normalise(record, unit.first + i).format
            except records.RecordError:
                continue
    raise ImportProblem("input: no record could be read as a conversation or preference sample (see vlmctl data "
                       "import --help for the layouts accepted)")


def run_import(settings: ImportSettings, progress: Callable[[int, int], None] | None = None) -> Summary:
    """Import `settings.inputs` into shards at `settings.output` (see the module doc); returns the summary.
    `progress(done, total)` is called as records are processed."""
    started = time.perf_counter()
    if settings.shard_bytes < 1 << 16:
        raise ImportProblem(f"--shard-size: at least 64 KiB, got {settings.shard_bytes} bytes")
    if settings.workers < 0:
        raise ImportProblem(f"--workers: 0 or more, got {settings.workers}")
    urls = storage.expand_shards(settings.inputs, field="input")
    units = list(_units(urls, settings.options))
    total = sum(u.size for u in units)
    fmt = detect_format(settings, units)
    summary = Summary(records=total, format=fmt, dry_run=settings.dry_run, output=settings.output)
    signature = _signature(settings, urls, fmt)
    kept = [] if settings.dry_run else _committed(settings, signature)
    for state in kept:
        summary.add(state)
    summary.shards_kept = len(kept)
    start = kept[-1]["next"] if kept else 0
    entries = [{"path": s["file"], "size": s["size"], "sha256": s["sha256"]} for s in kept]
    todo = [(u, start) for u in units if u.first + u.size > start]
    done = start
    if progress:
        progress(done, total)

    shard = _Shard(len(kept), start)

    def close(current: _Shard) -> None:
        if not current.samples:  # nothing to write: only skipped records since the last shard (counted)
            for reason, n in current.summary.skipped.items():
                summary.skip(reason, "", n, current.summary.skipped_ids.get(reason, []))
            return
        data = current.tar()
        name = SHARD.format(index=current.index)
        digest = hashlib.sha256(data).hexdigest()
        state = {"file": name, "index": current.index, "first": current.first, "next": current.next,
                 "samples": len(current.samples), "size": len(data), "sha256": digest, "signature": signature,
                 "skipped": current.summary.skipped, "skipped_ids": current.summary.skipped_ids,
                 "markers_added": current.summary.markers_added}
        if not settings.dry_run:
            uri = storage.join(settings.output, name)
            storage.write_bytes(uri, data, atomic=not storage.is_remote(uri), options=settings.options)
            storage.write_json(_state_uri(settings.output, current.index), state, options=settings.options)
        entries.append({"path": name, "size": len(data), "sha256": digest})
        summary.add(state)
        summary.shards += 1

    results: Iterator[list[Result]]
    pool = None
    if settings.workers > 1:
        pool = multiprocessing.get_context("fork").Pool(
            settings.workers, initializer=_init, initargs=(settings.image_root, fmt, settings.options))
        results = pool.imap(_task, todo)
    else:
        _init(settings.image_root, fmt, settings.options)
        results = (_task(t) for t in todo)
    try:
        for batch in results:
            for index, rid, members, reason, added in batch:
                if members is None:
                    shard.summary.skip(reason or "bad_record", rid)
                else:
                    if shard.samples and shard.size + len(members) > settings.shard_bytes:
                        close(shard)
                        shard = _Shard(shard.index + 1, index)
                    shard.samples.append(members)
                    shard.size += len(members)
                    shard.summary.markers_added += int(added)
                shard.next = index + 1
            done += len(batch)
            if progress:
                progress(done, total)
        close(shard)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.shards += len(kept)
    summary.seconds = time.perf_counter() - started
    if not settings.dry_run:
        with tempfile.TemporaryDirectory() as empty:
            storage.commit_dir(empty, settings.output, step=0, stage="import", uploaded=entries,
                               extra={"import": {k: v for k, v in summary.as_dict().items() if k != "seconds"}},
                               options=settings.options)
    return summary


def shard_pattern(output: str, shards: int) -> str:
    """The data.shards pattern naming an import's shards."""
    last = max(shards - 1, 0)
    return storage.join(output, "shard-{000000.." + f"{last:06d}" + "}.tar" if shards > 1 else SHARD.format(index=0))


def render(summary: Summary) -> str:
    """The summary a person reads: samples written, skipped by reason with the first offending ids."""
    verb = "would write" if summary.dry_run else "wrote"
    kept = f" ({summary.shards_kept} kept from an earlier run)" if summary.shards_kept else ""
    rate = summary.records / summary.seconds if summary.seconds > 0 else 0.0
    lines = [
        f"{summary.records} records -> {verb} {summary.samples} {summary.format} samples in {summary.shards} "
        f"shard(s){kept}, {summary.bytes / 1e6:.1f} MB ({summary.seconds:.1f} s, {rate:.0f} records/s)",
    ]
    if summary.markers_added:
        lines.append(f"  <image> marker added to the first user turn of {summary.markers_added} record(s) that had none")
    bad = sum(summary.skipped.values())
    lines.append(f"  skipped {bad} record(s)" + (":" if bad else ""))
    for reason, n in sorted(summary.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        ids = ", ".join(summary.skipped_ids.get(reason, []))
        lines.append(f"    {reason}: {n} (first: {ids})")
    if not summary.dry_run and summary.shards:
        lines.append(f"  train with data.format: {summary.format}, data.shards: "
                     f"[{shard_pattern(summary.output, summary.shards)}]")
    return "\n".join(lines)


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)
