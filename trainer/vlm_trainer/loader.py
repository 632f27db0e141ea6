"""The training data loader: worker processes, exact resume, bad samples skipped and counted, packing.

One rank's sample stream is fixed before any worker sees it: the sources' deterministic streams
(`vlm_trainer.data.TrainStream`, one per source) interleaved by `data.mix_order`. Sample j of that stream
(counted from where the loader started) is decoded, image-processed and tokenized by worker j mod W of a
`torch.utils.data.DataLoader` with W = `data.workers` processes; every worker reads the rank's raw stream
(tar bytes only: cheap) and encodes just its share. The DataLoader hands results back in index order
(round-robin over workers, `in_order`), so the training process sees EXACTLY the stream order whatever W is
— a sample that turns out bad still produces an item (a skip record), so no worker ever gets out of step.

Position (checkpointed per rank, `data.LoaderPosition`): for every source, (epoch, samples consumed in it)
counted over the items the training loop has TAKEN — items prefetched by workers but not yet taken are not
counted and are simply produced again after a resume. Where each worker stands follows from it: worker w
resumes at the w-th sample after the position and strides by W. So a resumed run, with any W, yields the
batches the uninterrupted run would have, sample for sample.

Bad samples (`SampleError.reason`: missing_field, bad_json, image_decode, no_assistant_turn, too_long,
identical_pair, too_many_images, ...; `truncated_shard` from the tar reader) are skipped, counted by reason
and by shard in the position (so the counts survive a resume), logged with the shard and key, and passed
to `on_bad` (the Prometheus counter). The share rule (`data.maxBadSampleShare`, `bad_share_exceeded`) is
checked here on this rank's counts as each bad sample arrives (so data that is all bad fails instead of
being searched forever) and by the trainer after every step on all ranks' counts (one decision for all).

Packing (`next_packed`): consecutive good samples while they fit the token budget; the first sample that
does not fit is held back (not yet counted as consumed) and opens the next row.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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


def source_seed(seed: int, index: int) -> int:
    """Source 0 keeps the stage seed (a one-source stage reads in the order it always did)."""
    return seed + 1_000_003 * index


class MixedSamples(IterableDataset):
    """The rank's mixed sample stream from `position` on; in worker w of W it yields items j = w, w+W, ..."""

    def __init__(
        self, sources: list[Source], encode: Encode, *, seed: int, rank: int, world: int, shuffle_buffer: int,
        position: LoaderPosition,
    ):
        self.sources, self.encode = sources, encode
        self.seed, self.rank, self.world, self.shuffle_buffer = seed, rank, world, shuffle_buffer
        self.position = copy.deepcopy(position)

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

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, (index, epoch, consumed, raw) in enumerate(self.raw()):
            if j % workers == worker:
                yield self.item(index, epoch, consumed, raw)

    def item(self, index: int, epoch: int, consumed: int, raw: dict[str, Any]) -> Item:
        key, shard = raw.get("__key__"), str(raw.get("__url__", "?"))
        if "__bad__" in raw:
            return Item(index, epoch, consumed, key, shard, None, raw["__bad__"], raw.get("__detail__"))
        try:
            return Item(index, epoch, consumed, key, shard, self.encode(raw, self.sources[index].format))
        except SampleError as err:
            return Item(index, epoch, consumed, key, shard, None, getattr(err, "reason", "invalid_sample"), str(err))


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
    ):
        if not sources:
            raise ValueError("stage.data: no sources")
        self.position = copy.deepcopy(position) if position is not None else LoaderPosition.fresh(len(sources))
        check_sources(self.position, len(sources))
        self.position.workers = workers
        self.on_bad, self.max_bad_share = on_bad, max_bad_share
        self.dataset = MixedSamples(
            sources, encode, seed=seed, rank=rank, world=world, shuffle_buffer=shuffle_buffer, position=self.position
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
                self._it = iter(DataLoader(
                    self.dataset, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                    prefetch_factor=self.prefetch_factor, persistent_workers=False,
                ))
        return self._it

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


def prefetch_per_worker(samples_per_step: int, workers: int) -> int:
    """Samples each worker may run ahead: two steps' worth in all (so workers keep encoding while the step
    computes, instead of idling on a full queue), at most MAX_PREFETCHED_SAMPLES per rank (host memory)."""
    if workers <= 0:
        return 2
    return max(2, min(math.ceil(2 * samples_per_step / workers), MAX_PREFETCHED_SAMPLES // workers))


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
