"""The VLMTrainingJob schema: defaults follow the field's recipe; bad input is named by field path."""

import copy

import pytest
import yaml
from job_fixtures import GOOD  # noqa: E402
from vlm_core.spec import SpecError, dump_job, parse_job


def problems(doc) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_job(doc)
    return e.value.problems


def test_stage_defaults_follow_the_recipe():
    job = parse_job(GOOD)
    align, instruct, dpo = job.spec.stages
    assert align.trainable == ["projector"] and align.optimizer.lr == 1e-3
    assert instruct.trainable == ["projector", "language_model"] and instruct.optimizer.lr == 2e-5
    assert instruct.optimizer.projector_lr_multiplier == 10.0
    assert align.optimizer.projector_lr_multiplier == 1.0
    assert dpo.dpo is not None and dpo.dpo.beta == 0.1


def test_round_trip_is_camel_case_and_stable():
    job = parse_job(GOOD)
    dumped = dump_job(job)
    assert "maxSteps" in dumped["spec"]["stages"][0] and "max_steps" not in dumped["spec"]["stages"][0]
    assert parse_job(dumped) == job


def test_every_problem_is_named_by_field_path():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["model"]["projecter"] = "linear"  # typo
    doc["spec"]["stages"][1]["optimizer"] = {"lr": -1}
    doc["spec"]["stages"][0]["batch"] = {"globalSize": 10, "microSize": 4}
    doc["spec"]["stages"][2]["name"] = "align"
    got = problems(doc)
    assert any(p.startswith("spec.model.projecter: unknown field") for p in got), got
    assert "spec.stages[1].optimizer.lr: must be > 0, got -1" in got
    assert any(p.startswith("spec.stages[0].batch.globalSize: 10 must be a multiple") for p in got), got
    assert any(p.startswith("spec.stages[2].name: 'align' is used by an earlier stage") for p in got), got


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["stages"][0].update(type="pretrain"), "spec.stages[0].type: Input should be"),
        (lambda d: d["spec"]["stages"][0].pop("maxSteps"), "spec.stages[0].maxSteps: set exactly one of maxSteps or epochs"),
        (lambda d: d["spec"]["stages"][2]["data"].update(format="caption"), "spec.stages[2].data.format: a dpo stage needs 'preference'"),
        (lambda d: d["spec"]["stages"][0].update(dpo={"beta": 0.1}), "spec.stages[0].dpo: only valid for type dpo"),
        (lambda d: d["spec"].update(stages=[]), "spec.stages: List should have at least 1 item"),
        (lambda d: d["spec"]["storage"].update(uri="ftp://x"), "spec.storage.uri: scheme must be one of"),
        (lambda d: d["metadata"].update(name="Bad_Name"), "metadata.name: must be a lowercase DNS label"),
        (lambda d: d.update(apiVersion="v1"), "apiVersion: must be 'training.vlm.dev/v1alpha1'"),
        (lambda d: d["spec"]["stages"][0].update(optimizer={"betas": [0.9, 1.5]}), "spec.stages[0].optimizer.betas: each beta"),
        (lambda d: d["spec"]["stages"][0]["resources"].update(nodes=0) if "resources" in d["spec"]["stages"][0]
         else d["spec"]["stages"][0].update(resources={"nodes": 0}), "spec.stages[0].resources.nodes: Input should be greater than 0"),
    ],
)
def test_planted_errors(mutate, expected):
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    got = problems(doc)
    assert any(p.startswith(expected) for p in got), got


def _vlmctl(*argv: str) -> int:
    from vlm_operator import cli

    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)


def test_vlmctl_validate_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][1]["optimizer"] = {"lr": -1}
    doc["spec"]["stages"][0]["maxStep"] = 3
    bad.write_text(yaml.safe_dump(doc))
    assert _vlmctl("validate", str(good)) == 0
    assert "align (align) -> instruct (instruct) -> dpo (dpo)" in capsys.readouterr().out
    assert _vlmctl("validate", str(bad)) == 1
    err = capsys.readouterr().err
    assert "spec.stages[1].optimizer.lr: must be > 0, got -1" in err
    assert "spec.stages[0].maxStep: unknown field" in err


def test_cross_field_rules_are_reported_with_field_errors_in_one_run():
    doc = copy.deepcopy(GOOD)
    dpo = doc["spec"]["stages"][2]
    dpo.update(name="Bad_Name", epochs=1)  # a field error, plus maxSteps and epochs both set
    dpo["data"]["format"] = "caption"  # and the wrong data for a dpo stage
    doc["spec"]["stages"][0]["optimizer"] = {"lr": 0}  # field error in another stage with a rule broken too
    doc["spec"]["stages"][0]["batch"] = {"globalSize": 12, "microSize": 8}
    got = problems(doc)
    assert any(p.startswith("spec.stages[2].name: must be a lowercase DNS label of at most 40 characters")
               and p.endswith("got 'Bad_Name'") for p in got), got
    assert any(p.startswith("spec.stages[2].maxSteps: set exactly one of maxSteps or epochs") for p in got), got
    assert "spec.stages[2].data.format: a dpo stage needs 'preference' data, got 'caption'" in got
    assert "spec.stages[0].optimizer.lr: must be > 0, got 0" in got
    assert any(p.startswith("spec.stages[0].batch.globalSize: 12 must be a multiple") for p in got), got
    assert len(got) == len(set(got))  # each problem once


def test_several_broken_rules_of_a_valid_stage_are_all_reported():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][0].update(epochs=2, dpo={"beta": 0.2})
    got = problems(doc)
    assert any(p.startswith("spec.stages[0].maxSteps: set exactly one") for p in got), got
    assert "spec.stages[0].dpo: only valid for type dpo, this stage is 'align'" in got
