"""Pure functions from what exists (stage Jobs, storage verification, the previous status) to what is true.

Level-triggered: each reconcile recomputes every stage's `planner.StageObservation` from the stage's
Jobs and storage, then the whole status. Only history the children cannot tell lives in the previous
status: restart and launch counts (also stamped on each Job, so a lost status write loses nothing), a
stage's verified checkpoint once committed, and start/completion times of Jobs since deleted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlm_core import contract, storage
from vlm_core.kinds import kind
from vlm_core.redact import redact
from vlm_core.spec import VLMTrainingJob

from vlm_operator import builders, planner
from vlm_operator.planner import StageObservation
from vlm_operator.status_model import Condition, JobPhase, JobStatus, StagePhaseStatus, StageStatus

Verifier = Callable[[str], storage.Verification]
EVICTED = "evicted, restarted without spending maxRestarts: "  # a stage message after an eviction's restart


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def job_launch(job_obj: Mapping[str, Any]) -> int:
    try:
        return int(_labels(job_obj).get(contract.LABEL_LAUNCH, "0"))
    except ValueError:
        return 0


def job_restarts(job_obj: Mapping[str, Any]) -> int:
    annotations = job_obj.get("metadata", {}).get("annotations") or {}
    try:
        return int(annotations.get(builders.ANNOTATION_RESTARTS, "0"))
    except ValueError:
        return 0


def group_jobs_by_stage(
    job: VLMTrainingJob, jobs: Sequence[Mapping[str, Any]]
) -> list[list[Mapping[str, Any]]]:
    """Each stage's Jobs, matched by labels here (label selectors may be ignored by a test API server)."""
    names = [s.name for s in job.spec.stages]
    out: list[list[Mapping[str, Any]]] = [[] for _ in names]
    for j in jobs:
        labels = _labels(j)
        if labels.get(contract.LABEL_JOB) != job.name or labels.get(contract.LABEL_STAGE) not in names:
            continue
        out[names.index(labels[contract.LABEL_STAGE])].append(j)
    return out


def current_job(jobs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The stage's newest Job that is not being deleted."""
    live = [j for j in jobs if not j.get("metadata", {}).get("deletionTimestamp")]
    return max(live, key=job_launch) if live else None


def job_phase(job_obj: Mapping[str, Any]) -> tuple[str, str]:
    """(Running | Succeeded | Failed, message) from a batch/v1 Job's status conditions."""
    status = job_obj.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Succeeded", ""
        if c.get("type") in ("Failed", "FailureTarget"):
            return "Failed", c.get("message") or c.get("reason") or "a pod failed"
    if status.get("failed"):
        return "Failed", f"{status['failed']} pod(s) failed"
    return "Running", ""


@dataclass(frozen=True)
class PodFailure:
    """Why a failed stage Job's gang failed, from its pods: the first failing rank's error (its container's
    termination message, written by the launcher) and the table's verdict on it."""

    message: str  # "rank 1: BadDataError: ..." (redacted), else the log's tail or the exit code
    failure: contract.Failure | None  # the table's row (by exit code, else the record's type); None: unknown
    disrupted: bool  # a pod carries the DisruptionTarget condition: evicted, not failed

    @property
    def retryable(self) -> bool:
        return self.failure is None or self.failure.retryable


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The trainer container's terminated state, if it ended with a non-zero code."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for c in sorted(statuses, key=lambda c: c.get("name") != builders.CONTAINER_NAME):
        t = (c.get("state") or {}).get("terminated") or {}
        if t.get("exitCode"):
            return t
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-500:] if lines else ""


def pod_failure(pods: Sequence[Mapping[str, Any]]) -> PodFailure | None:
    """What a failed stage Job's pods tell (None: no pod ended with an error and none was evicted).

    The first failing rank is the earliest record among the pods' termination messages (a record carries its
    rank and time); pods the Job killed after that first failure left none. Without any record, a failed
    pod's message (the kubelet's fallback to the log's tail) or its exit code stands in."""
    disrupted = any(
        c.get("type") == contract.DISRUPTION_CONDITION and c.get("status") == "True"
        for p in pods for c in (p.get("status") or {}).get("conditions") or []
    )
    failed = [(p, t) for p in pods if (t := _terminated(p)) is not None]
    records = [(r, p, t) for p, t in failed if (r := contract.parse_error_record(t.get("message") or "")) is not None]
    if records:
        error, pod, term = min(records, key=lambda x: x[0].timestamp if x[0].timestamp is not None else float("inf"))
        failure = contract.failure_of_exit_code(term.get("exitCode")) or error.failure
        return PodFailure(str(error), failure, disrupted)
    if failed:
        # a code in the table first (the launcher's own verdict), then the earliest to finish
        pod, term = min(failed, key=lambda x: (contract.failure_of_exit_code(x[1].get("exitCode")) is None,
                                               x[1].get("finishedAt") or ""))
        name = pod.get("metadata", {}).get("name", "?")
        tail = _last_line(term.get("message") or "")
        text = f"pod {name} exited with code {term.get('exitCode')}" + (f": {tail}" if tail else "")
        return PodFailure(redact(text), contract.failure_of_exit_code(term.get("exitCode")), disrupted)
    if disrupted:
        return PodFailure("a pod was evicted (DisruptionTarget)", None, True)
    return None


def failjob_failure(job_obj: Mapping[str, Any]) -> contract.Failure | None:
    """The table's row of a Job failed by a podFailurePolicy FailJob rule (reason PodFailurePolicy, the
    exit code in the message): the verdict stands even when the failed pods are gone."""
    for c in (job_obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True" and c.get("reason") == "PodFailurePolicy":
            found = re.search(r"exit code (\d+)", c.get("message") or "")
            return contract.failure_of_exit_code(int(found.group(1))) if found else None
    return None


def job_queued(job_obj: Mapping[str, Any] | None) -> bool:
    """A stage Job that exists but is suspended: Kueue's webhook creates queue-labelled Jobs suspended
    and unsuspends them on admission (and suspends them again on preemption). The planner sees such a
    Job as Running (it must not be created twice); the status shows it as Queued."""
    if job_obj is None:
        return False
    if (job_obj.get("spec") or {}).get("suspend") is not True:
        return False
    return job_phase(job_obj)[0] == "Running"


def _prev_stage(prev: JobStatus, index: int, name: str) -> StageStatus | None:
    for s in prev.stages:
        if s.name == name:
            return s
    return None


def observe_stages(
    job: VLMTrainingJob,
    prev: JobStatus,
    jobs_by_stage: Sequence[Sequence[Mapping[str, Any]]],
    verify: Verifier,
    pods: Callable[[Mapping[str, Any]], Sequence[Mapping[str, Any]]] | None = None,
    stamped: Callable[[int, Mapping[str, Any] | None], dict[str, Any] | None] | None = None,
) -> list[StageObservation]:
    """Each stage's observation. Storage is asked only about a finished stage not yet known committed,
    and only up to the first stage that is not done (later stages cannot matter to the planner).
    `pods(job)` (a failed stage Job's pods) is asked only about a stage whose current Job failed: its
    first failing rank's error, and whether a restart can fix it (`pod_failure`).
    `stamped(index, manifest)`: the fingerprint record of committed stage `index` (`manifest`: the one its
    handoff check just read, None: known committed earlier; see spec_changes.JobFingerprints.stamped)."""
    out: list[StageObservation] = []
    blocked = False
    for i, stage in enumerate(job.spec.stages):
        p = _prev_stage(prev, i, stage.name)
        jobs = jobs_by_stage[i] if i < len(jobs_by_stage) else []
        cur = current_job(jobs)
        restarts = max([p.restarts if p else 0, *(job_restarts(j) for j in jobs)])
        if p is not None and p.phase == "Succeeded" and p.checkpoint:
            out.append(StageObservation("Succeeded", restarts, committed=True,
                                        fingerprint=stamped(i, None) if stamped is not None else None))
            continue
        if cur is None:
            phase, message = (
                ("Succeeded", "") if p is not None and p.phase == "Succeeded" else ("Pending", "")
            )
        else:
            phase, message = job_phase(cur)
            if phase == "Failed" and p is not None and p.phase == "Failed" and p.message:
                message = message or p.message
        committed = False
        if phase == "Succeeded" and not blocked:
            v = verify(planner.final_uri(job, i))
            committed, message = v.ok, ("" if v.ok else v.reason)
            if v.ok and stamped is not None:
                record = stamped(i, v.manifest)
                out.append(StageObservation("Succeeded", restarts, True, fingerprint=record,
                                            report=stage_report(stage.type, v.manifest)))
                continue
            if v.ok:
                out.append(StageObservation("Succeeded", restarts, True, report=stage_report(stage.type, v.manifest)))
                continue
        why = pod_failure(pods(cur)) if phase == "Failed" and cur is not None and pods is not None else None
        if why is None and phase == "Failed" and cur is not None and (rule := failjob_failure(cur)) is not None:
            why = PodFailure(message, rule, False)  # the pods are gone; the Job's own condition says why
        if why is not None:
            out.append(StageObservation(
                phase, restarts, committed, why.message, retryable=why.retryable,  # type: ignore[arg-type]
                failure=why.failure.reason if why.failure is not None and not why.retryable else "",
                disrupted=why.disrupted,
            ))
        else:
            out.append(StageObservation(phase, restarts, committed, message))  # type: ignore[arg-type]
        blocked = blocked or not (phase == "Succeeded" and committed)
    return out


def stage_report(stage_type: str, manifest: Mapping[str, Any] | None) -> dict[str, float] | None:
    """A report kind's (eval) metrics as its final/'s manifest carries them (`eval`), else None."""
    if kind(stage_type).output != "report" or not isinstance(manifest, Mapping):
        return None
    doc = manifest.get("eval")
    if not isinstance(doc, Mapping):
        return None
    return {str(k): float(v) for k, v in doc.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def eval_summary(stages: Sequence[StageStatus], limit: int = 6) -> str:
    """'eval: <stage> vqa_accuracy 0.812, pope_f1 0.901' for the stages that report metrics ('' when none)."""
    parts = []
    for s in stages:
        if s.metrics:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in list(s.metrics.items())[:limit])
            parts.append(f"{s.name} {shown}")
    return ("eval: " + "; ".join(parts)) if parts else ""


def next_launch(prev_stage: StageStatus | None, jobs: Sequence[Mapping[str, Any]]) -> int:
    """Launch number of the stage's next Job: never reuses the name of one that existed."""
    seen = max([job_launch(j) + 1 for j in jobs] or [0])
    return max(seen, prev_stage.launches if prev_stage else 0)


def _condition(prev: JobStatus, type_: str, status: str, reason: str, message: str, now: str) -> Condition:
    """A condition that keeps its lastTransitionTime while its status does not change."""
    for c in prev.conditions:
        if c.type == type_ and c.status == status:
            return Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=c.last_transition_time or now,
            )
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=now)


def _job_time(job_obj: Mapping[str, Any] | None, key: str) -> str | None:
    if job_obj is None:
        return None
    status = job_obj.get("status") or {}
    if key == "start":
        return status.get("startTime") or job_obj.get("metadata", {}).get("creationTimestamp")
    return status.get("completionTime")


def stage_status(
    job: VLMTrainingJob,
    index: int,
    prev: JobStatus,
    observation: StageObservation,
    action: planner.Action,
    jobs: Sequence[Mapping[str, Any]],
    now: str,
    launched: Mapping[str, Any] | None = None,
    progress: contract.ProgressRecord | None = None,
) -> StageStatus:
    """Stage `index`'s status after `action`: its observation, its Jobs (`launched`: the one just
    created), the history kept in the previous status, and its progress.json."""
    stage = job.spec.stages[index]
    o = observation
    p = _prev_stage(prev, index, stage.name) or StageStatus(name=stage.name, type=stage.type)
    cur = current_job(jobs)
    stage_phase: StagePhaseStatus = o.phase
    restarts = o.restarts
    job_name = cur["metadata"]["name"] if cur is not None else p.job_name
    launches = next_launch(p, jobs)
    start = p.start_time or _job_time(cur, "start")
    completion = p.completion_time or (_job_time(cur, "completion") if o.phase == "Succeeded" else None)
    message = o.message or None
    if launched is not None:
        stage_phase, job_name = "Running", launched["metadata"]["name"]
        launches = max(launches, job_launch(launched) + 1)
        start = start or now
        message = None
        if isinstance(action, planner.StartStage) and action.index == index:
            restarts = action.restarts
            if action.restart and o.message:  # the failure this launch restarts after (the pod's own error)
                evicted = o.disrupted and restarts == o.restarts
                message = (EVICTED if evicted else "restarted after: ") + o.message
    elif isinstance(action, planner.Suspend) and action.index == index:
        stage_phase = "Suspended"
    elif o.phase == "Running" and job_queued(cur):
        stage_phase = "Queued"
    elif o.phase == "Succeeded":
        completion = completion or now
    pr = progress or contract.ProgressRecord()
    return StageStatus(
        name=stage.name,
        type=stage.type,
        phase=stage_phase,
        job_name=job_name,
        launches=launches,
        restarts=restarts,
        start_time=start,
        completion_time=completion,
        checkpoint=planner.final_uri(job, index) if o.committed else None,
        step=pr.step if pr.step is not None else p.step,
        total_steps=pr.total if pr.total is not None else p.total_steps,
        tokens_per_second=pr.tokens_per_second if pr.tokens_per_second is not None else p.tokens_per_second,
        metrics=o.report if o.report is not None else p.metrics,
        message=message,
    )


def job_phase_and_message(
    job: VLMTrainingJob, stages: Sequence[StageStatus], action: planner.Action
) -> tuple[JobPhase, str | None]:
    """The job's phase and status message, from the planner's action and the stages' statuses."""
    index = getattr(action, "index", None)
    if isinstance(action, planner.Done):
        summary = eval_summary(stages)
        return "Succeeded", f"all {len(stages)} stage(s) succeeded" + (f"; {summary}" if summary else "")
    if isinstance(action, planner.Fail):
        return "Failed", action.reason
    if isinstance(action, planner.Suspend):
        return "Suspended", "suspended by spec.suspend"
    if isinstance(action, planner.StartStage):
        # the planner's words for a running stage: a later reconcile that finds it running changes nothing
        return "Running", f"stage {stages[action.index].name!r} is running"
    if isinstance(action, planner.SpecChanged):  # nothing starts: never Succeeded; Running only while pods run
        running = any(s.phase in ("Running", "Queued") for s in stages)
        return ("Running" if running else "Pending"), action.message(job)
    wait_reason = action.reason if isinstance(action, planner.Wait) else None
    if index is not None and stages[index].phase == "Queued":
        queue = job.spec.run_policy.queue_name
        return "Queued", (
            f"stage {stages[index].name!r}: Job {stages[index].job_name} is suspended, waiting for admission"
            + (f" by Kueue LocalQueue {queue!r}" if queue else "")
        )
    if any(s.phase in ("Running", "Succeeded") for s in stages):
        return "Running", wait_reason
    return "Pending", wait_reason


def job_conditions(
    prev: JobStatus,
    phase: JobPhase,
    message: str | None,
    action: planner.Action,
    observed: Sequence[StageObservation],
    stages: Sequence[StageStatus],
    now: str,
) -> list[Condition]:
    """Running, Queued, Suspended always; HandoffReady once a handoff is pending or made; Admitted when
    a GPU-memory decision was made (else the previous one); Succeeded or Failed when the job ended."""
    conditions = [
        _condition(
            prev,
            "Running",
            "True" if phase == "Running" else "False",
            "StageRunning" if phase == "Running" else phase,
            message or "",
            now,
        ),
        _condition(
            prev,
            "Queued",
            "True" if phase == "Queued" else "False",
            "WaitingForAdmission" if phase == "Queued" else "NotQueued",
            (message or "") if phase == "Queued" else "",
            now,
        ),
        _condition(
            prev,
            "Suspended",
            "True" if phase == "Suspended" else "False",
            "SuspendedBySpec" if phase == "Suspended" else "NotSuspended",
            "",
            now,
        ),
    ]
    done = committed_stages(stages)
    waiting = (
        action
        if isinstance(action, planner.Wait)
        and action.index is not None
        and action.index < len(observed)
        and observed[action.index].phase == "Succeeded"
        else None
    )
    if waiting is not None:
        conditions.append(
            _condition(prev, "HandoffReady", "False", "CheckpointNotCommitted", waiting.reason, now)
        )
    elif done:
        conditions.append(
            _condition(
                prev,
                "HandoffReady",
                "True",
                "CheckpointCommitted",
                f"{stages[done - 1].name}: {stages[done - 1].checkpoint}",
                now,
            )
        )
    decision = getattr(action, "admission", None)
    if decision is not None:  # GPU-memory admission of the stage about to start (or held back)
        status_ = "True" if decision.admitted else "False"
        conditions.append(_condition(prev, "Admitted", status_, decision.reason, decision.message, now))
    else:
        conditions += [c for c in prev.conditions if c.type == "Admitted"]
    if phase == "Succeeded":
        conditions.append(_condition(prev, "Succeeded", "True", "AllStagesSucceeded", message or "", now))
    if phase == "Failed":
        code = action.code if isinstance(action, planner.Fail) else planner.FAIL_MAX_RESTARTS
        conditions.append(_condition(prev, "Failed", "True", code, message or "", now))
    return conditions


def committed_stages(stages: Sequence[StageStatus]) -> int:
    """How many stages have a committed checkpoint."""
    return sum(1 for s in stages if s.checkpoint)


def current_stage(stages: Sequence[StageStatus], action: planner.Action) -> tuple[int, StageStatus] | None:
    """The stage the action is about (none once the job is done)."""
    index = getattr(action, "index", None)
    if isinstance(action, planner.Done) or index is None:
        return None
    return index, stages[index]


def progress_text(stages: Sequence[StageStatus], current: StageStatus | None) -> str:
    """`done/total`, plus the running stage's step count: `1/2 (instruct 40/100)`."""
    text = f"{committed_stages(stages)}/{len(stages)}"
    if current is not None and current.phase == "Running" and current.step is not None and current.total_steps:
        text += f" ({current.name} {current.step}/{current.total_steps})"
    return text


def compute_status(
    job: VLMTrainingJob,
    generation: int | None,
    prev: JobStatus,
    observed: Sequence[StageObservation],
    action: planner.Action,
    jobs_by_stage: Sequence[Sequence[Mapping[str, Any]]],
    now: str,
    launched: Mapping[int, Mapping[str, Any]] | None = None,
    progress: Mapping[int, contract.ProgressRecord] | None = None,
) -> JobStatus:
    """The status after `action` was applied. `launched` maps a stage index to the Job just created."""
    launched = launched or {}
    progress = progress or {}
    stages = [
        stage_status(
            job,
            i,
            prev,
            observed[i] if i < len(observed) else StageObservation(),
            action,
            jobs_by_stage[i] if i < len(jobs_by_stage) else [],
            now,
            launched.get(i),
            progress.get(i),
        )
        for i in range(len(job.spec.stages))
    ]
    phase, message = job_phase_and_message(job, stages, action)
    current = current_stage(stages, action)
    return JobStatus(
        phase=phase,
        current_stage=current[1].name if current else None,
        current_stage_index=current[0] if current else None,
        progress=progress_text(stages, current[1] if current else None),
        restarts=sum(s.restarts for s in stages),
        start_time=prev.start_time or (now if phase != "Pending" else None),
        completion_time=prev.completion_time or (now if phase in ("Succeeded", "Failed") else None),
        message=message,
        observed_generation=generation,
        stages=stages,
        conditions=job_conditions(prev, phase, message, action, observed, stages, now),
    )


def stage_events(prev: JobStatus, new: JobStatus) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Kubernetes Events a status change deserves: the ones a user acts
    on (a restart, a failure, an admission refusal, a suspension, the job's end). A stage starting or
    committing its checkpoint is in the status (`stages[]`, the HandoffReady condition), not an Event:
    at a fleet's scale those were most of the operator's API requests."""
    events: list[tuple[str, str, str]] = []
    for s in new.stages:
        p = next((x for x in prev.stages if x.name == s.name), None)
        before = p.phase if p else "Pending"
        if s.restarts > (p.restarts if p else 0):
            events.append(
                (
                    "Warning",
                    "StageRestarted",
                    f"stage {s.name!r}: gang restart {s.restarts} (Job {s.job_name})"
                    + (f"; {s.message}" if s.message else ""),
                )
            )
        elif s.message and s.message.startswith(EVICTED) and s.launches > (p.launches if p else 0):
            events.append(("Warning", "StageRescheduled", f"stage {s.name!r} (Job {s.job_name}): {s.message}"))
        if s.phase == "Failed" and before != "Failed" and new.phase == "Failed":
            events.append(("Warning", "StageFailed", f"stage {s.name!r} failed: {new.message}"))
    admitted = next((c for c in new.conditions if c.type == "Admitted"), None)
    prev_admitted = next((c for c in prev.conditions if c.type == "Admitted"), None)
    if admitted is not None and admitted.reason.startswith("InsufficientGPUMemory") and (
        prev_admitted is None or (prev_admitted.reason, prev_admitted.message) != (admitted.reason, admitted.message)
    ):
        events.append(("Warning", admitted.reason, admitted.message))
    if new.phase == "Suspended" and prev.phase != "Suspended":
        events.append(("Normal", "Suspended", "job suspended: stage pods deleted"))
    if new.phase == "Succeeded" and prev.phase != "Succeeded":
        events.append(("Normal", "Succeeded", new.message or "all stages succeeded"))
    if new.phase == "Failed" and prev.phase != "Failed":
        events.append(("Warning", "Failed", new.message or "job failed"))
    return events


def parse_status(raw: Mapping[str, Any] | None) -> JobStatus:
    """The previous status as written by this operator; unknown keys (e.g. Kopf's) are ignored."""
    if not raw:
        return JobStatus()
    try:
        return JobStatus.model_validate(dict(raw))
    except ValueError:
        return JobStatus()


def dump_status(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)


def status_patch(old: JobStatus, new: JobStatus) -> dict[str, Any] | None:
    """The merge patch that turns status `old` into `new` (None when they are equal). A merge patch keeps
    the keys it does not mention, so the keys that no longer apply are cleared with None."""
    new_doc, old_doc = dump_status(new), dump_status(old)
    return None if new_doc == old_doc else {**dict.fromkeys(old_doc), **new_doc}
