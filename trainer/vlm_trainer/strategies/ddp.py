"""`ddp`: every rank holds the whole model (DistributedDataParallel); gradients are all-reduced.

Checkpoints are written with torch.distributed.checkpoint (DCP), which stores each replicated tensor once
(spread over the ranks), and load on any world size: the state is the same on every replica.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlm_trainer.parallel import gather_objects, materialize_from_rank0, parameter_sha256
from vlm_trainer.strategies.base import OptimizerFactory, Strategy, grad_clip_norm
from vlm_trainer.strategies.dcp import dcp_load, dcp_save, full_state_dict


class DDPStrategy(Strategy):
    name = "ddp"

    def prepare(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        materialize_from_rank0(module, self.env)
        self.module = module
        self.model = self._wrap(module) if self.env.distributed else module
        self.optimizer = make_optimizer(module)

    def _wrap(self, module: nn.Module) -> DistributedDataParallel:
        # Buffers are not re-broadcast each forward: they are constants here (rotary frequencies, position
        # ids) and the broadcast would be a collective inside eval forwards. torch 2.13 renamed the switch;
        # older releases (the GPU machine's 2.11) only know the old one.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(
            module,
            device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
            # A trainable vision tower has parameters outside the selected feature layer (last block,
            # post-norm, pooling head) that never get a gradient; DDP must be told to expect that.
            find_unused_parameters="vision_tower" in (self.stage.trainable or []),
            **no_buffer_sync,
        )

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        materialize_from_rank0(module, self.env)
        return module

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if last or not isinstance(self.model, DistributedDataParallel):
            yield
        else:
            with self.model.no_sync():
                yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        if params and self.optimizer.defaults.get("fused"):
            norm = self._fused_clip([p.grad for p in params if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm(self.stage)) if params else torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _fused_clip(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Clipping and the non-finite guard inside torch's fused AdamW (its AMP inputs): the kernel divides the
        gradients by `grad_scale` (= 1 / clip_grad_norm_'s coefficient) and skips the whole update when
        `found_inf` is set. No extra pass over the gradients and no host sync; the weights stay clean after a
        non-finite step (the loop raises when it reads the norm)."""
        norm = torch.nn.utils.get_total_norm(grads)
        max_norm = grad_clip_norm(self.stage)
        optimizer: Any = self.optimizer
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        optimizer.grad_scale = (
            torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0) if math.isfinite(max_norm) else None
        )
        return norm

    def save(self, local_dir: str) -> None:
        dcp_save(self.module, self.optimizer, local_dir)

    def load(self, local_dir: str) -> None:
        dcp_load(self.module, self.optimizer, local_dir)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.module, self.env)

    def replica_fingerprints(self) -> list[str] | None:
        if not self.env.distributed:
            return None
        return gather_objects(parameter_sha256(self.module), self.env)
