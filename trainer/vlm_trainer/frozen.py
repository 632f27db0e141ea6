"""A frozen vision tower runs in inference mode: eval mode (`model.set_train_modes`) and no autograd.

When no parameter of the tower trains (align, instruct: `trainable` without `vision_tower`, no adapters
in it), its forward runs under `torch.no_grad()`: nothing of it is recorded for backward and none of its
activations are kept, whatever wraps it (activation checkpointing, DDP, FSDP2). Its output feeds the
projector, which trains; gradients of the projector and the LM are unchanged (the tower's output never
needed a gradient). Under bf16 autocast the tower computes in bf16 like the rest; its master weights stay
fp32 so `final/` carries them unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from vlm_trainer.family import vision_tower


def vision_tower_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in vision_tower(module).parameters())


def run_frozen_tower_in_inference(module: nn.Module) -> bool:
    """Make a frozen vision tower's forward run without autograd; returns whether it was frozen (and set)."""
    tower = vision_tower(module)
    if not vision_tower_frozen(module) or getattr(tower, "_vlm_inference_forward", False):
        return False
    forward = tower.forward

    @functools.wraps(forward)
    def inference_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return forward(*args, **kwargs)

    tower.forward = inference_forward
    tower._vlm_inference_forward = True
    return True
