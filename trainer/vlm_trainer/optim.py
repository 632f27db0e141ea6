"""AdamW over the stage's parameter groups, and the learning-rate schedule (linear warmup, then decay)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from vlm_core import strategies
from vlm_core.spec import ScheduleSpec, StageSpec


def fused_applies(groups: list[dict], stage: StageSpec) -> bool:
    """torch's fused AdamW (one kernel for all parameters, on CPU and CUDA) where the parameters are plain
    tensors it supports, on the devices the strategy's row names (`fused_adamw_devices`: ddp on CPU or CUDA,
    fsdp's DTensor shards on CUDA), without offload; DeepSpeed drives its own flat partitions, and
    CPU-offloaded FSDP2 keeps the proven foreach path."""
    params = [p for g in groups for p in g["params"]]
    if not params or any(not p.is_floating_point() or p.is_meta for p in params):
        return False
    devices = strategies.traits(stage.strategy).fused_adamw_devices
    return stage.offload == strategies.NO_OFFLOAD and bool(devices) and all(p.device.type in devices for p in params)


def build_optimizer(groups: list[dict], stage: StageSpec) -> torch.optim.AdamW:
    if not groups:
        raise ValueError("stage.trainable: no parameter requires a gradient; nothing to train")
    return torch.optim.AdamW(groups, betas=tuple(stage.optimizer.betas), weight_decay=stage.optimizer.weight_decay,
                             fused=fused_applies(groups, stage))


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleSpec) -> float:
    """Share of the peak lr at optimizer step `step` (0-based): warmup ramps to 1, then the decay runs
    from 1 to min_lr_ratio at the last step (cosine or linear; constant stays at 1)."""
    warmup = int(round(schedule.warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule.type == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = schedule.min_lr_ratio
    if schedule.type == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: ScheduleSpec) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, schedule))
