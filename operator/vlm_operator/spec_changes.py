"""Edits to a VLMTrainingJob's spec after its stages ran, on Kubernetes (what ran is what the spec says).

- A committed stage whose stamped fingerprint (`vlm_core.fingerprint`, in its final/ manifest) differs from the
  spec's is not done (the planner returns `SpecChanged`): the condition `SpecChanged` (True) names the stage and
  the fields (`old -> new`) and the ways on, ONE Warning Event is posted (again only if the changes differ),
  nothing starts and nothing is deleted. The job's phase is then Pending (nothing runs: the message says why),
  or Running while another stage's pods still run; never Succeeded.
- A running stage whose launched fingerprint (the Job's annotation; the full record in its ConfigMap) differs
  from the spec's: the same condition and Event; the stage continues with the settings it started with
  (nothing restarts; a later restart is refused by the trainer: no half-old, half-new model).
- `spec.runPolicy.rerunFrom: S`, not yet applied (`status.rerun`): the stage Jobs of S and every stage after it
  are deleted, their outputs moved aside (`vlm_core.reruns.set_aside`), `status.rerun` recorded, a Normal Event
  posted, and the job reconciles on: the stages run again. Applied once per value; clearing it clears
  `status.rerun`. Crash-safe: the intent (with its stamp) is recorded first, so a reconcile after a crash
  repeats the deletes (404s) and moves (a missing folder is a no-op) under the same stamp.

Cost: the expected fingerprint reads storage (shard listings, the upstream final/ manifest), so it is cached
per (job, stage), keyed by a hash of the spec and the committed_at of every earlier stage's final/ manifest,
and recomputed at most every `MAX_AGE_SECONDS` otherwise (a shard rewritten in place sends no event). A
committed stage's manifest is read once per process (or taken from the handoff check that verified it). So
a reconcile of an unchanged job reads nothing from storage for this.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlm_core import contract, fingerprint, reruns, storage
from vlm_core.spec import VLMTrainingJob

from vlm_operator import builders, kube, observe, planner
from vlm_operator.status_model import Condition, JobStatus, RerunStatus, StageStatus

CONDITION = "SpecChanged"
EVENT_REASON = "SpecChanged"
RERUN_EVENT_REASON = "RerunFrom"
MAX_AGE_SECONDS = 600.0


def _ways_on(name: str) -> str:
    return (f"To run it with the job's settings set spec.runPolicy.rerunFrom: {name} (its outputs and those of "
            "the stages after it are kept aside, not deleted), or give the job a new metadata.name")


@dataclass(frozen=True)
class Changed:
    """One stage whose settings or inputs differ from the spec's (`running`: its pods still run)."""

    stage: str
    changes: tuple[str, ...]
    running: bool = False

    @property
    def message(self) -> str:
        fields = "; ".join(self.changes)
        if self.running:
            return (f"stage {self.stage!r} is running with other settings than the job's now: {fields}. The running "
                    "stage continues with the settings it started with; a restart of it is refused (its "
                    f"checkpoints have the old settings). {_ways_on(self.stage)}.")
        return (f"stage {self.stage!r} was committed by other settings than the job's now: {fields}. Nothing runs "
                f"until then. {_ways_on(self.stage)}.")


def from_action(job: VLMTrainingJob, action: planner.Action) -> Changed | None:
    """The planner's SpecChanged (a committed stage differs) as a `Changed`."""
    if not isinstance(action, planner.SpecChanged):
        return None
    return Changed(job.spec.stages[action.index].name, action.changes)


def _reason_part(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def condition(prev: JobStatus, changed: Sequence[Changed], now: str) -> Condition | None:
    """The SpecChanged condition: True naming the stages (reason `StageDiffers:<stage>[,<stage>]`) and the
    changes; False once nothing differs any more (after a revert or a rerun); absent if it never was True."""
    before = next((c for c in prev.conditions if c.type == CONDITION), None)
    if changed:
        status, reason = "True", "StageDiffers:" + ",".join(_reason_part(c.stage) for c in changed)
        message = " | ".join(c.message for c in changed)
    elif before is None:
        return None
    else:
        status, reason, message = "False", "SpecMatches", ""
    since = before.last_transition_time if before is not None and before.status == status else None
    return Condition(type=CONDITION, status=status, reason=reason, message=message, last_transition_time=since or now)


def events(prev: JobStatus, new: JobStatus) -> list[tuple[str, str, str]]:
    """One Warning Event when the condition turns True or its message changes (not one per reconcile)."""
    cur = next((c for c in new.conditions if c.type == CONDITION), None)
    before = next((c for c in prev.conditions if c.type == CONDITION), None)
    if cur is None or cur.status != "True":
        return []
    if before is not None and before.status == "True" and before.message == cur.message:
        return []
    return [("Warning", EVENT_REASON, cur.message)]


def with_changes(job: VLMTrainingJob, status: JobStatus, prev: JobStatus, changed: Sequence[Changed],
                 now: str) -> JobStatus:
    """`status` (observe.compute_status's) with the SpecChanged condition, and `status.rerun` carried over
    while spec.runPolicy.rerunFrom still names it."""
    conditions = [c for c in status.conditions if c.type != CONDITION]
    cond = condition(prev, changed, now)
    if cond is not None:
        conditions.append(cond)
    return status.model_copy(update={"conditions": conditions, "rerun": kept_rerun(job, prev)})


# --- caches -------------------------------------------------------------------------------------------------


class Fingerprints:
    """Per-process caches of what a fingerprint check reads (storage, the API)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_age: float = MAX_AGE_SECONDS) -> None:
        self._clock, self._max_age = clock, max_age
        self._lock = threading.Lock()
        self._manifests: dict[tuple[str, str, int], Mapping[str, Any] | None] = {}
        self._expected: dict[tuple[str, str, int], tuple[Any, float, fingerprint.Fingerprint]] = {}
        self._launched: dict[tuple[str, str], dict[str, Any] | None] = {}

    def manifest(self, namespace: str, name: str, index: int, fresh: Mapping[str, Any] | None,
                 read: Callable[[], Mapping[str, Any] | None]) -> Mapping[str, Any] | None:
        """Stage `index`'s committed final/ manifest: `fresh` (a handoff check just verified it) replaces the
        cached one; else the cached one, else `read()` once."""
        key = (namespace, name, index)
        with self._lock:
            if fresh is None and key in self._manifests:
                return self._manifests[key]
        manifest = fresh if fresh is not None else read()
        with self._lock:
            self._manifests[key] = manifest
        return manifest

    def cached_manifest(self, namespace: str, name: str, index: int) -> Mapping[str, Any] | None:
        with self._lock:
            return self._manifests.get((namespace, name, index))

    def expected(self, namespace: str, name: str, index: int, key: Any,
                 compute: Callable[[], fingerprint.Fingerprint]) -> fingerprint.Fingerprint:
        """The spec's fingerprint of stage `index`, recomputed only when `key` changed or it is older than
        `max_age` (inputs in storage can change without an event)."""
        now = self._clock()
        with self._lock:
            hit = self._expected.get((namespace, name, index))
        if hit is not None and hit[0] == key and now - hit[1] < self._max_age:
            return hit[2]
        value = compute()
        with self._lock:
            self._expected[(namespace, name, index)] = (key, now, value)
        return value

    def launched(self, namespace: str, job_name: str, read: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """The fingerprint record a stage Job was launched with (its ConfigMap's), read once per Job."""
        key = (namespace, job_name)
        with self._lock:
            if key in self._launched:
                return self._launched[key]
        record = read()
        with self._lock:
            self._launched[key] = record
        return record

    def forget_stages(self, namespace: str, name: str, indices: Sequence[int]) -> None:
        with self._lock:
            for i in indices:
                self._manifests.pop((namespace, name, i), None)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            for d in (self._manifests, self._expected):
                for k in [k for k in d if k[:2] == (namespace, name)]:
                    del d[k]
            for launched in [k for k in self._launched if k[0] == namespace and k[1].startswith(f"{name}-")]:
                del self._launched[launched]


cache = Fingerprints()


def spec_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body.get("spec") or {}, sort_keys=True, default=str).encode()).hexdigest()


class JobFingerprints:
    """One reconcile's view: the stamped records of committed stages and the spec's fingerprints (cached)."""

    def __init__(self, job: VLMTrainingJob, namespace: str, body: Mapping[str, Any],
                 options: Callable[[], storage.Options | None], fps: Fingerprints | None = None) -> None:
        self.job, self.namespace, self.options = job, namespace, options
        self.spec = spec_hash(body)
        self.fps = fps or cache

    def stamped(self, index: int, fresh: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """observe.observe_stages' `stamped`: the fingerprint record in committed stage `index`'s final/."""
        manifest = self.fps.manifest(
            self.namespace, self.job.name, index, fresh,
            lambda: storage.read_manifest(planner.final_uri(self.job, index), options=self.options()),
        )
        return fingerprint.recorded(manifest)

    def expected(self, index: int) -> fingerprint.Fingerprint:
        """planner.plan's `fingerprint`: stage `index`'s fingerprint under the spec, inputs as in storage."""
        upstream = tuple(
            (self.fps.cached_manifest(self.namespace, self.job.name, j) or {}).get("committed_at")
            for j in range(index)
        )
        return self.fps.expected(
            self.namespace, self.job.name, index, (self.spec, upstream),
            lambda: fingerprint.compute(planner.resolve_stage(self.job, index), self.options()),
        )

    def running(self, index: int, stage_job: Mapping[str, Any] | None) -> Changed | None:
        """The running stage `index`: a Changed when the Job was launched with another fingerprint."""
        annotations = ((stage_job or {}).get("metadata") or {}).get("annotations") or {}
        digest = annotations.get(builders.ANNOTATION_FINGERPRINT)
        if stage_job is None or not digest:
            return None  # launched by a release that stamped no fingerprint: nothing to compare
        new = self.expected(index)
        if new.digest == digest:
            return None
        name = self.job.spec.stages[index].name
        old = self.fps.launched(self.namespace, stage_job["metadata"]["name"], lambda: _configmap_record(
            self.namespace, builders.configmap_name(self.job.name, name), digest))
        changes = fingerprint.differences(old, new) if old is not None else [
            f"(launched with fingerprint {digest[:12]}, the spec's is {new.digest[:12]})"]
        return Changed(name, tuple(changes), running=True)


def _configmap_record(namespace: str, name: str, digest: str) -> dict[str, Any] | None:
    data = kube.read_configmap(namespace, name) or {}
    try:
        record = json.loads(data.get(contract.CONFIG_FILE, "{}")).get(fingerprint.KEY)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("digest") == digest else None


# --- rerunFrom ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rerun:
    """Apply spec.runPolicy.rerunFrom: the stages `indices` (from `stage` on) under the stamp `at`."""

    stage: str
    indices: tuple[int, ...]
    at: str
    resumed: bool = False  # a crash interrupted it: the intent (and stamp) is already recorded


def rerun_decision(job: VLMTrainingJob, prev: JobStatus, stamp: Callable[[], str] = reruns.stamp) -> Rerun | None:
    """What spec.runPolicy.rerunFrom asks given what status.rerun records (pure): None when there is nothing
    to apply (unset, or that value was applied already)."""
    want = job.spec.run_policy.rerun_from
    if want is None:
        return None
    done = prev.rerun
    if done is not None and done.from_ == want and done.completed:
        return None
    indices = tuple(reruns.covered(job, want))
    if done is not None and done.from_ == want:
        return Rerun(want, indices, done.at, resumed=True)
    return Rerun(want, indices, stamp())


def kept_rerun(job: VLMTrainingJob, prev: JobStatus) -> RerunStatus | None:
    """status.rerun while spec.runPolicy.rerunFrom still names it (cleared with it)."""
    if prev.rerun is not None and job.spec.run_policy.rerun_from == prev.rerun.from_:
        return prev.rerun
    return None


def after_rerun(job: VLMTrainingJob, prev: JobStatus, rerun: Rerun, set_aside: Sequence[str]) -> JobStatus:
    """The status a rerun leaves (pure): the covered stages Pending again (their launch counts kept, so a new
    Job never reuses an old name; restarts start over), the job no longer finished, status.rerun recorded."""
    covered = {job.spec.stages[i].name for i in rerun.indices}
    stages = [
        StageStatus(name=s.name, type=s.type, launches=s.launches) if s.name in covered else s for s in prev.stages
    ]
    phase = "Pending" if prev.phase in ("Succeeded", "Failed") else prev.phase
    return prev.model_copy(update={
        "stages": stages,
        "phase": phase,
        "completion_time": None,
        "conditions": [c for c in prev.conditions if c.type not in ("Succeeded", "Failed")],
        "rerun": RerunStatus(from_=rerun.stage, at=rerun.at, set_aside=list(set_aside), completed=True),
    })


def rerun_event(rerun: Rerun, set_aside: Sequence[str]) -> tuple[str, str, str]:
    where = ", ".join(set_aside) if set_aside else "nothing (no stage had outputs yet)"
    return ("Normal", RERUN_EVENT_REASON,
            f"rerun from stage {rerun.stage!r} (spec.runPolicy.rerunFrom): previous outputs kept aside: {where}")


def apply_rerun(
    job: VLMTrainingJob,
    body: Mapping[str, Any],
    prev: JobStatus,
    rerun: Rerun,
    jobs_by_stage: Sequence[Sequence[Mapping[str, Any]]],
    options: storage.Options | None,
    deleted: Callable[[str], None],
    write: Callable[[Mapping[str, Any]], None],
) -> JobStatus:
    """Carry out `rerun` (level-triggered, see the module doc); returns the status to reconcile on from
    (written with `write(whole status, None for keys to remove)`, and the Normal Event posted)."""
    ns, name = body["metadata"]["namespace"], job.name
    old_doc = prev.model_dump(by_alias=True, mode="json", exclude_none=True)
    if not rerun.resumed:  # the intent first: a crash from here on resumes under the same stamp
        intent = RerunStatus(from_=rerun.stage, at=rerun.at, completed=False)
        write({**old_doc, "rerun": intent.model_dump(by_alias=True, mode="json")})
    for i in rerun.indices:
        for j in jobs_by_stage[i] if i < len(jobs_by_stage) else []:
            kube.delete_stage_job(ns, j["metadata"]["name"])
            deleted(j["metadata"]["name"])
    reruns.set_aside(job, list(rerun.indices), rerun.at, options=options)
    cache.forget_stages(ns, name, rerun.indices)
    # What is aside under this stamp (also what an interrupted earlier attempt moved).
    set_aside = [
        dst for i in rerun.indices
        if storage.exists(dst := contract.replaced_output(job.spec.storage.uri, name, job.spec.stages[i].name,
                                                         rerun.at), options=options)
    ]
    new = after_rerun(job, prev, rerun, set_aside)
    if (patch := observe.status_patch(prev, new)) is not None:
        write(patch)
    kube.post_event(body, *rerun_event(rerun, set_aside))
    return new
