"""One reconcile of one VLMTrainingJob: observe -> planner.plan -> apply -> status, Events, metrics.

Level-triggered and idempotent: everything is recomputed from the stage Jobs, storage and the stored
status each time, Job names are deterministic (a second create is a 409, never a duplicate), and the
status is written only when it changed. A per-job lock keeps the timer and the Job watch of the same
VLMTrainingJob from interleaving inside this one process (the operator runs as one replica).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from vlm_trainer import contract, storage
from vlm_trainer.spec import SpecError, VLMTrainingJob, parse_job

from vlm_operator import builders, kube, metrics, observe, planner

log = logging.getLogger(__name__)
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def known_jobs() -> int:
    """VLMTrainingJobs this process has reconciled (and not seen deleted)."""
    with _locks_guard:
        return len(_locks)


def forget(namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((namespace, name), None)
    metrics.set_job_phase(namespace, name, None)


def storage_options(job: VLMTrainingJob, namespace: str) -> dict[str, Any]:
    """This job's own storage options: its endpoint and the credentials in its spec.storage.secretRef
    (so one operator serves jobs on different endpoints and accounts)."""
    ref = job.spec.storage.secret_ref
    return job.spec.storage.fsspec_options(kube.read_secret(namespace, ref) if ref else None)


def read_progress(job: VLMTrainingJob, index: int, options: storage.Options | None = None) -> contract.ProgressRecord:
    """The running stage's progress.json (written by trainer rank 0); empty if absent or unreadable."""
    try:
        return contract.ProgressRecord.from_doc(
            storage.read_json(storage.join(planner.stage_output(job, index), contract.PROGRESS_FILE), options=options)
        )
    except (FileNotFoundError, ValueError, OSError):
        return contract.ProgressRecord()


def _start_stage(
    job: VLMTrainingJob,
    body: Mapping[str, Any],
    action: planner.StartStage,
    prev: observe.JobStatus,
    jobs_by_stage: list[list[Mapping[str, Any]]],
) -> str:
    """Create the stage's ConfigMap, Service and a new Job (after deleting a failed one). Returns its name."""
    ns = body["metadata"]["namespace"]
    i = action.index
    stage = job.spec.stages[i]
    for old in jobs_by_stage[i]:  # a failed gang goes as a whole, pods included
        if not old.get("metadata", {}).get("deletionTimestamp"):
            kube.delete_stage_job(ns, old["metadata"]["name"])
    prev_stage = next((s for s in prev.stages if s.name == stage.name), None)
    launch = observe.next_launch(prev_stage, jobs_by_stage[i])
    objs = builders.build_stage_objects(job, i, ns, launch=launch, restarts=action.restarts, owner=body)
    *support, stage_job = objs
    for obj in support:
        if obj["kind"] == "ConfigMap":
            kube.apply_configmap(obj)
        else:
            kube.create(obj)
    kube.create(stage_job)
    if action.restart:
        metrics.STAGE_RESTARTS.labels(stage_type=stage.type).inc()
    return stage_job["metadata"]["name"]


def reconcile(
    namespace: str, name: str, verify: Callable[[str], storage.Verification] | None = None
) -> str | None:
    """Reconcile one VLMTrainingJob; returns its phase (None if it is gone or being deleted)."""
    with _lock(namespace, name):
        body = kube.get_training_job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        prev = observe.parse_status(body.get("status"))
        generation = body["metadata"].get("generation")
        try:
            job = parse_job(body)
        except SpecError as err:
            return _invalid(body, prev, generation, err)
        if prev.phase in ("Succeeded", "Failed") and prev.observed_generation == generation:
            _expire(job, body, prev)
            metrics.set_job_phase(namespace, name, prev.phase)
            return prev.phase
        # The job's Secret is read only when storage is actually asked (a handoff check, progress).
        options = functools.cache(lambda: storage_options(job, namespace))
        check = verify or (lambda uri: storage.verify_committed(uri, options=options()))
        jobs_by_stage = observe.group_jobs_by_stage(job, kube.list_stage_jobs(namespace, name))
        observed = observe.observe_stages(job, prev, jobs_by_stage, check)
        action = planner.plan(job, observed)
        launched: dict[int, str] = {}
        now = kube.now()
        if isinstance(action, planner.StartStage):
            launched[action.index] = _start_stage(job, body, action, prev, jobs_by_stage)
        elif isinstance(action, planner.Suspend) and action.index is not None:
            for j in jobs_by_stage[action.index]:
                kube.delete_stage_job(namespace, j["metadata"]["name"])
        progress = {}
        if (
            isinstance(action, planner.Wait)
            and action.index is not None
            and observed[action.index].phase == "Running"
        ):
            progress[action.index] = read_progress(job, action.index, options())
        status = observe.compute_status(
            job, generation, prev, observed, action, jobs_by_stage, now, launched=launched, progress=progress
        )
        _record_metrics(job, prev, status, launched)
        new, old = observe.dump_status(status), observe.dump_status(prev)
        if new != old:
            # A merge patch keeps keys it does not mention: clear the ones that no longer apply.
            kube.patch_status(namespace, name, {**dict.fromkeys(old), **new})
        for type_, reason, message in observe.stage_events(prev, status):
            kube.post_event(body, type_, reason, message)
        metrics.set_job_phase(namespace, name, status.phase)
        return status.phase


def _record_metrics(
    job: VLMTrainingJob, prev: observe.JobStatus, new: observe.JobStatus, launched: Mapping[int, str]
) -> None:
    prev_by_name = {s.name: s for s in prev.stages}
    for i, s in enumerate(new.stages):
        p = prev_by_name.get(s.name)
        if s.checkpoint and not (p and p.checkpoint):
            d = metrics.seconds_between(s.start_time, s.completion_time)
            if d is not None:
                metrics.STAGE_DURATION.labels(stage_type=s.type).observe(d)
        first_launch = i in launched and (p is None or p.launches == 0)
        if first_launch and i > 0:
            d = metrics.seconds_between(new.stages[i - 1].completion_time, kube.now())
            if d is not None:
                metrics.HANDOFF_LATENCY.observe(d)


def _invalid(body: Mapping[str, Any], prev: observe.JobStatus, generation: int | None, err: SpecError) -> str:
    """A spec the API server let through but the typed schema rejects: Failed, naming every field."""
    meta = body["metadata"]
    message = "; ".join(err.problems)
    status = prev.model_copy(
        update={
            "phase": "Failed",
            "message": message,
            "observed_generation": generation,
            "conditions": [
                observe.Condition(
                    type="Failed",
                    status="True",
                    reason="InvalidSpec",
                    message=message,
                    last_transition_time=kube.now(),
                )
            ],
        }
    )
    new, old = observe.dump_status(status), observe.dump_status(prev)
    if new != old:
        kube.patch_status(meta["namespace"], meta["name"], {**dict.fromkeys(old), **new})
        kube.post_event(body, "Warning", "InvalidSpec", message)
    metrics.set_job_phase(meta["namespace"], meta["name"], "Failed")
    return "Failed"


def _expire(job: VLMTrainingJob, body: Mapping[str, Any], status: observe.JobStatus) -> None:
    """runPolicy.ttlSecondsAfterFinished: delete a finished job once its time is up."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    if ttl is None or not status.completion_time:
        return
    age = metrics.seconds_between(status.completion_time, kube.now())
    if age is not None and age >= ttl:
        log.info("deleting %s: finished %.0f s ago (ttlSecondsAfterFinished %d)", job.name, age, ttl)
        kube.delete_training_job(body["metadata"]["namespace"], job.name)
