"""The collectives the curate stage's global decisions use, over small fixed-width records (numpy structured arrays).

Every global step of `curate.scale` is written against the `Exchange` protocol: a rank sends each other rank a
batch of records (`all_to_all`), sums small integer vectors (`all_sum`) and, for the few things every rank needs
(confirmed duplicate edges, a k-means seed sample), gathers a small array from all ranks (`all_gather`). Three
implementations:
- `Solo`: one process (the plain `decide` and the 1-rank stage);
- `TorchExchange`: torch.distributed (gloo on CPU, the stage's own process group): two all_to_all_single calls,
  the byte counts then the bytes;
- `simulate(world, fn)`: `world` ranks as threads of one process with a barrier-based mailbox, so unit tests
  run the very code of the distributed stage for 1, 2, 3 ... ranks without processes.

A message is a 1-D numpy structured array; all parts of one call share a dtype, which the receiver knows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")


class Exchange(Protocol):
    rank: int
    world: int

    def all_to_all(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """Send `parts[r]` to rank r; returns what each rank sent this one, in rank order."""
        ...

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of an int64 vector (the same length on every rank)."""
        ...


def all_gather(ex: Exchange, part: np.ndarray) -> list[np.ndarray]:
    """Every rank's `part`, in rank order (on every rank); for small arrays only."""
    return ex.all_to_all([part] * ex.world)


def all_count(ex: Exchange, *counts: int) -> list[int]:
    """Global sums of a few local counts."""
    return [int(v) for v in ex.all_sum(np.array(counts, dtype=np.int64))]


def route(records: np.ndarray, dest: np.ndarray, world: int) -> list[np.ndarray]:
    """Split `records` by destination rank (`dest[i]` in [0, world)), keeping their order within each part."""
    order = np.argsort(dest, kind="stable")
    bounds = np.searchsorted(dest[order], np.arange(world + 1))
    return [records[order[bounds[r]:bounds[r + 1]]] for r in range(world)]


def owner(keys: np.ndarray, world: int) -> np.ndarray:
    """The rank owning each uint64 key: a multiplicative mix (so low-entropy keys still spread), mod world."""
    mixed = (keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(29)
    return (mixed % np.uint64(world)).astype(np.int64)


class Solo:
    """One rank: every collective is the identity."""

    rank, world = 0, 1

    def all_to_all(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        assert len(parts) == 1
        return [parts[0]]

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)


class TorchExchange:
    """torch.distributed: byte counts, then the bytes, by all_to_all_single, on CPU tensors. The stage's process
    group is gloo on CPU; under NCCL (GPUs) a gloo group of the same ranks carries these host-side records."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def all_to_all(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        import torch
        import torch.distributed as dist

        assert len(parts) == self.world
        dtype = parts[0].dtype
        send = [np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in parts]
        send_sizes = torch.tensor([s.size for s in send], dtype=torch.int64)
        recv_sizes = torch.empty(self.world, dtype=torch.int64)
        dist.all_to_all_single(recv_sizes, send_sizes, group=self.group)
        sizes = recv_sizes.tolist()
        inp = torch.from_numpy(np.concatenate(send)) if sum(s.size for s in send) else torch.empty(0, dtype=torch.uint8)
        out = torch.empty(sum(sizes), dtype=torch.uint8)
        dist.all_to_all_single(out, inp, output_split_sizes=sizes, input_split_sizes=send_sizes.tolist(),
                               group=self.group)
        raw = out.numpy()
        bounds = np.cumsum([0, *sizes])
        return [raw[bounds[r]:bounds[r + 1]].copy().view(dtype) for r in range(self.world)]

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.array(values, dtype=np.int64))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()


class _Mailbox:
    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[Any] = [None] * world


class ThreadExchange:
    """One simulated rank of `simulate`: collectives through a shared mailbox and a barrier."""

    def __init__(self, rank: int, box: _Mailbox):
        self.rank, self.world, self._box = rank, box.world, box

    def _swap(self, value: Any) -> list[Any]:
        self._box.slots[self.rank] = value
        self._box.barrier.wait()
        seen = list(self._box.slots)
        self._box.barrier.wait()  # nobody writes the next round before all have read this one
        return seen

    def all_to_all(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        assert len(parts) == self.world
        return [np.array(p[self.rank], copy=True) for p in self._swap(parts)]

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return np.sum([np.asarray(v, dtype=np.int64) for v in self._swap(values)], axis=0).astype(np.int64)


def simulate(world: int, fn: Callable[[ThreadExchange], T], timeout: float = 300.0) -> list[T]:
    """Run `fn(exchange)` as `world` ranks (threads of this process); their results in rank order. An error on
    any rank is raised here (the others are released by aborting the barrier)."""
    box = _Mailbox(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadExchange(rank, box))
        except threading.BrokenBarrierError:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised below, on the caller's thread
            errors.append(err)
            box.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"simulate: ranks still running after {timeout} s")
    return results
