"""Operator metrics (prometheus-client), served on :8080/metrics. Names are fixed: a dashboard uses them.

- vlm_operator_jobs{phase}                          gauge: VLMTrainingJobs by phase
- vlm_operator_stage_duration_seconds{stage_type}   histogram: stage Job start -> final/ committed
- vlm_operator_stage_restarts_total{stage_type}     counter: gang restarts
- vlm_operator_handoff_latency_seconds              histogram: stage k done -> stage k+1 Job created
- vlm_operator_reconcile_errors_total               counter: reconciles that raised
"""

from __future__ import annotations

import threading
from datetime import datetime

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

METRICS_PORT = 8080
PHASES = ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended")

JOBS = Gauge("vlm_operator_jobs", "VLMTrainingJobs by phase", ["phase"])
STAGE_DURATION = Histogram(
    "vlm_operator_stage_duration_seconds",
    "Wall time of a stage, first Job start to final/ verified committed",
    ["stage_type"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200),
)
STAGE_RESTARTS = Counter("vlm_operator_stage_restarts_total", "Gang restarts of stages", ["stage_type"])
HANDOFF_LATENCY = Histogram(
    "vlm_operator_handoff_latency_seconds",
    "Stage k done (Job complete) to stage k+1 Job created",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
RECONCILE_ERRORS = Counter("vlm_operator_reconcile_errors_total", "Reconciles that raised an error")

_phases: dict[tuple[str, str], str] = {}
_phases_lock = threading.Lock()


def set_job_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone) and refresh the per-phase gauge."""
    with _phases_lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase
        counts = dict.fromkeys(PHASES, 0)
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            JOBS.labels(phase=p).set(n)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds between two RFC 3339 timestamps, or None if either is missing."""
    if not start or not end:
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return max(0.0, (parse(end) - parse(start)).total_seconds())


def serve(port: int = METRICS_PORT, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics in a background thread."""
    start_http_server(port, addr=addr, registry=registry)
