"""Stage fingerprints: which fields count (read off the schema), inputs by content, the planner's refusal,
and reruns that keep the old outputs aside."""

import copy
import json

import pytest
from job_fixtures import GOOD
from pydantic import BaseModel
from vlm_core import contract, fingerprint, reruns, storage
from vlm_core.spec import TrainerConfig, content_of, no_effect, parse_job
from vlm_operator import planner
from vlm_operator.planner import StageObservation as Obs


def job_doc(tmp_path):
    doc = copy.deepcopy(GOOD)
    doc["spec"]["storage"]["uri"] = f"file://{tmp_path}/store"
    return doc


def full_training_config(tmp_path) -> TrainerConfig:
    """A DPO stage with every optional block set, so every field of the schema has a value to change."""
    doc = job_doc(tmp_path)
    doc["spec"]["stages"][2].update({
        "lora": {"rank": 8}, "dpo": {"beta": 0.2}, "resources": {"cpu": "2", "memory": "4Gi", "gpuMemoryGiB": 80},
        "maxRestarts": 2, "optimizer": {"lr": 1e-5},
    })
    doc["spec"]["stages"][2]["data"].update({"evalShards": ["e.tar"], "workers": 1, "cacheMiB": 16,
                                             "resolution": {"policy": "fixed", "imageSize": 32}})
    return planner.resolve_stage(parse_job(doc), 2)


def full_curate_config(tmp_path) -> TrainerConfig:
    doc = job_doc(tmp_path)
    doc["spec"]["stages"].insert(0, {
        "name": "curate", "type": "curate", "input": {"shards": ["raw-{0..1}.tar"]}, "encoder": "/m/enc",
        "filters": {"clipScore": {"threshold": 0.2}, "nsfw": {"probe": "/m/probe.json"},
                    "semanticDedup": {"clusters": 2, "threshold": 0.9},
                    "balance": {"concepts": ["cat"], "conceptsFile": "/m/c.txt", "perConceptCap": 5}},
    })
    return planner.resolve_stage(parse_job(doc), 0)


def leaves(model: BaseModel, prefix: str = ""):
    """(path, owner model, field name, FieldInfo, value) of every leaf field, as the schema lays them out."""
    for name, info in type(model).model_fields.items():
        path = prefix + (info.alias or info.serialization_alias or name)
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from leaves(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, v in enumerate(value):
                yield from leaves(v, f"{path}[{i}].")
        else:
            yield path, model, name, info, value


def changed(value):
    """Another value of the same shape (no validation: the fingerprint reads the instance)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, (list, tuple)):
        return [*value, "x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    return "x"  # None


def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp")
    out = []
    for config in (full_training_config(tmp), full_curate_config(tmp)):
        for path, _owner, _name, info, value in leaves(config):
            if value is None and content_of(info) is not None:
                continue  # None -> a location adds an input (content appears): not a change of location
            reads_model = config.stage.type != "curate"  # a data stage builds no model (kinds: trains)
            out.append((config, path, no_effect(info) is None and (reads_model or not path.startswith("model."))))
    return out


def mutate(config: TrainerConfig, path: str) -> TrainerConfig:
    copy_ = config.model_copy(deep=True)
    for p, owner, name, _info, value in leaves(copy_):
        if p == path:
            object.__setattr__(owner, name, changed(value))
            return copy_
    raise KeyError(path)


@pytest.fixture(scope="module")
def every_field(tmp_path_factory):
    return cases(tmp_path_factory)


def test_every_field_of_the_schema_counts_unless_marked_no_effect(every_field):
    """The table of what counts is the schema itself: each leaf field, changed, changes the fingerprint
    exactly when it carries no NoEffect marker."""
    wrong = []
    for config, path, counts in every_field:
        before, after = fingerprint.compute(config), fingerprint.compute(mutate(config, path))
        if (before.digest != after.digest) != counts:
            wrong.append(f"{path}: counts={counts} but digest {'changed' if not counts else 'did not change'}")
    assert not wrong, "\n".join(wrong)
    assert len(every_field) > 80  # both stage kinds, every block set


def test_the_fields_without_effect_are_the_ones_a_user_expects(every_field):
    exempt = {path for c, path, counts in every_field
              if not counts and not (c.stage.type == "curate" and path.startswith("model."))}
    # scheduling, restart budget, loader speed, checkpoint cadence, report detail, storage access, locations
    for path in ("stage.resources.cpu", "stage.resources.memory", "stage.maxRestarts", "stage.data.workers",
                 "stage.data.cacheMiB", "stage.checkpoint.everySteps", "storage.endpointUrl", "storage.secretRef",
                 "output", "initFrom", "job", "stageIndex", "stage.output.examplesPerReason"):
        assert path in exempt, path
    for path in ("stage.optimizer.lr", "stage.maxSteps", "stage.seed", "stage.resources.nodes", "stage.data.shards",
                 "stage.lora.rank", "stage.dpo.beta", "model.languageModel", "stage.filters.clipScore.threshold"):
        assert path not in exempt, path


def test_differences_name_each_changed_field_old_to_new(tmp_path):
    doc = job_doc(tmp_path)
    old = fingerprint.compute(planner.resolve_stage(parse_job(doc), 1)).record()
    doc["spec"]["stages"][1].update({"optimizer": {"lr": 5e-4}, "maxSteps": 3, "resources": {"cpu": "4"}})
    new = fingerprint.compute(planner.resolve_stage(parse_job(doc), 1))
    assert fingerprint.differences(old, new) == ["stage.maxSteps: 10 -> 3", "stage.optimizer.lr: 2e-05 -> 0.0005"]
    assert fingerprint.differences(new.record(), new) == []
    assert "older release" in fingerprint.differences(None, new)[0]


def test_a_field_a_later_release_added_unset_changes_nothing_committed_before_it(tmp_path):
    """A stage committed before a field existed (its stamp lacks the key) matches the spec whose field is unset
    (null); the same field set to a value is a change, and so is a field removed that had a value."""
    new = fingerprint.compute(planner.resolve_stage(parse_job(job_doc(tmp_path)), 1))
    assert new.settings["stage.rl"] is None  # an unset optional block (added after some stages were committed)
    older = {k: v for k, v in new.settings.items() if k != "stage.rl"}
    old = fingerprint.Fingerprint(older, new.inputs).record()
    assert old["digest"] != new.digest and fingerprint.differences(old, new) == []
    set_now = fingerprint.Fingerprint({**new.settings, "stage.rl": {"algorithm": "grpo"}}, new.inputs)
    assert fingerprint.differences(old, set_now) == ['stage.rl: (absent) -> {"algorithm": "grpo"}']
    had = fingerprint.Fingerprint({**older, "stage.gone": 3}, new.inputs).record()
    assert fingerprint.differences(had, new) == ["stage.gone: 3 -> (absent)"]


def test_inputs_are_read_by_content_shards_model_folders_and_the_upstream_final(tmp_path):
    doc = job_doc(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (store / "b.tar").write_bytes(b"x" * 10)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text("{}")
    doc["spec"]["model"]["languageModel"] = str(lm)
    job = parse_job(doc)
    final0 = planner.final_uri(job, 0)
    src = tmp_path / "w"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"1")
    storage.commit_dir(str(src), final0, step=1, stage="align")
    base = fingerprint.compute(planner.resolve_stage(job, 1))
    assert base.inputs["initFrom"].startswith("1 files")
    assert base.inputs[f"stage.data.shards: {store}/b.tar".replace(str(store), f"file://{store}")].startswith("size=10")

    (store / "b.tar").write_bytes(b"y" * 11)  # a shard rewritten
    lines = fingerprint.differences(base.record(), fingerprint.compute(planner.resolve_stage(job, 1)))
    assert len(lines) == 1 and lines[0].startswith("input stage.data.shards: file://") and "size=11" in lines[0]
    base = fingerprint.compute(planner.resolve_stage(job, 1))

    (lm / "config.json").write_text('{"hidden_size": 8}')  # the model folder changed
    lines = fingerprint.differences(base.record(), fingerprint.compute(planner.resolve_stage(job, 1)))
    assert len(lines) == 1 and lines[0].startswith(f"input model.languageModel: {lm}")
    base = fingerprint.compute(planner.resolve_stage(job, 1))

    (src / "model.safetensors").write_bytes(b"2")  # the upstream stage committed other weights: the chain
    storage.commit_dir(str(src), final0, step=1, stage="align")
    lines = fingerprint.differences(base.record(), fingerprint.compute(planner.resolve_stage(job, 1)))
    assert len(lines) == 1 and lines[0].startswith("input initFrom:")


def test_many_shards_are_summarised_by_one_digest(tmp_path):
    doc = job_doc(tmp_path)
    doc["spec"]["stages"][0]["data"]["shards"] = ["a-{000..099}.tar"]
    f = fingerprint.compute(planner.resolve_stage(parse_job(doc), 0))
    assert f.inputs["stage.data.shards"].startswith("100 shards, digest ")
    assert len(json.dumps(f.record())) < 8000  # small enough for a ConfigMap and a manifest


class TestPlanner:
    def setup_method(self):
        self.job = parse_job(GOOD)
        self.prints = {i: fingerprint.compute(planner.resolve_stage(self.job, i)) for i in range(3)}

    def plan(self, observed):
        return planner.plan(self.job, observed, fingerprint=lambda i: self.prints[i])

    def test_a_committed_stage_with_the_same_fingerprint_is_done(self):
        a = self.plan([Obs("Succeeded", committed=True, fingerprint=self.prints[0].record())])
        assert isinstance(a, planner.StartStage) and a.index == 1
        assert a.config.fingerprint == self.prints[1].record()  # the launch carries what the trainer stamps

    def test_a_committed_stage_with_another_fingerprint_is_refused_not_reused(self):
        old = copy.deepcopy(self.prints[0].record())
        old["settings"]["stage.maxSteps"], old["digest"] = 99, "0" * 64
        a = self.plan([Obs("Succeeded", committed=True, fingerprint=old)])
        assert isinstance(a, planner.SpecChanged) and a.index == 0
        assert a.changes == ("stage.maxSteps: 99 -> 10",)
        assert "--rerun-from align" in a.message(self.job) and "rerunFrom: align" in a.message(self.job)

    def test_a_stage_committed_without_a_fingerprint_is_not_trusted(self):
        a = self.plan([Obs("Succeeded", committed=True, fingerprint=None)])
        assert isinstance(a, planner.SpecChanged) and "older release" in a.changes[0]


def test_a_rerun_covers_the_stage_and_those_after_it_and_keeps_their_outputs(tmp_path):
    job = parse_job(job_doc(tmp_path))
    assert reruns.covered(job, "instruct") == [1, 2]
    with pytest.raises(ValueError, match=r"--rerun-from: 'nope' is not a stage of job 'demo'; one of: align, instruct, dpo"):
        reruns.covered(job, "nope", field="--rerun-from")
    out = planner.stage_output(job, 1)
    storage.write_text(storage.join(out, "final", "manifest.json"), "{}")
    moved = reruns.set_aside(job, [1, 2], "20261207T000000Z")
    aside = contract.replaced_output(job.spec.storage.uri, "demo", "instruct", "20261207T000000Z")
    assert moved == [(out, aside)]  # dpo had no output: nothing to move
    assert not storage.exists(out) and storage.exists(storage.join(aside, "final", "manifest.json"))


def test_rerun_from_in_the_spec_must_name_a_stage():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["runPolicy"] = {"rerunFrom": "instruc"}
    with pytest.raises(Exception, match="runPolicy.rerunFrom: 'instruc' is not a stage of this job; one of: align"):
        parse_job(doc)


def test_no_effect_markers_say_why(tmp_path):
    from vlm_core.spec import NoEffect

    for _path, _owner, _name, info, _value in leaves(full_training_config(tmp_path)):
        marker = no_effect(info)
        assert marker is None or (isinstance(marker, NoEffect) and marker.why)
