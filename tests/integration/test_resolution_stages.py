"""A fixed -> dynamic resolution stage sequence, for real (local backend, torchrun, 2 ranks on CPU): stage 1
trains Llava at 32px, stage 2 (`data.resolution.policy: anyres`) starts from stage 1's final/, converts it to
LlavaNext with the weights carried over, trains on AnyRes tiles, and publishes a LlavaNext final/."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tiny_parts import build_parts, job_file
from vlm_operator.local import LocalRunner
from vlm_trainer import family, storage
from vlm_trainer.model import load_vlm
from vlm_trainer.spec import load_job

pytestmark = pytest.mark.integration


def test_fixed_then_anyres_stages_train_and_hand_the_weights_over(tmp_path):
    parts = build_parts(tmp_path / "parts")
    path = job_file(tmp_path / "job.yaml", "res", parts, tmp_path / "store", steps=2, every=2)
    doc = yaml.safe_load(open(path))
    first = doc["spec"]["stages"][0]
    first["data"]["maxLength"] = 96
    second = json.loads(json.dumps(first))
    second["name"] = "tiles"
    second["data"]["resolution"] = {"policy": "anyres", "gridPinpoints": [[32, 64], [64, 32], [64, 64]]}
    doc["spec"]["stages"].append(second)
    open(path, "w").write(yaml.safe_dump(doc))

    result = LocalRunner(load_job(path), log_dir=str(tmp_path / "logs"), on_line=lambda *a: None).run()
    assert result.succeeded, result.message
    store = tmp_path / "store" / "res"
    fixed, tiled = load_vlm(str(store / "align" / "final")), load_vlm(str(store / "tiles" / "final"))
    assert family.of_model(fixed.model) is family.LLAVA and family.of_model(tiled.model) is family.LLAVA_NEXT
    assert isinstance(tiled.processor, family.LLAVA_NEXT.processor_class)
    assert tiled.model.config.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64]]
    a, b = fixed.model.state_dict(), tiled.model.state_dict()
    # align trains the projector (and image_newline) only: the frozen parts arrive unchanged, the projector moved on
    frozen = [k for k in a if "multi_modal_projector" not in k]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if "multi_modal_projector" in k)
    for stage in ("align", "tiles"):
        progress = storage.read_json(str(store / stage / "progress.json"))
        assert progress["step"] == 2 and math.isfinite(progress["loss"]), progress
