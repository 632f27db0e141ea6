"""Preflight: a stage's inputs checked before any process starts, each problem naming its field."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

from job_fixtures import GOOD
from vlm_core.spec import ResolutionSpec, parse_job
from vlm_operator import preflight


def write_inputs(root: Path, *, image_size: int = 32, patch: int = 8, layers: int = 2) -> dict:
    (root / "vision").mkdir(parents=True)
    (root / "lm").mkdir()
    vision = {"model_type": "siglip_vision_model", "image_size": image_size, "patch_size": patch,
              "num_hidden_layers": layers}
    (root / "vision" / "config.json").write_text(json.dumps(vision))
    (root / "lm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with tarfile.open(root / "a.tar", "w") as tar:
        info = tarfile.TarInfo("000000.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    (root / "not-a-tar.tar").write_bytes(b"x" * 1024)
    return {"visionEncoder": str(root / "vision"), "languageModel": str(root / "lm"), "imageSize": image_size}


def job(tmp_path: Path, model: dict, shards: list[str], eval_shards: list[str] | None = None, max_length: int = 64):
    doc = copy.deepcopy(GOOD)
    doc["spec"]["model"] = model
    doc["spec"]["storage"]["uri"] = f"file://{tmp_path}/store"
    doc["spec"]["stages"][0]["data"].update(shards=shards, evalShards=eval_shards or [], maxLength=max_length)
    return parse_job(doc)


def test_good_inputs_pass(tmp_path: Path) -> None:
    model = write_inputs(tmp_path)
    assert preflight.check_stage(job(tmp_path, model, [str(tmp_path / "a.tar")]), 0) == []


def test_every_problem_names_its_field(tmp_path: Path) -> None:
    model = write_inputs(tmp_path)
    model.update(visionEncoder=str(tmp_path / "missing-vision"))
    j = job(tmp_path, model, [str(tmp_path / "a-{0..3}.tar"), str(tmp_path / "not-a-tar.tar")],
            eval_shards=[str(tmp_path / "eval.tar")])
    problems = preflight.check_stage(j, 0)
    assert any(p.startswith("spec.model.visionEncoder: no Hugging Face checkpoint at") for p in problems)
    assert any(p.startswith("spec.stages[0].data.shards[0]: 4 of 4 shard(s) not found") for p in problems)
    assert any(p.startswith("spec.stages[0].data.shards[1]:") and "not a tar archive" in p for p in problems)
    assert any(p.startswith("spec.stages[0].data.evalShards[0]: 1 of 1 shard(s) not found") for p in problems)


def test_model_config_disagreements(tmp_path: Path) -> None:
    model = write_inputs(tmp_path, image_size=64, patch=8, layers=2)  # 64 image tokens per image
    model.update(imageSize=64, visionFeatureLayer=5)
    problems = preflight.check_stage(job(tmp_path, model, [str(tmp_path / "a.tar")], max_length=48), 0)
    assert any(p.startswith("spec.model.visionFeatureLayer: 5 is outside the encoder's 2 layers") for p in problems)
    assert any(p.startswith("spec.stages[0].data.maxLength: 48 tokens cannot hold one image (64 image tokens")
               for p in problems)
    model.update(imageSize=32, visionFeatureLayer=-2)
    problems = preflight.check_stage(job(tmp_path, model, [str(tmp_path / "a.tar")]), 0)
    assert any(p.startswith("spec.model.imageSize: 32 does not match") for p in problems)


def test_max_length_counts_a_stage_raised_resolution(tmp_path: Path) -> None:
    model = write_inputs(tmp_path)  # 32px, patch 8: 16 tokens; the stage raises it to 64px: 64 tokens
    j = job(tmp_path, model, [str(tmp_path / "a.tar")], max_length=48)
    assert preflight.check_stage(j, 0) == []
    j.spec.stages[0].data.resolution = ResolutionSpec(policy="fixed", imageSize=64)
    problems = preflight.check_stage(j, 0)
    assert any(p.startswith("spec.stages[0].data.maxLength: 48 tokens cannot hold one image (64 image tokens at "
                            "imageSize 64") for p in problems), problems
