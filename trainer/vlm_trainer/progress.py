"""Rank 0's progress reports: one JSON object per line on stdout, and `<output>/progress.json`.

The local runner parses the stdout lines for progress bars; each has an `event` key:
`{"event": "step", "step": s, "total": T, "loss": x, "lr": y, "tokens_per_second": z,
"samples_per_second": w, ...}` and `start`, `resume`, `checkpoint`, `eval`, `done`, `skip` events.
`progress.json` (step, total, tokens_per_second, eta_seconds, loss) is rewritten every ~10 s.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from vlm_trainer import contract, storage

log = logging.getLogger(__name__)


def emit(event: str, **fields: Any) -> None:
    """Print one JSON line (call on rank 0 only)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class ProgressReporter:
    """Step lines every `log_every` steps (and the first and last), progress.json every `interval_seconds`."""

    def __init__(self, output: str, total_steps: int, *, is_main: bool, start_step: int, interval_seconds: float = 10.0):
        self.uri = storage.join(output, contract.PROGRESS_FILE)
        self.total = total_steps
        self.is_main = is_main
        self.log_every = max(1, total_steps // 100)
        self.interval = interval_seconds
        self.start_step = start_step
        self.started = time.perf_counter()
        self.last_write = 0.0

    def eta_seconds(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * max(self.total - step, 0)

    def step(self, step: int, *, loss: float, lr: float, tokens_per_second: float, samples_per_second: float, **extra: Any) -> None:
        if not self.is_main:
            return
        if step % self.log_every == 0 or step == self.total or step == self.start_step + 1:
            emit(
                "step",
                step=step,
                total=self.total,
                loss=round(loss, 6),
                lr=lr,
                tokens_per_second=round(tokens_per_second, 2),
                samples_per_second=round(samples_per_second, 3),
                **{k: round(v, 6) if isinstance(v, float) else v for k, v in extra.items()},
            )
        now = time.perf_counter()
        if now - self.last_write >= self.interval or step == self.total:
            self.last_write = now
            self.write(step, loss=loss, tokens_per_second=tokens_per_second)

    def write(self, step: int, *, loss: float | None, tokens_per_second: float | None) -> None:
        if not self.is_main:
            return
        doc = {
            "step": step,
            "total": self.total,
            "tokens_per_second": tokens_per_second,
            "eta_seconds": self.eta_seconds(step),
            "loss": loss,
            "updated_at": time.time(),
        }
        try:
            storage.write_json(self.uri, doc)
        except OSError as err:  # progress is advisory; storage hiccups must not stop training
            log.warning("could not write %s: %s", self.uri, err)
