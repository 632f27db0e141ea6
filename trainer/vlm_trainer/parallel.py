"""Process group, device, and the few collectives the loop and the strategies use.

The model never sees a rank: how it is replicated or sharded is a strategy's business
(`vlm_trainer.strategies`), applied from outside after freezing and activation checkpointing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over ranks (float64 on the collective's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise sum over ranks of a device tensor, in place, without reading it on the host."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def to_empty_keeping_ties(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on `device` (uninitialised). Tensors are swapped in place, so a
    parameter shared by two modules (tied embeddings/LM head) stays one parameter."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def materialize_from_rank0(model: nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's parameters and buffers. Other ranks built the model on the meta device
    (no memory, nothing read); they allocate it here and receive the values by broadcast, so only rank 0
    ever read the checkpoint files."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        to_empty_keeping_ties(model, env.device)
    elif any(t.device != env.device for t in tensors):  # (a 4-bit QLoRA model is loaded on its device already)
        model.to(env.device)
    if env.distributed:
        seen: set[int] = set()
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                dist.broadcast(t.data, src=0)


def gather_to_main(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0 (None elsewhere): what only rank 0 writes."""
    if not env.distributed:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
