"""Parquet files read through the storage layer (pyarrow over fsspec), by row group.

A Parquet shard's unit of work is a row group: the trainer splits a stage's row groups across ranks as it
splits tar shards (`vlm_trainer.data`), and `vlmctl data import` reads its input one row group at a time
(memory bounded by a row group, not by the file). Rows come back as plain dicts (structs as dicts, lists
as lists: HF's `{bytes, path}` images included), which `vlm_core.records` normalises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlm_core import storage
from vlm_core.storage_errors import named

SUFFIX = ".parquet"
MAGIC = b"PAR1"


def is_parquet(url: str) -> bool:
    """A Parquet shard is named by its suffix (`.parquet`); anything else is a WebDataset tar shard."""
    return url.split("?", 1)[0].rstrip("/").lower().endswith(SUFFIX)


def shard_kind(urls: list[str], field: str | None) -> str:
    """"parquet" when every shard is a .parquet file, "tar" when none is; a mix is refused (naming `field`):
    one source reads one kind of shard (a second source in data.sources can read the other)."""
    kinds = {is_parquet(u) for u in urls}
    if len(kinds) > 1:
        parquet = next(u for u in urls if is_parquet(u))
        tar = next(u for u in urls if not is_parquet(u))
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}mixes Parquet files ({parquet}) with WebDataset tar shards ({tar}); one source reads "
                         "one kind of shard (put the other kind in a second entry of data.sources)")
    return "parquet" if kinds == {True} else "tar"


def _pq() -> Any:
    import pyarrow.parquet as pq

    return pq


@dataclass(frozen=True)
class RowGroup:
    """One row group of one Parquet file: the unit split across ranks."""

    url: str
    index: int
    rows: int
    first_row: int  # rows of the file before this group (row keys are `<file row>`)


@named("url")
def row_groups(url: str, *, options: storage.Options | None = None) -> list[RowGroup]:
    """The row groups of the Parquet file at `url` (reads its footer only)."""
    fs, path = storage.filesystem(url, options)
    with fs.open(path, "rb") as f:
        meta = _pq().ParquetFile(f).metadata
    out, first = [], 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        out.append(RowGroup(url, i, n, first))
        first += n
    return out


def num_rows(urls: list[str], *, options: storage.Options | None = None) -> int:
    """Rows in the Parquet files (footers only)."""
    return sum(g.rows for u in urls for g in row_groups(u, options=options))


def read_rows(group: RowGroup, *, options: storage.Options | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number in the file, row as a dict) of one row group, in order."""
    fs, path = storage.filesystem(group.url, options)
    with fs.open(path, "rb") as f:
        # One thread: the loader reads in forked worker processes (Arrow's thread pool and fork do not mix well),
        # and decoding, not reading, is where the cores go.
        table = _pq().ParquetFile(f).read_row_group(group.index, use_threads=False)
    for i, row in enumerate(table.to_pylist()):
        yield group.first_row + i, row
