"""Process group, device, and data parallelism applied to a single-device model from outside.

The model never sees a rank: `apply_ddp` wraps it, `apply_fsdp` shards it in place with FSDP2
(`fully_shard` per decoder/encoder layer, then the root), in that fixed order after activation
checkpointing. Collectives used by the loop (sums, object gathers) live here too.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    """This process' place in the torchrun gang (all 0/1 when run plain)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); CUDA device by local rank."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, local_rank, local_world, device)


def init_distributed(env: DistEnv) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when there is more than one process."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=env.device if backend == "nccl" else None)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def set_threads(env: DistEnv) -> int:
    """One share of the CPU per local process: $OMP_NUM_THREADS if set, else cores // local processes.
    (Small CPU matmuls with oversubscribed threads ran ~7x slower here.)"""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(raw) if raw.isdigit() and int(raw) > 0 else max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(threads)
    return threads


def apply_ddp(model: nn.Module, env: DistEnv, *, find_unused_parameters: bool) -> DistributedDataParallel:
    """Replicate with DDP. Buffers are not re-broadcast each forward: they are constants here (rotary
    frequencies, position ids) and the broadcast would be a collective inside eval forwards."""
    # torch 2.13 renamed the per-forward switch; older releases (the GPU machine's 2.11) only know the old one.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        **no_buffer_sync,
    )


def apply_fsdp(model: nn.Module, *, layers: list[nn.Module]) -> nn.Module:
    """FSDP2: shard each transformer block, then the root (embeddings, projector, heads). In place."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over ranks (float64 on the collective's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: int, env: DistEnv) -> int:
    t = torch.tensor([value], dtype=torch.long, device=env.device)
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def parameter_sha256(model: nn.Module) -> str:
    """A fingerprint of a replicated model's parameters (names, dtypes and exact bytes)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
