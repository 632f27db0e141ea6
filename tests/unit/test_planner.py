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
