"""WebDataset shards read through fsspec: deterministic per (seed, epoch), split across ranks, resumable.

Training order of one rank, epoch e:
1. the stage's shard list (brace patterns expanded) is shuffled with a RNG seeded by (seed, e), the same
   on every rank (`shuffle_buffer: 0` keeps the given order);
2. shards are split across ranks (rank r reads shards r, r+world, ...). With fewer shards than ranks,
   every rank reads every shard and keeps every world-size-th sample instead;
3. each shard is opened with `storage.filesystem` (so `s3://` honours AWS_ENDPOINT_URL), its members are
   read in order and grouped into samples by key (WebDataset's naming: `<key>.<ext>`). A shard that ends
   early (a truncated tar: cut inside a member, or at a member boundary without the end-of-archive block,
   which Python's tarfile would accept in silence) yields the samples before the cut and then one marker
   `{"__bad__": "truncated_shard", "__url__": ...}` that the loader counts and reports: never silently
   shortened. `tar_samples` is the one tar reader: the curate stage reads its input through it too;
4. samples pass a shuffle buffer seeded by (seed, e, rank).
Epochs repeat forever; the loop stops by step count.

Parquet shards (`data.shards` naming `.parquet` files: the kind is inferred from the suffix, and one source
reads one kind, `vlm_core.parquet.shard_kind`) are read in place, without converting: their unit is the row
group (listed from the files' footers), and steps 1-4 apply to row groups as to tar shards: shuffled by
(seed, e), split across ranks (rank r reads row groups r, r+world, ...; fewer row groups than ranks: every
rank reads all and keeps every world-size-th row), rows in file order, then the shuffle buffer. Each row is
normalised by `vlm_core.records` (the normaliser `vlmctl data import` uses) into the raw sample a tar shard
would hold (`json` + image members), so the encoders and everything downstream (loader workers, the cache,
resume, the bad-sample counters) are the same; a row that cannot be a sample becomes a bad-sample marker
with its reason (no_image, image_missing, image_mismatch, missing_field, ...), a row group pyarrow cannot
read one `unreadable_row_group` marker.

Several sources (`data.sources: [{shards, format, weight}]`) are several such streams, each with its own
epochs, interleaved by `mix_order`: draw n goes to the source whose realised count lags its weight's share
the most (ties: the first source), so every prefix of the mix is within one sample per source of the
exact ratios, and the choice needs only the counts drawn so far (part of the position).

Resume: a rank's position is (epoch, samples it consumed in that epoch). Because every step above is
deterministic, re-creating the epoch's stream and skipping that many raw samples (before image decoding
and tokenization) lands exactly where the interrupted run stopped. Skipping costs reading those samples
again; it is honest and simple, and bounded by one epoch. `LoaderPosition` is what a checkpoint stores per
rank: every source's DataPosition, the mix counts, and the loader's bad-sample counters.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import webdataset as wds
from vlm_core import parquet, records, storage
from webdataset.tariterators import base_plus_ext


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


@dataclass
class LoaderPosition:
    """One rank's whole data position: per source (epoch, consumed), samples drawn from each source, the
    worker count that produced it (informational: the order does not depend on it), and the bad-sample
    counters (`bad[reason]`, `bad_by_shard[url][reason]`, `seen` = raw samples taken, good or bad)."""

    sources: list[DataPosition] = field(default_factory=lambda: [DataPosition()])
    drawn: list[int] = field(default_factory=lambda: [0])
    workers: int = 0
    seen: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    bad_by_shard: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def fresh(cls, n_sources: int, workers: int = 0) -> LoaderPosition:
        return cls([DataPosition() for _ in range(n_sources)], [0] * n_sources, workers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epoch"], d["consumed"] = self.sources[0].epoch, self.sources[0].consumed  # readable by older code
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderPosition:
        """A checkpoint's position; a pre-loader one ({epoch, consumed}) is one source with nothing counted."""
        if "sources" not in d:
            return cls([DataPosition.from_dict(d)], [int(d["consumed"])])
        return cls(
            sources=[DataPosition.from_dict(p) for p in d["sources"]],
            drawn=[int(n) for n in d["drawn"]],
            workers=int(d.get("workers", 0)),
            seen=int(d.get("seen", 0)),
            bad={str(k): int(v) for k, v in d.get("bad", {}).items()},
            bad_by_shard={str(u): {str(k): int(v) for k, v in r.items()} for u, r in d.get("bad_by_shard", {}).items()},
        )

    def count_bad(self, reason: str, shard: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        per_shard = self.bad_by_shard.setdefault(shard, {})
        per_shard[reason] = per_shard.get(reason, 0) + 1


def check_sources(position: LoaderPosition, n_sources: int) -> None:
    """A resumed position must describe the stage's sources."""
    if len(position.sources) != n_sources or len(position.drawn) != n_sources:
        raise ValueError(
            f"resume: the checkpoint's data position has {len(position.sources)} source(s), the stage has "
            f"{n_sources}; stage.data.sources cannot change within a stage"
        )


def mix_order(weights: list[float], drawn: list[int]) -> Iterator[int]:
    """Endless source choices for weights, continuing after `drawn` (counts per source so far)."""
    total = float(sum(weights))
    shares = [w / total for w in weights]
    counts = list(drawn)
    while True:
        n = sum(counts) + 1
        best = max(range(len(shares)), key=lambda i: (n * shares[i] - counts[i], -i))
        counts[best] += 1
        yield best


def open_with_fsspec(src: Iterable[dict[str, Any]], field: str = "stage.data") -> Iterator[dict[str, Any]]:
    """WebDataset url opener over the project's storage layer (file://, s3://, gs://, local paths)."""
    for item in src:
        fs, path = storage.filesystem(item["url"])
        try:
            stream = fs.open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{field}: shard {item['url']} does not exist") from None
        try:
            yield {**item, "stream": stream}
        finally:
            stream.close()


SHARDS_FIELD = "stage.data.shards"
TRUNCATED_SHARD = "truncated_shard"
_BLOCK = tarfile.BLOCKSIZE


class TruncatedShard(ValueError):
    """A shard ended early (cut inside a member, or without its end-of-archive block). `key` is the sample
    that was being read when the data ended (dropped: it may be missing members)."""

    def __init__(self, url: str, detail: str, key: str | None):
        super().__init__(f"shard {url} is truncated or corrupt ({detail}); the samples before the cut were read")
        self.url, self.key = url, key


@dataclass
class TarSample:
    """One WebDataset sample as stored: its key and its members (name, extension, bytes) in tar order."""

    key: str
    members: list[tuple[str, str, bytes]]

    def raw(self, url: str) -> dict[str, Any]:
        """The sample as the encoders read it: member bytes by lower-case extension, `__key__`, `__url__`."""
        out: dict[str, Any] = {"__key__": self.key, "__url__": url}
        for _name, ext, data in self.members:
            out[ext.lower()] = data
        return out


def _end_block_present(url: str, offset: int) -> bool:
    """Whether an uncompressed tar holds its end-of-archive (zero) block at `offset`."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(offset)
        return f.read(_BLOCK) == b"\0" * _BLOCK


def tar_samples(url: str, stream: Any) -> Iterator[TarSample]:
    """The one WebDataset tar reader (training and curate): the samples of an opened shard in tar order,
    members grouped by key as WebDataset groups them (`base_plus_ext`: the path up to the first dot of the
    file name). A sample is yielded once complete; a shard that ends early raises `TruncatedShard` after the
    complete samples before the cut."""
    current: TarSample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None or suffix is None:
                    continue
                member = tar.extractfile(info)
                data = member.read() if member is not None else b""
                if current is None or current.key != prefix:
                    if current is not None:
                        yield current
                    current = TarSample(prefix, [])
                current.members.append((info.name, suffix, data))
            end = tar.offset
        plain = not url.rstrip("/").lower().endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))
        if plain and not _end_block_present(url, end):
            raise TruncatedShard(url, f"no end-of-archive block after byte {end}", current.key if current else None)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, TruncatedShard):
            raise
        raise TruncatedShard(url, f"{type(err).__name__}: {err}", current.key if current else None) from None
    if current is not None:
        yield current


def read_shard(url: str, field: str = "stage.data") -> Iterator[TarSample]:
    """The samples of the shard at `url` (`tar_samples` over the storage layer)."""
    for item in open_with_fsspec([{"url": url}], field):
        yield from tar_samples(url, item["stream"])


def expand_tar_samples(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Opened shards -> samples (member bytes by lower-case extension, `__key__`, `__url__`), in tar order.

    A truncated shard ends with the complete samples before the cut and one `TRUNCATED_SHARD` marker; the
    sample that was being read when the data ended is dropped with it (it may be missing members)."""
    for item in src:
        url = item["url"]
        try:
            for sample in tar_samples(url, item["stream"]):
                yield sample.raw(url)
        except TruncatedShard as err:
            yield {"__bad__": TRUNCATED_SHARD, "__url__": url, "__key__": err.key, "__detail__": str(err)}


def _every_nth(rank: int, world: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    def split(src: Iterable[Any]) -> Iterator[Any]:
        return itertools.islice(src, rank, None, world)

    return split


UNREADABLE_ROW_GROUP = "unreadable_row_group"


def parquet_groups(urls: list[str], field: str = SHARDS_FIELD) -> list[parquet.RowGroup]:
    """The row groups of the stage's Parquet files, in file order (footers only)."""
    groups = []
    for url in urls:
        try:
            groups += parquet.row_groups(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"{field}: Parquet file {url} does not exist") from None
        except ValueError as err:  # pyarrow.ArrowInvalid: not a Parquet file
            raise ValueError(f"{field}: {url} is not a readable Parquet file ({err})") from None
    return groups


def parquet_samples(groups: Iterable[parquet.RowGroup]) -> Iterator[dict[str, Any]]:
    """Raw samples of the row groups' rows, in order (the Parquet twin of `expand_tar_samples`)."""
    import pyarrow

    for group in groups:
        try:
            rows = list(parquet.read_rows(group))
        except (ValueError, pyarrow.ArrowException) as err:
            yield {"__bad__": UNREADABLE_ROW_GROUP, "__url__": group.url, "__key__": f"row group {group.index}",
                   "__detail__": f"{group.url}: row group {group.index} cannot be read ({err})"}
            continue
        for row_no, row in rows:
            yield records.embedded_sample(row, row_no, str(row_no), group.url)


def _parquet_pass(
    groups: list[parquet.RowGroup], *, rank: int, world: int, shard_seed: Any | None, sample_seed: Any | None,
    shuffle_buffer: int,
) -> Iterator[dict[str, Any]]:
    """`raw_samples` for Parquet: row groups take the place of shards."""
    groups = list(groups)
    if shard_seed is not None:
        random.Random(str(shard_seed)).shuffle(groups)
    by_group = len(groups) >= world
    stream: Iterator[dict[str, Any]] = parquet_samples(groups[rank::world] if by_group else groups)
    if not by_group:
        stream = _every_nth(rank, world)(stream)
    if shuffle_buffer > 0 and sample_seed is not None:
        stream = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(str(sample_seed)))(stream)
    return iter(stream)


def raw_samples(
    urls: list[str],
    *,
    rank: int,
    world: int,
    shard_seed: Any | None,
    sample_seed: Any | None,
    shuffle_buffer: int,
    groups: list[parquet.RowGroup] | None = None,
) -> Iterator[dict[str, Any]]:
    """One pass over `urls` for one rank: a WebDataset pipeline yielding raw samples (member bytes by ext).
    Parquet files (or their listed `groups`) are read by row group."""
    if groups is None and parquet.shard_kind(list(urls), SHARDS_FIELD) == "parquet":
        groups = parquet_groups(list(urls))
    if groups is not None:
        return _parquet_pass(groups, rank=rank, world=world, shard_seed=shard_seed, sample_seed=sample_seed,
                             shuffle_buffer=shuffle_buffer)
    urls = list(urls)
    if shard_seed is not None:
        random.Random(str(shard_seed)).shuffle(urls)
    by_shard = len(urls) >= world
    # Shards split across ranks like wds.split_by_node (rank r reads shards r, r+world, ...). DataLoader
    # workers do NOT split shards: each reads its rank's whole stream and encodes every W-th sample
    # (vlm_trainer.loader), which keeps the order independent of the worker count.
    stages: list[Any] = [wds.SimpleShardList(urls[rank::world] if by_shard else urls)]
    stages += [
        open_with_fsspec,
        expand_tar_samples,
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
        self.urls = storage.expand_shards(shards, field=SHARDS_FIELD)
        parquet_files = parquet.shard_kind(self.urls, SHARDS_FIELD) == "parquet"
        self.groups = parquet_groups(self.urls) if parquet_files else None  # listed once, read every epoch
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
            groups=self.groups,
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
    urls = storage.expand_shards(shards, field=SHARDS_FIELD)
    if parquet.shard_kind(urls, SHARDS_FIELD) == "parquet":
        return _every_nth(rank, world)(parquet_samples(parquet_groups(urls)))
    stages = [wds.SimpleShardList(urls), open_with_fsspec, expand_tar_samples, _every_nth(rank, world)]
    return iter(wds.DataPipeline(*stages))


def count_samples(shards: list[str]) -> int:
    """Samples in the shards, by reading the tar headers (keys grouped as WebDataset groups them); rows of
    Parquet files, from their footers (bad ones included, as a tar's bad samples are)."""
    total = 0
    urls = storage.expand_shards(shards, field=SHARDS_FIELD)
    if parquet.shard_kind(urls, SHARDS_FIELD) == "parquet":
        return sum(g.rows for g in parquet_groups(urls))
    for url in urls:
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
