"""The trainer on a real GPU: three stages (align -> instruct -> dpo) with bf16 autocast, gradient
checkpointing in instruct, one process each; frozen parts stay bit-identical and final/ generates on CUDA.

Opt-in tier: runs on the accelerator machine only (`pytest -m gpu tests/gpu`).
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
def staged(tmp_path_factory):
    from vlm_core.spec import parse_job
    from vlm_operator.planner import resolve_stage
    from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
    from vlm_quickstart.shapes import shard_paths, write_shards

    root = tmp_path_factory.mktemp("gpu")
    tok = build_tokenizer()
    lm = build_language_model(str(root / "lm"), tok)
    vision = build_vision_encoder(str(root / "vision"))
    train = write_shards(str(root / "data"), "train", 2048, seed=0, per_shard=512)
    held = write_shards(str(root / "data"), "heldout", 128, seed=0, per_shard=128)

    def stage(name, typ, fmt, steps, **extra):
        d = {"name": name, "type": typ, "maxSteps": steps, "precision": "bf16",
             "data": {"shards": shard_paths(train, fmt), "evalShards": shard_paths(held, fmt), "format": fmt, "maxLength": 96},
             "batch": {"globalSize": 64, "microSize": 32}, "checkpoint": {"everySteps": 20}}
        d.update(extra)
        return d

    job = parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "gpu"},
        "spec": {"model": {"visionEncoder": vision, "languageModel": lm, "imageSize": 32},
                 "storage": {"uri": f"file://{root}/store"},
                 "stages": [stage("align", "align", "caption", 60, optimizer={"lr": 2e-3}),
                            stage("instruct", "instruct", "conversation", 40, gradientCheckpointing=True,
                                  optimizer={"lr": 1e-4}),
                            stage("dpo", "dpo", "preference", 20, optimizer={"lr": 1e-4})]}})
    results = []
    for i in range(3):
        cfg = resolve_stage(job, i)
        path = root / f"stage{i}.json"
        path.write_text(json.dumps(cfg.dump()))
        run = subprocess.run([sys.executable, "-m", "vlm_trainer", "--config", str(path)],
                             env={**os.environ, "VLM_METRICS_PORT": "0"}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        out = cfg.output.removeprefix("file://")
        results.append({"events": events, "eval": json.loads(open(f"{out}/eval.json").read()), "final": f"{out}/final"})
    return {"vision": vision, "stages": results}


def test_all_stages_train_in_bf16_on_cuda(staged):
    for s in staged["stages"]:
        steps = [e for e in s["events"] if e["event"] == "step"]
        assert steps and all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    align_steps = [e for e in staged["stages"][0]["events"] if e["event"] == "step"]
    assert align_steps[-1]["loss"] < align_steps[0]["loss"]
    dpo = staged["stages"][2]["eval"]
    assert 0.0 <= dpo["reward_accuracy"] <= 1.0


def test_vision_tower_bit_identical_and_final_generates_on_cuda(staged):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, SiglipVisionModel

    final = staged["stages"][2]["final"]
    model = LlavaForConditionalGeneration.from_pretrained(final).cuda()
    reference = SiglipVisionModel.from_pretrained(staged["vision"])
    got, want = model.model.vision_tower.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
    proc = AutoProcessor.from_pretrained(final)
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    prompt = proc.apply_chat_template([{"role": "user", "content": "<image>\nwhat colour is the shape ?"}],
                                      add_generation_prompt=True)
    inputs = proc(images=image, text=prompt, return_tensors="pt").to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
