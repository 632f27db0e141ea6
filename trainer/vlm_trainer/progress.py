"""Rank 0's progress reports: one JSON object per line on stdout, and `<output>/progress.json`.

The local runner parses the stdout lines for progress bars. Event names, keys and the line format are
the contract's (`contract.EVENT_*`, `contract.KEY_*`, `contract.event_line`). `progress.json` is a
`contract.ProgressRecord`, rewritten every ~10 s.

The ETA is computed here and only here (`EtaClock`); the Prometheus gauge, progress.json, the step
lines and the local progress bars all show this one number.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from vlm_core import contract, storage

log = logging.getLogger(__name__)

# Weight of the newest step in the smoothed step time that the ETA uses.
ETA_SMOOTHING = 0.1


def emit(event: str, **fields: Any) -> None:
    """Print one event line (call on rank 0 only). Non-finite numbers become null: the line stays JSON."""
    sys.stdout.write(contract.event_line(event, **fields) + "\n")
    sys.stdout.flush()


class EtaClock:
    """Seconds to the stage's last step: remaining steps x an exponentially smoothed step time."""

    def __init__(self, total_steps: int, smoothing: float = ETA_SMOOTHING):
        self.total = total_steps
        self.smoothing = smoothing
        self.step_seconds: float | None = None

    def observe(self, step_seconds: float) -> None:
        ema = self.step_seconds
        self.step_seconds = step_seconds if ema is None else ema + self.smoothing * (step_seconds - ema)

    def eta_seconds(self, step: int) -> float | None:
        """None before the first observed step; 0 once the last step is done."""
        if step >= self.total:
            return 0.0
        if self.step_seconds is None:
            return None
        return (self.total - step) * self.step_seconds


class ProgressReporter:
    """Step lines every `log_every` steps (and the first and last), progress.json every `interval_seconds`."""

    def __init__(self, output: str, total_steps: int, *, is_main: bool, start_step: int, interval_seconds: float = 10.0):
        self.uri = storage.join(output, contract.PROGRESS_FILE)
        self.total = total_steps
        self.is_main = is_main
        self.log_every = max(1, total_steps // 100)
        self.interval = interval_seconds
        self.start_step = start_step
        self.clock = EtaClock(total_steps)
        self.last_write = 0.0

    def eta_seconds(self, step: int) -> float | None:
        return self.clock.eta_seconds(step)

    def step(self, step: int, *, loss: float, lr: float, tokens_per_second: float, samples_per_second: float,
             step_seconds: float, **extra: Any) -> float | None:
        """Record optimizer step `step` (1-based, done); returns the ETA in seconds."""
        self.clock.observe(step_seconds)
        eta = self.clock.eta_seconds(step)
        if not self.is_main:
            return eta
        if step % self.log_every == 0 or step == self.total or step == self.start_step + 1:
            emit(
                contract.EVENT_STEP,
                step=step,
                total=self.total,
                loss=round(loss, 6),
                lr=lr,
                tokens_per_second=round(tokens_per_second, 2),
                samples_per_second=round(samples_per_second, 3),
                eta_seconds=round(eta, 1) if eta is not None else None,
                **{k: round(v, 6) if isinstance(v, float) else v for k, v in extra.items()},
            )
        now = time.perf_counter()
        if now - self.last_write >= self.interval or step == self.total:
            self.last_write = now
            self.write(step, loss=loss, tokens_per_second=tokens_per_second)
        return eta

    def write(self, step: int, *, loss: float | None, tokens_per_second: float | None) -> None:
        if not self.is_main:
            return
        record = contract.ProgressRecord(
            step=step, total=self.total, tokens_per_second=tokens_per_second,
            eta_seconds=self.clock.eta_seconds(step), loss=loss, updated_at=time.time(),
        )
        try:
            storage.write_json(self.uri, record.to_doc())
        except OSError as err:  # progress is advisory; storage hiccups must not stop training
            log.warning("could not write %s: %s", self.uri, err)
