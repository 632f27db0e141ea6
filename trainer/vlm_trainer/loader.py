"""The training data loader: worker processes, exact resume, bad samples skipped and counted, packing.

One rank's sample stream is fixed before any worker sees it: the sources' deterministic streams
(`vlm_trainer.data.TrainStream`, one per source) interleaved by `data.mix_order`. Sample j of that stream
(counted from where the loader started) belongs to chunk c = j // K (K = `chunk` samples), which is decoded,
image-processed and tokenized by worker c mod W of a `torch.utils.data.DataLoader` with W = `data.workers`
processes; every worker reads the rank's raw stream (tar bytes only: cheap) and encodes just its share. The
DataLoader hands chunks back in index order (round-robin over workers, `in_order`), so the training process
sees EXACTLY the stream order whatever W and K are — a sample that turns out bad still produces an item (a
skip record), so no worker ever gets out of step.

Position (checkpointed per rank, `data.LoaderPosition`): for every source, (epoch, samples consumed in it)
counted over the items the training loop has TAKEN — items prefetched by workers but not yet taken are not
counted and are simply produced again after a resume. Where each worker stands follows from it: chunks are
counted from the position again, worker w takes chunks w, w+W, ... So a resumed run, with any W, yields the
batches the uninterrupted run would have, sample for sample.

Bad samples (`SampleError.reason`: missing_field, bad_json, image_decode, no_assistant_turn, too_long,
identical_pair, too_many_images, ...; `truncated_shard` from the tar reader) are skipped, counted by reason
and by shard in the position (so the counts survive a resume), logged with the shard and key, and passed
to `on_bad` (the Prometheus counter). The share rule (`data.maxBadSampleShare`, `bad_share_exceeded`) is
checked here on this rank's counts as each bad sample arrives (so data that is all bad fails instead of
being searched forever) and by the trainer after every step on all ranks' counts (one decision for all).

Packing (`next_packed`): consecutive good samples while they fit the token budget; the first sample that
does not fit is held back (not yet counted as consumed) and opens the next row.

Transport (measured on the quickstart, bench/results/issue10/README.md): with `batch_size=None` every sample
crossed the worker -> trainer queue as its own message, its tensors moved to shared memory one file
descriptor each: ~2.3 ms of the TRAINING process per sample, more than encoding it in-process (~1 ms). So
workers now send CHUNKS: worker w encodes the consecutive samples of chunks c = w, w+W, ... (chunk c = stream
samples cK .. cK+K-1, K = `chunk`), each sample's payload pickled to plain bytes with its pixel tensors as
numpy arrays, and the chunk travels as one message. The order is still the stream order whatever W and K are
(chunks round-robin, `in_order`). Since issue 10d the message is columnar (`pack_chunk`): with one image shape in
the chunk all its images are stacked into one array, the training process unpickles ONE object and takes views,
and `samples.collate` slices a micro-batch that is a run of one chunk's images instead of stacking it: the
training process's cost per quickstart micro-batch of 32 fell from ~1.5 to ~0.9 ms (thread CPU).

Encoded-sample cache (`data.cacheMiB`): encoding is a pure function of the raw sample's bytes (the encoder
has no random augmentation), so the packed payload (or the bad-sample verdict) is kept by a digest of those
bytes (BLAKE2b over every member, key and url included, ~0.01 ms) until the cap is reached (then nothing more
is added; no eviction). A later epoch re-reads the tar (the order and the position stay exactly as without
the cache) but skips decode, image processing and tokenization. Results are byte-identical to uncached. Each
worker (or the training process with workers 0) holds its own cache; a worker only sees every W-th chunk of
each epoch, so with W > 1 the same sample may be cached by several workers (the cap bounds each).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_trainer.data import DataPosition, LoaderPosition, TrainStream, check_sources, mix_order
from vlm_trainer.packing import fits
from vlm_trainer.samples import Encoded, EncodedPair, SampleError

log = logging.getLogger(__name__)

Encode = Callable[[dict[str, Any], str], Encoded | EncodedPair]
_LOGGED_BAD_PER_REASON = 5  # each rank logs the first few skips of each reason; all are counted


class BadDataError(RuntimeError):
    """More than data.maxBadSampleShare of the samples read is bad: the stage stops (the message names shards)."""


@dataclass
class Source:
    """One source of the mix (the trainer's view of `DataSourceSpec`)."""

    shards: list[str]
    format: str
    weight: float = 1.0


@dataclass
class Item:
    """What a worker returns for one sample of the stream: the encoded sample, or why it was skipped."""

    source: int
    epoch: int
    consumed: int  # the source's samples consumed in `epoch` once this one is taken
    key: str | None
    shard: str
    payload: Encoded | EncodedPair | None
    reason: str | None = None
    detail: str | None = None

    @property
    def length(self) -> int:
        assert isinstance(self.payload, Encoded)
        return len(self.payload.input_ids)


Plain = tuple[Any, ...]  # ("one", fields) or ("pair", chosen fields, rejected fields); pixels as numpy arrays
_Meta = tuple[int, int, int, "str | None", str, "str | None", "str | None"]  # an Item's fields but the payload


def _plain(e: Encoded, arrays: dict[int, Any]) -> tuple[Any, ...]:
    pixels = [arrays.setdefault(id(p), p.numpy()) for p in e.pixel_values]  # a pair's shared images: stored once
    return (e.input_ids, e.labels, pixels, e.image_sizes, e.image_tokens)


def _encoded(t: tuple[Any, ...]) -> Encoded:
    ids, labels, pixels, sizes, tokens = t
    return Encoded(ids, labels, [torch.from_numpy(p) for p in pixels], sizes, tokens)


def to_plain(payload: Encoded | EncodedPair) -> Plain:
    """An encoded sample as plain Python/numpy objects (what pickles cheaply: no shared-memory file per tensor)."""
    arrays: dict[int, Any] = {}
    if isinstance(payload, EncodedPair):
        return ("pair", _plain(payload.chosen, arrays), _plain(payload.rejected, arrays))
    return ("one", _plain(payload, arrays))


def from_plain(plain: Plain) -> Encoded | EncodedPair:
    kind, *parts = plain
    if kind == "pair":
        return EncodedPair(_encoded(parts[0]), _encoded(parts[1]))
    return _encoded(parts[0])


def pack_payload(payload: Encoded | EncodedPair) -> bytes:
    """An encoded sample as plain pickle bytes (tensors as numpy arrays: no shared-memory file per tensor)."""
    return pickle.dumps(to_plain(payload), protocol=5)


def unpack_payload(blob: bytes) -> Encoded | EncodedPair:
    return from_plain(pickle.loads(blob))


def pack_chunk(metas: list[_Meta], plains: list[Plain | None]) -> bytes:
    """A worker's chunk as ONE pickled, columnar object: the items' fields, their plain payloads, and — when every
    good sample of the chunk is a single (not paired) sample and all their images have one shape and dtype (the
    common case: a fixed image size) — all the chunk's images stacked into one contiguous (N, ...) array, the
    payloads holding only their image counts. The training process then unpickles one object and takes views
    (`unpack_chunk`), and `samples.collate` slices a micro-batch that is a run of one chunk's consecutive images
    instead of stacking it. Other chunks (pairs, AnyRes tiles of different counts) carry their arrays per sample."""
    goods = [p for p in plains if p is not None]
    images = [a for p in goods for a in p[1][2]] if goods and all(p[0] == "one" for p in goods) else []
    stacked = None
    if images and all(a.shape == images[0].shape and a.dtype == images[0].dtype for a in images):
        stacked = np.stack(images)
        plains = [None if p is None else ("one", (*p[1][:2], len(p[1][2]), *p[1][3:])) for p in plains]
    return pickle.dumps((metas, plains, stacked), protocol=5)


def unpack_chunk(blob: bytes) -> list[Item]:
    """The items of a `pack_chunk` message, in order; stacked images become views of one tensor (no copy)."""
    metas, plains, stacked = pickle.loads(blob)
    items = []
    if stacked is None:
        for (source, epoch, consumed, key, shard, reason, detail), plain in zip(metas, plains, strict=True):
            payload = None if plain is None else from_plain(plain)
            items.append(Item(source, epoch, consumed, key, shard, payload, reason, detail))
        return items
    images, at = torch.from_numpy(stacked).unbind(0), 0
    for (source, epoch, consumed, key, shard, reason, detail), plain in zip(metas, plains, strict=True):
        payload = None
        if plain is not None:
            ids, labels, n, sizes, tokens = plain[1]
            payload, at = Encoded(ids, labels, list(images[at:at + n]), sizes, tokens), at + n
        items.append(Item(source, epoch, consumed, key, shard, payload, reason, detail))
    return items


def sample_digest(raw: dict[str, Any], fmt: str) -> bytes:
    """A digest of everything `encode(raw, fmt)` reads: the format, every member's name and bytes."""
    h = hashlib.blake2b(fmt.encode(), digest_size=20)
    for name in sorted(raw):
        value = raw[name]
        data = value if isinstance(value, bytes) else str(value).encode()
        h.update(b"\0%s\0%d\0" % (name.encode(), len(data)))
        h.update(data)
    return h.digest()


class EncodedCache:
    """Packed payloads (or bad-sample verdicts) by sample digest, up to `max_bytes`; full = nothing added."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used, self.hits, self.misses = max_bytes, 0, 0, 0
        self._store: dict[bytes, tuple[bytes | None, str | None, str | None]] = {}

    def get(self, digest: bytes) -> tuple[bytes | None, str | None, str | None] | None:
        found = self._store.get(digest)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, digest: bytes, entry: tuple[bytes | None, str | None, str | None]) -> None:
        size = len(digest) + len(entry[0] or b"") + len(entry[2] or "") + 64
        if self.used + size <= self.max_bytes:
            self._store[digest] = entry
            self.used += size


def source_seed(seed: int, index: int) -> int:
    """Source 0 keeps the stage seed (a one-source stage reads in the order it always did)."""
    return seed + 1_000_003 * index


class MixedSamples(IterableDataset):
    """The rank's mixed sample stream from `position` on; in worker w of W it yields items j = w, w+W, ..."""

    def __init__(
        self, sources: list[Source], encode: Encode, *, seed: int, rank: int, world: int, shuffle_buffer: int,
        position: LoaderPosition, chunk: int = 1, cache_bytes: int = 0,
    ):
        self.sources, self.encode = sources, encode
        self.seed, self.rank, self.world, self.shuffle_buffer = seed, rank, world, shuffle_buffer
        self.position = copy.deepcopy(position)
        self.chunk, self.cache_bytes = max(1, chunk), cache_bytes
        self.cache: EncodedCache | None = None  # created in the process that encodes (each worker its own)

    def raw(self) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """(source, epoch, consumed after it, raw sample) in stream order."""
        streams = [
            TrainStream(
                s.shards, seed=source_seed(self.seed, i), rank=self.rank, world=self.world,
                shuffle_buffer=self.shuffle_buffer, position=copy.deepcopy(self.position.sources[i]),
            )
            for i, s in enumerate(self.sources)
        ]
        for index in mix_order([s.weight for s in self.sources], self.position.drawn):
            raw = next(streams[index])
            pos = streams[index].position
            yield index, pos.epoch, pos.consumed, raw

    def __iter__(self) -> Iterator[Any]:
        """In the training process (workers 0): items. In worker w of W: chunks (`pack_chunk` bytes) of stream
        samples cK .. cK+K-1 for c = w, w+W, ..."""
        if self.cache is None and self.cache_bytes > 0:
            self.cache = EncodedCache(self.cache_bytes)
        info = get_worker_info()
        if info is None:
            for index, epoch, consumed, raw in self.raw():
                meta, plain, payload = self.item(index, epoch, consumed, raw)
                if payload is None and plain is not None:
                    payload = from_plain(plain)
                yield Item(*meta[:5], payload, *meta[5:])
            return
        worker, workers, k = info.id, info.num_workers, self.chunk
        metas: list[_Meta] = []
        plains: list[Plain | None] = []
        for j, (index, epoch, consumed, raw) in enumerate(self.raw()):
            if (j // k) % workers == worker:
                meta, plain, payload = self.item(index, epoch, consumed, raw)
                metas.append(meta)
                plains.append(to_plain(payload) if plain is None and payload is not None else plain)
                if len(metas) == k:
                    yield pack_chunk(metas, plains)
                    metas, plains = [], []
        if metas:  # the stream is endless; kept for a finite one
            yield pack_chunk(metas, plains)

    def item(
        self, index: int, epoch: int, consumed: int, raw: dict[str, Any]
    ) -> tuple[_Meta, Plain | None, Encoded | EncodedPair | None]:
        """One raw sample encoded, or why it is skipped: (the item's fields but the payload, the payload as plain
        objects when the cache is on, else None, the encoded payload when the cache is off, else None). The cache
        holds `pack_payload` bytes (its cap counts them; a hit unpickles fresh arrays)."""
        key, shard = raw.get("__key__"), str(raw.get("__url__", "?"))
        if "__bad__" in raw:
            return (index, epoch, consumed, key, shard, raw["__bad__"], raw.get("__detail__")), None, None
        fmt = self.sources[index].format
        if self.cache is None:
            try:
                return (index, epoch, consumed, key, shard, None, None), None, self.encode(raw, fmt)
            except SampleError as err:
                return (index, epoch, consumed, key, shard, getattr(err, "reason", "invalid_sample"), str(err)), None, None
        digest = sample_digest(raw, fmt)
        cached = self.cache.get(digest)
        if cached is not None:
            packed, reason, detail = cached
            return (index, epoch, consumed, key, shard, reason, detail), (
                None if packed is None else pickle.loads(packed)), None
        try:
            payload = self.encode(raw, fmt)
        except SampleError as err:
            reason, detail = getattr(err, "reason", "invalid_sample"), str(err)
            self.cache.put(digest, (None, reason, detail))
            return (index, epoch, consumed, key, shard, reason, detail), None, None
        plain = to_plain(payload)
        self.cache.put(digest, (pickle.dumps(plain, protocol=5), None, None))
        return (index, epoch, consumed, key, shard, None, None), plain, None


def _identity(item: Any) -> Any:
    return item


class TrainLoader:
    """Endless good samples of one rank, in stream order, with an exact, checkpointable position."""

    def __init__(
        self,
        sources: list[Source],
        encode: Encode,
        *,
        seed: int,
        rank: int,
        world: int,
        shuffle_buffer: int,
        workers: int = 0,
        position: LoaderPosition | None = None,
        prefetch_factor: int = 4,
        on_bad: Callable[[str], None] | None = None,
        max_bad_share: float | None = None,
        chunk: int = 1,
        cache_bytes: int = 0,
    ):
        if not sources:
            raise ValueError("stage.data: no sources")
        self.position = copy.deepcopy(position) if position is not None else LoaderPosition.fresh(len(sources))
        check_sources(self.position, len(sources))
        self.position.workers = workers
        self.on_bad, self.max_bad_share = on_bad, max_bad_share
        self.dataset = MixedSamples(
            sources, encode, seed=seed, rank=rank, world=world, shuffle_buffer=shuffle_buffer, position=self.position,
            chunk=chunk, cache_bytes=cache_bytes,
        )
        self.workers, self.prefetch_factor = workers, prefetch_factor
        self._it: Iterator[Item] | None = None
        self._pending: Item | None = None
        self._logged: dict[str, int] = {}
        self.last_keys: list[str | None] = []  # the sample keys of the last batch handed out (tests, debugging)

    def _items(self) -> Iterator[Item]:
        if self._it is None:
            if self.workers == 0:
                self._it = iter(self.dataset)
            else:
                # Workers tokenize; a forked worker must not fight the trainer for cores with Rust threads.
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                chunks = DataLoader(
                    self.dataset, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                    prefetch_factor=self.prefetch_factor, persistent_workers=False,
                )
                self._it = (item for blob in chunks for item in unpack_chunk(blob))
        return self._it

    def start(self) -> None:
        """Start the worker processes now (otherwise the first batch starts them)."""
        self._items()

    def _take(self) -> Item:
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        return next(self._items())

    def _account(self, item: Item) -> None:
        self.position.sources[item.source] = DataPosition(item.epoch, item.consumed)
        self.position.drawn[item.source] += 1
        self.position.seen += 1
        if item.reason is not None:
            self.position.count_bad(item.reason, item.shard)
            shown = self._logged.get(item.reason, 0)
            if shown < _LOGGED_BAD_PER_REASON:
                self._logged[item.reason] = shown + 1
                log.warning("skipped a bad sample (%s) in %s: %s", item.reason, item.shard, item.detail)
            if self.on_bad is not None:
                self.on_bad(item.reason)
            share = self.max_bad_share
            if share is not None and bad_share_exceeded(sum(self.position.bad.values()), self.position.seen, share):
                raise BadDataError(bad_data_message([self.position], share) + " (counted on this rank)")

    def next_good(self) -> Item:
        while True:
            item = self._take()
            self._account(item)
            if item.reason is None:
                return item

    def next_samples(self, n: int) -> list[Encoded | EncodedPair]:
        """The next n good samples (bad ones skipped and counted)."""
        out: list[Encoded | EncodedPair] = []
        self.last_keys = []
        while len(out) < n:
            item = self.next_good()
            assert item.payload is not None
            out.append(item.payload)
            self.last_keys.append(item.key)
        return out

    def next_packed(self, capacity: int) -> list[Encoded]:
        """Consecutive good samples whose total length fits `capacity` (at least one)."""
        out: list[Encoded] = []
        lengths: list[int] = []
        self.last_keys = []
        while True:
            item = self._take()
            if item.reason is not None:
                self._account(item)
                continue
            if not fits(lengths, item.length, capacity):
                self._pending = item  # opens the next row; not consumed yet
                return out
            self._account(item)
            assert isinstance(item.payload, Encoded)
            out.append(item.payload)
            lengths.append(item.length)
            self.last_keys.append(item.key)
            if sum(lengths) >= capacity:
                return out

    def close(self) -> None:
        """Stop the worker processes (the DataLoader iterator shuts them down when released)."""
        self._it = None


MAX_PREFETCHED_SAMPLES = 1024


def prefetch_per_worker(samples_per_step: int, workers: int, chunk: int = 1) -> int:
    """Chunks (of `chunk` samples) each worker may run ahead: four steps' worth in all (so workers keep encoding
    while the step computes instead of idling on a full queue, and a worker that the training processes starve
    of CPU for a step or two, or that refills its shuffle buffer at an epoch start, does not stall the step),
    at most MAX_PREFETCHED_SAMPLES per rank (host memory)."""
    if workers <= 0:
        return 2
    chunk = max(1, chunk)
    return max(2, min(math.ceil(4 * samples_per_step / (workers * chunk)), MAX_PREFETCHED_SAMPLES // (workers * chunk)))


def chunk_size(samples_per_micro_batch: int) -> int:
    """Samples per worker message: the most whole micro-batches' worth (a packed row's is unknown: 16) up to 64
    samples, or 64 for a larger micro-batch (each message costs the training process ~0.3 ms: fewer is better)."""
    m = max(1, samples_per_micro_batch)
    return m * (64 // m) if m <= 64 else 64


def bad_share_exceeded(bad: float, seen: float, max_share: float) -> bool:
    """More than `max_share` of the samples read is bad, judged once at least 1/max_share samples were read
    (before that a single bad sample would already exceed the share); a share of 0 fails on the first."""
    if bad <= 0:
        return False
    if max_share <= 0:
        return True
    return seen >= math.ceil(1 / max_share) and bad > max_share * seen


def bad_data_message(positions: list[LoaderPosition], max_share: float) -> str:
    """The failure message: share, counts by reason, and the shards that held the bad samples."""
    bad: dict[str, int] = {}
    shards: dict[str, int] = {}
    for p in positions:
        for reason, n in p.bad.items():
            bad[reason] = bad.get(reason, 0) + n
        for shard, reasons in p.bad_by_shard.items():
            shards[shard] = shards.get(shard, 0) + sum(reasons.values())
    total_bad, seen = sum(bad.values()), sum(p.seen for p in positions)
    worst = sorted(shards.items(), key=lambda kv: (-kv[1], kv[0]))
    named = ", ".join(f"{s} ({n})" for s, n in worst[:10]) + (f" and {len(worst) - 10} more" if len(worst) > 10 else "")
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(bad.items()))
    return (
        f"stage.data: {total_bad} of {seen} samples read were bad ({total_bad / max(seen, 1):.1%} > "
        f"data.maxBadSampleShare {max_share:g}); by reason {reasons}; bad samples in shard(s): {named}"
    )


def data_report(positions: list[LoaderPosition]) -> dict[str, Any]:
    """The stage report's data section: samples read, bad samples by reason and by shard (all ranks)."""
    bad: dict[str, int] = {}
    by_shard: dict[str, dict[str, int]] = {}
    for p in positions:
        for reason, n in p.bad.items():
            bad[reason] = bad.get(reason, 0) + n
        for shard, reasons in p.bad_by_shard.items():
            merged = by_shard.setdefault(shard, {})
            for reason, n in reasons.items():
                merged[reason] = merged.get(reason, 0) + n
    return {
        "samples_read": sum(p.seen for p in positions),
        "bad_samples": sum(bad.values()),
        "bad_samples_by_reason": dict(sorted(bad.items())),
        "bad_samples_by_shard": dict(sorted(by_shard.items())),
    }
