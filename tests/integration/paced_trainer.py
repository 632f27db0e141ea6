"""`python -m vlm_trainer`, paced by the test that watches it (tests/integration/test_prometheus.py).

Before each optimizer step a rank waits until the step's number is at most the one in the file named by
`$PACED_TRAINER_GATE`. The test writes that number from what Prometheus has scraped (the lowest step it
has seen on any rank, plus a few), and holds the last step back until it has found the moment its checks
read; so the stage never runs ahead of the scraper, on a fast quiet machine as on a loaded one. The wait
comes before the step's clock starts: step times, data-wait and throughput metrics are the trainer's own.

Test-only, so it lives here and not in the trainer: a script torchrun runs in place of `-m vlm_trainer`,
wrapping `Trainer.train_step_async`. If the test stops rewriting the gate (it rewrites it several times a
second) for `STALL_SECONDS`, the ranks run free, so a stage whose test died still ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from vlm_trainer import __main__ as entry
from vlm_trainer.trainer import Trainer

GATE_ENV = "PACED_TRAINER_GATE"
STALL_SECONDS = 30.0
POLL_SECONDS = 0.02


def allowed_step(gate: str) -> int | None:
    """The highest step the test lets the ranks take; None once the test is gone (the gate went stale)."""
    try:
        if time.time() - os.stat(gate).st_mtime > STALL_SECONDS:
            return None
        with open(gate) as f:
            return int(f.read())
    except FileNotFoundError:
        return None
    except ValueError:  # read between the test's create and write: it writes with a rename, but be safe
        return 0


def paced(step_async: Callable[[Trainer], Any], gate: str) -> Callable[[Trainer], Any]:
    free = False

    def train_step_async(self: Trainer) -> Any:
        nonlocal free
        step = self.step + 1
        while not free:
            allowed = allowed_step(gate)
            if allowed is None:
                print(f"paced_trainer: {gate} missing or stale for {STALL_SECONDS} s; running free", file=sys.stderr)
                free = True
            elif step <= allowed:
                break
            else:
                time.sleep(POLL_SECONDS)
        return step_async(self)

    return train_step_async


if __name__ == "__main__":
    Trainer.train_step_async = paced(Trainer.train_step_async, os.environ[GATE_ENV])
    entry.exit_now(entry.main())
