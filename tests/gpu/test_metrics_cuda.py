"""Trainer metrics on a real GPU: memory comes from the CUDA allocator and MFU divides by the
device's dense bf16 peak (a large bf16 matmul must land between 30% and 100% of it).

Opt-in tier: runs on the accelerator machine only (`pytest -m gpu tests/gpu`).
"""

from __future__ import annotations

import urllib.request

import pytest
import torch
from vlm_core.accounting import gpu_for_device
from vlm_trainer.metrics import TrainerMetrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu is opt-in)"),
]

MIB = 1024 * 1024


def scraped(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not served")


def test_memory_reads_the_cuda_allocator() -> None:
    torch.cuda.set_device(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with TrainerMetrics("gpu", "check", 0, port=0, addr="127.0.0.1") as metrics:
        metrics.start_server()
        before = metrics.observe_memory()
        block = torch.empty(512 * MIB, dtype=torch.uint8, device="cuda")
        during = metrics.observe_memory()
        del block
        torch.cuda.empty_cache()
        after = metrics.observe_memory()
        assert during.device == "cuda:0"
        assert during.allocated_bytes - before.allocated_bytes >= 512 * MIB
        assert during.reserved_bytes >= during.allocated_bytes
        assert after.allocated_bytes <= during.allocated_bytes - 512 * MIB
        assert after.peak_bytes >= during.allocated_bytes  # the peak survives the free
        assert during.capacity_bytes == torch.cuda.get_device_properties(0).total_memory
        assert scraped(metrics.port, "vlm_trainer_device_memory_peak_bytes") == after.peak_bytes
        assert scraped(metrics.port, "vlm_trainer_device_memory_capacity_bytes") == during.capacity_bytes
        print(f"allocator: during={during}, after={after}")


def test_mfu_of_a_bf16_matmul_against_the_default_peak() -> None:
    name = torch.cuda.get_device_name(0)
    with TrainerMetrics("gpu", "check", 0, port=0, addr="127.0.0.1") as metrics:
        metrics.start_server()
        known = gpu_for_device(name)
        assert known is not None, f"no default peak for {name!r}: add it to vlm_core.accounting.GPUS"
        assert metrics.peak_flops_per_second == known.peak_flops_per_second
        n, iters = 8192, 50
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        flops = 2 * n**3 * iters
        metrics.observe_step(
            1,
            tokens=n * iters,
            samples=iters,
            loss=0.0,
            lr=0.0,
            grad_norm=None,
            step_seconds=seconds,
            flops=flops,
        )
        mfu = scraped(metrics.port, "vlm_trainer_mfu_ratio")
        print(
            f"{name}: {flops / seconds / 1e12:.0f} TFLOP/s bf16 matmul, MFU {mfu:.3f} of {known[0] / 1e12:.0f}"
        )
        assert mfu == pytest.approx(flops / seconds / known[0])
        assert 0.3 < mfu <= 1.0
