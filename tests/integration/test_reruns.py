"""What ran is what the file says, on the local backend with real torchrun processes: after a full run, an edited
file (lr, maxSteps, a shard, the model folder, a curate threshold) is refused naming exactly what changed; an
unchanged file skips everything; `--rerun-from` reruns that stage and the ones after it only, keeping the old outputs
aside; and a checkpoint is resumed only under the fingerprint it was written with."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_parts import build_parts
from vlm_core import contract, storage
from vlm_core.spec import parse_job
from vlm_operator import cli
from vlm_operator.describe import describe
from vlm_operator.local import LocalRunner

TRAIN = {"precision": "fp32", "maxSteps": 1, "batch": {"globalSize": 2, "microSize": 2},
         "checkpoint": {"everySteps": 1, "keepLast": 2}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """curate -> align -> instruct, run to the end once (the stages the tests below edit)."""
    os.environ.setdefault(contract.METRICS_PORT_ENV, "off")
    tmp = tmp_path_factory.mktemp("reruns")
    parts = build_parts(tmp / "parts")
    doc = {
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "edit"},
        "spec": {
            "model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32},
            "storage": {"uri": f"file://{tmp}/store"},
            "runPolicy": {"maxRestarts": 0},
            "stages": [
                {"name": "curate", "type": "curate", "input": {"shards": parts["shards"]},
                 "filters": {"text": {"minWords": 1}}},
                {"name": "align", "type": "align", "data": {"fromStage": "curate", "format": "caption", "maxLength": 64},
                 **TRAIN},
                {"name": "instruct", "type": "instruct",
                 "data": {"shards": parts["shards"], "format": "caption", "maxLength": 64}, **TRAIN},
            ],
        },
    }
    result = LocalRunner(parse_job(doc), log_dir=str(tmp / "logs")).run()
    assert result.succeeded, result.message
    assert [s.name for s in result.stages] == ["curate", "align", "instruct"]
    return {"tmp": tmp, "doc": doc, "parts": parts, "store": tmp / "store" / "edit"}


def run(doc: dict, tmp: Path, **kw):
    return LocalRunner(parse_job(doc), log_dir=str(tmp / "logs"), **kw).run()


def edited(doc: dict, stage: int, **fields) -> dict:
    out = copy.deepcopy(doc)
    out["spec"]["stages"][stage].update(fields)
    return out


def test_an_unchanged_file_skips_every_stage(finished):
    result = run(finished["doc"], finished["tmp"])
    assert result.succeeded and result.stages == [] and result.changed is None
    assert [r.state for r in describe(parse_job(finished["doc"]))] == ["done", "done", "done"]
    final = storage.read_manifest(f"file://{finished['store']}/instruct/final")
    assert final["fingerprint"]["settings"]["stage.optimizer.lr"] == 2e-5  # what produced it, in final/
    assert final["config"]["stage"]["name"] == "instruct"
    report = json.loads((finished["store"] / "instruct" / contract.EVAL_FILE).read_text())
    assert report["fingerprint"] == final["fingerprint"]["digest"]


def test_changed_settings_are_refused_naming_each_field(finished, capsys):
    doc = edited(finished["doc"], 2, optimizer={"lr": 5e-4}, maxSteps=2, resources={"cpu": "3"})  # cpu: no effect
    result = run(doc, finished["tmp"])
    assert not result.succeeded and result.stages == []  # nothing ran
    assert result.changed is not None and result.changed.index == 2
    assert result.changed.changes == ("stage.maxSteps: 1 -> 2", "stage.optimizer.lr: 2e-05 -> 0.0005")
    # what a user sees: `vlmctl run` exits non-zero with the stage, the fields and the two ways on
    path = finished["tmp"] / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["run", str(path)]) == 1
    out = capsys.readouterr().out
    assert "refused: stage 'instruct' of job 'edit'" in out and "stage.optimizer.lr: 2e-05 -> 0.0005" in out
    assert f"vlmctl run {path} --rerun-from instruct" in out and "new metadata.name" in out
    assert cli.main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "instruct     instruct  differs" in out and "stage.maxSteps: 1 -> 2" in out


def test_a_changed_curate_threshold_is_refused_at_the_curate_stage(finished):
    doc = copy.deepcopy(finished["doc"])
    doc["spec"]["stages"][0]["filters"]["text"]["minWords"] = 2
    result = run(doc, finished["tmp"])
    assert result.changed is not None and result.changed.index == 0
    assert result.changed.changes == ("stage.filters.text.minWords: 1 -> 2",)


def test_a_rewritten_shard_is_refused_naming_the_shard(finished):
    shard = storage.local_path(finished["parts"]["shards"][1])
    saved, stat = Path(shard).read_bytes(), os.stat(shard)
    try:
        Path(shard).write_bytes(saved + b"\0" * 512)
        result = run(finished["doc"], finished["tmp"])
        assert result.changed is not None and result.changed.index == 0  # curate reads it first
        (line,) = result.changed.changes
        assert line.startswith(f"input stage.input.shards: {finished['parts']['shards'][1]}: size={stat.st_size}")
    finally:
        Path(shard).write_bytes(saved)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(finished["doc"], finished["tmp"]).succeeded  # the same bytes and time again: nothing changed


def test_a_changed_model_folder_is_refused_at_the_first_stage_that_reads_it(finished):
    config = Path(finished["parts"]["lm"]) / "config.json"
    saved, stat = config.read_text(), os.stat(config)
    try:
        config.write_text(saved.replace("{", '{\n  "note": "edited",', 1))
        result = run(finished["doc"], finished["tmp"])
        assert result.changed is not None and result.changed.index == 1  # curate builds no model: align is first
        (line,) = result.changed.changes
        assert line.startswith(f"input model.languageModel: {finished['parts']['lm']}: ")
    finally:
        config.write_text(saved)
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_rerun_from_reruns_that_stage_and_after_keeping_the_old_outputs(finished, tmp_path):
    """Last of the module: it changes the stored state (instruct rerun with 2 steps, a checkpoint at step 1)."""
    store = finished["store"]
    before = {s: storage.read_manifest(f"file://{store}/{s}/final")["committed_at"] for s in ("curate", "align", "instruct")}
    doc = edited(finished["doc"], 2, optimizer={"lr": 5e-4}, maxSteps=2)
    result = run(doc, finished["tmp"], rerun_from="instruct")
    assert result.succeeded, result.message
    assert [s.name for s in result.stages] == ["instruct"]  # curate and align reused
    for s in ("curate", "align"):
        assert storage.read_manifest(f"file://{store}/{s}/final")["committed_at"] == before[s]
    ((src, dst),) = result.set_aside
    assert src == f"file://{store}/instruct" and f"/edit/{contract.REPLACED_DIR}/" in dst
    old = storage.read_manifest(f"{dst}/final")
    assert old["committed_at"] == before["instruct"]  # kept aside, not deleted
    assert [r.state for r in describe(parse_job(doc))] == ["done", "done", "done"]

    # A checkpoint is resumed only under its own fingerprint: instruct "interrupted" after its checkpoint at step 1
    # (final/ gone), then the file edited -> the trainer refuses the checkpoint, once (a configuration error).
    shutil.rmtree(store / "instruct" / "final")
    assert storage.latest_checkpoint(f"file://{store}/instruct") is not None
    result = run(edited(doc, 2, optimizer={"lr": 1e-3}, maxSteps=2), finished["tmp"])
    assert not result.succeeded and [(s.name, s.attempts) for s in result.stages] == [("instruct", 1)]
    assert "ConfigurationError" in result.message and "stage.optimizer.lr: 0.0005 -> 0.001" in result.message
    # the same file as the checkpoint's resumes it
    result = run(doc, finished["tmp"])
    assert result.succeeded and [s.name for s in result.stages] == ["instruct"]
    report = json.loads((store / "instruct" / contract.EVAL_FILE).read_text())
    assert report["resumed_from_step"] == 1
