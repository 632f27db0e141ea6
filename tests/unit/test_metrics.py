"""Trainer metrics: scraped over real HTTP from the endpoint `TrainerMetrics` serves.

Checks the exposition a Prometheus server would see: names with units and `_total`, the
job/stage/rank labels on every series, and values derived from what the loop reported.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from vlm_core import contract
from vlm_core.accounting import gpu_for_device
from vlm_trainer.metrics import (
    CPU_PEAK_FLOPS_PER_SECOND,
    TrainerMetrics,
    default_peak_flops_per_second,
    read_memory,
    resolve_metrics_port,
)

EXPECTED_FAMILIES = {
    # family name (as the parser reports it) -> type
    "vlm_trainer_tokens_per_second": "gauge",
    "vlm_trainer_samples_per_second": "gauge",
    "vlm_trainer_tokens": "counter",
    "vlm_trainer_samples": "counter",
    "vlm_trainer_mfu_ratio": "gauge",
    "vlm_trainer_device_peak_flops_per_second": "gauge",
    "vlm_trainer_loss": "gauge",
    "vlm_trainer_learning_rate": "gauge",
    "vlm_trainer_grad_norm": "gauge",
    "vlm_trainer_step_seconds": "histogram",
    "vlm_trainer_data_wait_ratio": "gauge",
    "vlm_trainer_data_wait_seconds": "counter",
    "vlm_trainer_device_memory_allocated_bytes": "gauge",
    "vlm_trainer_device_memory_reserved_bytes": "gauge",
    "vlm_trainer_device_memory_peak_bytes": "gauge",
    "vlm_trainer_device_memory_capacity_bytes": "gauge",
    "vlm_trainer_checkpoint_save_seconds": "histogram",
    "vlm_trainer_step": "gauge",
    "vlm_trainer_total_steps": "gauge",
    "vlm_trainer_eta_seconds": "gauge",
}


def scrape_families(port: int) -> dict[str, Metric]:
    """GET /metrics and parse it with the Prometheus text parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape(port: int) -> dict[str, float]:
    """The scraped samples as {'name{label=value,...}': value}, labels sorted."""
    samples: dict[str, float] = {}
    for family in scrape_families(port).values():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def value(samples: dict[str, float], name: str, rank: int = 1, **extra: str) -> float:
    labels = {"job": "demo", "stage": "align", "rank": str(rank), **extra}
    return samples[f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"]


@pytest.fixture
def metrics() -> Iterator[TrainerMetrics]:
    with TrainerMetrics("demo", "align", rank=1, port=0, peak_flops_per_second=1e9, addr="127.0.0.1") as m:
        assert m.start_server() == m.port and m.port
        yield m


def test_endpoint_serves_every_metric_with_job_stage_rank_labels(metrics: TrainerMetrics) -> None:
    metrics.set_progress(0, total_steps=100)
    metrics.observe_step(
        1,
        tokens=4096,
        samples=32,
        loss=2.5,
        lr=1e-3,
        grad_norm=0.7,
        step_seconds=0.5,
        data_wait_seconds=0.1,
        flops=2e8,
    )
    metrics.observe_checkpoint(1.5)
    metrics.observe_memory()
    samples = scrape(metrics.port)
    families = scrape_families(metrics.port)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, f"{name}: {families[name].type} != {kind}"
        for sample in families[name].samples:
            if sample.name.endswith("_created"):
                continue
            assert {"job": "demo", "stage": "align", "rank": "1"}.items() <= sample.labels.items(), sample
    # Counters are exposed with `_total`, durations in seconds, memory in bytes (Prometheus conventions).
    assert value(samples, "vlm_trainer_tokens_total") == 4096
    assert value(samples, "vlm_trainer_samples_total") == 32
    assert any(k.startswith("vlm_trainer_step_seconds_bucket{") for k in samples)


def test_values_follow_from_the_reported_steps(metrics: TrainerMetrics) -> None:
    metrics.set_progress(0, total_steps=10)
    metrics.observe_step(
        1,
        tokens=1000,
        samples=10,
        loss=3.0,
        lr=1e-3,
        grad_norm=1.0,
        step_seconds=2.0,
        data_wait_seconds=0.5,
        flops=1e9,
    )
    metrics.observe_step(
        2,
        tokens=1000,
        samples=10,
        loss=2.0,
        lr=5e-4,
        grad_norm=None,
        step_seconds=1.0,
        data_wait_seconds=0.25,
        flops=4e8,
        eta_seconds=15.2,
    )
    samples = scrape(metrics.port)
    assert value(samples, "vlm_trainer_tokens_total") == 2000
    assert value(samples, "vlm_trainer_tokens_per_second") == pytest.approx(1000.0)
    assert value(samples, "vlm_trainer_samples_per_second") == pytest.approx(10.0)
    assert value(samples, "vlm_trainer_mfu_ratio") == pytest.approx(0.4)  # 4e8 FLOP / 1 s / 1e9 peak
    assert value(samples, "vlm_trainer_loss") == 2.0
    assert value(samples, "vlm_trainer_learning_rate") == 5e-4
    assert value(samples, "vlm_trainer_grad_norm") == 1.0  # None leaves the last value
    assert value(samples, "vlm_trainer_data_wait_ratio") == pytest.approx(0.25)
    assert value(samples, "vlm_trainer_data_wait_seconds_total") == pytest.approx(0.75)
    assert value(samples, "vlm_trainer_step_seconds_count") == 2
    assert value(samples, "vlm_trainer_step_seconds_sum") == pytest.approx(3.0)
    assert value(samples, "vlm_trainer_step_seconds_bucket", le="1.0") == 1
    assert value(samples, "vlm_trainer_step_seconds_bucket", le="2.5") == 2
    assert value(samples, "vlm_trainer_step") == 2
    assert value(samples, "vlm_trainer_total_steps") == 10
    assert value(samples, "vlm_trainer_eta_seconds") == pytest.approx(15.2)  # as the loop reported it


def test_progress_and_checkpoints(metrics: TrainerMetrics) -> None:
    metrics.set_progress(5, total_steps=5)  # resumed at the end: nothing left
    metrics.observe_checkpoint(0.3)
    metrics.observe_checkpoint(12.0)
    samples = scrape(metrics.port)
    assert value(samples, "vlm_trainer_eta_seconds") == 0
    assert value(samples, "vlm_trainer_checkpoint_save_seconds_count") == 2
    assert value(samples, "vlm_trainer_checkpoint_save_seconds_sum") == pytest.approx(12.3)
    assert value(samples, "vlm_trainer_checkpoint_save_seconds_bucket", le="0.5") == 1


def test_memory_on_cpu_is_the_process_rss(metrics: TrainerMetrics) -> None:
    ballast = bytearray(64 * 1024 * 1024)  # 64 MiB, touched
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    sample = metrics.observe_memory()
    samples = scrape(metrics.port)
    assert sample.device == "cpu"
    allocated = value(samples, "vlm_trainer_device_memory_allocated_bytes")
    assert allocated == sample.allocated_bytes >= 64 * 1024 * 1024
    assert value(samples, "vlm_trainer_device_memory_peak_bytes") >= allocated
    assert allocated < value(samples, "vlm_trainer_device_memory_capacity_bytes")
    del ballast


def test_two_instances_in_one_process_keep_separate_registries() -> None:
    with (
        TrainerMetrics("demo", "align", rank=0, port=0, addr="127.0.0.1") as rank0,
        TrainerMetrics("demo", "align", rank=1, port=0, addr="127.0.0.1") as rank1,
    ):
        rank0.start_server()
        rank1.start_server()
        rank0.observe_step(1, 10, 1, 1.0, 1e-3, 1.0, 1.0)
        rank1.observe_step(1, 30, 3, 1.0, 1e-3, 1.0, 1.0)
        assert value(scrape(rank0.port), "vlm_trainer_tokens_total", rank=0) == 10
        assert value(scrape(rank1.port), "vlm_trainer_tokens_total", rank=1) == 30


def test_port_from_env_and_local_rank() -> None:
    assert resolve_metrics_port({}) == contract.METRICS_PORT
    assert resolve_metrics_port({"LOCAL_RANK": "3"}) == contract.METRICS_PORT + 3
    assert resolve_metrics_port({contract.METRICS_PORT_ENV: "9100", "LOCAL_RANK": "1"}) == 9101
    assert resolve_metrics_port({contract.METRICS_PORT_ENV: "0", "LOCAL_RANK": "1"}) == 0
    assert resolve_metrics_port({contract.METRICS_PORT_ENV: "off"}) is None
    with pytest.raises(ValueError, match=contract.METRICS_PORT_ENV):
        resolve_metrics_port({contract.METRICS_PORT_ENV: "ninety"})
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        resolve_metrics_port({"LOCAL_RANK": "x"})
    m = TrainerMetrics.from_env(
        "demo", "align", env={"RANK": "5", "LOCAL_RANK": "1", contract.METRICS_PORT_ENV: "off"}
    )
    assert m.rank == 5 and m.start_server() is None


def test_a_taken_port_does_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        m = TrainerMetrics("demo", "align", rank=0, port=taken.getsockname()[1], addr="127.0.0.1")
        assert m.start_server() is None
    assert contract.METRICS_PORT_ENV in caplog.text
    m.observe_step(1, 1, 1, 1.0, 1e-3, 1.0, 1.0)  # still records


def test_peak_flops_defaults_and_bad_inputs() -> None:
    assert default_peak_flops_per_second("NVIDIA H100 80GB HBM3") == 989e12
    assert default_peak_flops_per_second("NVIDIA A100-SXM4-40GB") == 312e12
    assert default_peak_flops_per_second(None) == CPU_PEAK_FLOPS_PER_SECOND
    # One table (accounting.GPUS, the estimator's): families matched longest first, memory variants by name.
    assert default_peak_flops_per_second("NVIDIA L4") == 121e12
    assert default_peak_flops_per_second("NVIDIA L40S") == 362e12
    assert default_peak_flops_per_second("NVIDIA GeForce RTX 4090") == 165e12
    assert gpu_for_device("NVIDIA A100-SXM4-40GB").name == "A100-40GB"  # type: ignore[union-attr]
    assert gpu_for_device("NVIDIA H200").memory_gib == 139.8  # type: ignore[union-attr]
    assert gpu_for_device("Some Accelerator") is None
    assert TrainerMetrics("demo", "align", 0, port=None).peak_flops_per_second == CPU_PEAK_FLOPS_PER_SECOND
    with pytest.raises(ValueError, match="peak_flops_per_second"):
        TrainerMetrics("demo", "align", 0, port=None, peak_flops_per_second=0)
    with pytest.raises(ValueError, match="job"):
        TrainerMetrics("", "align", 0, port=None)
    m = TrainerMetrics("demo", "align", 0, port=None)
    with pytest.raises(ValueError, match="step_seconds"):
        m.observe_step(1, 1, 1, 1.0, 1e-3, 1.0, step_seconds=0)
    assert read_memory().capacity_bytes > 0
