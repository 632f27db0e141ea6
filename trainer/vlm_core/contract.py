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

from vlm_core.redact import redact
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

# Which failures a restart can fix: ONE table, read by the launcher (exit code of a failed pod), the
# builders (each stage Job's podFailurePolicy), the operator (restart or fail, from a failed pod's exit code
# or its termination record) and the local backend (from torchelastic's error record).
# torchrun itself exits 1 whatever its workers' exit codes are, so the pod's entry point
# (`python -m LAUNCHER_MODULE -- torchrun ...`) maps the first failing rank's exception type to its code.


@dataclass(frozen=True)
class Failure:
    """One kind of trainer failure: the exception types that mean it, the pod's exit code, whether a
    restart can succeed, and the reason a Failed condition names."""

    reason: str
    exit_code: int
    retryable: bool
    what: str  # how a status message names it: "stage 'x' failed with <what> (not retried)"
    errors: tuple[str, ...] = ()  # exception type names (as torchelastic's record spells them)
    why: str = ""


FAILURES: tuple[Failure, ...] = (
    Failure("ConfigurationError", 78, False, "a configuration error",  # sysexits' EX_CONFIG
            ("ModelConfigError", "SpecError", "ValidationError", "ConfigurationError", "ResolutionError",
             "QLoRAUnavailable", "LeaseHeldError", "StorageError"),
            "the config, the model, storage refusing the job (credentials, access; vlm_core.storage_errors) or "
            "another writer holding the stage: the same again on every restart"),
    Failure("BadData", 65, False, "bad data over its budget", ("BadDataError",),  # EX_DATAERR
            "more bad samples than data.maxBadSampleShare: the same shards give the same share again"),
    Failure("NonFiniteLoss", 66, False, "a non-finite loss", ("NonFiniteError",),
            "a non-finite loss recurs from the same checkpoint on the same batches"),
    Failure("OutOfMemory", 67, False, "out of memory", ("OutOfMemoryError",),
            "out of memory: the restart resumes at the same batch with the same memory"),
    Failure("TrainerError", 75, True, "an error", (),  # EX_TEMPFAIL: any other exception a rank raised
            "another exception (storage, network, a peer lost): worth a gang restart"),
)
TRANSIENT = FAILURES[-1]
# A pod failing with one of these conditions was evicted (drain, preemption, node pressure) and did not
# fail on its own: its Job ignores it (podFailurePolicy Ignore), the operator restarts without spending
# maxRestarts.
DISRUPTION_CONDITION = "DisruptionTarget"

# For the table's readers that go by exception type name (the local backend) or exit code (pods).
NOT_RETRIED_ERRORS = tuple(e for f in FAILURES if not f.retryable for e in f.errors)


def failure_of_error(type_name: str) -> Failure:
    """The table's row for an exception type name (any type not listed is transient)."""
    return next((f for f in FAILURES if type_name in f.errors), TRANSIENT)


def failure_of_exit_code(code: int | None) -> Failure | None:
    """The table's row for a pod's exit code; None for a code not in it (a crash, a kill: transient)."""
    return next((f for f in FAILURES if f.exit_code == code), None)


# The pod's entry point around torchrun, and where it writes the first failing rank's record: the file the
# kubelet reads into the container's termination message (builders set terminationMessagePath to it;
# TERMINATION_LOG_ENV carries the path, so a test's kubelet stand-in can put the file elsewhere).
LAUNCHER_MODULE = "vlm_trainer.launch"
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "VLM_TERMINATION_LOG"
TERMINATION_MESSAGE_MAX = 4096  # bytes the kubelet keeps of a termination message


@dataclass(frozen=True)
class TrainerError:
    """The first failing rank's exception, from an error record (torchelastic's error file locally; the same
    record, without the traceback, in a pod's termination message)."""

    message: str  # "SomeError: message"
    rank: int | None = None
    timestamp: float | None = None

    @property
    def type_name(self) -> str:
        return self.message.split(":", 1)[0].rsplit(".", 1)[-1].strip()

    @property
    def failure(self) -> Failure:
        return failure_of_error(self.type_name)

    @property
    def retryable(self) -> bool:
        return self.failure.retryable

    def __str__(self) -> str:
        return redact(self.message if self.rank is None else f"rank {self.rank}: {self.message}")


def parse_error_record(text: str) -> TrainerError | None:
    """The exception in an error record (torchelastic's error-file JSON: `{"message": {"message": ...,
    "extraInfo": {"rank", "timestamp", ...}}}`), or None if `text` is not one."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    message = doc.get("message") if isinstance(doc, dict) else None
    info: dict = {}
    if isinstance(message, dict):
        extra = message.get("extraInfo")
        info = extra if isinstance(extra, dict) else {}
        message = message.get("message")
    if not isinstance(message, str) or not message:
        return None
    rank, stamp = info.get("rank"), info.get("timestamp")
    return TrainerError(
        message,
        int(rank) if isinstance(rank, (int, str)) and str(rank).isdigit() else None,
        float(stamp) if isinstance(stamp, (int, float, str)) and str(stamp).replace(".", "", 1).isdigit() else None,
    )


def error_record(error: TrainerError, exit_code: int) -> str:
    """The record a pod's termination message holds: torchelastic's format without the traceback, the
    message redacted and cut so that the whole record fits the kubelet's TERMINATION_MESSAGE_MAX bytes."""
    info: dict[str, Any] = {}
    if error.rank is not None:
        info["rank"] = str(error.rank)
    if error.timestamp is not None:
        info["timestamp"] = str(int(error.timestamp))
    full = redact(error.message)
    keep = len(full)
    while True:
        message = full if keep == len(full) else full[:keep] + "..."
        text = json.dumps({"message": {"message": message, "extraInfo": info}, "errorCode": exit_code},
                          ensure_ascii=False)
        excess = len(text.encode()) - TERMINATION_MESSAGE_MAX
        if excess <= 0:
            return text
        keep = max(0, min(keep, len(full)) - max(1, excess // 4) - 3)  # a character is 1 to 4 UTF-8 bytes


# Storage layout under <storage.uri>/<job>/<stage>/
FINAL_DIR = "final"  # HF-format weights, published when the stage ends (committed, manifest last)
CHECKPOINT_PREFIX = "checkpoint-"  # resumable checkpoints: checkpoint-<step>/
PROGRESS_FILE = "progress.json"  # a ProgressRecord, rewritten periodically by rank 0
EVAL_FILE = "eval.json"  # end-of-stage metrics (loss, DPO reward accuracy/margin), written by rank 0
PREDICTIONS_FILE = "predictions.jsonl"  # an eval stage's per-sample answers and scores (in its final/)
TRAIN_LOG_FILE = "train-log.jsonl"  # the local runner's per-step history of a stage
REPORT_FILE = "report.json"  # per job, under <storage.uri>/<job>/
# A curate stage's committed final/: one output shard per input shard, and its reports.
CURATED_SHARD = "curated-{index:06d}.tar"
FUNNEL_FILE = "funnel.json"  # counts entering/leaving each filter, per reason, examples, throughput
DECISIONS_FILE = "decisions.jsonl"  # one {"key", "kept", "reason"} line per input sample
FUNNEL_CHART = "funnel.png"
DUPLICATES_CHART = "duplicates.png"  # a sample of removed duplicates side by side with the sample each repeats
DUPLICATES_PAGE = "duplicates.html"  # the same sample as a page (images inline), with keys and similarities

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
EVENT_EVALUATED = "evaluated"  # an eval stage's metrics: samples, then one key per metric
EVENTS = frozenset({
    EVENT_START, EVENT_STEP, EVENT_CHECKPOINT, EVENT_CHECKPOINT_SKIPPED, EVENT_RESUME, EVENT_DATA,
    EVENT_VISION_FEATURE_CACHE, EVENT_EVAL, EVENT_REPLICAS, EVENT_DONE, EVENT_SKIP, EVENT_CURATE, EVENT_CURATED,
    EVENT_EVALUATED,
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


REPLACED_DIR = ".replaced"  # <storage.uri>/<job>/.replaced/<stamp>/<stage>: outputs a rerun set aside


def replaced_output(storage_uri: str, job: str, stage: str, stamp: str) -> str:
    """Where a rerun keeps a stage's previous outputs (never deleted by us): <storage.uri>/<job>/.replaced/<stamp>/<stage>."""
    return join(storage_uri, job, REPLACED_DIR, stamp, stage)


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


# `vlmctl curate calibrate` runs the trainer's calibration in a child process by this module name (the operator
# names no trainer module itself).
CURATE_CALIBRATE_MODULE = "vlm_trainer.curate.calibrate"
