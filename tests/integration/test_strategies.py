"""Every strategy for real: `torchrun --nproc_per_node 2` (gloo, CPU) against one process, on a tiny VLM.

One instruct stage (LM + projector train, vision tower frozen), 5 steps, one data shard and no shuffling,
so a 1-process run and a 2-process run see the same global batch at every step. Per strategy (ddp, fsdp,
zero2, zero3): the first-step loss equals the 1-process loss, the parameters after 5 steps are within
PARAM_ATOL of it, the frozen vision tower is bit-identical to its input, every rank wrote its own
checkpoint shard (no full-state gather on rank 0), and a run interrupted after its checkpoint resumes to
the same next-step loss. An fsdp checkpoint written by 2 processes resumes on 1 and finishes (the refusal
for zero2/zero3 is a pure rule, tested in tests/unit/test_strategy_rules.py). LoRA trains on CPU: the loss falls, only the adapters
and the projector change, and final/ and final/adapter/ load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlavaForConditionalGeneration, SiglipVisionModel
from vlm_core import contract, storage
from vlm_core.spec import parse_job
from vlm_operator.planner import resolve_stage
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_quickstart.shapes import shard_paths, write_shards

pytestmark = pytest.mark.integration

TIMEOUT_SECONDS = 150
STEPS = 5
# fp32 on CPU; the 2-process runs sum gradients in another order (all-reduce, sharded reductions) than the
# single process, so parameters after 5 AdamW steps agree to float rounding, not bit for bit.
PARAM_ATOL = 2e-5
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("strategy-parts")
    tokenizer = build_tokenizer()
    lm = build_language_model(str(root / "lm"), tokenizer, hidden=64, layers=2, heads=4, mlp=128)
    vision = build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=2)
    # One shard: ranks take every other sample of it, so any world size sees the same global batches.
    train = write_shards(str(root / "data"), "train", 64, seed=0, per_shard=64)
    heldout = write_shards(str(root / "data"), "heldout", 8, seed=0, per_shard=8)
    return {"lm": lm, "vision": vision, "train": shard_paths(train, "conversation"),
            "heldout": shard_paths(heldout, "conversation")}


def make_job(name: str, root, parts: dict, *, procs: int, **stage_extra):
    stage = {
        "name": "instruct", "type": "instruct", "maxSteps": STEPS, "precision": "fp32",
        "data": {"shards": parts["train"], "evalShards": parts["heldout"], "format": "conversation",
                 "maxLength": 64, "shuffleBuffer": 0},
        "batch": {"globalSize": 8, "microSize": 2},
        "optimizer": {"lr": 1e-3, "projectorLrMultiplier": 1},
        "schedule": {"type": "constant", "warmupRatio": 0},
        "checkpoint": {"everySteps": 2, "keepLast": 2},
        "resources": {"procsPerNode": procs},
    }
    stage.update(stage_extra)
    return parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": name},
        "spec": {"model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32,
                           "visionFeatureSelectStrategy": "full"},
                 "storage": {"uri": f"file://{root}/storage"}, "stages": [stage]},
    })


def run(job, root) -> tuple[list[dict], str]:
    config = resolve_stage(job, 0)
    path = root / f"{job.name}-{config.stage.world_size}.json"
    path.write_text(json.dumps(config.dump()))
    procs = str(config.stage.world_size)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", procs,
           "-m", "vlm_trainer", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", contract.METRICS_PORT_ENV: "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert proc.returncode == 0, f"{job.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{") and '"event"' in line]
    return events, proc.stdout + proc.stderr


def output_dir(job) -> str:
    return storage.local_path(resolve_stage(job, 0).output)


def step_losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def final_state(job) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(output_dir(job) + "/final").state_dict()


def interrupt_after_first_checkpoint(job) -> None:
    """What a crash after step 4's save would leave minus that save: checkpoint-2 only, no final/."""
    out = output_dir(job)
    for name in ("final", "eval.json", "checkpoint-4"):
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))


@pytest.fixture(scope="module")
def single(parts, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    job = make_job("single", root, parts, procs=1)
    events, _ = run(job, root)
    return {"losses": step_losses(events), "state": final_state(job)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_processes_match_one_and_resume_exactly(strategy, single, parts, tmp_path):
    job = make_job(f"s-{strategy}", tmp_path, parts, procs=2, strategy=strategy)
    events, _ = run(job, tmp_path)
    losses = step_losses(events)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[1] == pytest.approx(single["losses"][1], rel=LOSS_RTOL)
    state, reference = final_state(job), single["state"]
    assert state.keys() == reference.keys()
    worst = max(float((state[k] - reference[k]).abs().max()) for k in state)
    assert worst <= PARAM_ATOL, f"{strategy}: params after {STEPS} steps differ by {worst:g} from 1 process"
    vision = SiglipVisionModel.from_pretrained(parts["vision"]).state_dict()
    for k, v in vision.items():
        assert torch.equal(state[f"model.vision_tower.{k}"], v), f"{strategy}: frozen {k} changed"

    # Each rank wrote its own shard of the checkpoint; rank 0 did not gather the full state.
    state_dir = os.path.join(output_dir(job), "checkpoint-4", "state")
    files = {os.path.relpath(os.path.join(r, n), state_dir): os.path.getsize(os.path.join(r, n))
             for r, _, names in os.walk(state_dir) for n in names}
    manifest = storage.read_manifest(storage.join(resolve_stage(job, 0).output, "checkpoint-4"))
    assert {f"state/{p}" for p in files} <= {f["path"] for f in manifest["files"]}
    if strategy in ("fsdp", "zero2", "zero3"):
        per_rank = [sum(s for p, s in files.items() if marker in p) for marker in _rank_markers(strategy)]
        assert all(size > 0 for size in per_rank), files
        assert per_rank[0] < 0.75 * sum(per_rank), f"rank 0 wrote most of the state: {files}"

    if strategy == "fsdp":
        # Written by 2 processes, resumed by 1: DCP reshards; the stage finishes.
        interrupt_after_first_checkpoint(job)
        events, _ = run(make_job(f"s-{strategy}", tmp_path, parts, procs=1, strategy=strategy), tmp_path)
        (resume,) = [e for e in events if e["event"] == "resume"]
        assert resume["step"] == 2 and resume["from_world_size"] == 2
        assert sorted(step_losses(events)) == [3, 4, 5]
        assert storage.verify_committed(resolve_stage(job, 0).output + "/final", check_sha256=True).ok
        return
    interrupt_after_first_checkpoint(job)
    events, _ = run(job, tmp_path)
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["step"] == 2
    resumed = step_losses(events)
    assert sorted(resumed) == [3, 4, 5]
    assert resumed[3] == pytest.approx(losses[3], rel=1e-6), f"{strategy}: next-step loss after resume differs"
    again = final_state(job)
    assert max(float((again[k] - state[k]).abs().max()) for k in state) <= 1e-6


def _rank_markers(strategy: str) -> list[str]:
    if strategy == "fsdp":
        return ["__0_", "__1_"]
    return ["zero_pp_rank_0_", "zero_pp_rank_1_"]


def test_lora_trains_adapters_and_projector_only_and_dpo_references_work(parts, tmp_path):
    """instruct with LoRA (2 ranks, ddp) -> dpo with LoRA (reference = adapter disabled) -> dpo with fsdp
    (reference = a sharded copy). Each DPO stage starts at loss log 2: policy == reference at step 1."""
    from peft import PeftModel
    from vlm_trainer.model import assemble_vlm

    data = {"shards": parts["train"], "evalShards": parts["heldout"], "maxLength": 64, "shuffleBuffer": 0}
    common = {"precision": "fp32", "batch": {"globalSize": 8, "microSize": 2}, "resources": {"procsPerNode": 2},
              "checkpoint": {"everySteps": 100}, "schedule": {"type": "constant", "warmupRatio": 0}}
    pref = {**data, "shards": [p.replace("conversation", "preference") for p in parts["train"]],
            "evalShards": [p.replace("conversation", "preference") for p in parts["heldout"]], "format": "preference"}
    job = parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "lora"},
        "spec": {"model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32,
                           "visionFeatureSelectStrategy": "full"},
                 "storage": {"uri": f"file://{tmp_path}/storage"},
                 "stages": [
                     {"name": "instruct", "type": "instruct", "maxSteps": 8, **common,
                      "data": {**data, "format": "conversation"}, "optimizer": {"lr": 5e-3, "projectorLrMultiplier": 1},
                      "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
                     {"name": "dpo-lora", "type": "dpo", "maxSteps": 2, **common, "data": pref,
                      "optimizer": {"lr": 1e-3}, "lora": {"rank": 4, "dropout": 0.0}},
                     {"name": "dpo-fsdp", "type": "dpo", "maxSteps": 2, **common, "data": pref,
                      "optimizer": {"lr": 1e-3}, "strategy": "fsdp", "dpo": {"reference": "sharded"}},
                 ]},
    })
    events = []
    for index in range(3):
        config = resolve_stage(job, index)
        path = tmp_path / f"stage{index}.json"
        path.write_text(json.dumps(config.dump()))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vlm_trainer", "--config", str(path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", contract.METRICS_PORT_ENV: "0"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        assert proc.returncode == 0, f"stage {index}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        events.append([json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event"')])

    losses = step_losses(events[0])
    assert losses[8] < losses[1], f"LoRA did not learn: {losses}"
    final = storage.local_path(resolve_stage(job, 0).output) + "/final"
    trained = LlavaForConditionalGeneration.from_pretrained(final).state_dict()
    start = assemble_vlm(job.spec.model, seed=0).model
    initial = start.state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert {k for k in changed if "multi_modal_projector" in k} == {k for k in initial if "multi_modal_projector" in k}
    lm_changed = changed - {k for k in changed if "multi_modal_projector" in k}
    assert lm_changed and all("language_model" in k and k.split(".")[-2] in targets for k in lm_changed), lm_changed
    # final/adapter/ is a PEFT adapter: on the starting model it gives final/'s weights.
    merged = PeftModel.from_pretrained(start, final + "/adapter").merge_and_unload().state_dict()
    assert max(float((merged[k] - trained[k]).abs().max()) for k in trained) < 1e-6

    for stage_events in events[1:]:
        first = step_losses(stage_events)[1]
        assert first == pytest.approx(0.6931, abs=1e-4), "the policy must start equal to its DPO reference"
    assert storage.verify_committed(resolve_stage(job, 2).output + "/final", check_sha256=True).ok
