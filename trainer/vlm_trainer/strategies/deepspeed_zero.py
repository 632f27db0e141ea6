"""`zero2` and `zero3`: DeepSpeed ZeRO, with the DeepSpeed config generated from the stage spec.

ZeRO-2 shards optimizer state and gradients (every rank holds the parameters); ZeRO-3 shards the
parameters too. The engine receives the stage's torch AdamW (param groups with their own learning rates)
at wrap time, so no DeepSpeed optimizer op is JIT-built; bf16 is enabled on CUDA only. DeepSpeed is imported
lazily: only these two strategies need it. Checkpoints are DeepSpeed's own (one optimizer-state file per
rank, frozen parameters excluded), which cannot resume on another world size.

On CPU DeepSpeed JIT-builds an op; a lock left by a killed build is cleared first (`build_locks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from vlm_core.spec import StageSpec

from vlm_trainer.parallel import materialize_from_rank0, to_empty_keeping_ties
from vlm_trainer.strategies.base import OptimizerFactory, Strategy
from vlm_trainer.strategies.build_locks import clear_stale_build_locks

CHECKPOINT_TAG = "deepspeed"


def deepspeed_config(stage: StageSpec, *, zero_stage: int, world_size: int, cuda: bool, with_optimizer: bool = True) -> dict[str, Any]:
    """The DeepSpeed config of a stage (pure): batch sizes, ZeRO stage, bf16 (CUDA only), clipping, offload."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if stage.offload in ("optimizer", "optimizer_and_params") and with_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if stage.offload == "optimizer_and_params" and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.batch.micro_size,
        "gradient_accumulation_steps": stage.batch.global_size // (stage.batch.micro_size * world_size),
        "train_batch_size": stage.batch.global_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cuda and stage.precision == "bf16"},
        # The client optimizer is torch's AdamW: supported by ZeRO, nothing to compile (also with offload).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if with_optimizer:
        config["gradient_clipping"] = float(stage.optimizer.grad_clip)
    return config


class ZeroStrategy(Strategy):
    zero_stage: int

    def _config(self, with_optimizer: bool = True) -> dict[str, Any]:
        return deepspeed_config(
            self.stage, zero_stage=self.zero_stage, world_size=self.env.world_size,
            cuda=self.env.device.type == "cuda", with_optimizer=with_optimizer,
        )

    def _materialize(self, module: nn.Module, config: dict[str, Any]) -> None:
        if self.zero_stage < 3:
            materialize_from_rank0(module, self.env)
            return
        import deepspeed

        # DeepSpeed's own comm layer wraps the process group torchrun/vlm_trainer already joined.
        deepspeed.init_distributed(dist_backend="nccl" if self.env.device.type == "cuda" else "gloo")
        # ZeRO-3: allocate, then zero.Init broadcasts rank 0's values one parameter at a time and keeps
        # only this rank's partition (the other ranks' allocations are freed parameter by parameter).
        buffers_meta = any(b.is_meta for b in module.buffers())
        if any(p.is_meta for p in module.parameters()) or buffers_meta:
            to_empty_keeping_ties(module, self.env.device)
        else:
            module.to(self.env.device)
        deepspeed.zero.Init(module=module, config_dict_or_path=config)
        if self.env.distributed:
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)

    def prepare(self, module: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import deepspeed

        clear_stale_build_locks()  # before DeepSpeed's comm layer builds (or loads) its op
        config = self._config()
        # With bf16 the engine casts the module to bf16; frozen parameters never change, so rank 0 keeps
        # their fp32 values (it read them anyway) and final/ holds them bit-identical to the inputs.
        self.frozen_fp32 = {
            n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if not p.requires_grad
        } if self.bf16 and self.env.is_main else {}
        self._materialize(module, config)
        self.optimizer = make_optimizer(module)
        engine, _opt, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=config)
        self.engine = engine
        self.model = engine
        self.module = engine.module

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        import deepspeed

        clear_stale_build_locks()
        config = self._config(with_optimizer=False)
        self._materialize(module, config)
        if self.zero_stage < 3:
            return module
        # A partitioned module needs the engine's hooks to gather its parameters in forward (as TRL does).
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        return engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # with bf16 the engine holds the module in bf16 itself

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already scaled the loss to a mean over the global batch.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, local_dir: str) -> None:
        self.engine.save_checkpoint(local_dir, tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, local_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(
            local_dir, tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {local_dir}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights of trainable parameters, gathered module weights of frozen ones."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                if self.env.is_main:
                    out[name] = out[seen[id(param)]]
                continue
            seen[id(param)] = name
            if not param.requires_grad and self.bf16:  # the same decision on every rank: no gather at all
                if self.env.is_main:
                    out[name] = self.frozen_fp32[name]
                continue
            if param.requires_grad:
                full = safe_get_full_fp32_param(param)
            else:
                with deepspeed.zero.GatheredParameters([param], enabled=self.zero_stage == 3):
                    full = param.data.detach().clone()
            if self.env.is_main:
                out[name] = full.float().cpu()
        if self.env.is_main:
            persistent = set(self.module.state_dict(keep_vars=True))
            for name, buf in self.module.named_buffers():
                if name in persistent:
                    out[name] = buf.detach().float().cpu()
        return out


class Zero2Strategy(ZeroStrategy):
    name = "zero2"
    zero_stage = 2


class Zero3Strategy(ZeroStrategy):
    name = "zero3"
    zero_stage = 3
