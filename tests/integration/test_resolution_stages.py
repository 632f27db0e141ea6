"""A fixed -> dynamic resolution stage sequence, for real (local backend, torchrun, 2 ranks on CPU): stage 1
trains Llava at 32px on captions, stage 2 (`data.resolution.policy: anyres`) starts from stage 1's final/,
converts it to LlavaNext with the weights carried over, trains on AnyRes tiles of interleaved two-image
documents of several sizes, and publishes a LlavaNext final/."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import yaml
from tiny_parts import build_parts, job_file
from vlm_core import storage
from vlm_core.spec import load_job
from vlm_operator.local import LocalRunner
from vlm_quickstart.shapes import draw_shape
from vlm_trainer import family
from vlm_trainer.model import load_vlm

pytestmark = pytest.mark.integration


def write_interleaved_shard(path, samples: int = 16) -> str:
    """Two images per document (0.png, 1.png; 32x32 and 64x32 quickstart shapes), text around them."""
    rng = np.random.default_rng(0)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for j, (colour, size) in enumerate((("red", 32), ("blue", 64))):
                buf = io.BytesIO()
                draw_shape(rng, colour, "circle", size).crop((0, 0, size, 32)).save(buf, format="PNG")
                add(tar, f"d{i:04d}.{j}.png", buf.getvalue())
            doc = {"segments": [{"text": "here is a red circle ."}, {"image": "0.png"},
                                {"text": "and here a blue circle ."}, {"image": "1.png"}]}
            add(tar, f"d{i:04d}.json", json.dumps(doc).encode())
    return f"file://{path}"


def test_fixed_then_anyres_stages_train_and_hand_the_weights_over(tmp_path):
    parts = build_parts(tmp_path / "parts")
    path = job_file(tmp_path / "job.yaml", "res", parts, tmp_path / "store", steps=2, every=2)
    doc = yaml.safe_load(open(path))
    first = doc["spec"]["stages"][0]
    first["data"]["maxLength"] = 96
    second = json.loads(json.dumps(first))
    second["name"] = "tiles"
    second["data"].update(shards=[write_interleaved_shard(tmp_path / "docs.tar")], format="interleaved", maxImages=2, maxLength=160,
                          resolution={"policy": "anyres", "gridPinpoints": [[32, 64], [64, 32], [64, 64]]})
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
