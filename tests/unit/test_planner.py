"""The one planner: transitions, handoff rule, restarts, suspension, resolved configs."""

import copy

import pytest
from job_fixtures import GOOD
from vlm_core.spec import parse_job
from vlm_operator import planner
from vlm_operator.planner import StageObservation as Obs


def job(**spec_updates):
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(spec_updates)
    return parse_job(doc)


def test_first_stage_starts_from_the_pretrained_parts():
    a = planner.plan(job(), [])
    assert isinstance(a, planner.StartStage) and a.index == 0 and not a.restart
    assert a.config.init_from is None
    assert a.config.output == "file:///tmp/store/demo/align"
    assert a.config.stage.data.shards == ["file:///tmp/store/a-{0..1}.tar"]  # relative -> storage.uri


def test_stage_k_starts_from_stage_k_minus_1_final():
    a = planner.plan(job(), [Obs("Succeeded", committed=True)])
    assert isinstance(a, planner.StartStage) and a.index == 1
    assert a.config.init_from == "file:///tmp/store/demo/align/final"
    assert a.config.output == "file:///tmp/store/demo/instruct"


def test_handoff_waits_for_committed_final():
    a = planner.plan(job(), [Obs("Succeeded", committed=False, message="no manifest.json")])
    assert isinstance(a, planner.Wait) and a.index == 0 and "not committed" in a.reason


@pytest.mark.parametrize(
    "observed, kind, index",
    [
        ([Obs("Running")], "wait", 0),
        ([Obs("Succeeded", committed=True), Obs("Running")], "wait", 1),
        ([Obs("Succeeded", committed=True)] * 3, "done", None),
        ([Obs("Failed", restarts=0)], "start", 0),
        ([Obs("Failed", restarts=2)], "start", 0),
        ([Obs("Failed", restarts=3, message="OOM")], "fail", 0),
    ],
)
def test_transitions(observed, kind, index):
    a = planner.plan(job(), observed)
    assert a.kind == kind
    assert getattr(a, "index", None) == index
    if kind == "start" and observed[0].phase == "Failed":
        assert a.restart
    if kind == "fail":
        assert "maxRestarts 3" in a.reason and "OOM" in a.reason


def test_stage_max_restarts_overrides_run_policy():
    j = job()
    j.spec.stages[0].max_restarts = 0
    assert planner.plan(j, [Obs("Failed", restarts=0)]).kind == "fail"


def test_suspend_holds_the_current_stage_but_not_finished_ones():
    j = job(suspend=True)
    a = planner.plan(j, [Obs("Succeeded", committed=True), Obs("Running")])
    assert isinstance(a, planner.Suspend) and a.index == 1
    assert planner.plan(j, [Obs("Succeeded", committed=True)] * 3).kind == "done"


def test_resolved_config_round_trips_as_json():
    cfg = planner.resolve_stage(job(), 2)
    again = type(cfg).load(cfg.dump())
    assert again == cfg and again.stage.max_restarts == 3 and again.stage.dpo.beta == 0.1


# The planner alone decides whether a failed or new stage may run, and words why not: both backends
# report these reasons and codes unchanged (tests/unit/test_backends_agree.py).
@pytest.mark.parametrize(
    "obs, problems, code, reason",
    [
        (Obs("Failed", restarts=3, message="OOM"), None, planner.FAIL_MAX_RESTARTS,
         "stage 'align' failed after 3 restart(s) (maxRestarts 3): OOM"),
        (Obs("Failed", restarts=5, message="OOM"), None, planner.FAIL_MAX_RESTARTS,
         "stage 'align' failed after 5 restart(s) (maxRestarts 3): OOM"),
        (Obs("Failed", restarts=0, message="SpecError: bad", retryable=False), None, planner.FAIL_CONFIGURATION,
         "stage 'align' failed with a configuration error (not retried): SpecError: bad"),
        (Obs(), ["spec.model.visionEncoder: missing", "spec.stages[0].data.shards[0]: not found"],
         planner.FAIL_PREFLIGHT,
         "stage 'align' failed with a configuration error (not retried): preflight failed: "
         "spec.model.visionEncoder: missing; spec.stages[0].data.shards[0]: not found"),
        (Obs("Failed", restarts=2, message="OOM"), None, None, None),  # restart 3 of 3
        (Obs("Failed", restarts=2, message="OOM"), ["x: missing"], None, None),  # a restart is not preflighted
        (Obs(), [], None, None),
    ],
)
def test_failure_reasons_table(obs, problems, code, reason):
    asked = []

    def preflight(i):
        asked.append(i)
        return problems or []

    a = planner.plan(job(), [obs], preflight=preflight)
    if code is None:
        assert isinstance(a, planner.StartStage) and a.index == 0
        assert a.restarts == (obs.restarts + 1 if obs.phase == "Failed" else obs.restarts)
    else:
        assert isinstance(a, planner.Fail) and (a.index, a.code, a.reason) == (0, code, reason)
    assert asked == ([0] if obs.phase == "Pending" else [])


def test_preflight_is_asked_only_for_a_stage_that_may_start():
    asked = []
    a = planner.plan(job(), [Obs("Running")], preflight=lambda i: asked.append(i) or [])
    assert a.kind == "wait" and asked == []
    a = planner.plan(job(), [Obs("Succeeded", committed=True)], preflight=lambda i: asked.append(i) or [])
    assert a.kind == "start" and asked == [1]


def test_failure_after_and_preflight_failure_are_none_when_the_stage_may_run():
    assert planner.failure_after(job(), 0, Obs("Failed", restarts=0)) is None
    assert planner.preflight_failure(job(), 0, []) is None
