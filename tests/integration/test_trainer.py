"""The trainer for real: `torchrun --nproc_per_node 2 -m vlm_trainer` (gloo, CPU) on tiny quickstart parts.

Stages are resolved by the planner from a validated job, exactly as the local backend does, and the
checks are on what a user gets: which weights changed, where a stage started from, whether a killed
run resumes, and whether `final/` loads in transformers and generates.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time

import psutil
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration, SiglipVisionModel
from vlm_core import contract, storage
from vlm_core.spec import ScheduleSpec, parse_job
from vlm_operator.local import LocalRunner
from vlm_operator.planner import resolve_stage
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_quickstart.shapes import read_shards, shard_paths, write_shards
from vlm_trainer.model import apply_freezing, assemble_vlm, param_groups
from vlm_trainer.optim import lr_multiplier
from vlm_trainer.reward_model import RewardModel

STAGE_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """Untrained tiny components in the contract's HF formats, and small shards of every format."""
    root = tmp_path_factory.mktemp("parts")
    tokenizer = build_tokenizer()
    lm = build_language_model(str(root / "lm"), tokenizer, hidden=64, layers=2, heads=4, mlp=128)
    vision = build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=2)
    train = write_shards(str(root / "data"), "train", 64, seed=0, per_shard=16)
    heldout = write_shards(str(root / "data"), "heldout", 16, seed=0, per_shard=16)
    return {
        "lm": lm,
        "vision": vision,
        "train": {fmt: [f"file://{p}" for p in shard_paths(train, fmt)] for fmt in ("caption", "conversation", "preference")},
        "heldout": {fmt: [f"file://{p}" for p in shard_paths(heldout, fmt)] for fmt in ("caption", "conversation", "preference")},
        "heldout_paths": shard_paths(heldout, "conversation"),
    }


def stage_doc(name: str, type_: str, fmt: str, parts: dict, steps: int, **extra) -> dict:
    doc = {
        "name": name,
        "type": type_,
        "data": {"shards": parts["train"][fmt], "evalShards": parts["heldout"][fmt], "format": fmt, "maxLength": 64},
        "batch": {"globalSize": 8, "microSize": 2},  # 2 ranks x 2 micro x 2 accumulation steps
        "maxSteps": steps,
        "precision": "fp32",
        "checkpoint": {"everySteps": 4, "keepLast": 2},
        "resources": {"procsPerNode": 2},
    }
    doc.update(extra)
    return doc


def make_job(name: str, storage_uri: str, parts: dict, stages: list[dict]):
    return parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32,
                      "visionFeatureSelectStrategy": "full"},
            "storage": {"uri": storage_uri},
            "stages": stages,
        },
    })


def torchrun_command(config_path: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "vlm_trainer", "--config", config_path]


def trainer_env() -> dict[str, str]:
    # One thread per rank (2 ranks share 2 cores); an ephemeral metrics port so parallel runs never collide.
    return {**os.environ, "OMP_NUM_THREADS": "1", contract.METRICS_PORT_ENV: "0"}


def write_config(job, index: int, tmp_path) -> str:
    path = tmp_path / f"{job.name}-stage{index}.json"
    path.write_text(json.dumps(resolve_stage(job, index).dump()))
    return str(path)


def events(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and '"event"' in line:
            out.append(json.loads(line))
    return out


def run_stage(job, index: int, tmp_path) -> tuple[list[dict], float]:
    started = time.perf_counter()
    proc = subprocess.run(
        torchrun_command(write_config(job, index, tmp_path)), env=trainer_env(), capture_output=True, text=True,
        timeout=STAGE_TIMEOUT_SECONDS,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, f"stage {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return events(proc.stdout), seconds


def final_dir(job, index: int) -> str:
    return storage.local_path(resolve_stage(job, index).output + "/" + contract.FINAL_DIR)


def load_final(job, index: int) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(final_dir(job, index))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lm_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The LM part in LlamaForCausalLM's own names (lm_head is tied to the embeddings here)."""
    return {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}


def write_bad_shard(path) -> str:
    """Two conversations without an assistant turn (each of 2 ranks reads one of them)."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    with tarfile.open(path, "w") as tar:
        for i in range(2):
            doc = json.dumps({"conversations": [{"role": "user", "content": "<image> what is it?"}]}).encode()
            for ext, data in (("png", buf.getvalue()), ("json", doc)):
                info = tarfile.TarInfo(f"bad{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return f"file://{path}"


@pytest.fixture(scope="module")
def staged(parts, tmp_path_factory) -> dict:
    """align (projector only) then instruct (LM only, so the projector must come through unchanged).

    instruct also runs the loader's features: 2 worker processes per rank, packing, a conversation +
    caption mix, and a third source whose samples are all bad (skipped, counted, named in the report)."""
    tmp = tmp_path_factory.mktemp("staged")
    bad_shard = write_bad_shard(tmp / "bad-000.tar")
    instruct_data = {
        "sources": [
            {"shards": parts["train"]["conversation"], "format": "conversation", "weight": 3},
            {"shards": parts["train"]["caption"], "format": "caption", "weight": 1},
            {"shards": [bad_shard], "format": "conversation", "weight": 0.25},
        ],
        "evalShards": parts["heldout"]["conversation"], "maxLength": 64, "workers": 2, "cacheMiB": 16, "maxBadSampleShare": 0.2,
    }
    job = make_job("staged", f"file://{tmp}/storage", parts, [
        stage_doc("align", "align", "caption", parts, steps=8, optimizer={"lr": 5e-3}, cacheVisionFeatures=True),
        stage_doc("instruct", "instruct", "conversation", parts, steps=6, trainable=["language_model"],
                  optimizer={"lr": 1e-3}, data=instruct_data, cacheVisionFeatures=True,
                  batch={"globalSize": 8, "microSize": 2, "tokensPerMicroBatch": 160}),
        stage_doc("dpo", "dpo", "preference", parts, steps=4, optimizer={"lr": 1e-3}, dpo={"beta": 0.1}),
        # reward (issue 22): a scalar head on the dpo model, Bradley-Terry with a margin
        stage_doc("reward", "reward", "preference", parts, steps=6, optimizer={"lr": 2e-3}, reward={"margin": 0.1}),
    ])
    return {"job": job, "tmp": tmp, "seconds": {}, "events": {}}


@pytest.fixture(scope="module")
def align_done(staged):
    staged["events"]["align"], staged["seconds"]["align"] = run_stage(staged["job"], 0, staged["tmp"])
    return staged


@pytest.fixture(scope="module")
def instruct_done(align_done):
    align_done["events"]["instruct"], align_done["seconds"]["instruct"] = run_stage(align_done["job"], 1, align_done["tmp"])
    return align_done


def test_align_changes_only_the_projector(align_done, parts):
    job = align_done["job"]
    final = load_final(job, 0)
    lm = LlamaForCausalLM.from_pretrained(parts["lm"])
    vision = SiglipVisionModel.from_pretrained(parts["vision"])
    assert same_tensors(final.model.vision_tower.state_dict(), vision.state_dict()), "vision tower changed in align"
    assert same_tensors(lm_state(final), {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"})
    assert torch.equal(final.lm_head.weight, lm.lm_head.weight)
    # The projector trained away from the seeded initial projector every rank started from.
    initial = assemble_vlm(resolve_stage(job, 0).model, seed=0).model.model.multi_modal_projector.state_dict()
    trained = final.model.multi_modal_projector.state_dict()
    assert initial.keys() == trained.keys()
    assert all(not torch.equal(initial[k], trained[k]) for k in initial)

    report = json.loads(open(storage.local_path(resolve_stage(job, 0).output) + "/eval.json").read())
    assert report["steps"] == 8 and report["eval_loss"] > 0 and report["train_loss_first"] > 0
    assert storage.verify_committed(resolve_stage(job, 0).output + "/final", check_sha256=True).ok
    steps = [e for e in align_done["events"]["align"] if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9)) and all(e["total"] == 8 for e in steps)
    assert {"loss", "lr", "tokens_per_second", "samples_per_second"} <= steps[-1].keys()
    progress = json.loads(open(storage.local_path(resolve_stage(job, 0).output) + "/progress.json").read())
    assert progress["step"] == progress["total"] == 8


def test_ddp_ranks_hold_identical_parameters(align_done):
    (replicas,) = [e for e in align_done["events"]["align"] if e["event"] == "replicas"]
    assert len(replicas["parameter_sha256"]) == 2 and replicas["equal"]
    assert len(set(replicas["parameter_sha256"])) == 1


def test_instruct_starts_from_align_final_and_keeps_the_vision_tower(instruct_done, parts):
    job = instruct_done["job"]
    align_final, instruct_final = load_final(job, 0), load_final(job, 1)
    (start,) = [e for e in instruct_done["events"]["instruct"] if e["event"] == "start"]
    assert start["init_from"] == resolve_stage(job, 0).output + "/final"
    # The projector was frozen in this instruct stage: it must be align's trained projector, bit for bit.
    assert same_tensors(instruct_final.model.multi_modal_projector.state_dict(),
                        align_final.model.multi_modal_projector.state_dict())
    vision = SiglipVisionModel.from_pretrained(parts["vision"])
    assert same_tensors(instruct_final.model.vision_tower.state_dict(), vision.state_dict())
    before, after = lm_state(align_final), lm_state(instruct_final)
    assert any(not torch.equal(before[k], after[k]) for k in before), "instruct did not train the LM"
    # both stages cache the frozen tower's features (cacheVisionFeatures): align computes and stores them,
    # instruct (same tower, same transform) reads the caption images align stored
    reports = [json.loads(open(storage.local_path(resolve_stage(job, i).output) + "/eval.json").read()) for i in (0, 1)]
    align_cache, instruct_cache = (r["vision_feature_cache"] for r in reports)
    assert align_cache["misses"] > 0 and align_cache["writes"] == align_cache["misses"]
    assert instruct_cache["hits_storage"] > 0, instruct_cache


def test_instruct_loader_packs_mixes_and_skips_bad_samples_with_workers(instruct_done):
    job = instruct_done["job"]
    data = json.loads(open(storage.local_path(resolve_stage(job, 1).output) + "/eval.json").read())["data"]
    assert data["workers"] == 2 and data["packed"] and 0.3 < data["packing_efficiency"] <= 1.0
    bad_shard = resolve_stage(job, 1).stage.data.sources[2].shards[0]
    assert data["bad_samples"] >= 2 and data["bad_samples_by_reason"] == {"no_assistant_turn": data["bad_samples"]}
    assert list(data["bad_samples_by_shard"]) == [bad_shard]
    assert data["bad_samples"] / data["samples_read"] < 0.2


def test_past_the_bad_sample_share_the_stage_fails_naming_the_shard(parts, tmp_path):
    bad_shard = write_bad_shard(tmp_path / "bad-000.tar")
    job = make_job("toobad", f"file://{tmp_path}/storage", parts, [stage_doc(
        "align", "align", "caption", parts, steps=4, data={
            "sources": [{"shards": parts["train"]["caption"], "format": "caption", "weight": 1},
                        {"shards": [bad_shard], "format": "conversation", "weight": 1}],
            "maxLength": 64, "maxBadSampleShare": 0.1,
        })])
    proc = subprocess.run(torchrun_command(write_config(job, 0, tmp_path)), env=trainer_env(), capture_output=True,
                          text=True, timeout=STAGE_TIMEOUT_SECONDS)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "data.maxBadSampleShare 0.1" in out and bad_shard in out and "no_assistant_turn" in out
    assert not storage.verify_committed(resolve_stage(job, 0).output + "/final").ok


def test_final_loads_in_transformers_and_generates(instruct_done, parts):
    path = final_dir(instruct_done["job"], 1)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    _key, image, record = read_shards(parts["heldout_paths"])[0]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nwhat colour is the shape ?"}], add_generation_prompt=True
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # (32 / 8)^2 patches
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), str)


def test_dpo_stage_reports_reward_accuracy_and_margin(instruct_done):
    job = instruct_done["job"]
    stage_events, instruct_done["seconds"]["dpo"] = run_stage(job, 2, instruct_done["tmp"])
    report = json.loads(open(storage.local_path(resolve_stage(job, 2).output) + "/eval.json").read())
    for key in ("eval_loss", "reward_accuracy", "reward_margin", "train_loss_first", "train_loss_last", "steps", "wall_seconds"):
        assert key in report, key
    assert 0.0 <= report["reward_accuracy"] <= 1.0 and report["steps"] == 4
    # The policy started equal to the frozen reference, so the first loss is log 2.
    assert report["train_loss_first"] == pytest.approx(0.6931, abs=1e-3)
    steps = [e for e in stage_events if e["event"] == "step"]
    assert {"reward_margin", "reward_accuracy"} <= steps[0].keys()
    dpo_final, instruct_final = load_final(job, 2), load_final(job, 1)
    assert any(not torch.equal(a, b) for a, b in zip(lm_state(dpo_final).values(), lm_state(instruct_final).values(), strict=True))
    # Re-running a finished stage does nothing.
    rerun, _ = run_stage(job, 2, instruct_done["tmp"])
    assert [e["event"] for e in rerun] == ["skip"]
    print("stage seconds (2 ranks, torchrun wall time):", instruct_done["seconds"])


def test_reward_stage_learns_and_its_final_scores_pairs_as_its_eval_did(instruct_done, parts):
    job, tmp = instruct_done["job"], instruct_done["tmp"]
    if not storage.verify_committed(resolve_stage(job, 2).output + "/final").ok:
        run_stage(job, 2, tmp)  # the reward stage starts from the dpo stage's final/
    stage_events, instruct_done["seconds"]["reward"] = run_stage(job, 3, tmp)
    output = resolve_stage(job, 3).output
    report = json.loads(open(storage.local_path(output) + "/eval.json").read())
    # the head starts at zero: every reward 0, the first loss -log sigmoid(-margin) = log(1 + e^0.1)
    assert report["train_loss_first"] == pytest.approx(math.log1p(math.exp(0.1)), abs=1e-4)
    assert report["train_loss_last"] < report["train_loss_first"], report
    steps = [e for e in stage_events if e["event"] == "step"]
    assert {"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= steps[0].keys()

    final = output + "/final"
    assert storage.verify_committed(final, check_sha256=True).ok
    LlavaForConditionalGeneration.from_pretrained(storage.local_path(final))  # the VLM folder loads as is
    rm = RewardModel.load(final)
    rows = read_shards([u.removeprefix("file://") for u in parts["heldout"]["preference"]])
    items = [rm.encode(r["prompt"], r["chosen"], img) for _k, img, r in rows]
    items += [rm.encode(r["prompt"], r["rejected"], img) for _k, img, r in rows]
    scores = rm.score(rm.collate(items))
    chosen, rejected = scores[: len(rows)], scores[len(rows):]
    # the loaded model scores the held-out pairs as the stage's own evaluation did (2 ranks, other batches)
    assert (chosen > rejected).float().mean().item() == pytest.approx(report["reward_accuracy"], abs=1e-6)
    assert (chosen - rejected).mean().item() == pytest.approx(report["reward_margin"], abs=1e-4)
    assert chosen.mean().item() == pytest.approx(report["chosen_reward"], abs=1e-4)
    assert report["reward_accuracy"] > 0.5 and report["reward_margin"] > 0, report
    print("stage seconds (2 ranks, torchrun wall time):", instruct_done["seconds"])


def test_killed_rank_resumes_from_last_committed_checkpoint(parts, tmp_path):
    job = make_job("resume", f"file://{tmp_path}/storage", parts, [
        stage_doc("align", "align", "caption", parts, steps=40, checkpoint={"everySteps": 3, "keepLast": 3}),
    ])
    config = resolve_stage(job, 0)
    proc = subprocess.Popen(torchrun_command(write_config(job, 0, tmp_path)), env=trainer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + STAGE_TIMEOUT_SECONDS
        while len(storage.list_checkpoints(config.output)) < 2:
            assert proc.poll() is None, f"the run ended before two checkpoints:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no two checkpoints in time"
            time.sleep(0.05)
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "RANK" in p.environ()}
        ranks["1"].send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=STAGE_TIMEOUT_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not storage.verify_committed(config.output + "/final").ok, "the killed run must not have finished"

    committed = storage.list_checkpoints(config.output)
    assert len(committed) >= 2
    (older_step, _), (newest_step, newest_uri) = committed[-2], committed[-1]
    # A newest checkpoint whose bytes no longer match its manifest is skipped (same size, other sha256)...
    (state_file,) = [f["path"] for f in storage.read_manifest(newest_uri)["files"] if f["path"] == "state/.metadata"]
    model_file = storage.local_path(newest_uri) + "/" + state_file
    data = bytearray(open(model_file, "rb").read())
    data[-1] ^= 0xFF
    open(model_file, "wb").write(bytes(data))
    # ...and a folder without manifest.json is never a checkpoint, however new its step.
    bogus = storage.local_path(config.output) + "/checkpoint-999"
    os.makedirs(bogus)
    open(bogus + "/model.pt", "wb").write(b"not a checkpoint")

    stage_events, _ = run_stage(job, 0, tmp_path)
    (resume,) = [e for e in stage_events if e["event"] == "resume"]
    assert resume["step"] == older_step > 0 and older_step < newest_step
    steps = [e["step"] for e in stage_events if e["event"] == "step"]
    assert steps[0] == older_step + 1 and steps[-1] == 40
    report = json.loads(open(storage.local_path(config.output) + "/eval.json").read())
    assert report["resumed_from_step"] == older_step and report["steps"] == 40
    assert storage.verify_committed(config.output + "/final", check_sha256=True).ok


def test_fsdp_matches_ddp_and_keeps_frozen_parts_bit_identical(align_done, parts, tmp_path):
    job = make_job("fsdp", f"file://{tmp_path}/storage", parts, [
        stage_doc("align", "align", "caption", parts, steps=8, optimizer={"lr": 5e-3}, strategy="fsdp"),
    ])
    run_stage(job, 0, tmp_path)
    fsdp, ddp = load_final(job, 0), load_final(align_done["job"], 0)
    vision = SiglipVisionModel.from_pretrained(parts["vision"])
    assert same_tensors(fsdp.model.vision_tower.state_dict(), vision.state_dict())
    assert same_tensors(lm_state(fsdp), lm_state(ddp))
    for k, v in fsdp.model.multi_modal_projector.state_dict().items():
        assert torch.allclose(v, ddp.model.multi_modal_projector.state_dict()[k], atol=1e-5), k


def test_param_groups_and_schedule(parts):
    doc = stage_doc("s", "instruct", "conversation", parts, steps=10,
                    optimizer={"lr": 1e-4, "projectorLrMultiplier": 10, "weightDecay": 0.1})
    job = make_job("groups", "file:///tmp/unused", parts, [doc])
    vlm = assemble_vlm(job.spec.model, seed=0)
    stage = job.spec.stages[0]
    apply_freezing(vlm.model, list(stage.trainable))
    assert not vlm.model.model.vision_tower.training and vlm.model.model.language_model.training
    groups = param_groups(vlm.model, stage)
    names = {id(p): n for n, p in vlm.model.named_parameters()}
    for g in groups:
        group_names = [names[id(p)] for p in g["params"]]
        projector = all("multi_modal_projector" in n for n in group_names)
        assert g["lr"] == pytest.approx(1e-3 if projector else 1e-4)
        assert all(("multi_modal_projector" in n) == projector for n in group_names)
        if any(n.endswith(("norm.weight", ".bias")) for n in group_names):
            assert g["weight_decay"] == 0.0
    trained = {names[id(p)] for g in groups for p in g["params"]}
    assert not any("vision_tower" in n for n in trained)
    schedule = ScheduleSpec.model_validate({"type": "cosine", "warmupRatio": 0.2, "minLrRatio": 0.1})
    values = [lr_multiplier(s, 10, schedule) for s in range(10)]
    assert values[0] < values[1] < 1.0 and values[2] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))


def test_s3_storage_end_to_end(parts, tmp_path, s3_server):
    """Parts, shards, checkpoints and final/ all on a real S3 server (SeaweedFS), run by the local backend:
    align, then instruct initialised from align's final/ downloaded from S3."""
    base = f"s3://{s3_server.bucket}/trainer-test"
    fs, _ = storage.filesystem(base)
    remote = {}
    for name in ("lm", "vision"):
        fs.put(parts[name].rstrip("/") + "/", f"{s3_server.bucket}/trainer-test/parts/{name}/", recursive=True)
        remote[name] = f"{base}/parts/{name}"
    s3_parts = {**parts, **remote, "train": {}, "heldout": {}}
    for split in ("train", "heldout"):
        for fmt, urls in parts[split].items():
            s3_parts[split][fmt] = []
            for url in urls:
                key = f"{s3_server.bucket}/trainer-test/data/{os.path.basename(url)}"
                fs.put_file(storage.local_path(url), key)
                s3_parts[split][fmt].append(f"s3://{key}")
    job = make_job("s3job", f"{base}/storage", s3_parts, [
        stage_doc("align", "align", "caption", s3_parts, steps=4, checkpoint={"everySteps": 2, "keepLast": 1}),
        stage_doc("instruct", "instruct", "conversation", s3_parts, steps=2),
    ])
    # Through the local backend (`vlmctl run`): TorchX launches torchrun, the planner hands off via S3.
    result = LocalRunner(job, log_dir=str(tmp_path / "torchx"), env={contract.METRICS_PORT_ENV: "0"}).run()
    assert result.succeeded, result.message
    assert [s.name for s in result.stages] == ["align", "instruct"]
    for index in (0, 1):
        output = resolve_stage(job, index).output
        assert storage.verify_committed(output + "/final", check_sha256=True).ok
        assert storage.read_json(output + "/eval.json")["eval_loss"] > 0
    assert [step for step, _ in storage.list_checkpoints(resolve_stage(job, 0).output)] == [2]
    local = storage.download_dir(resolve_stage(job, 1).output + "/final", str(tmp_path / "final"))
    model = LlavaForConditionalGeneration.from_pretrained(local)
    vision = SiglipVisionModel.from_pretrained(parts["vision"])
    assert same_tensors(model.model.vision_tower.state_dict(), vision.state_dict())
