"""The operator's side of "what ran is what the spec says" (vlm_operator.spec_changes), pure parts: the
SpecChanged condition and its one Event, the job's phase, the rerun decision from spec + status, the status a
rerun leaves, the fingerprint cache's keys, and a rerun interrupted by a crash resuming under its stamp."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from job_fixtures import GOOD
from vlm_core import contract, fingerprint, storage
from vlm_core.spec import parse_job
from vlm_operator import kube, observe, planner, spec_changes
from vlm_operator.spec_changes import Changed, Fingerprints, Rerun
from vlm_operator.status_model import Condition, JobStatus, RerunStatus, StageStatus

NOW, LATER = "2026-12-07T10:00:00Z", "2026-12-07T11:00:00Z"


def job(tmp_path: Path | None = None, rerun_from: str | None = None) -> Any:
    doc = copy.deepcopy(GOOD)
    if tmp_path is not None:
        doc["spec"]["storage"]["uri"] = f"file://{tmp_path}/store"
    if rerun_from is not None:
        doc["spec"]["runPolicy"] = {"rerunFrom": rerun_from}
    return parse_job(doc)


def finished() -> JobStatus:
    stages = [StageStatus(name=n, type=n, phase="Succeeded", job_name=f"demo-{n}-0", launches=1, restarts=r,
                          checkpoint=f"file:///tmp/store/demo/{n}/final", completion_time=NOW)
              for n, r in (("align", 0), ("instruct", 1), ("dpo", 0))]
    return JobStatus(phase="Succeeded", completion_time=NOW, stages=stages, conditions=[
        Condition(type="Succeeded", status="True", reason="AllStagesSucceeded")])


LR = Changed("instruct", ("stage.optimizer.lr: 0.0001 -> 0.0005",))


def test_the_condition_names_the_stage_and_the_changes_and_clears_when_nothing_differs() -> None:
    cond = spec_changes.condition(JobStatus(), [LR], NOW)
    assert cond is not None and (cond.status, cond.reason) == ("True", "StageDiffers:instruct")
    assert cond.message.startswith("stage 'instruct' was committed by other settings than the job's now: "
                                   "stage.optimizer.lr: 0.0001 -> 0.0005. Nothing runs until then.")
    assert "spec.runPolicy.rerunFrom: instruct" in cond.message and "new metadata.name" in cond.message
    prev = JobStatus(conditions=[cond])
    assert spec_changes.condition(prev, [LR], LATER).last_transition_time == NOW  # type: ignore[union-attr]
    cleared = spec_changes.condition(prev, [], LATER)
    assert cleared is not None and (cleared.status, cleared.reason, cleared.last_transition_time) == (
        "False", "SpecMatches", LATER)
    assert spec_changes.condition(JobStatus(), [], NOW) is None  # never differed: no condition at all


def test_a_running_stage_continues_with_its_settings_and_both_stages_are_named() -> None:
    running = Changed("dpo-v2", ("stage.maxSteps: 5 -> 8",), running=True)
    assert "continues with the settings it started with" in running.message
    cond = spec_changes.condition(JobStatus(), [LR, running], NOW)
    assert cond is not None and cond.reason == "StageDiffers:instruct,dpo_v2"
    assert "stage 'instruct' was committed" in cond.message and "stage 'dpo-v2' is running" in cond.message


def test_one_warning_event_per_change_not_one_per_reconcile() -> None:
    first = JobStatus(conditions=[spec_changes.condition(JobStatus(), [LR], NOW)])  # type: ignore[list-item]
    assert spec_changes.events(JobStatus(), first) == [("Warning", "SpecChanged", LR.message)]
    assert spec_changes.events(first, first) == []  # the next reconcile: nothing new
    other = Changed("instruct", ("stage.maxSteps: 10 -> 20",))
    second = JobStatus(conditions=[spec_changes.condition(first, [other], NOW)])  # type: ignore[list-item]
    assert spec_changes.events(first, second) == [("Warning", "SpecChanged", other.message)]
    gone = JobStatus(conditions=[spec_changes.condition(second, [], NOW)])  # type: ignore[list-item]
    assert spec_changes.events(second, gone) == []


def test_a_changed_spec_never_claims_succeeded_and_claims_running_only_while_pods_run() -> None:
    j = job()
    action = planner.SpecChanged(1, ("stage.maxSteps: 10 -> 20",))
    stages = finished().stages
    phase, message = observe.job_phase_and_message(j, stages, action)
    assert phase == "Pending" and message == action.message(j)
    stages[2] = stages[2].model_copy(update={"phase": "Running"})
    assert observe.job_phase_and_message(j, stages, action)[0] == "Running"


def test_the_rerun_decision_from_spec_and_status() -> None:
    stamp = lambda: "20261207T100000Z"  # noqa: E731
    assert spec_changes.rerun_decision(job(), finished(), stamp) is None  # no rerunFrom
    assert spec_changes.rerun_decision(job(rerun_from="instruct"), finished(), stamp) == Rerun(
        "instruct", (1, 2), "20261207T100000Z")
    applied = finished().model_copy(update={"rerun": RerunStatus(from_="instruct", at="T1", completed=True)})
    assert spec_changes.rerun_decision(job(rerun_from="instruct"), applied, stamp) is None  # once per value
    assert spec_changes.rerun_decision(job(rerun_from="align"), applied, stamp) == Rerun(
        "align", (0, 1, 2), "20261207T100000Z")  # another value: applied again
    interrupted = finished().model_copy(update={"rerun": RerunStatus(from_="instruct", at="T1")})
    assert spec_changes.rerun_decision(job(rerun_from="instruct"), interrupted, stamp) == Rerun(
        "instruct", (1, 2), "T1", resumed=True)  # a crash in between: the same stamp
    # status.rerun lives as long as rerunFrom names it
    assert spec_changes.kept_rerun(job(rerun_from="instruct"), applied) == applied.rerun
    assert spec_changes.kept_rerun(job(), applied) is None


def test_a_rerun_leaves_its_stages_pending_with_their_launch_counts_and_the_job_unfinished() -> None:
    new = spec_changes.after_rerun(job(), finished(), Rerun("instruct", (1, 2), "T1"), ["s3://x/aside"])
    align, instruct, dpo = new.stages
    assert align == finished().stages[0]
    assert (instruct.phase, instruct.checkpoint, instruct.launches, instruct.restarts) == ("Pending", None, 1, 0)
    assert dpo.phase == "Pending" and dpo.launches == 1
    assert new.phase == "Pending" and new.completion_time is None
    assert not [c for c in new.conditions if c.type == "Succeeded"]
    assert new.rerun == RerunStatus(from_="instruct", at="T1", set_aside=["s3://x/aside"], completed=True)
    assert observe.dump_status(new)["rerun"] == {
        "from": "instruct", "at": "T1", "setAside": ["s3://x/aside"], "completed": True}
    # the next launch never reuses a Job name
    assert observe.next_launch(instruct, []) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_expected_fingerprint_is_recomputed_only_when_it_can_have_changed() -> None:
    clock, computed = Clock(), []
    fps = Fingerprints(clock, max_age=600)

    def compute() -> fingerprint.Fingerprint:
        computed.append(1)
        return fingerprint.Fingerprint({"n": len(computed)})

    assert fps.expected("ns", "demo", 1, ("spec-1", (1.0,)), compute).settings == {"n": 1}
    assert fps.expected("ns", "demo", 1, ("spec-1", (1.0,)), compute).settings == {"n": 1}  # cached
    assert fps.expected("ns", "demo", 1, ("spec-2", (1.0,)), compute).settings == {"n": 2}  # spec edited
    assert fps.expected("ns", "demo", 1, ("spec-2", (2.0,)), compute).settings == {"n": 3}  # upstream recommitted
    clock.now = 601
    assert fps.expected("ns", "demo", 1, ("spec-2", (2.0,)), compute).settings == {"n": 4}  # inputs may have moved
    reads: list[int] = []
    read = lambda: reads.append(1) or {"committed_at": 5.0}  # noqa: E731
    assert fps.manifest("ns", "demo", 0, None, read) == {"committed_at": 5.0}
    assert fps.manifest("ns", "demo", 0, None, read) == {"committed_at": 5.0} and len(reads) == 1  # read once
    assert fps.manifest("ns", "demo", 0, {"committed_at": 6.0}, read) == {"committed_at": 6.0}  # just verified
    fps.forget("ns", "demo")
    assert fps.cached_manifest("ns", "demo", 0) is None


def test_a_rerun_interrupted_by_a_crash_resumes_under_the_same_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = job(tmp_path, rerun_from="instruct")
    for name in ("align", "instruct", "dpo"):
        storage.write_text(storage.join(planner.stage_output(j, [s.name for s in j.spec.stages].index(name)),
                                        "final", "manifest.json"), "{}")
    body = {"metadata": {"name": "demo", "namespace": "ns"}}
    patches: list[dict[str, Any]] = []
    events: list[tuple[str, ...]] = []
    deleted: list[str] = []
    write = lambda status: patches.append(copy.deepcopy(dict(status)))  # noqa: E731 (the status writer)
    monkeypatch.setattr(kube, "post_event", lambda owner, *e: events.append(e))
    monkeypatch.setattr(kube, "delete_stage_job", lambda ns, name: deleted.append(name))
    jobs = [[{"metadata": {"name": f"demo-{n}-0"}}] for n in ("align", "instruct", "dpo")]

    # the first attempt records its intent, deletes the Jobs, moves instruct aside, then "crashes"
    real_move = storage.move
    calls = {"n": 0}

    def crashing_move(src: str, dst: str, **kw: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("operator killed")
        return real_move(src, dst, **kw)

    monkeypatch.setattr(storage, "move", crashing_move)
    rerun = spec_changes.rerun_decision(j, finished(), lambda: "T1")
    assert rerun is not None
    with pytest.raises(OSError):
        spec_changes.apply_rerun(j, body, finished(), rerun, jobs, None, deleted.append, write)
    # the whole status is written (the status cache keeps whole ones): the finished status plus the intent
    assert len(patches) == 1 and patches[0]["phase"] == finished().phase
    assert patches[0]["rerun"] == {"from": "instruct", "at": "T1", "setAside": [], "completed": False}
    assert deleted == ["demo-instruct-0", "demo-instruct-0", "demo-dpo-0", "demo-dpo-0"]  # API + cache

    # the next reconcile reads the intent back and finishes the same rerun
    monkeypatch.setattr(storage, "move", real_move)
    prev = finished().model_copy(update={"rerun": RerunStatus.model_validate(patches[0]["rerun"])})
    again = spec_changes.rerun_decision(j, prev, lambda: "T2")
    assert again == Rerun("instruct", (1, 2), "T1", resumed=True)
    new = spec_changes.apply_rerun(j, body, prev, again, jobs, None, deleted.append, write)
    aside = [contract.replaced_output(j.spec.storage.uri, "demo", n, "T1") for n in ("instruct", "dpo")]
    assert new.rerun == RerunStatus(from_="instruct", at="T1", set_aside=aside, completed=True)
    assert all(storage.exists(storage.join(a, "final", "manifest.json")) for a in aside)
    assert storage.exists(storage.join(planner.stage_output(j, 0), "final", "manifest.json"))  # align untouched
    assert len(patches) == 2 and patches[1]["rerun"]["completed"] is True  # no second intent
    assert events == [("Normal", "RerunFrom", "rerun from stage 'instruct' (spec.runPolicy.rerunFrom): previous "
                                              f"outputs kept aside: {aside[0]}, {aside[1]}")]
    assert spec_changes.rerun_decision(j, new) is None  # applied: nothing more


def test_a_running_stage_is_compared_by_the_digest_on_its_job_and_named_from_its_configmap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vlm_operator import builders

    j = job()
    old = fingerprint.Fingerprint({"stage.maxSteps": 10})
    new = fingerprint.Fingerprint({"stage.maxSteps": 20})
    config = planner.resolve_stage(j, 1).model_copy(update={"fingerprint": old.record()})
    objs = builders.build_stage_objects(j, 1, "ns", config, launch=0)
    stage_job, configmap = objs[-1], objs[0]
    assert stage_job["metadata"]["annotations"][builders.ANNOTATION_FINGERPRINT] == old.digest
    reads: list[str] = []
    monkeypatch.setattr(kube, "read_configmap", lambda ns, name: reads.append(name) or configmap["data"])
    fps = spec_changes.JobFingerprints(j, "ns", {"spec": {}}, lambda: None, Fingerprints())
    monkeypatch.setattr(fps, "expected", lambda i: new)
    changed = fps.running(1, stage_job)
    assert changed == Changed("instruct", ("stage.maxSteps: 10 -> 20",), running=True)
    assert fps.running(1, stage_job) == changed and reads == ["demo-instruct-config"]  # read once per Job
    monkeypatch.setattr(fps, "expected", lambda i: old)
    assert fps.running(1, stage_job) is None  # launched with the spec's settings
