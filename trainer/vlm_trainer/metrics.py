"""Prometheus metrics of one trainer process: throughput, MFU, loss, memory, checkpoints, progress.

Every torchrun process serves its own endpoint on port `contract.METRICS_PORT + LOCAL_RANK` (the
base port can be overridden with `contract.METRICS_PORT_ENV`; `0` binds an ephemeral port, `off`
disables the endpoint). One endpoint per process keeps the client library out of its multiprocess
mode (no shared directory, no cross-process locking); the `rank` label tells processes apart.

Every series carries the labels `job`, `stage` and `rank`. Because `job` is also Prometheus' own
target label, scrape configs must set `honor_labels: true` (the chart's PodMonitor does).

The class only records what the training loop reports; it never reads the loop's state itself:

    metrics = TrainerMetrics.from_env(job="demo", stage="align")
    metrics.start_server()
    metrics.set_progress(step=0, total_steps=300)
    ... per step:       metrics.observe_step(step, tokens, samples, loss, lr, grad_norm, secs, wait, flops)
    ... per checkpoint: metrics.observe_checkpoint(save_seconds)
    ... now and then:   metrics.observe_memory()
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from vlm_core import contract
from vlm_core.accounting import CPU_PEAK_FLOPS_PER_SECOND as CPU_PEAK_FLOPS_PER_SECOND  # re-exported
from vlm_core.accounting import peak_flops_for_device

log = logging.getLogger(__name__)

LABELS = ("job", "stage", "rank")

STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 600)
CHECKPOINT_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

_DISABLED = ("off", "none", "disabled")

# The RL stage's per-step statistics (stat name -> help), exported as vlm_trainer_rl_<name>.
RL_STATS = {
    "reward_mean": "RL: mean reward of the last step's sampled responses.",
    "reward_std": "RL: standard deviation of the rewards of the last step's responses (mean over micro-batches).",
    "kl": "RL: mean per-token KL (k3 estimator) of the policy to the frozen reference, last step.",
    "entropy": "RL: mean per-token entropy of the policy over the responses, last step.",
    "response_length": "RL: mean response length in tokens, last step.",
    "clip_fraction": "RL: share of response tokens whose probability ratio was clipped, last step.",
    "value_loss": "RL (ppo): clipped value loss of the value head, last step.",
}


def default_peak_flops_per_second(device_name: str | None) -> float:
    """Peak dense bf16 FLOP/s of a device named like `torch.cuda.get_device_name()`; CPU otherwise.
    One table for the estimator and the trainer's MFU: `vlm_core.accounting.GPUS`."""
    return peak_flops_for_device(device_name)


def resolve_metrics_port(env: Mapping[str, str] | None = None) -> int | None:
    """The port this process serves on: base (`METRICS_PORT` or `$VLM_METRICS_PORT`) + `LOCAL_RANK`.

    `VLM_METRICS_PORT=0` means an ephemeral port (for tests); `off` disables the endpoint (None).
    """
    env = os.environ if env is None else env
    raw = env.get(contract.METRICS_PORT_ENV, "").strip()
    if raw.lower() in _DISABLED:
        return None
    local_rank = _int_env(env, "LOCAL_RANK", 0)
    if not raw:
        return contract.METRICS_PORT + local_rank
    try:
        base = int(raw)
    except ValueError:
        raise ValueError(
            f"{contract.METRICS_PORT_ENV}={raw!r} is not a port: use an integer 1-65535, "
            f"0 for an ephemeral port, or 'off' to disable the metrics endpoint"
        ) from None
    if base == 0:
        return 0
    port = base + local_rank
    if not 0 < port < 65536:
        raise ValueError(
            f"{contract.METRICS_PORT_ENV}={raw!r} plus LOCAL_RANK={local_rank} gives port {port}, "
            "outside 1-65535"
        )
    return port


@dataclass(frozen=True)
class MemorySample:
    """Device memory of this process, bytes. On CPU allocated = reserved = resident set size."""

    device: str
    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int
    capacity_bytes: int


def read_memory() -> MemorySample:
    """CUDA allocator numbers when a GPU is in use, else the process' RSS and the memory limit."""
    torch = _torch_if_cuda()
    if torch is not None:
        index = torch.cuda.current_device()
        return MemorySample(
            device=f"cuda:{index}",
            allocated_bytes=int(torch.cuda.memory_allocated(index)),
            reserved_bytes=int(torch.cuda.memory_reserved(index)),
            peak_bytes=int(torch.cuda.max_memory_allocated(index)),
            capacity_bytes=int(torch.cuda.get_device_properties(index).total_memory),
        )
    rss = psutil.Process().memory_info().rss
    # ru_maxrss is in KiB on Linux.
    peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return MemorySample(
        device="cpu", allocated_bytes=rss, reserved_bytes=rss, peak_bytes=peak, capacity_bytes=_memory_limit()
    )


class TrainerMetrics:
    """The Prometheus series of one trainer process, in a registry of its own."""

    def __init__(
        self,
        job: str,
        stage: str,
        rank: int,
        port: int | None = contract.METRICS_PORT,
        peak_flops_per_second: float | None = None,
        *,
        addr: str = "0.0.0.0",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not job or not stage:
            raise ValueError(f"TrainerMetrics needs a job and a stage name, got job={job!r} stage={stage!r}")
        if peak_flops_per_second is not None and peak_flops_per_second <= 0:
            raise ValueError(f"peak_flops_per_second must be > 0, got {peak_flops_per_second!r}")
        self.job, self.stage, self.rank = job, stage, int(rank)
        self.requested_port = port
        self.addr = addr
        self.port: int | None = None  # the bound port, once start_server() succeeded
        self.peak_flops_per_second = peak_flops_per_second or default_peak_flops_per_second(_cuda_name())
        self.registry = registry if registry is not None else CollectorRegistry()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._total_steps: int | None = None
        self._build()

    @classmethod
    def from_env(
        cls,
        job: str,
        stage: str,
        peak_flops_per_second: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TrainerMetrics:
        """Rank from torchrun's `RANK`, port from `resolve_metrics_port`."""
        env = os.environ if env is None else env
        return cls(
            job,
            stage,
            _int_env(env, "RANK", 0),
            port=resolve_metrics_port(env),
            peak_flops_per_second=peak_flops_per_second,
        )

    @classmethod
    def serve(cls, job: str, stage: str) -> TrainerMetrics | None:
        """`from_env` with its endpoint started, or None (logged) when it cannot start: metrics are advisory,
        a bad port must not stop a stage."""
        try:
            metrics = cls.from_env(job, stage)
            metrics.start_server()
            return metrics
        except (ValueError, OSError) as err:
            log.warning("metrics disabled: %s", err)
            return None

    def _build(self) -> None:
        values = (self.job, self.stage, str(self.rank))

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(*values)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry).labels(*values)

        p = "vlm_trainer_"
        self.tokens_per_second = gauge(
            p + "tokens_per_second", "Tokens this process trained per second, last step."
        )
        self.samples_per_second = gauge(
            p + "samples_per_second", "Samples this process trained per second, last step."
        )
        self.tokens_total = counter(p + "tokens", "Tokens this process has trained.")
        self.samples_total = counter(p + "samples", "Samples this process has trained.")
        self.mfu_ratio = gauge(
            p + "mfu_ratio", "Model FLOP/s of the last step over the device's peak FLOP/s."
        )
        self.peak_flops = gauge(p + "device_peak_flops_per_second", "Peak FLOP/s the MFU ratio divides by.")
        self.loss = gauge(p + "loss", "Training loss of the last step.")
        self.learning_rate = gauge(p + "learning_rate", "Learning rate of the last step.")
        self.grad_norm = gauge(p + "grad_norm", "Gradient norm of the last step (before clipping).")
        self.step_seconds = histogram(
            p + "step_seconds", "Wall time of a training step.", STEP_SECONDS_BUCKETS
        )
        self.data_wait_ratio = gauge(p + "data_wait_ratio", "Share of the last step spent waiting for data.")
        self.data_wait_seconds_total = counter(p + "data_wait_seconds", "Time spent waiting for data.")
        self.memory_allocated = gauge(
            p + "device_memory_allocated_bytes", "Device memory held by tensors (CPU: resident set size)."
        )
        self.memory_reserved = gauge(
            p + "device_memory_reserved_bytes",
            "Device memory reserved by the allocator (CPU: resident set size).",
        )
        self.memory_peak = gauge(
            p + "device_memory_peak_bytes", "Peak device memory held by tensors (CPU: peak RSS)."
        )
        self.memory_capacity = gauge(
            p + "device_memory_capacity_bytes",
            "Device memory capacity (CPU: the memory limit of the process).",
        )
        self.checkpoint_save_seconds = histogram(
            p + "checkpoint_save_seconds",
            "Wall time to save and commit a checkpoint.",
            CHECKPOINT_SECONDS_BUCKETS,
        )
        self.step = gauge(p + "step", "Last completed optimizer step.")
        self.total_steps = gauge(p + "total_steps", "Optimizer steps this stage runs in total.")
        self.eta_seconds = gauge(p + "eta_seconds", "Estimated seconds until the stage's last step.")
        self.peak_flops.set(self.peak_flops_per_second)
        # Data loader (vlm_trainer.loader): skipped samples by reason, and how full the batches' rows are.
        self._bad_samples = Counter(
            p + "bad_samples", "Samples skipped as corrupt or unusable, by reason (truncated_shard, image_decode, "
            "bad_json, missing_field, no_assistant_turn, too_long, identical_pair, ...).", (*LABELS, "reason"),
            registry=self.registry,
        )
        self.packing_efficiency = gauge(
            p + "packing_efficiency_ratio", "Real tokens over row capacity of the last step's micro-batches "
            "(packed: rows x tokensPerMicroBatch; padded: rows x longest sample)."
        )
        # RL stages (vlm_trainer.stages.rl): the last step's rollout and policy statistics, by their stat names.
        self.rl_stats = {name: gauge(p + "rl_" + name, doc) for name, doc in RL_STATS.items()}

        # Eval stage (vlm_trainer.stages.eval): each metric of the held-out set, set by rank 0 when scored.
        self._eval_metric = Gauge(
            p + "eval_metric", "An eval stage's metric on its held-out set (vqa_accuracy, exact_match, "
            "relaxed_accuracy, multiple_choice_accuracy, pope_f1, pope_precision, pope_recall, pope_yes_ratio, "
            "caption_cider, caption_bleu4, ...), by metric.", (*LABELS, "metric"), registry=self.registry,
        )

    def observe_eval(self, metrics: Mapping[str, float]) -> None:
        """An eval stage's metrics (floats only), one series per metric."""
        for name, value in metrics.items():
            self._eval_metric.labels(self.job, self.stage, str(self.rank), name).set(value)

    def observe_bad_sample(self, reason: str) -> None:
        """One skipped sample of this process."""
        self._bad_samples.labels(self.job, self.stage, str(self.rank), reason).inc()

    def observe_packing(self, efficiency: float) -> None:
        self.packing_efficiency.set(efficiency)

    def observe_stats(self, stats: Mapping[str, float]) -> None:
        """The last step's objective statistics that have a series (the RL ones, `RL_STATS`); others are ignored."""
        for name, value in stats.items():
            if name in self.rl_stats:
                self.rl_stats[name].set(value)

    def start_server(self) -> int | None:
        """Serve /metrics; returns the bound port, or None when disabled or the port is taken.

        A taken port is logged, not raised: losing metrics must not stop a training run.
        """
        if self._server is not None:
            return self.port
        if self.requested_port is None:
            return None
        try:
            self._server, self._thread = start_http_server(
                self.requested_port, self.addr, registry=self.registry
            )
        except OSError as error:
            log.warning(
                "metrics endpoint not started: cannot bind %s:%s (%s); set %s to another base port or 'off'",
                self.addr,
                self.requested_port,
                error,
                contract.METRICS_PORT_ENV,
            )
            return None
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        """Stop the endpoint (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
            self.port = None

    def __enter__(self) -> TrainerMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def observe_step(
        self,
        step: int,
        tokens: int,
        samples: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        step_seconds: float,
        data_wait_seconds: float = 0.0,
        flops: float | None = None,
        eta_seconds: float | None = None,
    ) -> None:
        """Record one optimizer step of this process (tokens, samples and FLOPs of this rank only)."""
        if step_seconds <= 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds!r}")
        if tokens < 0 or samples < 0 or data_wait_seconds < 0:
            raise ValueError(
                f"tokens, samples and data_wait_seconds must be >= 0, got {tokens!r}, {samples!r}, "
                f"{data_wait_seconds!r}"
            )
        self.tokens_total.inc(tokens)
        self.samples_total.inc(samples)
        self.tokens_per_second.set(tokens / step_seconds)
        self.samples_per_second.set(samples / step_seconds)
        if flops is not None:
            self.mfu_ratio.set(flops / step_seconds / self.peak_flops_per_second)
        self.loss.set(loss)
        self.learning_rate.set(lr)
        if grad_norm is not None:
            self.grad_norm.set(grad_norm)
        self.step_seconds.observe(step_seconds)
        self.data_wait_seconds_total.inc(data_wait_seconds)
        self.data_wait_ratio.set(min(data_wait_seconds / step_seconds, 1.0))
        self.set_progress(step, self._total_steps, eta_seconds=eta_seconds)

    def observe_checkpoint(self, save_seconds: float) -> None:
        """Record the wall time of one checkpoint save (files and manifest committed)."""
        if save_seconds < 0:
            raise ValueError(f"save_seconds must be >= 0, got {save_seconds!r}")
        self.checkpoint_save_seconds.observe(save_seconds)

    def observe_memory(self) -> MemorySample:
        """Read device memory now (CUDA allocator, or process RSS on CPU) and publish it."""
        sample = read_memory()
        self.memory_allocated.set(sample.allocated_bytes)
        self.memory_reserved.set(sample.reserved_bytes)
        self.memory_peak.set(sample.peak_bytes)
        self.memory_capacity.set(sample.capacity_bytes)
        return sample

    def set_progress(self, step: int, total_steps: int | None, *, eta_seconds: float | None = None) -> None:
        """Publish the step, the stage's total and the ETA (computed by `progress.EtaClock`, the one ETA)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps!r}")
        self._total_steps = total_steps
        self.step.set(step)
        if total_steps is not None:
            self.total_steps.set(total_steps)
            if step >= total_steps:
                self.eta_seconds.set(0)
        if eta_seconds is not None:
            self.eta_seconds.set(eta_seconds)


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _torch_if_cuda() -> Any:
    """torch when it is importable and CUDA is available, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _cuda_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _memory_limit() -> int:
    """The cgroup v2 memory limit of this container when set (psutil does not read cgroups), else the
    machine's physical memory."""
    physical = psutil.virtual_memory().total
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            raw = limit.read().strip()
    except OSError:
        return physical
    return min(int(raw), physical) if raw.isdigit() else physical
