"""The operator-trainer contract: every name both sides read (env, paths, files, records, labels, ports).

Torch-free and Kubernetes-free; imported by both packages and tested from both sides. If a name is
spelled here, no other module spells it again.
"""

from __future__ import annotations

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

# Exception types a restart cannot fix (a configuration problem, another writer holding the stage, a
# non-finite loss that would recur from the same checkpoint): a stage failing with one (by torchelastic's
# error record) is failed at once, not retried.
NOT_RETRIED_ERRORS = ("ModelConfigError", "SpecError", "ValidationError", "ConfigurationError", "LeaseHeldError",
                      "NonFiniteError")

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

# Prometheus endpoint per trainer process: port METRICS_PORT + local rank.
METRICS_PORT = 9400
METRICS_PORT_ENV = "VLM_METRICS_PORT"

# Labels on every object the operator creates.
LABEL_JOB = "training.vlm.dev/job"
LABEL_STAGE = "training.vlm.dev/stage"
LABEL_STAGE_INDEX = "training.vlm.dev/stage-index"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "vlm-operator"

RDZV_PORT = 29400


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
