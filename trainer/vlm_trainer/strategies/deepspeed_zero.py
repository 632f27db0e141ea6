"""`zero2` and `zero3`: DeepSpeed ZeRO, with the DeepSpeed config generated from the stage spec.

ZeRO-2 shards optimizer state and gradients (every rank holds the parameters); ZeRO-3 shards the
parameters too. The engine receives the stage's torch AdamW (param groups with their own learning rates)
at wrap time, so no DeepSpeed optimizer op is JIT-built; bf16 is enabled on CUDA only. DeepSpeed is imported
lazily: only these two strategies need it. Checkpoints are DeepSpeed's own (one optimizer-state file per
rank, frozen parameters excluded), which cannot resume on another world size.

On CPU DeepSpeed JIT-builds its shared-memory comm op (`deepspeed_shm_comm`) with gcc on first use, through
torch's `cpp_extension`, which guards each build folder with a `lock` file: created when a build starts,
removed when it ends. A build that is killed (a timeout, Ctrl-C, the OOM killer) leaves the lock behind, and
every later run then waits for it forever, silently. So before a ZeRO run starts, `clear_stale_build_locks`
removes the locks no live process builds behind (see there), and logs each one it removes.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from vlm_core.spec import StageSpec

from vlm_trainer.parallel import materialize_from_rank0, to_empty_keeping_ties
from vlm_trainer.strategies.base import OptimizerFactory, Strategy

CHECKPOINT_TAG = "deepspeed"
# A lock younger than this with no live holder may be a build that is just starting: wait until it is this old.
STALE_BUILD_LOCK_SECONDS = 10.0

log = logging.getLogger(__name__)


def torch_extension_roots() -> list[str]:
    """Where torch's `cpp_extension` (and so DeepSpeed's JIT ops) builds: `$TORCH_EXTENSIONS_DIR`, or its
    default root (~/.cache/torch_extensions), under which torch adds a `<python>_<accelerator>` level."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [os.environ["TORCH_EXTENSIONS_DIR"]]
    from torch.utils.cpp_extension import get_default_build_root

    return [get_default_build_root()]


def build_locks(roots: list[str]) -> list[str]:
    """The `lock` files of the extension build folders under `roots` (<root>/<op>/lock, <root>/<py_acc>/<op>/lock)."""
    found: set[str] = set()
    for root in roots:
        for pattern in ("*/lock", "*/*/lock"):
            found.update(glob.glob(os.path.join(glob.escape(root), pattern)))
    return sorted(found)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def build_lock_holder(lock: str, proc: str = "/proc") -> str | None:
    """A live process that builds behind `lock`, described; None if there is none. A process counts if it
    holds the lock file open (torch's FileBaton keeps the descriptor it created the lock with open for the
    whole build), works in the build folder (ninja and the compiler run there) or names the folder in its
    command line. Processes this one may not inspect (another user's) are passed over."""
    folder = os.path.dirname(os.path.realpath(lock))
    lock_path = os.path.realpath(lock)
    names_folder = re.compile(re.escape(folder) + r"(?:/|$)")  # the folder, not a sibling whose name extends it
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        base = os.path.join(proc, pid)
        try:
            with open(os.path.join(base, "cmdline"), "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not args:  # a zombie or a kernel thread
            continue
        what = f"pid {pid} ({os.path.basename(args[0])})"
        try:
            if _inside(os.readlink(os.path.join(base, "cwd")), folder):
                return what
        except OSError:
            pass
        if any(names_folder.search(arg) for arg in args):
            return what
        try:
            fds = os.listdir(os.path.join(base, "fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(base, "fd", fd)) == lock_path:
                    return what
            except OSError:
                continue
    return None


def clear_stale_build_locks(
    roots: list[str] | None = None,
    *,
    proc: str = "/proc",
    stale_after: float = STALE_BUILD_LOCK_SECONDS,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Remove the extension build locks that no live process builds behind (`build_lock_holder`) and that
    are at least `stale_after` seconds old (a younger one is waited on until it is that old, gone, or has a
    builder); return the removed paths. A lock with a live builder is kept: torch waits for that build."""
    removed = []
    for lock in build_locks(torch_extension_roots() if roots is None else roots):
        while True:
            try:
                age = clock() - os.stat(lock).st_mtime
            except FileNotFoundError:
                break
            holder = build_lock_holder(lock, proc)
            if holder is not None:
                log.info("JIT build lock %s is held by %s, a build in progress: kept", lock, holder)
                break
            if age >= stale_after:
                try:
                    os.remove(lock)
                except FileNotFoundError:
                    break
                removed.append(lock)
                log.warning(
                    "removed a stale JIT build lock %s (%.0f s old, no process builds in %s): a build killed "
                    "before it finished left it, and torch would have waited for it forever",
                    lock, age, os.path.dirname(lock),
                )
                break
            sleep(min(1.0, stale_after - age))
    return removed


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
