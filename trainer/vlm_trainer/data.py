"""WebDataset shards read through fsspec: deterministic per (seed, epoch), split across ranks, resumable.

Training order of one rank, epoch e:
1. the stage's shard list (brace patterns expanded) is shuffled with a RNG seeded by (seed, e), the same
   on every rank (`shuffle_buffer: 0` keeps the given order);
2. shards are split across ranks with `wds.split_by_node` (and across DataLoader workers with
   `wds.split_by_worker`, a no-op here: samples are read in the trainer process). With fewer shards
   than ranks, every rank reads every shard and keeps every world-size-th sample instead;
3. each shard is opened with `storage.filesystem` (so `s3://` honours AWS_ENDPOINT_URL), expanded with
   WebDataset's tar iterators and grouped into samples by key;
4. samples pass a shuffle buffer seeded by (seed, e, rank).
Epochs repeat forever; the loop stops by step count.

Resume: a rank's position is (epoch, samples it consumed in that epoch). Because every step above is
deterministic, re-creating the epoch's stream and skipping that many raw samples (before image decoding
and tokenization) lands exactly where the interrupted run stopped. Skipping costs reading those samples
again; it is honest and simple, and bounded by one epoch.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from vlm_trainer import storage


@dataclass
class DataPosition:
    """Where one rank's training stream stands: epoch, and samples consumed in that epoch."""

    epoch: int = 0
    consumed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), consumed=int(d["consumed"]))


def expand_shards(shards: Iterable[str]) -> list[str]:
    """Brace patterns (`train-{000..003}.tar`) expanded, order kept."""
    urls = [u for pattern in shards for u in braceexpand.braceexpand(pattern)]
    if not urls:
        raise ValueError("stage.data.shards: no shard URLs after brace expansion")
    return urls


def open_with_fsspec(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """WebDataset url opener over the project's storage layer (file://, s3://, gs://, local paths)."""
    for item in src:
        fs, path = storage.filesystem(item["url"])
        try:
            stream = fs.open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"stage.data: shard {item['url']} does not exist") from None
        try:
            yield {**item, "stream": stream}
        finally:
            stream.close()


def _every_nth(rank: int, world: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    def split(src: Iterable[Any]) -> Iterator[Any]:
        return itertools.islice(src, rank, None, world)

    return split


def raw_samples(
    urls: list[str],
    *,
    rank: int,
    world: int,
    shard_seed: Any | None,
    sample_seed: Any | None,
    shuffle_buffer: int,
) -> Iterator[dict[str, Any]]:
    """One pass over `urls` for one rank: a WebDataset pipeline yielding raw samples (member bytes by ext)."""
    urls = list(urls)
    if shard_seed is not None:
        random.Random(str(shard_seed)).shuffle(urls)
    by_shard = len(urls) >= world
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if by_shard:
        # split_by_node reads RANK/WORLD_SIZE (set by torchrun) like torch.distributed does.
        stages += [wds.split_by_node, wds.split_by_worker]
    else:
        stages += [wds.split_by_worker]
    stages += [
        open_with_fsspec,
        tar_file_expander,
        group_by_keys,
    ]
    if not by_shard:
        stages.append(_every_nth(rank, world))
    if shuffle_buffer > 0 and sample_seed is not None:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(str(sample_seed))))
    return iter(wds.DataPipeline(*stages))


class TrainStream:
    """Endless, resumable stream of raw training samples for one rank."""

    def __init__(
        self,
        shards: list[str],
        *,
        seed: int,
        rank: int,
        world: int,
        shuffle_buffer: int,
        position: DataPosition | None = None,
    ):
        self.urls = expand_shards(shards)
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.position = position or DataPosition()
        self._it: Iterator[dict[str, Any]] | None = None

    def _epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        shuffle = self.shuffle_buffer > 0
        return raw_samples(
            self.urls,
            rank=self.rank,
            world=self.world,
            shard_seed=f"{self.seed}/{epoch}" if shuffle else None,
            sample_seed=f"{self.seed}/{epoch}/{self.rank}" if shuffle else None,
            shuffle_buffer=self.shuffle_buffer,
        )

    def _generate(self) -> Iterator[dict[str, Any]]:
        while True:
            epoch = self.position.epoch
            stream = self._epoch(epoch)
            skipped = sum(1 for _ in itertools.islice(stream, self.position.consumed))
            if skipped < self.position.consumed:
                raise ValueError(
                    f"resume: data position says {self.position.consumed} samples were consumed in epoch {epoch}, "
                    f"but rank {self.rank} has only {skipped}; did stage.data.shards change?"
                )
            yielded = skipped
            for sample in stream:
                self.position.consumed += 1
                yielded += 1
                yield sample
            if yielded == 0:
                raise ValueError(
                    f"stage.data.shards: rank {self.rank} of {self.world} got no samples from {len(self.urls)} shard(s)"
                )
            self.position = DataPosition(epoch + 1, 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._generate()
        return next(self._it)


def eval_samples(shards: list[str], *, rank: int, world: int) -> Iterator[dict[str, Any]]:
    """One unshuffled pass over held-out shards; rank r keeps samples r, r+world, ... (balanced to +-1)."""
    urls = expand_shards(shards)
    stages = [wds.SimpleShardList(urls), open_with_fsspec, tar_file_expander, group_by_keys, _every_nth(rank, world)]
    return iter(wds.DataPipeline(*stages))


def count_samples(shards: list[str]) -> int:
    """Samples in the shards, by reading the tar headers (keys grouped as WebDataset groups them)."""
    total = 0
    for url in expand_shards(shards):
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            last = None
            for info in tar:
                if not info.isreg():
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is not None and prefix != last:
                    total += 1
                    last = prefix
    return total
