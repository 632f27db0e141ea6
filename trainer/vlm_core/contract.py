"""The operator-trainer contract: every name both sides read (env, paths, files, records, labels, ports).

Torch-free and Kubernetes-free; imported by both packages and tested from both sides. If a name is
spelled here, no other module spells it again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from vlm_core.storage import join

# The trainer entry point, as torchrun runs it: `torchrun ... -m vlm_trainer --config <uri>`.
TRAINER_MODULE = "vlm_trainer"
CONFIG_ENV = "VLM_TRAINER_CONFIG"  # URI/path of the resolved TrainerConfig JSON
CONFIG_MOUNT_DIR = "/etc/vlm-trainer"  # where the stage ConfigMap is mounted in pods
CONFIG_FILE = "config.json"
# torchelastic's structured error file: a failing rank's `@record`-ed main writes its exception there,
# and torchrun copies the first failure's record to the path in its own environment.
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
# The trainers' environment, set by both backends: the S3 endpoint of spec.storage.endpointUrl (botocore
# and s3fs read it), and unbuffered stdout so each event line reaches the launcher as it is printed.
ENDPOINT_URL_ENV = "AWS_ENDPOINT_URL"
UNBUFFERED_ENV = "PYTHONUNBUFFERED"

# Exception types a restart cannot fix (a configuration problem, another writer holding the stage, a
# non-finite loss that would recur from the same checkpoint, storage refusing the job's credentials or
# prefix: vlm_core.storage_errors, whose transient StorageUnavailable is retried): a stage failing with
# one (by torchelastic's error record) is failed at once, not retried.
NOT_RETRIED_ERRORS = ("ModelConfigError", "SpecError", "ValidationError", "ConfigurationError", "LeaseHeldError",
                      "NonFiniteError", "StorageError")

# Storage layout under <storage.uri>/<job>/<stage>/
FINAL_DIR = "final"  # HF-format weights, published when the stage ends (committed, manifest last)
CHECKPOINT_PREFIX = "checkpoint-"  # resumable checkpoints: checkpoint-<step>/
PROGRESS_FILE = "progress.json"  # a ProgressRecord, rewritten periodically by rank 0
EVAL_FILE = "eval.json"  # end-of-stage metrics (loss, DPO reward accuracy/margin), written by rank 0
TRAIN_LOG_FILE = "train-log.jsonl"  # the local runner's per-step history of a stage
REPORT_FILE = "report.json"  # per job, under <storage.uri>/<job>/
# A curate stage's committed final/: one output shard per input shard, and its reports.
CURATED_SHARD = "curated-{index:06d}.tar"
FUNNEL_FILE = "funnel.json"  # counts entering/leaving each filter, per reason, examples, throughput
DECISIONS_FILE = "decisions.jsonl"  # one {"key", "kept", "reason"} line per input sample
FUNNEL_CHART = "funnel.png"

# Prometheus endpoint per trainer process: port METRICS_PORT + local rank. A pod declares (and its
# NetworkPolicy opens) the ports of its first METRICS_PORTS_MAX local ranks.
METRICS_PORT = 9400
METRICS_PORT_ENV = "VLM_METRICS_PORT"
METRICS_PORTS_MAX = 8

# Labels on every object the operator creates.
LABEL_JOB = "training.vlm.dev/job"
LABEL_STAGE = "training.vlm.dev/stage"
LABEL_STAGE_INDEX = "training.vlm.dev/stage-index"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "vlm-operator"
LABEL_LAUNCH = "training.vlm.dev/launch"  # on a stage's Job and pods: which Job of the stage (0, 1, ...)

RDZV_PORT = 29400

# Trainer events: rank 0 prints one JSON object per line on stdout, `{"event": <name>, <key>: <value>...}`;
# the local runner parses them for its progress bars and messages (`parse_event`).
EVENT_KEY = "event"
EVENT_START = "start"
EVENT_STEP = "step"  # keys: step, total, loss, lr, tokens_per_second, samples_per_second, eta_seconds
EVENT_CHECKPOINT = "checkpoint"  # keys: step, seconds
EVENT_CHECKPOINT_SKIPPED = "checkpoint_skipped"  # keys: checkpoint, reason
EVENT_RESUME = "resume"  # keys: step, checkpoint, from_world_size
EVENT_DATA = "data"
EVENT_VISION_FEATURE_CACHE = "vision_feature_cache"
EVENT_EVAL = "eval"
EVENT_REPLICAS = "replicas"
EVENT_DONE = "done"  # keys: final, steps, wall_seconds
EVENT_SKIP = "skip"  # keys: stage, reason (final/ already committed: nothing to do)
EVENT_CURATE = "curate"  # a curate stage's shards: step (shards done), total
EVENT_CURATED = "curated"  # keys: input, kept, removed
EVENTS = frozenset({
    EVENT_START, EVENT_STEP, EVENT_CHECKPOINT, EVENT_CHECKPOINT_SKIPPED, EVENT_RESUME, EVENT_DATA,
    EVENT_VISION_FEATURE_CACHE, EVENT_EVAL, EVENT_REPLICAS, EVENT_DONE, EVENT_SKIP, EVENT_CURATE, EVENT_CURATED,
})
# The keys of those events that a reader relies on (the trainer passes them as keyword arguments of
# `progress.emit`; tests/unit/test_progress.py checks the lines it prints carry these).
KEY_STAGE = "stage"
KEY_STEP = "step"
KEY_TOTAL = "total"
KEY_LOSS = "loss"
KEY_LR = "lr"
KEY_TOKENS_PER_SECOND = "tokens_per_second"
KEY_SAMPLES_PER_SECOND = "samples_per_second"
KEY_ETA_SECONDS = "eta_seconds"
KEY_CHECKPOINT = "checkpoint"
KEY_REASON = "reason"
KEY_INPUT = "input"
KEY_KEPT = "kept"
KEY_REMOVED = "removed"
STEP_EVENT_KEYS = (KEY_STEP, KEY_TOTAL, KEY_LOSS, KEY_LR, KEY_TOKENS_PER_SECOND, KEY_SAMPLES_PER_SECOND,
                   KEY_ETA_SECONDS)


def metrics_ports(procs_per_node: int) -> list[int]:
    """The metrics ports a pod of `procs_per_node` processes declares: one per local rank, at most
    METRICS_PORTS_MAX."""
    return [METRICS_PORT + r for r in range(min(procs_per_node, METRICS_PORTS_MAX))]


def event_line(event: str, **fields: Any) -> str:
    """One trainer event as its stdout line (no newline). Non-finite numbers become null: the line stays
    strict JSON."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
    return json.dumps({EVENT_KEY: event, **clean})


def parse_event(text: str) -> dict[str, Any] | None:
    """The event on a line the trainer printed (rank prefix already removed), or None for any other line."""
    text = text.strip()
    if not text.startswith("{") or f'"{EVENT_KEY}"' not in text:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get(EVENT_KEY), str) else None


def job_output(storage_uri: str, job: str) -> str:
    """<storage.uri>/<job>: the job's reports."""
    return join(storage_uri, job)


def stage_output(storage_uri: str, job: str, stage: str) -> str:
    """<storage.uri>/<job>/<stage>: a stage's checkpoints, final/, progress and eval files."""
    return join(storage_uri, job, stage)


def stage_final(storage_uri: str, job: str, stage: str) -> str:
    """<storage.uri>/<job>/<stage>/final: the stage's committed Hugging Face output."""
    return join(stage_output(storage_uri, job, stage), FINAL_DIR)


def curated_shard(final: str, index: int) -> str:
    """<final>/curated-<index>.tar: the curate stage's output shard for input shard `index`."""
    return join(final, CURATED_SHARD.format(index=index))


@dataclass(frozen=True)
class ProgressRecord:
    """progress.json: what rank 0 last reported. Written by the trainer, read by the operator.

    Unknown or malformed values read as None (a trainer of another version must not break status)."""

    step: int | None = None
    total: int | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    loss: float | None = None
    updated_at: float | None = None

    def to_doc(self) -> dict[str, Any]:
        """Strict JSON: non-finite numbers are written as null."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> ProgressRecord:
        doc = doc if isinstance(doc, Mapping) else {}

        def num(key: str) -> float | None:
            v = doc.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return None
            return float(v)

        def whole(key: str) -> int | None:
            v = num(key)
            return int(v) if v is not None else None

        return cls(
            step=whole("step"),
            total=whole("total"),
            tokens_per_second=num("tokens_per_second"),
            eta_seconds=num("eta_seconds"),
            loss=num("loss"),
            updated_at=num("updated_at"),
        )
