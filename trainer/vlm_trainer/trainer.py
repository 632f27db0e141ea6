"""The training loop of one stage: a `Trainer` whose parts are typed attributes, built once, run once.

Order of assembly (torchtitan's): model (from initFrom or the parts; on rank 0 only, other ranks build it
on the meta device) -> freezing or LoRA adapters -> activation checkpointing
-> per-block torch.compile (`stage.compile`) -> the stage's strategy
(`vlm_trainer.strategies`: DDP, FSDP2 or DeepSpeed ZeRO-2/3) materialises and wraps model and optimizer
together -> schedule -> resume from the newest verified checkpoint. The loop has no strategy branches. Then: steps with gradient accumulation, clipping, checkpoints every N steps,
progress lines and Prometheus metrics; at the end evaluation on the held-out shards, `eval.json`, and
`final/` (published last: a committed final/ means the stage is done, and a re-run does nothing).

The loop is the same for every training stage kind; what differs (the objective, how samples are collated,
the eval statistics) the kind's module gives it (`StageKindHooks`, implemented in vlm_trainer.stages, which
also holds `run_stage`, the entry every kind shares).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from vlm_core import accounting, contract, storage
from vlm_core.spec import TrainerConfig

from vlm_trainer import family, lora
from vlm_trainer.checkpoint import Checkpointer, ResumeState
from vlm_trainer.data import LoaderPosition, count_samples, eval_samples
from vlm_trainer.features import FeatureCache, cache_root, setup_feature_cache
from vlm_trainer.final import write_hf_folder
from vlm_trainer.frozen import run_frozen_tower_in_inference
from vlm_trainer.loader import (
    BadDataError,
    Source,
    TrainLoader,
    bad_data_message,
    bad_share_exceeded,
    chunk_size,
    data_report,
    prefetch_per_worker,
)
from vlm_trainer.metrics import TrainerMetrics
from vlm_trainer.model import VLM, apply_freezing, build_vlm, param_groups, set_train_modes
from vlm_trainer.objective import Objective
from vlm_trainer.optim import build_optimizer, build_scheduler
from vlm_trainer.packing import efficiency, pack_row, packing_mode
from vlm_trainer.parallel import DistEnv, all_reduce_sum, all_reduce_tensor, gather_objects
from vlm_trainer.progress import ProgressReporter, emit
from vlm_trainer.samples import Encoded, SampleEncoder, SampleError
from vlm_trainer.strategies import Strategy, build_strategy
from vlm_trainer.strategies.compile import compile_blocks

log = logging.getLogger(__name__)
# steps taken before the loop reads them back at the latest (the log interval is progress.log_every steps)
MAX_UNREAD_STEPS = 50


def total_steps_of(config: TrainerConfig) -> int:
    """maxSteps, or epochs x samples / global batch (samples counted from the shards' tar headers)."""
    stage = config.stage
    if stage.max_steps is not None:
        return stage.max_steps
    samples = sum(count_samples(source.shards) for source in stage.data.source_list())  # a tar or a Parquet source
    if samples == 0:
        raise ValueError("stage.data.shards: the shards hold no samples")
    return max(1, math.ceil(stage.epochs * samples / stage.batch.global_size))


def process_start_time() -> float:
    """When this process started (s since the epoch): the start of the stage's start-up as this rank sees it."""
    import psutil

    return float(psutil.Process().create_time())


class StageKindHooks(Protocol):
    """What a training stage kind (its module in vlm_trainer.stages) gives the shared loop."""

    @property
    def sequences_per_sample(self) -> int:
        """Rows of a collated batch per sample (a preference pair: chosen and rejected)."""
        ...

    def objective(self, trainer: Trainer, *, reads_weights: bool) -> Objective:
        """The stage's objective, built after the strategy has wrapped the model (a reference model, if any,
        placed by `trainer.strategy`; `reads_weights`: this rank reads checkpoint weights)."""
        ...

    def collate(self, items: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """A micro-batch of encoded samples (sequences or pairs) as padded tensors."""
        ...

    def eval_statistics(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        """The eval report's statistics from the objective's stat sums over `samples` held-out samples."""
        ...

    def step_batches(self, trainer: Trainer) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step (grad-accumulation steps of them), on the device."""
        ...

    def adapt_model(self, trainer: Trainer, module: nn.Module) -> None:
        """Change the built model in place before freezing, LoRA and the strategy (a reward model's scalar head);
        also applied to the base a LoRA adapter is merged into for final/."""
        ...

    def always_trained(self, module: nn.Module) -> tuple[str, ...]:
        """Module paths (in the family's model) that train whatever stage.trainable says (LoRA: modules_to_save)."""
        ...

    def final_weights(self, trainer: Trainer, folder: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of final/'s Hugging Face folder, from the full trained ones; the kind may write its own files
        into `folder` (rank 0)."""
        ...


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient norm or weight: the stage stops and commits nothing (not retried)."""


@dataclass
class StepResult:
    loss: float
    lr: float  # the base (non-projector) learning rate the optimizer used for this step
    grad_norm: float
    tokens: int
    samples: int
    local_tokens: int
    local_samples: int
    seconds: float
    data_wait_seconds: float
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class PendingStep:
    """A step taken but not read back: its sums (loss, tokens, samples, bad, seen, stats) reduced over ranks
    and its gradient norm, still on the device."""

    step: int
    sums: torch.Tensor
    denominator: torch.Tensor
    grad_norm: torch.Tensor | float
    lr: float
    stat_names: list[str]
    local_tokens: int
    local_samples: int
    started: float
    seconds: float
    data_wait_seconds: float


class Trainer:
    """One stage's training, resumable. Build with `Trainer.build(config, env)`, then `run()`."""

    config: TrainerConfig
    env: DistEnv
    vlm: VLM
    strategy: Strategy  # owns the wrapped model, the optimizer, backward/step and sharded state
    kind: StageKindHooks  # what the stage's kind decides: objective, collate, eval statistics
    objective: Objective
    scheduler: torch.optim.lr_scheduler.LambdaLR
    encoder: SampleEncoder
    loader: TrainLoader
    checkpointer: Checkpointer
    metrics: TrainerMetrics | None
    total_steps: int
    step: int
    stats: dict[str, Any]

    @classmethod
    def build(cls, config: TrainerConfig, env: DistEnv, kind: StageKindHooks) -> Trainer:
        self = cls()
        self.config, self.env, self.kind = config, env, kind
        stage = config.stage
        self.started = time.perf_counter()
        self.startup: dict[str, float] = {"process_start": process_start_time(), "build_start": time.time()}
        lora.check_qlora_device(stage, env.device)
        self.total_steps = total_steps_of(config)
        self.checkpointer = Checkpointer(
            config.output, stage.name, every_steps=stage.checkpoint.every_steps,
            keep_last=stage.checkpoint.keep_last, env=env, fingerprint=config.fingerprint,
        )
        self.strategy = build_strategy(stage, env)

        # Memory-safe build: only rank 0 reads the weights (each rank its own 4-bit copy for QLoRA).
        reads_weights = env.is_main or stage.qlora
        self.vlm = build_vlm(config.model, config.init_from, seed=stage.seed, materialize=reads_weights,
                             resolution_policy=stage.data.resolution)
        self.encoder = SampleEncoder(self.vlm.processor, max_length=stage.data.max_length,
                                     max_images=stage.data.max_images)
        self.metrics = None
        latest = self.checkpointer.latest_verified()
        if latest is None:  # a fresh start: the data workers fill their shuffle buffers while the model is wrapped
            self._make_loader(None)
        module: nn.Module = self.vlm.model
        if stage.qlora:
            module = lora.quantized_copy(self.vlm, env.device)
        kind.adapt_model(self, module)
        always = kind.always_trained(module)
        if stage.lora is not None:
            module = lora.apply_lora(module, stage, env.device, modules_to_save=always)
            set_train_modes(module, list(stage.trainable))
        else:
            apply_freezing(module, list(stage.trainable), always=always)
        if stage.gradient_checkpointing:
            family.base_model(module).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        run_frozen_tower_in_inference(module)  # a frozen vision tower: no autograd, no activations kept
        self.feature_cache: FeatureCache | None = None
        if stage.cache_vision_features:  # the frozen tower's features computed once per image (vlm_trainer.features)
            self.feature_cache = setup_feature_cache(
                module, root=cache_root(config.storage.uri, config.job), compute=f"{stage.precision}:{env.device.type}",
                fingerprint_of_rank0=lambda fp: gather_objects(fp, env)[0],
            )
        if stage.compile:  # per block, after activation checkpointing and before the strategy wraps (torchtitan)
            compile_blocks(module)
        make_optimizer = lora.paged_adamw if stage.qlora else build_optimizer
        self.strategy.prepare(module, lambda m: make_optimizer(param_groups(m, stage), stage))

        self.objective = kind.objective(self, reads_weights=reads_weights)

        self.scheduler = build_scheduler(self.strategy.optimizer, self.total_steps, stage.schedule)
        self.flop_rates = accounting.flops_for_trainer(family.base_model(module).config.to_dict(), stage)  # the estimator's FLOPs (MFU)

        self.step, self.stats = 0, {}
        position: LoaderPosition | None = None
        self.resumed: ResumeState | None = None
        for skipped in self.checkpointer.skipped:  # said in the normal output and the stage report
            self._emit(contract.EVENT_CHECKPOINT_SKIPPED, **skipped)
        if latest is not None:
            self.resumed = self.checkpointer.load(latest[1], self.strategy, self.scheduler)
            self.step, self.stats, position = self.resumed.step, self.resumed.stats, self.resumed.data_position
            self._emit(contract.EVENT_RESUME, step=self.step, checkpoint=self.resumed.uri, from_world_size=self.resumed.world_size)
        else:
            # Different data-order/dropout streams per rank; the model was initialised identically above.
            random.seed(stage.seed + env.rank)
            np.random.seed(stage.seed + env.rank)
            torch.manual_seed(stage.seed + env.rank)
        self.metrics = self._start_metrics()
        if latest is not None:
            self._make_loader(position)
        attn = getattr(family.base_model(module).config.get_text_config(), "_attn_implementation", None)
        self.packing = packing_mode(attn)
        self._step_data = {"samples": 0, "tokens": 0, "capacity": 0}
        self._data_totals = {"tokens": 0, "capacity": 0, "wait_seconds": 0.0, "step_seconds": 0.0}
        return self

    # --- assembly helpers -------------------------------------------------------------------------

    @property
    def hf_model(self) -> nn.Module:
        """The model itself (PEFT-wrapped with LoRA; sharded in place under FSDP2/ZeRO-3)."""
        return self.strategy.module

    def _start_metrics(self) -> TrainerMetrics | None:
        metrics = TrainerMetrics.serve(self.config.job, self.config.stage.name)
        if metrics is not None:
            metrics.set_progress(self.step, self.total_steps)
        return metrics

    def _emit(self, event: str, **fields: Any) -> None:
        if self.env.is_main:
            emit(event, stage=self.config.stage.name, **fields)

    # --- data -------------------------------------------------------------------------------------

    def _make_loader(self, position: LoaderPosition | None) -> None:
        """The training loader, its worker processes started (they read and encode ahead from here on)."""
        stage, env = self.config.stage, self.env
        chunk = chunk_size(stage.batch.micro_size if stage.batch.tokens_per_micro_batch is None else 16)
        self.loader = TrainLoader(
            [Source(s.shards, s.format, s.weight) for s in stage.data.source_list()], self.encoder.encode,
            seed=stage.seed, rank=env.rank, world=env.world_size, shuffle_buffer=stage.data.shuffle_buffer,
            workers=stage.data.workers, position=position,
            prefetch_factor=prefetch_per_worker(stage.batch.micro_size * stage.grad_accum_steps, stage.data.workers,
                                                chunk),
            on_bad=self._observe_bad, max_bad_share=stage.data.max_bad_sample_share, chunk=chunk,
            cache_bytes=stage.data.cache_mib << 20,
        )
        self.loader.start()

    def _observe_bad(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_bad_sample(reason)

    def _collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return self._to_device(self.kind.collate(items, self.vlm.processor.tokenizer.pad_token_id))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.env.device.type == "cuda":  # pinned host memory: the copy overlaps the previous step's kernels
            return {k: v.pin_memory().to(self.env.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """One micro-batch from the loader: microSize samples padded, or one packed row (tokensPerMicroBatch)."""
        stage = self.config.stage
        capacity = stage.batch.tokens_per_micro_batch
        if capacity is not None:
            items: list[Any] = self.loader.next_packed(capacity)
            mask_dtype = torch.float32 if self.packing == "mask" and self._eager_attention() else None
            batch = self._to_device(pack_row(items, mode=self.packing, mask_dtype=mask_dtype))
            lengths = [len(e.input_ids) for e in items]
        else:
            items = self.loader.next_samples(stage.batch.micro_size)
            batch = self._collate(items)
            seqs = [e for p in items for e in ((p,) if isinstance(p, Encoded) else (p.chosen, p.rejected))]
            lengths = [len(e.input_ids) for e in seqs]
            capacity = max(lengths) * len(lengths) if lengths else 0
        self._step_data["samples"] += len(items)
        self._step_data["tokens"] += sum(lengths)
        self._step_data["capacity"] += capacity
        return batch

    def _eager_attention(self) -> bool:
        config = family.base_model(self.hf_model).config.get_text_config()
        return getattr(config, "_attn_implementation", None) == "eager"

    # --- one optimizer step -----------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step, read back at once (a host sync): benchmarks and tests."""
        return self.resolve(self.train_step_async())

    def train_step_async(self) -> PendingStep:
        """One optimizer step without a host sync: the loss, statistics and counts are reduced over ranks on the
        device, the gradient norm stays a device tensor; `resolve` reads them (the loop: at log intervals)."""
        env = self.env
        started = time.perf_counter()
        self._step_data = {"samples": 0, "tokens": 0, "capacity": 0}
        batches = self.kind.step_batches(self)  # micro-batches from the loader (an RL kind: its rollouts)
        data_wait = time.perf_counter() - started
        step_data = self._step_data
        units = torch.stack([self.objective.count_tensor(b).double() for b in batches])
        global_units = all_reduce_tensor(units.sum(), env)
        # Gradients are averaged over ranks by DDP/FSDP; scaling by world / global units makes the step's
        # gradient the mean over every unit (answer token or pair) of the global batch.
        denominator = global_units.clamp(min=1.0)
        scale = (env.world_size / denominator).float()
        loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
        stat_sums = {name: torch.zeros((), device=env.device, dtype=torch.float64) for name in self.objective.stat_names}
        strategy = self.strategy
        for i, batch in enumerate(batches):
            with strategy.micro_step(last=i == len(batches) - 1):
                with strategy.autocast():
                    micro_loss, stats = self.objective(strategy.model, batch)
                strategy.backward(micro_loss * scale)
            loss_sum += micro_loss.detach().double()
            for name, value in stats.items():
                stat_sums[name] += value.detach().double()
        local_tokens, local_samples = step_data["tokens"], step_data["samples"]
        lr_used = self._current_lr()
        position = self.loader.position
        host = torch.tensor([local_tokens, local_samples, sum(position.bad.values()), position.seen],
                            dtype=torch.float64).to(env.device, non_blocking=True)
        sums = all_reduce_tensor(torch.cat([loss_sum.view(1), host, *(v.view(1) for v in stat_sums.values())]), env)
        self._data_totals["tokens"] += local_tokens
        self._data_totals["capacity"] += step_data["capacity"]
        self._data_totals["wait_seconds"] += data_wait
        if self.metrics is not None:
            self.metrics.observe_packing(efficiency(local_tokens, step_data["capacity"]))
        # a non-finite step: DDP's fused AdamW skips the update on the device (the weights stay clean); the loop
        # raises when it reads the step (`resolve`), before any checkpoint or final/ is written
        grad_norm = strategy.step()
        self.scheduler.step()
        return PendingStep(
            step=self.step + 1, sums=sums, denominator=denominator, grad_norm=grad_norm, lr=lr_used,
            stat_names=list(stat_sums), local_tokens=local_tokens, local_samples=local_samples,
            started=started, seconds=max(time.perf_counter() - started, 1e-9), data_wait_seconds=data_wait,
        )

    def resolve(self, pending: PendingStep, seconds: float | None = None) -> StepResult:
        """Read a step's device values on the host (a sync); raise for a non-finite loss or gradient norm and
        for too many bad samples (collective: every rank resolves the same steps)."""
        sums = pending.sums.tolist()
        denominator = float(pending.denominator)
        grad_norm = float(pending.grad_norm)
        step = pending.step
        self._check_bad_share(bad=sums[3], seen=sums[4])
        if not math.isfinite(sums[0]):
            raise NonFiniteError(f"step {step}: the loss is {sums[0] / denominator} (non-finite); stopped, nothing "
                                 "was committed. Lower optimizer.lr or check the data")
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"step {step}: the gradient norm is {grad_norm} (non-finite); stopped, nothing "
                                 "was committed. Lower optimizer.lr, set optimizer.gradClip, or check the data")
        return StepResult(
            loss=sums[0] / denominator,
            lr=pending.lr,
            grad_norm=grad_norm,
            tokens=int(sums[1]),
            samples=int(sums[2]),
            local_tokens=pending.local_tokens,
            local_samples=pending.local_samples,
            seconds=seconds if seconds is not None else max(time.perf_counter() - pending.started, 1e-9),
            data_wait_seconds=pending.data_wait_seconds,
            stats={n: sums[5 + i] / max(sums[2], 1.0) for i, n in enumerate(pending.stat_names)},
        )

    def _check_bad_share(self, bad: float, seen: float) -> None:
        """Collective decision (all ranks see the same sums): fail past data.maxBadSampleShare, naming shards."""
        max_share = self.config.stage.data.max_bad_sample_share
        if bad_share_exceeded(bad, seen, max_share):
            positions = gather_objects(self.loader.position, self.env)
            raise BadDataError(bad_data_message(positions, max_share))

    def _data_section(self) -> dict[str, Any]:
        """Collective: the stage report's data section over all ranks (bad samples by reason and shard)."""
        positions = gather_objects(self.loader.position, self.env)
        totals = self._data_totals
        tokens, capacity, wait, busy = all_reduce_sum(
            [totals["tokens"], totals["capacity"], totals["wait_seconds"], totals["step_seconds"]], self.env
        )
        stage = self.config.stage
        return {
            **data_report(positions),
            "workers": stage.data.workers,
            "packed": stage.batch.tokens_per_micro_batch is not None,
            "packing_efficiency": round(efficiency(int(tokens), int(capacity)), 4),
            # this run's steps (a resumed run: since the resume), summed over ranks
            "data_wait_share": round(wait / busy, 4) if busy > 0 else None,
        }

    def _current_lr(self) -> float:
        """The learning rate the optimizer is about to use (base group; the projector's is a multiple)."""
        groups = self.strategy.optimizer.param_groups
        base = [g for g in groups if g.get("part") != "projector"] or groups
        return float(base[0]["lr"])

    # --- the stage --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        stage, env = self.config.stage, self.env
        self._emit(
            contract.EVENT_START, step=self.step, total=self.total_steps, world_size=env.world_size, strategy=stage.strategy,
            init_from=self.config.init_from, trainable=list(stage.trainable), device=str(env.device),
        )
        progress = ProgressReporter(self.config.output, self.total_steps, is_main=env.is_main, start_step=self.step)
        self.startup["built"] = time.time()
        pending: list[PendingStep] = []
        window_start = time.perf_counter()
        while self.step < self.total_steps:
            pending.append(self.train_step_async())  # no host sync: steps queue up on the device
            self.step += 1
            due = self.checkpointer.due(self.step, self.total_steps)
            if due or self.step % progress.log_every == 0 or self.step in (progress.start_step + 1, self.total_steps) \
                    or len(pending) >= MAX_UNREAD_STEPS:
                self._read_steps(pending, progress, window_start)  # the log interval: read the steps back
                pending, window_start = [], time.perf_counter()
            if self.checkpointer.due(self.step, self.total_steps):
                seconds = self.checkpointer.save(
                    self.step, self.strategy, self.scheduler, self.loader.position,
                    total_steps=self.total_steps, stats=self.stats,
                )
                if self.metrics is not None:
                    self.metrics.observe_checkpoint(seconds)
                self._emit(contract.EVENT_CHECKPOINT, step=self.step, seconds=round(seconds, 3))
            every = stage.evaluation.every_steps if stage.evaluation is not None else None
            if every and self.step % every == 0 and self.step < self.total_steps:
                self.generation_eval()

        self.loader.close()
        self._check_replicas()
        data = self._data_section()
        self._emit(contract.EVENT_DATA, **{k: v for k, v in data.items() if k != "bad_samples_by_shard"})
        if self.feature_cache is not None:
            self._emit(contract.EVENT_VISION_FEATURE_CACHE, fingerprint=self.feature_cache.fingerprint,
                       **self.feature_cache.stats.as_dict())
        evaluation = self.evaluate()
        if stage.evaluation is not None:  # evaluation by generation at the end (eval.json's `generation`)
            evaluation["generation"] = self.generation_eval()
        report = {
            "stage": stage.name,
            "type": stage.type,
            "steps": self.total_steps,
            "train_loss_first": self.stats.get("train_loss_first"),
            "train_loss_last": self.stats.get("train_loss_last"),
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            "resumed_from_step": self.resumed.step if self.resumed else None,
            "skipped_checkpoints": self.checkpointer.skipped,
            "world_size": env.world_size,
            # what produced this stage's output (vlm_core.fingerprint; final/manifest.json has the whole record)
            "fingerprint": (self.config.fingerprint or {}).get("digest"),
            "data": data,
            # wall-clock times (s since the epoch) of this rank-0 process: its start, build start, model built,
            # first step done (issue 14's start-up accounting; `bench/startup_bench.py` reads them)
            "startup": {k: round(v, 3) for k, v in self.startup.items()},
            # stage.cacheVisionFeatures: rank 0's look-ups (hits from memory / storage, misses, writes)
            "vision_feature_cache": self.feature_cache.stats.as_dict() if self.feature_cache is not None else None,
            **evaluation,
        }
        if env.is_main:
            storage.write_json(storage.join(self.config.output, contract.EVAL_FILE), report)
        self._emit(contract.EVENT_EVAL, **evaluation)
        final = self._publish_final(evaluation)
        progress.write(self.step, loss=self.stats.get("train_loss_last"), tokens_per_second=None)
        self._emit(contract.EVENT_DONE, final=final, steps=self.total_steps, wall_seconds=report["wall_seconds"])
        if self.metrics is not None:
            self.metrics.set_progress(self.step, self.total_steps)
            self.metrics.close()
        return report

    def _read_steps(self, pending: list[PendingStep], progress: ProgressReporter, window_start: float) -> None:
        """Read queued steps back (one host sync), in order: non-finite and bad-share checks, stats, progress lines
        and metrics. On CUDA each step's time is the window's wall time over its steps (the host ran ahead of
        the device, so a per-step host clock would show launch time); elsewhere the step's own measured time."""
        window: float | None = None
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
            window = max(time.perf_counter() - window_start, 1e-9) / len(pending)
        for item in pending:
            result = self.resolve(item, seconds=window if window is not None else item.seconds)
            self._data_totals["step_seconds"] += result.seconds
            self.startup.setdefault("first_step_done", time.time())
            self.stats.setdefault("train_loss_first", result.loss)
            self.stats["train_loss_last"] = result.loss
            eta = progress.step(
                item.step,
                step_seconds=result.seconds,
                loss=result.loss,
                lr=result.lr,
                tokens_per_second=result.tokens / result.seconds,
                samples_per_second=result.samples / result.seconds,
                grad_norm=result.grad_norm,
                **result.stats,
            )
            self._observe(result, result.lr, eta, step=item.step)

    def _publish_final(self, evaluation: dict[str, Any]) -> str:
        """final/: the full model in Hugging Face format (merged, plus adapter/, for LoRA). Collective."""
        stage, llava = self.config.stage, family.base_model(self.hf_model)
        state: dict[str, torch.Tensor] = {}
        if stage.lora is None:
            state = self.strategy.full_state_dict()

        def write(folder: str) -> None:
            weights = state
            if stage.lora is not None:
                adapter = f"{folder}/adapter"
                self.hf_model.save_pretrained(adapter)
                base = build_vlm(self.config.model, self.config.init_from, seed=stage.seed).model
                self.kind.adapt_model(self, base)
                weights = lora.merged_state_dict(base, adapter)
            bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:  # the last line of defence: final/ is never published with NaN/Inf weights
                raise NonFiniteError(f"final/ not published: {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[0]}")
            weights = self.kind.final_weights(self, folder, weights)
            write_hf_folder(folder, llava.config, llava.generation_config, weights, self.vlm.processor)

        return self.checkpointer.publish_final(write, step=self.total_steps,
                                               extra={"eval": evaluation, "config": self.config.dump()})

    def _observe(self, result: StepResult, lr: float, eta_seconds: float | None, *, step: int | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_step(
            self.step if step is None else step,
            tokens=result.local_tokens,
            samples=result.local_samples,
            loss=result.loss,
            lr=lr,
            grad_norm=result.grad_norm,
            step_seconds=result.seconds,
            data_wait_seconds=min(result.data_wait_seconds, result.seconds),
            # vlm_core.accounting's FLOPs (the estimator's): frozen parts forward (+ input gradient) only.
            flops=self.flop_rates.step_flops(result.local_tokens, result.local_samples) if self.flop_rates else None,
            eta_seconds=eta_seconds,
        )
        self.metrics.observe_stats(result.stats)
        self.metrics.observe_memory()

    def _check_replicas(self) -> None:
        """Replicas (DDP) must hold bit-identical parameters; a mismatch is a bug, not noise."""
        fingerprints = self.strategy.replica_fingerprints()
        if fingerprints is None:
            return
        self._emit(contract.EVENT_REPLICAS, parameter_sha256=fingerprints, equal=len(set(fingerprints)) == 1)
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"DDP replicas diverged: parameter sha256 per rank {fingerprints}")

    # --- evaluation -------------------------------------------------------------------------------

    def _eval_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """(batch, counts) pairs; every rank yields the same number of batches (FSDP2 forwards are
        collectives), ranks that run out repeat a batch that is not counted."""
        stage, env = self.config.stage, self.env
        total = count_samples(stage.data.eval_shards)
        per_rank = math.ceil(total / env.world_size)
        n_batches = math.ceil(per_rank / stage.batch.micro_size)
        samples = eval_samples(stage.data.eval_shards, rank=env.rank, world=env.world_size)
        filler: dict[str, torch.Tensor] | None = None
        for _ in range(n_batches):
            raws = [raw for _, raw in zip(range(stage.batch.micro_size), samples, strict=False)]
            encoded = [e for e in map(self._encode_eval, raws) if e is not None]
            if encoded:
                batch = self._collate(encoded)
                filler = batch
                yield batch, True
            else:
                if filler is None:
                    good = (e for e in map(self._encode_eval, eval_samples(stage.data.eval_shards, rank=0, world=1)) if e)
                    first = next(good, None)
                    if first is None:
                        raise BadDataError(f"stage.data.evalShards: no usable sample in {stage.data.eval_shards}")
                    filler = self._collate([first])
                yield filler, False

    def _encode_eval(self, raw: dict[str, Any]) -> Any:
        """A held-out sample encoded, or None when it is bad (skipped like training samples, logged)."""
        if "__bad__" in raw:
            log.warning("eval: %s", raw.get("__detail__"))
            return None
        try:
            return self.encoder.encode(raw, self.config.stage.data.eval_format)
        except SampleError as err:
            log.warning("eval: skipped a bad sample (%s) in %s: %s", err.reason, raw.get("__url__"), err)
            return None

    def generation_eval(self) -> dict[str, Any]:
        """stage.evaluation: greedy answers of the live model on its held-out shards, scored like an eval stage's
        (collective). Rank 0 writes <output>/generation-eval/step-<N>.jsonl (predictions), emits the evaluated
        event and sets the eval gauges; returns the metrics (with the step)."""
        from vlm_trainer.evaluation.generate import evaluate_by_generation
        from vlm_trainer.evaluation.scoring import headline

        stage, ev = self.config.stage, self.config.stage.evaluation
        assert ev is not None
        scores, samples = evaluate_by_generation(
            self.hf_model, self.vlm.processor, shards=ev.shards, fmt=ev.format, metrics=list(ev.metrics),
            max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, max_samples=ev.max_samples, env=self.env)
        set_train_modes(self.hf_model, list(stage.trainable))  # the frozen vision tower stays in eval mode
        scores = {"step": self.step, **scores}
        if self.env.is_main:
            lines = "".join(json.dumps(s.line()) + "\n" for s in samples)
            storage.write_text(storage.join(self.config.output, "generation-eval", f"step-{self.step}.jsonl"), lines)
            if self.metrics is not None:
                self.metrics.observe_eval(headline(scores))
        self._emit(contract.EVENT_EVALUATED, step=self.step, samples=scores["samples"], **headline(scores))
        return scores

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (and the kind's statistics, e.g. DPO's reward accuracy/margin) over stage.data.evalShards,
        summed over ranks."""
        stage = self.config.stage
        if not stage.data.eval_shards:
            return {"eval_loss": None}
        model = self.hf_model
        model.eval()
        names = list(self.objective.stat_names)
        loss_sum, units, samples = 0.0, 0, 0
        stat_sums = dict.fromkeys(names, 0.0)
        for batch, counts in self._eval_batches():
            with self.strategy.autocast():
                batch_loss, stats = self.objective(model, batch)
            if counts:
                loss_sum += float(batch_loss)
                units += self.objective.count(batch)
                samples += batch["input_ids"].shape[0] // self.kind.sequences_per_sample
                for n in names:
                    stat_sums[n] += float(stats[n])
        set_train_modes(model, list(stage.trainable))  # back to train modes (frozen vision tower stays eval)
        sums = all_reduce_sum([loss_sum, units, samples, *stat_sums.values()], self.env)
        result: dict[str, Any] = {"eval_loss": sums[0] / max(sums[1], 1.0), "eval_units": int(sums[1])}
        result.update(self.kind.eval_statistics(dict(zip(names, sums[3:], strict=True)), sums[2]))
        return result

