"""The strategy interface: how one stage's model is spread over the processes of the gang.

A strategy owns everything that differs between DDP, FSDP2 and DeepSpeed ZeRO, so the training loop has
no branches on it: it materialises the model memory-safely (ranks other than 0 build it on the meta
device and receive rank 0's weights), wraps model AND optimizer together (DeepSpeed needs the optimizer at
wrap time), runs backward with gradient-sync control per micro-batch, clips and steps, saves and loads
its sharded state (each rank writes its own files; nothing is gathered on rank 0), and gathers the full
state dict only for `final/`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import nn
from vlm_core import strategies as traits_table
from vlm_core.spec import StageSpec

from vlm_trainer.parallel import DistEnv

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy(ABC):
    """One stage's parallelism. Build with `strategies.build_strategy(stage, env)`, then `prepare()`."""

    name: ClassVar[str]  # the row of vlm_core.strategies this class implements

    model: nn.Module  # what training forwards go through (a DDP wrapper, a DeepSpeed engine, ...)
    module: nn.Module  # the model itself (sharded in place for FSDP2/ZeRO-3): eval, names, parameters
    optimizer: torch.optim.Optimizer  # the torch optimizer whose param_groups hold the learning rates

    def __init__(self, stage: StageSpec, env: DistEnv):
        self.stage = stage
        self.env = env

    @property
    def traits(self) -> traits_table.StrategyTraits:
        """What this strategy can do, from the torch-free table the spec and the estimator read."""
        return traits_table.traits(self.name)

    @property
    def checkpoint_format(self) -> str:
        """"dcp" (torch.distributed.checkpoint) or "deepspeed"."""
        return self.traits.checkpoint_format

    @property
    def reshardable(self) -> bool:
        """Can a checkpoint resume on a different world size?"""
        return self.traits.reshardable

    @property
    def bf16(self) -> bool:
        """bf16 compute is used on CUDA only; CPU runs compute in fp32 (master weights are fp32 everywhere)."""
        return self.env.device.type == "cuda" and self.stage.precision == "bf16"

    @abstractmethod
    def prepare(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Materialise (rank 0 holds the weights, other ranks a meta-device skeleton), wrap, and build the
        optimizer over the wrapped parameters. Collective."""

    @abstractmethod
    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen model (the DPO reference) placed like the policy; returns the module to call. Collective."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision around forwards (strategies that cast parameters themselves return a no-op)."""
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are synchronised only when `last`."""
        yield

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> torch.Tensor | float:
        """Clip to stage.optimizer.gradClip, optimizer step, zero the gradients; returns the global grad norm
        (a device tensor where the strategy can: the loop reads it at log intervals, no host sync per step)."""

    @abstractmethod
    def save(self, local_dir: str) -> None:
        """Write this rank's part of the trainable parameters and optimizer state under `local_dir`. Collective."""

    @abstractmethod
    def load(self, local_dir: str) -> None:
        """Restore what `save` wrote (a folder holding every rank's files). Collective."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and persistent buffer as full fp32 CPU tensors on rank 0 ({} elsewhere). Collective;
        used for `final/` only."""

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.module.named_parameters() if p.requires_grad}

    def replica_fingerprints(self) -> list[str] | None:
        """Per-rank parameter fingerprints where ranks hold replicas (DDP), else None. Collective."""
        return None


def grad_clip_norm(stage: StageSpec) -> float:
    return stage.optimizer.grad_clip or float("inf")
