"""Retry only what can succeed on retry: the contract's one table of failures (exception type -> exit code ->
retryable), the error record a pod's termination message carries, what the operator reads from a failed
gang's pods, and the planner's verdict (deterministic: one attempt; eviction: a restart that spends nothing)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from job_fixtures import GOOD
from vlm_core import contract
from vlm_core.spec import parse_job
from vlm_operator import local, observe, planner
from vlm_operator.planner import StageObservation as Obs


def test_the_table_has_one_distinct_exit_code_and_reason_per_row() -> None:
    codes = [f.exit_code for f in contract.FAILURES]
    assert len(set(codes)) == len(codes)
    # not 0/1/2 (success, torchrun's own failure, usage) nor the shell's 126+ (not run, signals)
    assert all(2 < c < 126 for c in codes)
    assert len({f.reason for f in contract.FAILURES}) == len(contract.FAILURES)
    names = [e for f in contract.FAILURES for e in f.errors]
    assert len(set(names)) == len(names)
    assert contract.TRANSIENT.retryable and not contract.TRANSIENT.errors
    assert [f.reason for f in contract.FAILURES if not f.retryable] == [
        "ConfigurationError", "BadData", "NonFiniteLoss", "OutOfMemory"]
    assert set(contract.NOT_RETRIED_ERRORS) == {e for f in contract.FAILURES if not f.retryable for e in f.errors}


def test_the_table_names_the_exceptions_the_trainer_raises() -> None:
    import torch
    from vlm_trainer.lease import LeaseHeldError
    from vlm_trainer.loader import BadDataError
    from vlm_trainer.model import ModelConfigError
    from vlm_trainer.trainer import NonFiniteError

    for cls, reason in ((BadDataError, "BadData"), (NonFiniteError, "NonFiniteLoss"),
                        (torch.OutOfMemoryError, "OutOfMemory"), (ModelConfigError, "ConfigurationError"),
                        (LeaseHeldError, "ConfigurationError")):
        assert contract.failure_of_error(cls.__name__).reason == reason
    assert contract.failure_of_error("RuntimeError") is contract.TRANSIENT
    assert contract.failure_of_exit_code(65).reason == "BadData"
    assert contract.failure_of_exit_code(1) is None and contract.failure_of_exit_code(None) is None


def test_error_record_round_trips_redacted_and_fits_the_termination_message() -> None:
    err = contract.TrainerError("BadDataError: 3 of 100 samples bad (s3://k:supersecret@b/x.tar)", 1, 1796676700.0)
    text = contract.error_record(err, 65)
    back = contract.parse_error_record(text)
    assert back is not None and back.rank == 1 and back.timestamp == 1796676700.0
    assert back.type_name == "BadDataError" and not back.retryable and back.failure.reason == "BadData"
    assert "supersecret" not in text and "supersecret" not in str(back)
    assert json.loads(text)["errorCode"] == 65
    long = contract.TrainerError("RuntimeError: " + "é" * 10_000, 0)
    text = contract.error_record(long, 75)
    assert len(text.encode()) <= contract.TERMINATION_MESSAGE_MAX
    assert contract.parse_error_record(text).type_name == "RuntimeError"  # type: ignore[union-attr]
    assert contract.parse_error_record("Traceback (most recent call last):") is None


def test_torchelastic_error_file_reads_as_the_same_record(tmp_path) -> None:
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": {"message": "NonFiniteError: step 1: loss nan", "extraInfo": {
        "py_callstack": "Traceback ...", "timestamp": "1796676700", "rank": "0"}}, "errorCode": 1}))
    err = local.trainer_error(str(path))
    assert err is not None and str(err) == "rank 0: NonFiniteError: step 1: loss nan" and not err.retryable


def pod(name: str, code: int | None, message: str = "", conditions: list[dict[str, Any]] | None = None,
        finished: str = "2026-12-07T10:00:00Z") -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "message": message, "finishedAt": finished}} if code is not None \
        else {"running": {}}
    return {"metadata": {"name": name},
            "status": {"conditions": conditions or [], "containerStatuses": [{"name": "trainer", "state": state}]}}


def record(message: str, rank: int, stamp: float, code: int) -> str:
    return contract.error_record(contract.TrainerError(message, rank, stamp), code)


def test_pod_failure_takes_the_first_failing_ranks_record() -> None:
    pods = [
        pod("p-0", 137),  # killed by the Job after the first failure: no record
        pod("p-1", 65, record("BadDataError: 2.0% > data.maxBadSampleShare 0.01", 3, 100.0, 65)),
        pod("p-2", 75, record("RuntimeError: peer lost", 5, 101.0, 75)),
    ]
    why = observe.pod_failure(pods)
    assert why is not None and why.message == "rank 3: BadDataError: 2.0% > data.maxBadSampleShare 0.01"
    assert why.failure is not None and why.failure.reason == "BadData" and not why.retryable and not why.disrupted


def test_pod_failure_without_a_record_uses_the_logs_tail_or_the_exit_code() -> None:
    why = observe.pod_failure([pod("p-0", 1, "loading...\nKilled: out of host memory\n")])
    assert why is not None and why.message == "pod p-0 exited with code 1: Killed: out of host memory"
    assert why.retryable and why.failure is None
    why = observe.pod_failure([pod("p-0", 137), pod("p-1", 66)])  # the launcher's code wins over a kill
    assert why is not None and why.message == "pod p-1 exited with code 66" and not why.retryable
    assert observe.pod_failure([pod("p-0", 0), pod("p-1", None)]) is None


def test_an_evicted_pod_is_a_disruption() -> None:
    evicted = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    why = observe.pod_failure([pod("p-0", 137, conditions=evicted), pod("p-1", 75, record("RuntimeError: x", 1, 1, 75))])
    assert why is not None and why.disrupted and why.retryable


def job(max_restarts: int = 3):
    doc = json.loads(json.dumps(GOOD))
    doc["spec"]["runPolicy"] = {"maxRestarts": max_restarts}
    return parse_job(doc)


@pytest.mark.parametrize("reason, what", [
    ("BadData", "bad data over its budget"), ("NonFiniteLoss", "a non-finite loss"),
    ("OutOfMemory", "out of memory"), ("ConfigurationError", "a configuration error"),
])
def test_a_deterministic_failure_ends_the_stage_after_one_attempt(reason: str, what: str) -> None:
    a = planner.plan(job(), [Obs("Failed", restarts=0, message="rank 0: X: y", retryable=False, failure=reason)])
    assert isinstance(a, planner.Fail) and a.code == reason
    assert a.reason == f"stage 'align' failed with {what} (not retried): rank 0: X: y"


def test_an_eviction_restarts_without_spending_max_restarts() -> None:
    spent = Obs("Failed", restarts=1, message="a pod was evicted", disrupted=True)
    a = planner.plan(job(max_restarts=1), [spent])  # the budget is spent, but an eviction is not a failure
    assert isinstance(a, planner.StartStage) and a.restart and a.restarts == 1
    a = planner.plan(job(max_restarts=1), [Obs("Failed", restarts=1, message="RuntimeError")])
    assert isinstance(a, planner.Fail) and a.code == planner.FAIL_MAX_RESTARTS


def stage_job(phase: str) -> dict[str, Any]:
    from vlm_operator import builders

    j = builders.build_stage_job(job(), 0, "ns", launch=0)
    j["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                   "message": "Container trainer for pod ns/x failed with exit code 65"}]} \
        if phase == "Failed" else {}
    return j


def test_the_operator_observes_a_failed_gangs_error_from_its_pods() -> None:
    asked: list[str] = []

    def pods(j: dict[str, Any]) -> list[dict[str, Any]]:
        asked.append(j["metadata"]["name"])
        return [pod("x-0", 65, record("BadDataError: too many bad samples", 0, 1.0, 65))]

    jobs = [[stage_job("Failed")], []]
    obs = observe.observe_stages(job(), observe.JobStatus(), jobs, lambda uri: pytest.fail("no storage"), pods=pods)
    assert asked == [jobs[0][0]["metadata"]["name"]]
    assert (obs[0].phase, obs[0].retryable, obs[0].failure) == ("Failed", False, "BadData")
    assert obs[0].message == "rank 0: BadDataError: too many bad samples"
    # a running stage's pods are never listed
    observe.observe_stages(job(), observe.JobStatus(), [[stage_job("Running")], []], lambda uri: pytest.fail(""),
                           pods=pods)
    assert len(asked) == 1


def test_the_local_backend_applies_the_same_table() -> None:
    obs = local.observe_local(job(), {0: 0}, {0: "rank 0: BadDataError: x"}, fatal={0: "BadData"})
    assert (obs[0].retryable, obs[0].failure) == (False, "BadData")
    a = planner.plan(job(), obs)
    assert isinstance(a, planner.Fail) and a.code == "BadData"


def test_a_job_failed_by_a_failjob_rule_is_not_retried_even_when_its_pods_are_gone() -> None:
    obs = observe.observe_stages(job(), observe.JobStatus(), [[stage_job("Failed")], []],
                                 lambda uri: pytest.fail("no storage"), pods=lambda j: [])
    assert (obs[0].retryable, obs[0].failure) == (False, "BadData")
    assert "exit code 65" in obs[0].message


def test_an_evictions_restart_keeps_the_count_and_says_so_in_a_warning() -> None:
    from vlm_operator.status_model import JobStatus, StageStatus

    obs = [Obs("Failed", restarts=0, message="a pod was evicted (DisruptionTarget)", disrupted=True), Obs()]
    action = planner.plan(job(max_restarts=0), obs)
    assert isinstance(action, planner.StartStage) and action.restarts == 0
    failed = stage_job("Failed")
    relaunched = dict(failed, metadata={**failed["metadata"], "name": "demo-align-1",
                                        "labels": {**failed["metadata"]["labels"], contract.LABEL_LAUNCH: "1"}})
    prev = JobStatus(phase="Running", stages=[StageStatus(name="align", type="align", phase="Running", launches=1)])
    new = observe.compute_status(job(max_restarts=0), 1, prev, obs, action, [[failed], []], "now",
                                 launched={0: relaunched})
    assert new.stages[0].restarts == 0 and new.stages[0].launches == 2
    assert new.stages[0].message == observe.EVICTED + "a pod was evicted (DisruptionTarget)"
    assert [e[1] for e in observe.stage_events(prev, new)] == ["StageRescheduled"]
