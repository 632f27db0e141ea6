"""`fsdp`: FSDP2 `fully_shard` per transformer block (LM and vision encoder), then the root.

Mixed precision on CUDA with precision bf16: parameters are all-gathered and computed in bf16, gradients
reduced in fp32, and the sharded master weights and optimizer state stay fp32. `offload` other than none
puts the sharded parameters, gradients and optimizer step on the CPU (FSDP2's CPUOffloadPolicy). Only
rank 0 reads the weights; the others shard a meta-device skeleton and receive their shards by broadcast
(`set_model_state_dict(..., broadcast_from_rank0=True)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from vlm_trainer import family
from vlm_trainer.parallel import to_empty_keeping_ties
from vlm_trainer.strategies.base import OptimizerFactory, Strategy, grad_clip_norm
from vlm_trainer.strategies.dcp import dcp_load, dcp_save, full_state_dict


class FSDPStrategy(Strategy):
    name = "fsdp"

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs: dict = {}
        if self.bf16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.stage.offload != "none":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in family.decoder_blocks(module):  # each block one FSDP unit
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)

    def _materialize(self, module: nn.Module) -> None:
        """Shard first, then allocate: ranks other than 0 shard a meta-device skeleton and allocate only
        their shards; rank 0 keeps its full copy (read from the files) until every shard has been sent."""
        env = self.env
        full = module.state_dict() if env.is_main else {}
        on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
        self._shard(module)
        if on_meta:
            to_empty_keeping_ties(module, env.device)
        elif env.device.type == "cuda":
            module.to(env.device)
        if env.distributed:
            set_model_state_dict(
                module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
            )
            # Non-persistent buffers (rotary frequencies, position ids) are in no state dict: send them too.
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)
        del full

    def prepare(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self._materialize(module)
        self.module = self.model = module
        self.optimizer = make_optimizer(module)

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        self._materialize(module)
        return module

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts the parameters itself

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm(self.stage)) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, local_dir: str) -> None:
        dcp_save(self.module, self.optimizer, local_dir)

    def load(self, local_dir: str) -> None:
        dcp_load(self.module, self.optimizer, local_dir)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.module, self.env)
