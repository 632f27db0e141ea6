"""Observation and status computation: from stage Jobs + storage to planner input and `status`."""

from __future__ import annotations

from typing import Any

import pytest
from vlm_core import contract
from vlm_core.spec import parse_job
from vlm_core.storage import Verification
from vlm_operator import builders, observe, planner
from vlm_operator.planner import StageObservation
from vlm_operator.status_model import JobStatus, StageStatus

NOW = "2026-11-26T10:00:00Z"


def make_job(max_restarts: int = 2, suspend: bool = False):
    def stage(name: str, t: str, fmt: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": t,
            "maxSteps": 5,
            "data": {"shards": ["d.tar"], "format": fmt},
            "batch": {"globalSize": 8, "microSize": 8},
        }

    return parse_job(
        {
            "apiVersion": "training.vlm.dev/v1alpha1",
            "kind": "VLMTrainingJob",
            "metadata": {"name": "demo", "namespace": "ns"},
            "spec": {
                "model": {"visionEncoder": "v", "languageModel": "l"},
                "storage": {"uri": "s3://b/runs"},
                "stages": [stage("align", "align", "caption"), stage("instruct", "instruct", "conversation")],
                "runPolicy": {"maxRestarts": max_restarts},
                "suspend": suspend,
            },
        }
    )


def stage_job(
    stage: int,
    launch: int = 0,
    condition: str | None = None,
    restarts: int = 0,
    deleting: bool = False,
    completion: str | None = None,
) -> dict[str, Any]:
    obj = builders.build_stage_job(make_job(), stage, "ns", launch=launch, restarts=restarts)
    obj["metadata"]["creationTimestamp"] = "2026-11-26T09:00:00Z"
    status: dict[str, Any] = {"startTime": "2026-11-26T09:00:01Z"}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "message": f"{condition} msg"}]
    if completion:
        status["completionTime"] = completion
    obj["status"] = status
    if deleting:
        obj["metadata"]["deletionTimestamp"] = NOW
    return obj


class Verifier:
    def __init__(self, ok: bool = True):
        self.ok = ok
        self.calls: list[str] = []

    def __call__(self, uri: str) -> Verification:
        self.calls.append(uri)
        return Verification(self.ok, "committed" if self.ok else f"no manifest.json at {uri}")


@pytest.mark.parametrize(
    "conditions,expect",
    [
        (None, "Running"),
        ([{"type": "Complete", "status": "True"}], "Succeeded"),
        ([{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}], "Failed"),
        ([{"type": "Failed", "status": "False"}], "Running"),
        ([{"type": "SuccessCriteriaMet", "status": "True"}], "Succeeded"),
    ],
)
def test_job_phase(conditions: Any, expect: str) -> None:
    assert observe.job_phase({"status": {"conditions": conditions}})[0] == expect


def test_jobs_are_grouped_by_labels_and_foreign_jobs_ignored() -> None:
    foreign = stage_job(0)
    foreign["metadata"]["labels"]["training.vlm.dev/job"] = "other"
    groups = observe.group_jobs_by_stage(make_job(), [stage_job(0), stage_job(1), foreign])
    assert [len(g) for g in groups] == [1, 1]


def test_current_job_is_the_newest_not_being_deleted() -> None:
    jobs = [stage_job(0, 0), stage_job(0, 2, deleting=True), stage_job(0, 1)]
    assert observe.current_job(jobs)["metadata"]["name"] == "demo-align-1"
    assert observe.next_launch(None, jobs) == 3
    assert observe.next_launch(StageStatus(name="align", type="align", launches=5), jobs) == 5


@pytest.mark.parametrize(
    "jobs0,verify_ok,expect0",
    [
        ([], True, StageObservation("Pending", 0, False, "")),
        ([stage_job(0)], True, StageObservation("Running", 0, False, "")),
        (
            [stage_job(0, condition="Failed", restarts=1)],
            True,
            StageObservation("Failed", 1, False, "Failed msg"),
        ),
        ([stage_job(0, condition="Complete")], True, StageObservation("Succeeded", 0, True, "")),
        (
            [stage_job(0, condition="Complete")],
            False,
            StageObservation("Succeeded", 0, False, "no manifest.json at s3://b/runs/demo/align/final"),
        ),
    ],
)
def test_observe_first_stage(jobs0: list, verify_ok: bool, expect0: StageObservation) -> None:
    obs = observe.observe_stages(make_job(), JobStatus(), [jobs0, []], Verifier(verify_ok))
    assert obs[0] == expect0
    assert obs[1] == StageObservation("Pending", 0, False, "")


def test_committed_stage_in_status_is_not_verified_again_and_restarts_come_from_status() -> None:
    prev = JobStatus(
        stages=[
            StageStatus(
                name="align", type="align", phase="Succeeded", checkpoint="s3://b/runs/demo/align/final"
            ),
            StageStatus(name="instruct", type="instruct", phase="Running", restarts=2, launches=2),
        ]
    )
    v = Verifier()
    obs = observe.observe_stages(make_job(), prev, [[], [stage_job(1, 2, restarts=1)]], v)
    assert v.calls == []
    assert obs == [StageObservation("Succeeded", 0, True, ""), StageObservation("Running", 2, False, "")]


def test_restart_count_survives_a_lost_status_through_the_job_annotation() -> None:
    obs = observe.observe_stages(
        make_job(), JobStatus(), [[stage_job(0, 3, "Failed", restarts=3)], []], Verifier()
    )
    assert obs[0].restarts == 3


@pytest.mark.parametrize(
    "obs0,suspend,max_restarts,expect",
    [
        (StageObservation("Pending"), False, 2, planner.StartStage),
        (StageObservation("Running"), False, 2, planner.Wait),
        (StageObservation("Failed", 1), False, 2, planner.StartStage),
        (StageObservation("Failed", 2), False, 2, planner.Fail),
        (StageObservation("Running"), True, 2, planner.Suspend),
        (StageObservation("Succeeded", 0, False, "no manifest"), False, 2, planner.Wait),
    ],
)
def test_planner_transitions_from_observations(
    obs0: StageObservation, suspend: bool, max_restarts: int, expect: type
) -> None:
    action = planner.plan(make_job(max_restarts=max_restarts, suspend=suspend), [obs0, StageObservation()])
    assert isinstance(action, expect)
    if isinstance(action, planner.StartStage):
        assert action.restart == (obs0.phase == "Failed")


def status_for(
    action: planner.Action,
    obs: list[StageObservation],
    jobs=None,
    prev: JobStatus | None = None,
    launched=None,
) -> JobStatus:
    return observe.compute_status(
        make_job(), 4, prev or JobStatus(), obs, action, jobs or [[], []], NOW, launched=launched
    )


def test_status_after_starting_the_first_stage() -> None:
    j = make_job()
    s = status_for(
        planner.StartStage(0, planner.resolve_stage(j, 0)),
        [StageObservation(), StageObservation()],
        launched={0: stage_job(0, 0)},
    )
    assert (s.phase, s.current_stage, s.observed_generation, s.progress) == ("Running", "align", 4, "0/2")
    assert s.stages[0].phase == "Running" and s.stages[0].job_name == "demo-align-0"
    assert s.stages[0].launches == 1 and s.stages[0].start_time == NOW
    assert s.start_time == NOW
    assert {c.type: c.status for c in s.conditions}["Running"] == "True"


def test_status_after_a_gang_restart_counts_it() -> None:
    j = make_job()
    obs = [StageObservation("Failed", 1, False, "pod died"), StageObservation()]
    action = planner.plan(j, obs)
    assert isinstance(action, planner.StartStage) and action.restart and action.restarts == 2
    s = status_for(
        action,
        obs,
        jobs=[[stage_job(0, 1, "Failed", restarts=1)], []],
        launched={0: stage_job(0, 2, restarts=2)},
    )
    assert s.stages[0].restarts == 2 and s.restarts == 2 and s.stages[0].launches == 3
    events = observe.stage_events(
        JobStatus(stages=[StageStatus(name="align", type="align", phase="Failed", restarts=1)]), s
    )
    assert [e[1] for e in events] == ["StageRestarted"]


def test_status_waiting_for_handoff_says_why_in_a_condition() -> None:
    obs = [StageObservation("Succeeded", 0, False, "no manifest.json at x"), StageObservation()]
    action = planner.plan(make_job(), obs)
    s = status_for(action, obs, jobs=[[stage_job(0, condition="Complete", completion=NOW)], []])
    handoff = next(c for c in s.conditions if c.type == "HandoffReady")
    assert (handoff.status, handoff.reason) == ("False", "CheckpointNotCommitted")
    assert "no manifest.json at x" in handoff.message
    assert s.phase == "Running" and s.stages[0].checkpoint is None


def test_status_when_done_and_failed() -> None:
    done_obs = [StageObservation("Succeeded", 0, True), StageObservation("Succeeded", 1, True)]
    s = status_for(planner.Done(), done_obs)
    assert s.phase == "Succeeded" and s.progress == "2/2" and s.restarts == 1 and s.completion_time == NOW
    assert s.stages[1].checkpoint == "s3://b/runs/demo/instruct/final"
    assert {c.type: (c.status, c.reason) for c in s.conditions}["Succeeded"] == ("True", "AllStagesSucceeded")
    failed = status_for(
        planner.Fail(0, "stage 'align' failed after 2 restart(s)"),
        [StageObservation("Failed", 2, False, "x"), StageObservation()],
    )
    assert failed.phase == "Failed"
    assert {c.type: (c.status, c.reason) for c in failed.conditions}["Failed"] == (
        "True",
        "MaxRestartsExceeded",
    )
    events = [e[1] for e in observe.stage_events(JobStatus(phase="Running"), failed)]
    assert "StageFailed" in events and "Failed" in events


def test_suspended_status() -> None:
    s = status_for(planner.Suspend(1), [StageObservation("Succeeded", 0, True), StageObservation()])
    assert s.phase == "Suspended" and s.stages[1].phase == "Suspended" and s.current_stage == "instruct"
    assert {c.type: c.status for c in s.conditions}["Suspended"] == "True"


def test_condition_transition_time_is_kept_while_the_status_holds() -> None:
    first = status_for(
        planner.Wait("stage 'align' is running", 0), [StageObservation("Running"), StageObservation()]
    )
    later = observe.compute_status(
        make_job(),
        4,
        first,
        [StageObservation("Running"), StageObservation()],
        planner.Wait("stage 'align' is running", 0),
        [[], []],
        "2026-11-26T11:00:00Z",
    )
    assert later.conditions[0].last_transition_time == NOW


def test_a_handoff_posts_no_event_and_the_end_posts_one() -> None:
    """Events only for what a user acts on: a stage starting or committing is in the status (stages[],
    HandoffReady), not an Event; the job's end is one."""
    prev = JobStatus()
    running = status_for(
        planner.StartStage(0, planner.resolve_stage(make_job(), 0)),
        [StageObservation(), StageObservation()],
        launched={0: stage_job(0, 0)},
    )
    assert observe.stage_events(prev, running) == []
    committed = status_for(
        planner.StartStage(1, planner.resolve_stage(make_job(), 1)),
        [StageObservation("Succeeded", 0, True), StageObservation()],
        prev=running,
        launched={1: stage_job(1, 0)},
    )
    assert committed.stages[0].checkpoint and committed.stages[1].phase == "Running"
    assert observe.stage_events(running, committed) == []
    done = status_for(
        planner.Done(),
        [StageObservation("Succeeded", 0, True), StageObservation("Succeeded", 0, True)],
        prev=committed,
    )
    assert [e[:2] for e in observe.stage_events(committed, done)] == [("Normal", "Succeeded")]


def test_a_later_reconcile_of_a_running_stage_writes_nothing() -> None:
    """The status right after a stage started is the status of every later reconcile that finds it
    running (no second status write per stage)."""
    j = make_job()
    started = status_for(
        planner.StartStage(0, planner.resolve_stage(j, 0)),
        [StageObservation(), StageObservation()],
        launched={0: stage_job(0, 0)},
    )
    later = status_for(
        planner.plan(make_job(), [StageObservation("Running"), StageObservation()]),
        [StageObservation("Running"), StageObservation()],
        jobs=[[stage_job(0, 0)], []],
        prev=started,
    )
    assert observe.dump_status(later) == observe.dump_status(started)


def test_progress_is_reported_for_the_running_stage() -> None:
    s = observe.compute_status(
        make_job(),
        1,
        JobStatus(),
        [StageObservation("Running"), StageObservation()],
        planner.Wait("running", 0),
        [[stage_job(0)], []],
        NOW,
        progress={0: contract.ProgressRecord.from_doc({"step": 3, "total": 5, "tokens_per_second": 1234.5})},
    )
    assert s.progress == "0/2 (align 3/5)" and s.stages[0].tokens_per_second == 1234.5


def test_status_round_trips_through_the_wire_form() -> None:
    s = status_for(
        planner.Done(), [StageObservation("Succeeded", 0, True), StageObservation("Succeeded", 0, True)]
    )
    wire = observe.dump_status(s)
    assert "currentStage" not in wire or wire["currentStage"] is None
    assert observe.parse_status({**wire, "kopf": {"progress": {}}}) == s


def test_the_launch_number_is_read_from_the_jobs_label_not_its_name() -> None:
    launched = stage_job(0, 4)
    launched["metadata"]["name"] = "renamed-by-someone"  # the name carries no launch number
    s = status_for(
        planner.StartStage(0, planner.resolve_stage(make_job(), 0)),
        [StageObservation(), StageObservation()],
        launched={0: launched},
    )
    assert s.stages[0].launches == 5 and s.stages[0].job_name == "renamed-by-someone"
    assert observe.job_launch(launched) == 4


@pytest.mark.parametrize(
    "action, stage_phases, phase",
    [
        (planner.Done(), ["Succeeded", "Succeeded"], "Succeeded"),
        (planner.Fail(0, "boom"), ["Failed", "Pending"], "Failed"),
        (planner.Suspend(0), ["Suspended", "Pending"], "Suspended"),
        (planner.Wait("stage 'align' is running", 0), ["Running", "Pending"], "Running"),
        (planner.Wait("held back", 0), ["Pending", "Pending"], "Pending"),
        (planner.Wait("in the queue", 0), ["Queued", "Pending"], "Queued"),
    ],
)
def test_job_phase_follows_the_action_and_the_stages(action, stage_phases, phase) -> None:
    stages = [StageStatus(name=n, type=n, phase=p) for n, p in zip(["align", "instruct"], stage_phases, strict=True)]
    got, message = observe.job_phase_and_message(make_job(), stages, action)
    assert got == phase and (message is not None or phase in ("Running", "Pending"))
