"""A stand-in operator process for the Prometheus test: the real `vlm_operator.metrics` endpoint,
fed the observations a reconcile loop makes (job phases, stage durations, restarts, handoffs,
reconcile errors). Prints `PORT <n>` once serving, then keeps observing until killed.
"""

from __future__ import annotations

import argparse
import time

from vlm_operator import metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    metrics.serve(port=args.port, addr="127.0.0.1")
    print(f"PORT {args.port}", flush=True)

    metrics.set_job_phase("team-a", "quickstart", "Running")
    metrics.set_job_phase("team-a", "yesterday", "Succeeded")
    metrics.set_job_phase("team-b", "broken", "Failed")
    tick = 0
    while True:
        tick += 1
        if tick % 5 == 1:
            metrics.STAGE_DURATION.labels(stage_type="align").observe(620.0 + tick)
            metrics.HANDOFF_LATENCY.observe(0.8)
        if tick % 7 == 1:
            metrics.STAGE_DURATION.labels(stage_type="instruct").observe(1840.0)
            metrics.STAGE_RESTARTS.labels(stage_type="instruct").inc()
        if tick % 11 == 1:
            metrics.RECONCILE_ERRORS.inc()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
