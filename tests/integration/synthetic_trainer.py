"""A stand-in trainer process for the Prometheus test: `TrainerMetrics` fed with realistic numbers.

Run as one process per rank with torchrun's env (`RANK`, `LOCAL_RANK`) and `VLM_METRICS_PORT=0`;
prints `PORT <n>` once its endpoint is up, then reports a step every `--step-seconds` until killed.
The lead replaces this with a real training stage once the training loop is wired to the metrics.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from vlm_trainer.metrics import TrainerMetrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--total-steps", type=int, default=10_000)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    metrics = TrainerMetrics.from_env(args.job, args.stage, peak_flops_per_second=1e11)
    port = metrics.start_server()
    if port is None:
        sys.exit("metrics endpoint did not start")
    print(f"PORT {port}", flush=True)

    tokens_per_sample, batch = 256, 8
    flops_per_token = 6 * 2_000_000  # 6 x parameters for a 2M-parameter model (forward + backward)
    ballast = []
    metrics.set_progress(0, args.total_steps)
    for step in range(1, args.total_steps + 1):
        started = time.perf_counter()
        wait = 0.02 + 0.01 * rank
        time.sleep(wait)  # "data loading"
        ballast.append(bytearray(256 * 1024))  # memory that grows a little, like activations caching
        time.sleep(args.step_seconds - wait)  # "forward/backward/step"
        elapsed = time.perf_counter() - started
        tokens = tokens_per_sample * batch
        metrics.observe_step(
            step,
            tokens=tokens,
            samples=batch,
            loss=2.0 * math.exp(-step / 50) + 0.5,
            lr=1e-3 * min(1.0, step / 10),
            grad_norm=1.0 / math.sqrt(step),
            step_seconds=elapsed,
            data_wait_seconds=wait,
            flops=tokens * flops_per_token,
        )
        metrics.observe_memory()
        if step % args.checkpoint_every == 0:
            metrics.observe_checkpoint(0.05 + 0.01 * rank)


if __name__ == "__main__":
    main()
