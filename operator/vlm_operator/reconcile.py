"""One reconcile of one VLMTrainingJob: observe -> planner.plan -> apply -> status, Events, metrics.

Level-triggered and idempotent: everything is recomputed from the stage Jobs, storage and the stored
status each time, Job names are deterministic (a second create is a 409, never a duplicate), and the
status is written only when it changed. A per-job lock keeps the timer and the Job watch of the same
VLMTrainingJob from interleaving inside this one process (the operator runs as one replica).

At scale (1,000 jobs) nothing is listed per reconcile: the stage Jobs come from Kopf's in-memory index
(fed by the Job watch; complete before any handler runs, so a restarted operator sees every Job),
overlaid with the Jobs this process just created or deleted until the watch reports them (`JobCache`).
Storage is asked only when its answer can have changed: a stage Job finished, or a pending handoff's
backoff elapsed (`StorageChecks`). The resync is adaptive (`next_resync_delay`): a job is woken only when
its state can change without an API event.

Nor is the VLMTrainingJob read per reconcile: the caller passes the body its watch delivered (Kopf's
index), and the status this process last wrote stands in for the body's until the watch brings that
write back (`StatusCache`), so a reconcile between a status write and its watch event neither plans from
nor re-posts Events for an old status.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vlm_core import contract, storage
from vlm_core.redact import redact_obj
from vlm_core.spec import SpecError, VLMTrainingJob, parse_job

from vlm_operator import admission, builders, kube, metrics, observe, planner, preflight, spec_changes

log = logging.getLogger(__name__)
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


class JobCache:
    """The stage Jobs this process created or deleted, until the watch (Kopf's index) reports them.

    Kopf's index lags our own writes by one watch event. Without this overlay a reconcile that runs in
    that gap (the timer, another Job's event) would not see the Job just created and plan its stage
    again under the next launch number: a duplicate gang."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._created: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
        self._deleted: dict[tuple[str, str], set[str]] = {}

    def created(self, namespace: str, owner: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._created.setdefault((namespace, owner), {})[obj["metadata"]["name"]] = obj

    def deleted(self, namespace: str, owner: str, job_name: str) -> None:
        with self._lock:
            self._deleted.setdefault((namespace, owner), set()).add(job_name)
            self._created.get((namespace, owner), {}).pop(job_name, None)

    def merge(self, namespace: str, owner: str, indexed: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The indexed Jobs plus ours not indexed yet, minus ours deleted (forgotten once the index agrees)."""
        key = (namespace, owner)
        jobs = {j["metadata"]["name"]: j for j in indexed}
        with self._lock:
            created = self._created.get(key, {})
            for name in [n for n in created if n in jobs]:
                del created[name]  # the watch caught up
            deleted = self._deleted.get(key, set())
            for name in [n for n in deleted if n not in jobs]:
                deleted.discard(name)
            out = [j for n, j in jobs.items() if n not in deleted]
            out.extend(created.values())
            if not created:
                self._created.pop(key, None)
            if not deleted:
                self._deleted.pop(key, None)
        return out

    def forget(self, namespace: str, owner: str) -> None:
        with self._lock:
            self._created.pop((namespace, owner), None)
            self._deleted.pop((namespace, owner), None)


class StorageChecks:
    """Backoff for handoff checks that failed: storage is asked again when the stage's Job changed (it
    finished, or a new one did) or when the backoff (1 s doubling to 30 s) elapsed, not on every trigger."""

    FIRST_SECONDS = 1.0
    MAX_SECONDS = 30.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failed: dict[tuple[str, str, str], tuple[str, float, float, storage.Verification]] = {}

    def verifier(
        self, namespace: str, owner: str, marker: Callable[[str], str], check: Callable[[str], storage.Verification]
    ) -> Callable[[str], storage.Verification]:
        """`check`, skipped while a failed answer for the same (uri, marker) is within its backoff."""

        def verify(uri: str) -> storage.Verification:
            key, mark, now = (namespace, owner, uri), marker(uri), self._clock()
            with self._lock:
                cached = self._failed.get(key)
            if cached is not None and cached[0] == mark and now < cached[1]:
                return cached[3]
            try:
                result = check(uri)
            except Exception as err:  # unreachable or failing storage: a pending handoff, not a crash
                result = storage.Verification(False, f"storage check failed: {type(err).__name__}: {err}")
            with self._lock:
                if result.ok:
                    self._failed.pop(key, None)
                else:
                    delay = self.FIRST_SECONDS if cached is None or cached[0] != mark else min(
                        cached[2] * 2, self.MAX_SECONDS
                    )
                    self._failed[key] = (mark, now + delay, delay, result)
            return result

        return verify

    def pending(self, namespace: str, owner: str) -> float | None:
        """Seconds until the earliest backoff of this job's failed checks ends (None: none pending)."""
        now = self._clock()
        with self._lock:
            due = [c[1] for k, c in self._failed.items() if k[:2] == (namespace, owner)]
        return max(0.0, min(due) - now) if due else None

    def forget(self, namespace: str, owner: str) -> None:
        with self._lock:
            for k in [k for k in self._failed if k[:2] == (namespace, owner)]:
                del self._failed[k]


class StatusCache:
    """The status this process last wrote for each job, until the watch delivers a body carrying it.

    A body from the watch lags our own status writes by one event; read in that gap it would show the
    status before the write, and the reconcile would redo the write and repeat its Events. The status is
    owned by this operator (one writer), so a body whose status differs from the one we wrote is older."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._written: dict[tuple[str, str], tuple[str | None, dict[str, Any]]] = {}

    def wrote(self, namespace: str, name: str, uid: str | None, status: Mapping[str, Any]) -> None:
        """`status` as the server stores it (no None values: a merge patch removes those keys), for the
        object `uid` (a job deleted and created again under its name is another object)."""
        with self._lock:
            self._written[(namespace, name)] = (uid, {k: v for k, v in status.items() if v is not None})

    def current(
        self, namespace: str, name: str, uid: str | None, body_status: Mapping[str, Any] | None
    ) -> Mapping[str, Any] | None:
        """The job's current status: ours while the body does not show it yet, else the body's."""
        key = (namespace, name)
        with self._lock:
            entry = self._written.get(key)
            if entry is None:
                return body_status
            if entry[0] != uid or dict(body_status or {}) == entry[1]:
                del self._written[key]  # the watch caught up (or this is another object)
                return body_status
            return entry[1]

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._written.pop((namespace, name), None)


job_cache = JobCache()
storage_checks = StorageChecks()
status_cache = StatusCache()
_next_resync: dict[tuple[str, str], float] = {}
_running: set[tuple[str, str]] = set()
# Progress polls of running stages (storage reads) per second across all jobs: with more running jobs
# than this times the progress period, each job's poll spreads out (the cost stays flat with fleet size).
PROGRESS_READS_PER_SECOND = 20.0


def next_resync_delay(
    phase: str | None,
    resync_seconds: float,
    handoff_backoff: float | None,
    progress_seconds: float | None = None,
    running_jobs: int = 0,
) -> float:
    """Seconds until a job should be reconciled again without an event (watch events reconcile it sooner,
    and every reconcile, whatever triggered it, pushes this back): a pending handoff when its storage
    backoff ends; a running job every `progress_seconds` (default 3 periods: its stage's progress.json;
    storage sends no events), slower when more jobs run than `PROGRESS_READS_PER_SECOND` allows in
    that period; a waiting (Pending/Queued/Suspended) job every 6 periods (admission and preflight
    read storage); a finished one never (its TTL is scheduled by `reconcile`)."""
    if phase in ("Succeeded", "Failed", None):
        return float("inf")
    if handoff_backoff is not None:
        return max(handoff_backoff, 0.5)
    if phase == "Running":
        every = progress_seconds if progress_seconds is not None else resync_seconds * 3
        return max(every, running_jobs / PROGRESS_READS_PER_SECOND)
    return resync_seconds * 6


def resync_due(namespace: str, name: str) -> bool:
    """Whether the resync should reconcile this job now (unknown jobs: yes; not while another
    reconcile of it runs or waits: that one sees the same state)."""
    if _lock(namespace, name).locked():
        return False
    return time.monotonic() >= _next_resync.get((namespace, name), 0.0)


def resync_in(namespace: str, name: str) -> float | None:
    """Seconds until this job's next resync is due (None: none: it waits for events only)."""
    due = _next_resync.get((namespace, name))
    return None if due is None else max(0.0, due - time.monotonic())


def _schedule(namespace: str, name: str, delay: float) -> None:
    if delay == float("inf"):
        _next_resync.pop((namespace, name), None)
    else:
        _next_resync[(namespace, name)] = time.monotonic() + delay


def known_jobs() -> int:
    """VLMTrainingJobs this process has reconciled (and not seen deleted)."""
    with _locks_guard:
        return len(_locks)


def forget(namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((namespace, name), None)
    job_cache.forget(namespace, name)
    storage_checks.forget(namespace, name)
    spec_changes.cache.forget(namespace, name)
    status_cache.forget(namespace, name)
    _next_resync.pop((namespace, name), None)
    _running.discard((namespace, name))
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
) -> dict[str, Any]:
    """Create the stage's ConfigMap, Service and a new Job (after deleting a failed one), from the config
    the planner resolved. Returns the Job."""
    ns = body["metadata"]["namespace"]
    i = action.index
    stage = job.spec.stages[i]
    for old in jobs_by_stage[i]:  # a failed gang goes as a whole, pods included
        if not old.get("metadata", {}).get("deletionTimestamp"):
            kube.delete_stage_job(ns, old["metadata"]["name"])
            job_cache.deleted(ns, job.name, old["metadata"]["name"])
    prev_stage = next((s for s in prev.stages if s.name == stage.name), None)
    launch = observe.next_launch(prev_stage, jobs_by_stage[i])
    objs = builders.build_stage_objects(job, i, ns, action.config, launch=launch, restarts=action.restarts, owner=body)
    *support, stage_job = objs
    for obj in support:
        if obj["kind"] == "ConfigMap":
            kube.apply_configmap(obj)
        else:
            kube.create(obj)
    kube.create(stage_job)
    job_cache.created(ns, job.name, stage_job)
    if action.restart:
        metrics.STAGE_RESTARTS.labels(stage_type=stage.type).inc()
    return stage_job


def reconcile(
    namespace: str,
    name: str,
    verify: Callable[[str], storage.Verification] | None = None,
    jobs: Sequence[Mapping[str, Any]] | None = None,
    resync_seconds: float = 10.0,
    progress_seconds: float | None = None,
    body: Mapping[str, Any] | None = None,
) -> str | None:
    """Reconcile one VLMTrainingJob; returns its phase (None if it is gone or being deleted).

    `jobs`: its stage Jobs as the watch knows them (Kopf's index); None lists them from the API.
    `body`: the VLMTrainingJob as the watch knows it (Kopf's index); None reads it from the API."""
    key = (namespace, name)
    with _lock(namespace, name):
        phase, ttl_left = _reconcile_locked(namespace, name, verify, jobs, body)
        if phase is None:
            _next_resync.pop(key, None)
            _running.discard(key)
        else:
            if phase == "Running":
                _running.add(key)
            else:
                _running.discard(key)
            delay = next_resync_delay(
                phase, resync_seconds, storage_checks.pending(namespace, name), progress_seconds, len(_running)
            )
            _schedule(namespace, name, min(delay, ttl_left) if ttl_left is not None else delay)
        return phase


def _reconcile_locked(
    namespace: str,
    name: str,
    verify: Callable[[str], storage.Verification] | None,
    jobs: Sequence[Mapping[str, Any]] | None,
    given: Mapping[str, Any] | None,
) -> tuple[str | None, float | None]:
    """(phase, seconds until its TTL deletion is due, if one is pending)."""
    body = kube.get_training_job(namespace, name) if given is None else dict(given)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None, None
    uid = body["metadata"].get("uid")
    prev = observe.parse_status(status_cache.current(namespace, name, uid, body.get("status")))
    generation = body["metadata"].get("generation")
    try:
        job = parse_job(body)
    except SpecError as err:
        return _invalid(body, prev, generation, err), None
    if prev.phase in ("Succeeded", "Failed") and prev.observed_generation == generation:
        ttl_left = _expire(job, body, prev)
        metrics.set_job_phase(namespace, name, prev.phase)
        return prev.phase, ttl_left
    # The job's Secret is read only when storage is actually asked (a handoff check, progress).
    options = functools.cache(lambda: storage_options(job, namespace))
    listed = kube.list_stage_jobs(namespace, name) if jobs is None else jobs
    jobs_by_stage = observe.group_jobs_by_stage(job, job_cache.merge(namespace, name, listed))
    rerun = spec_changes.rerun_decision(job, prev)
    if rerun is not None:  # spec.runPolicy.rerunFrom not applied yet: set the stages aside, then go on
        prev = spec_changes.apply_rerun(job, body, prev, rerun, jobs_by_stage, options(),
                                        functools.partial(job_cache.deleted, namespace, name),
                                        functools.partial(_write_status, namespace, name, uid))
        jobs_by_stage = observe.group_jobs_by_stage(job, job_cache.merge(namespace, name, listed))
    fingerprints = spec_changes.JobFingerprints(job, namespace, body, options)
    check = storage_checks.verifier(
        namespace,
        name,
        functools.partial(_stage_marker, job, jobs_by_stage),
        verify or (lambda uri: storage.verify_committed(uri, options=options())),
    )
    observed = observe.observe_stages(
        job, prev, jobs_by_stage, check, pods=lambda j: kube.list_job_pods(namespace, j["metadata"]["name"]),
        stamped=fingerprints.stamped,
    )
    # Preflight runs before any pod of a stage exists: inputs present and agreeing with the spec.
    action = planner.plan(
        job,
        observed,
        admit=admission.checker(job, options=options),
        preflight=lambda i: preflight.check_stage(job, i, options()),
        fingerprint=fingerprints.expected,
    )
    changed = [c for c in [spec_changes.from_action(job, action)] if c is not None]
    changed += [c for i, o in enumerate(observed) if o.phase == "Running"
                and (c := fingerprints.running(i, observe.current_job(jobs_by_stage[i]))) is not None]
    launched: dict[int, Mapping[str, Any]] = {}
    now = kube.now()
    if isinstance(action, planner.StartStage):
        launched[action.index] = _start_stage(job, body, action, prev, jobs_by_stage)
    elif isinstance(action, planner.Suspend) and action.index is not None:
        for j in jobs_by_stage[action.index]:
            kube.delete_stage_job(namespace, j["metadata"]["name"])
            job_cache.deleted(namespace, name, j["metadata"]["name"])
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
    status = spec_changes.with_changes(job, status, prev, changed, now)
    _record_metrics(job, prev, status, launched)
    if (patch := observe.status_patch(prev, status)) is not None:
        _write_status(namespace, name, uid, patch)
    for type_, reason, message in observe.stage_events(prev, status) + spec_changes.events(prev, status):
        kube.post_event(body, type_, reason, message)
    metrics.set_job_phase(namespace, name, status.phase)
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    return status.phase, (float(ttl) if ttl is not None and status.phase in ("Succeeded", "Failed") else None)


def _write_status(namespace: str, name: str, uid: str | None, status: Mapping[str, Any]) -> None:
    kube.patch_status(namespace, name, status)
    status_cache.wrote(namespace, name, uid, redact_obj(dict(status)))


def _stage_marker(job: VLMTrainingJob, jobs_by_stage: list[list[Mapping[str, Any]]], uri: str) -> str:
    """What must change for a failed handoff check to be worth repeating at once: the stage's current
    Job (its name and completion time)."""
    for i in range(len(job.spec.stages)):
        if planner.final_uri(job, i) == uri:
            cur = observe.current_job(jobs_by_stage[i])
            if cur is None:
                return ""
            return f"{cur['metadata']['name']}@{(cur.get('status') or {}).get('completionTime', '')}"
    return ""


def _record_metrics(
    job: VLMTrainingJob, prev: observe.JobStatus, new: observe.JobStatus, launched: Mapping[int, Mapping[str, Any]]
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
    if (patch := observe.status_patch(prev, status)) is not None:
        _write_status(meta["namespace"], meta["name"], meta.get("uid"), patch)
        kube.post_event(body, "Warning", "InvalidSpec", message)
    metrics.set_job_phase(meta["namespace"], meta["name"], "Failed")
    return "Failed"


def _expire(job: VLMTrainingJob, body: Mapping[str, Any], status: observe.JobStatus) -> float | None:
    """runPolicy.ttlSecondsAfterFinished: delete a finished job once its time is up. Returns the seconds
    left until then (None: no TTL, or deleted now)."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    if ttl is None or not status.completion_time:
        return None
    age = metrics.seconds_between(status.completion_time, kube.now())
    if age is not None and age >= ttl:
        log.info("deleting %s: finished %.0f s ago (ttlSecondsAfterFinished %d)", job.name, age, ttl)
        kube.delete_training_job(body["metadata"]["namespace"], job.name)
        return None
    return ttl - (age or 0.0)
