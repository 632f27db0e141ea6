"""The stage rules written once as data: the kinds and strategy tables drive the typed spec's defaults and
rules AND the CRD's CEL rules, so the two cannot drift; a curate stage refuses every training field in both."""

from __future__ import annotations

import copy
import itertools
import random
from typing import Any

import pytest
from job_fixtures import GOOD
from vlm_core import kinds, strategies
from vlm_core import spec as S
from vlm_core.accounting import StageInput
from vlm_operator import crd

pytestmark = pytest.mark.unit

CURATE = {"name": "cur", "type": "curate", "input": {"shards": ["raw-{0..1}.tar"]}}


def _eval_cel(rule: str, value: Any) -> bool:
    import celpy  # cel-python: Google's CEL, evaluated as the API server would

    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}))


def _stage_cel_rules() -> list[dict[str, Any]]:
    return crd.spec_schema()["properties"]["stages"]["items"]["x-kubernetes-validations"]


def _failing_cel_messages(stage: dict[str, Any]) -> list[str]:
    return [r["message"] for r in _stage_cel_rules() if not _eval_cel(r["rule"], stage)]


def _job(*stages: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"] = list(stages)
    return doc


def _problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(S.SpecError) as err:
        S.parse_job(doc)
    return err.value.problems


def _training_values() -> dict[str, Any]:
    """A valid value for every training-stage field: a training stage with defaults filled in, plus the
    optional ones a default leaves out."""
    stage = S.dump_job(S.parse_job(GOOD))["spec"]["stages"][2]
    stage.update(lora={"rank": 8}, epochs=1)
    stage.update(reward={"margin": 0.5})  # a reward stage's own field (the dpo stage above has none)
    stage.update(rl={"algorithm": "grpo"})  # an rl stage's own field
    return stage


def test_the_field_lists_are_derived_from_the_two_models():
    training, curate = set(S.wire_names(S.StageSpec)), set(S.wire_names(S.CurateStage))
    assert set(S.TRAINING_ONLY_FIELDS) == training - curate
    assert set(S.CURATE_ONLY_FIELDS) == curate - training
    assert {"compile", "cacheVisionFeatures", "crossEntropy"} <= set(S.TRAINING_ONLY_FIELDS)


@pytest.mark.parametrize("field", S.TRAINING_ONLY_FIELDS)
def test_every_training_field_is_refused_on_a_curate_stage_by_python_and_cel(field: str):
    value = _training_values()[field]
    stage = {**CURATE, field: value}
    assert any(p.startswith(f"spec.stages[0].{field}: a curate stage has no training fields")
               for p in _problems(_job(stage))), field
    assert f"{field}: a curate stage has no training fields" in _failing_cel_messages(stage)


@pytest.mark.parametrize("field,value", [("compile", True), ("cacheVisionFeatures", True), ("crossEntropy", "chunked")])
def test_the_crd_refuses_a_curate_stage_with_the_fields_the_hand_list_lacked(field: str, value: Any):
    stage = {**CURATE, field: value}
    assert _failing_cel_messages(CURATE) == []
    assert f"{field}: a curate stage has no training fields" in _failing_cel_messages(stage)


@pytest.mark.parametrize("field", S.CURATE_ONLY_FIELDS)
def test_every_curate_field_is_refused_on_a_training_stage_by_python_and_cel(field: str):
    stage = copy.deepcopy(GOOD["spec"]["stages"][0])
    stage[field] = {"shards": ["raw.tar"]} if field == "input" else {} if field != "encoder" else "/m/enc"
    assert any(p.startswith(f"spec.stages[0].{field}: only valid for type curate") for p in _problems(_job(stage)))
    assert any(m.endswith("only valid for type curate") and field in m for m in _failing_cel_messages(stage))


@pytest.mark.parametrize("kind", [k for k in kinds.KINDS.values() if k.trains], ids=lambda k: k.type)
def test_every_kinds_table_row_has_its_defaults_applied(kind: kinds.StageKind):
    stage = {"name": "s", "type": kind.type, "data": {"shards": ["a.tar"], "format": kind.formats[0]}, "maxSteps": 3}
    got = S.parse_job(_job(stage)).spec.stages[0]
    assert isinstance(got, S.StageSpec)
    assert tuple(got.trainable or ()) == kind.default_trainable
    assert got.optimizer.lr == kind.default_lr
    assert got.optimizer.projector_lr_multiplier == kind.default_projector_lr_multiplier
    for own in kind.own_fields:  # a kind's own settings section is filled in with its defaults
        assert getattr(got, own) is not None
    assert _failing_cel_messages(stage) == []
    for fmt in {f for k in kinds.KINDS.values() for f in k.formats} - set(kind.formats):
        bad = {**stage, "data": {"shards": ["a.tar"], "format": fmt}}
        assert any(p.startswith("spec.stages[0].data.format:") for p in _problems(_job(bad)))
        assert any(m.startswith("data.format:") for m in _failing_cel_messages(bad))


def test_stage_type_and_strategy_literals_come_from_the_tables():
    assert S.StageSpec.model_fields["type"].annotation.__args__ == kinds.TRAINING_TYPES  # type: ignore[union-attr]
    assert S.StageSpec.model_fields["strategy"].annotation.__args__ == strategies.STRATEGIES  # type: ignore[union-attr]
    assert S.DataSourceSpec.model_fields["format"].annotation.__args__ == kinds.FORMATS  # type: ignore[union-attr]
    assert S.CurateStage.model_fields["type"].annotation.__args__ == kinds.DATA_TYPES  # type: ignore[union-attr]
    assert S.STAGE_TYPES == kinds.STAGE_TYPES


def _stage_grid() -> list[dict[str, Any]]:
    """Stages across the tables' values: every kind, strategy and offload, with the fields the rules read."""
    base = {"name": "s", "maxSteps": 4, "batch": {"globalSize": 8, "microSize": 8}}
    fmts = sorted({f for k in kinds.KINDS.values() for f in k.formats})
    grid = []
    for t, strat, off, fmt in itertools.product(kinds.TRAINING_TYPES, strategies.STRATEGIES, strategies.OFFLOADS, fmts):
        grid.append({**base, "type": t, "strategy": strat, "offload": off, "data": {"shards": ["a.tar"], "format": fmt}})
    extras: list[dict[str, Any]] = [
        {"lora": {"rank": 4}}, {"qlora": True}, {"qlora": True, "lora": {"rank": 4}},
        {"qlora": True, "lora": {"rank": 4}, "resources": {"gpusPerNode": 1}}, {"compile": True},
        {"cacheVisionFeatures": True}, {"cacheVisionFeatures": True, "trainable": ["vision_tower"]},
        {"crossEntropy": "chunked"}, {"batch": {"globalSize": 8, "microSize": 8, "tokensPerMicroBatch": 512}},
        {"dpo": {"reference": "adapter_disabled"}}, {"dpo": {"reference": "adapter_disabled"}, "lora": {"rank": 4}},
        {"trainable": ["projector"]},
        {"reward": {"margin": 0.5}}, {"rl": {"algorithm": "grpo"}},  # the reward and rl kinds' own fields
    ]
    rng = random.Random(0)
    out = []
    for stage in rng.sample(grid, 60):
        out.append(stage)
        out.append({**stage, **rng.choice(extras)})
    return out


def test_python_and_cel_agree_on_every_table_rule():
    compiled = []
    import celpy

    env = celpy.Environment()
    for rule in S.STAGE_RULES:
        compiled.append((rule, env.program(env.compile(rule.cel()))))
    broken_somewhere = set()
    for stage in _stage_grid():
        for rule, program in compiled:
            cel_ok = bool(program.evaluate({"self": celpy.json_to_cel(stage)}))
            assert rule.broken(stage) == (not cel_ok), (rule.cel_message, stage)
            if not cel_ok:
                broken_somewhere.add(rule.cel_message)
    assert len(broken_somewhere) >= len(S.STAGE_RULES) - 2  # the grid exercises (nearly) every rule


@pytest.mark.parametrize("name", strategies.STRATEGIES)
def test_offloads_follow_the_strategy_traits_in_spec_cel_and_accounting(name: str):
    row = strategies.traits(name)
    for off in strategies.OFFLOADS:
        stage = {**GOOD["spec"]["stages"][1], "strategy": name, "offload": off}
        allowed = off in row.offloads
        if allowed:
            S.parse_job(_job(stage))
            StageInput(strategy=name, offload=off)
        else:
            assert any(p.startswith("spec.stages[0].offload:") for p in _problems(_job(stage)))
            with pytest.raises(ValueError, match="offload: needs strategy"):
                StageInput(strategy=name, offload=off)
        assert any(m.startswith("offload:") for m in _failing_cel_messages(stage)) is not allowed


def test_unknown_strategy_names_the_accepted_ones():
    with pytest.raises(KeyError, match="ddp, fsdp, zero2, zero3"):
        strategies.traits("zero9")


def test_rules_on_raw_input_of_wrong_types_report_problems_never_a_crash():
    weird: list[Any] = [None, 1, True, "x", [], ["a"], {}, {"a": 1}, [{}], 1.5, "pretrain", "dpo", "curate"]
    keys = ["type", "data", "batch", "resources", "strategy", "offload", "lora", "qlora", "compile",
            "cacheVisionFeatures", "crossEntropy", "dpo", "trainable", "maxSteps", "epochs"]
    rng = random.Random(1)
    for _ in range(300):
        stage = copy.deepcopy(GOOD["spec"]["stages"][rng.randrange(3)])
        for k in rng.sample(keys, rng.randrange(1, 5)):
            stage[k] = rng.choice(weird)
        if isinstance(stage.get("batch"), dict):
            stage["batch"]["tokensPerMicroBatch"] = rng.choice(weird)
        S.stage_rule_problems(stage)
        try:
            S.parse_job(_job(stage))
        except S.SpecError:  # a problem by field path: what a user should get; anything else fails the test
            pass
