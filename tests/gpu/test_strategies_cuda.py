"""ZeRO-3 and QLoRA on one GPU (issue 8): one process each, bf16, on the quickstart-sized tiny VLM.

- zero3: an instruct stage under DeepSpeed ZeRO-3 (bf16, torch AdamW as the client optimizer, so no op is
  JIT-built): the loss falls, a checkpoint is written by DeepSpeed, the frozen vision tower in final/ is
  bit-identical to its input, and final/ loads in transformers and generates on CUDA;
- qlora: an instruct stage with the LM in 4-bit NF4 (bitsandbytes, double quantisation, paged AdamW)
  and LoRA adapters: the loss falls, final/ (merged, fp32) loads, final/adapter/ loads with
  PeftModel.from_pretrained and reproduces final/'s weights, the vision tower is bit-identical.

Opt-in tier: runs on the accelerator machine only (`pytest -m gpu tests/gpu`). Needs deepspeed, peft,
bitsandbytes there (see TESTING.md for the wheels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu is opt-in)"),
]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
    from vlm_quickstart.shapes import shard_paths, write_shards

    root = tmp_path_factory.mktemp("gpu-strategies")
    tok = build_tokenizer()
    train = write_shards(str(root / "data"), "train", 1024, seed=0, per_shard=512)
    held = write_shards(str(root / "data"), "heldout", 64, seed=0, per_shard=64)
    return {"root": root, "lm": build_language_model(str(root / "lm"), tok),
            "vision": build_vision_encoder(str(root / "vision")),
            "train": shard_paths(train, "conversation"), "held": shard_paths(held, "conversation")}


def run_stage(parts, name: str, **extra) -> dict:
    from vlm_core.spec import parse_job
    from vlm_operator.planner import resolve_stage

    stage = {"name": "instruct", "type": "instruct", "maxSteps": 30, "precision": "bf16",
             "data": {"shards": parts["train"], "evalShards": parts["held"], "format": "conversation", "maxLength": 96},
             "batch": {"globalSize": 32, "microSize": 16}, "checkpoint": {"everySteps": 10},
             "optimizer": {"lr": 1e-3}, "resources": {"gpusPerNode": 1}}
    stage.update(extra)
    job = parse_job({"apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": name},
                     "spec": {"model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32},
                              "storage": {"uri": f"file://{parts['root']}/{name}"}, "stages": [stage]}})
    config = resolve_stage(job, 0)
    path = parts["root"] / f"{name}.json"
    path.write_text(json.dumps(config.dump()))
    run = subprocess.run([sys.executable, "-m", "vlm_trainer", "--config", str(path)],
                         env={**os.environ, "VLM_METRICS_PORT": "0"}, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"event"')]
    out = config.output.removeprefix("file://")
    return {"events": events, "final": f"{out}/final", "out": out, "job": job}


def losses(events) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "step"]


def vision_identical(final: str, vision: str) -> None:
    from transformers import LlavaForConditionalGeneration, SiglipVisionModel

    got = LlavaForConditionalGeneration.from_pretrained(final).model.vision_tower.state_dict()
    want = SiglipVisionModel.from_pretrained(vision).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_zero3_trains_in_bf16_on_one_gpu(parts):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    result = run_stage(parts, "zero3", strategy="zero3")
    values = losses(result["events"])
    assert len(values) == 30 and all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0]
    assert any(n.startswith("checkpoint-") for n in os.listdir(result["out"]))
    vision_identical(result["final"], parts["vision"])
    model = LlavaForConditionalGeneration.from_pretrained(result["final"]).cuda()
    processor = AutoProcessor.from_pretrained(result["final"])
    from PIL import Image

    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nwhat colour is the shape ?"}],
                                           add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (32, 32)), text=prompt, return_tensors="pt").to("cuda")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_qlora_trains_adapters_on_a_4bit_base(parts):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration
    from vlm_trainer.model import assemble_vlm

    result = run_stage(parts, "qlora", lora={"rank": 16, "alpha": 32, "dropout": 0.0}, qlora=True)
    values = losses(result["events"])
    assert all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0]
    vision_identical(result["final"], parts["vision"])
    merged = LlavaForConditionalGeneration.from_pretrained(result["final"]).state_dict()
    start = assemble_vlm(result["job"].spec.model, seed=0).model
    again = PeftModel.from_pretrained(start, result["final"] + "/adapter").merge_and_unload().state_dict()
    assert max(float((again[k] - merged[k]).abs().max()) for k in merged) < 1e-6
