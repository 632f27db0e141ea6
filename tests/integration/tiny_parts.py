"""Tiny real model parts and shards (quickstart components), for tests that run `vlmctl run` for real."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import yaml
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_quickstart.shapes import shard_paths, write_shards


def build_parts(root: Path) -> dict:
    tokenizer = build_tokenizer()
    return {
        "lm": build_language_model(str(root / "lm"), tokenizer, hidden=32, layers=1, heads=2, mlp=64),
        "vision": build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=2),
        "shards": [f"file://{p}" for p in shard_paths(write_shards(str(root / "data"), "train", 64, seed=0,
                                                                    per_shard=32), "caption")],
    }


def job_file(path: Path, name: str, parts: dict, storage: Path, *, steps: int = 4, every: int = 2,
             max_restarts: int = 0, **stage: object) -> str:
    doc = {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32},
            "storage": {"uri": f"file://{storage}"},
            "runPolicy": {"maxRestarts": max_restarts},
            "stages": [{
                "name": "align", "type": "align", "maxSteps": steps, "precision": "fp32",
                "data": {"shards": parts["shards"], "format": "caption", "maxLength": 64},
                "batch": {"globalSize": 4, "microSize": 2}, "resources": {"procsPerNode": 2},
                "checkpoint": {"everySteps": every, "keepLast": 2}, **stage,
            }],
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def write_imageless_shard(path: Path, caption: str = "caption {i}", samples: int = 8) -> str:
    """A real tar (preflight passes) whose samples carry text but no image: the trainer fails at run time."""
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            data = caption.format(i=i).encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"file://{path}"
