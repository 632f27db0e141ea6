"""Kueue: a stage Job held suspended (not yet admitted, or preempted) shows as Queued, never Running,
and is never created twice; once admitted it shows as Running again."""

from __future__ import annotations

from typing import Any

from vlm_core.spec import parse_job
from vlm_operator import builders, observe, planner
from vlm_operator.status_model import JobStatus

NOW = "2026-11-30T10:00:00Z"


def make_job() -> Any:
    return parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {
            "model": {"visionEncoder": "v", "languageModel": "l"},
            "storage": {"uri": "s3://b/runs"},
            "stages": [
                {"name": "align", "type": "align", "maxSteps": 5, "data": {"shards": ["d.tar"], "format": "caption"}},
                {"name": "instruct", "type": "instruct", "maxSteps": 5,
                 "data": {"shards": ["d.tar"], "format": "conversation"}},
            ],
            "runPolicy": {"queueName": "team-a-gpus"},
        },
    })


def stage_job(suspended: bool) -> dict[str, Any]:
    obj = builders.build_stage_job(make_job(), 0, "ns")
    assert obj["metadata"]["labels"][builders.KUEUE_QUEUE_LABEL] == "team-a-gpus"
    obj["metadata"]["creationTimestamp"] = NOW
    obj["spec"]["suspend"] = suspended  # what Kueue's webhook sets until the workload is admitted
    obj["status"] = {"conditions": [{"type": "Suspended", "status": "True"}]} if suspended else {"active": 1}
    return obj


def reconcile_once(jobs: list[dict[str, Any]], prev: JobStatus) -> tuple[planner.Action, JobStatus]:
    job = make_job()
    by_stage = observe.group_jobs_by_stage(job, jobs)
    obs = observe.observe_stages(job, prev, by_stage, lambda uri: (_ for _ in ()).throw(AssertionError(uri)))
    action = planner.plan(job, obs)
    return action, observe.compute_status(job, 1, prev, obs, action, by_stage, NOW)


def test_a_suspended_stage_job_is_queued_with_a_condition_and_not_recreated() -> None:
    action, status = reconcile_once([stage_job(suspended=True)], JobStatus())
    assert isinstance(action, planner.Wait)  # the Job exists: no second one
    assert status.phase == "Queued" and status.stages[0].phase == "Queued"
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Queued"].status == "True" and conditions["Queued"].reason == "WaitingForAdmission"
    assert "team-a-gpus" in conditions["Queued"].message and "demo-align-0" in conditions["Queued"].message
    assert conditions["Running"].status == "False"


def test_admission_turns_queued_into_running() -> None:
    _, queued = reconcile_once([stage_job(suspended=True)], JobStatus())
    _, running = reconcile_once([stage_job(suspended=False)], queued)
    assert running.phase == "Running" and running.stages[0].phase == "Running"
    conditions = {c.type: c for c in running.conditions}
    assert conditions["Queued"].status == "False" and conditions["Running"].status == "True"
    assert observe.stage_events(queued, running) == []  # the status says it; nothing for a user to do
