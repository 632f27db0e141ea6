"""`prepare`: everything the quickstart job needs before training, in one folder.

DIR/
  data/       train-{caption,conversation,preference}-NNNNN.tar, heldout-...-00000.tar, heldout-text.txt,
              raw-caption-NNNNN.tar (the clean training pairs + planted noise, `noise.py`) and
              raw-truth.json (what was planted where; only `evaluate` reads it)
  stage0/     language_model/, dual_encoder/ (SigLIP image + text towers) and vision_encoder/ (the dual
              encoder's image tower) as HF folders, pretrain.json
  job.yaml    the staged job: curate -> align -> instruct -> dpo -> eval (a valid VLMTrainingJob); align reads
              the curated shards (`data: {fromStage: curate}`); eval answers heldout-eval-00000.tar with dpo's model
  raw.yaml    the same align stage on the raw shards, uncurated (the raw-vs-curated comparison)
  naive.yaml  the naive baseline: everything unfrozen from the start at a high lr, same data and steps
  quickstart.json  seed and paths, read by `evaluate`
  storage/    spec.storage.uri (file://, absolute): stage outputs and report.json land here

The recipe (steps, learning rates, batch) was measured on 2 CPU cores; see TESTING.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import yaml
from vlm_core.spec import API_GROUP, API_VERSION, KIND, dump_job, parse_job

from vlm_quickstart.dual_encoder import export_vision_tower, train_dual_encoder
from vlm_quickstart.noise import write_raw_shards
from vlm_quickstart.pretrain import VISION_FEATURE_LAYER, pretrain_language_model
from vlm_quickstart.shapes import (
    IMAGE_SIZE,
    make_samples,
    shard_paths,
    text_documents,
    write_eval_shard,
    write_shards,
)

JOB_NAME = "quickstart"
NAIVE_JOB_NAME = "quickstart-naive"
RAW_JOB_NAME = "quickstart-raw"
RAW_TRUTH_FILE = "raw-truth.json"
TRAIN_SAMPLES = 3000
HELDOUT_SAMPLES = 300
HELDOUT_TEXT_DOCS = 300
NEAR_RADIUS = 7  # calibrated (--suite light), see Recipe
NEAR_SIMILARITY = 0.995  # measured on the planted copies, see Recipe
EVAL_IMAGES = 150  # held-out images the eval stage asks about (2 prompts each: its colour, its shape)


@dataclass
class Recipe:
    """The quickstart's training recipe: one place to tune it."""

    global_batch: int = 64
    micro_batch: int = 32
    procs_per_node: int = 2
    align_steps: int = 300
    align_lr: float = 2e-3
    instruct_steps: int = 150
    instruct_lr: float = 1e-4
    instruct_projector_mult: float = 1.0
    dpo_steps: int = 50
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    naive_lr: float = 1e-3
    max_length: int = 96
    # The loader (measured, bench/results/issue10/README.md): one worker process per rank encodes off the
    # training process and sends micro-batch-sized chunks; its encoded-sample cache (the align stage reads
    # ~6 epochs of the same curated set) skips decode/processing/tokenization after the first epoch. With
    # workers 0 the quickstart's stages spent ~40% of each step waiting for data.
    data_workers: int = 1
    data_cache_mib: int = 256
    lm_pretrain_steps: int = 150
    vision_pretrain_steps: int = 500
    # How the instruct stage trains: "full" (ddp, the default), "zero2" (DeepSpeed ZeRO-2) or "lora"
    # (PEFT adapters on the LM's projections + the projector; a LoRA lr is ~10x a full fine-tune's).
    instruct_variant: str = "full"
    instruct_lora_lr: float = 1e-3
    instruct_lora_rank: int = 16
    # The curate stage: CLIP-score threshold (cosine of the stage-0 dual encoder; clean pairs score
    # ~0.76-0.96, mismatched ones mostly below 0.5) and near dedup: pHash or dHash within NEAR_RADIUS bits
    # proposes a pair, the sharp (blur 0) aligned 24x24 thumbnail cosine confirms it at NEAR_SIMILARITY.
    # NEAR_RADIUS and the blur are what `vlmctl curate calibrate job.yaml --suite light` recommends on the
    # quickstart's raw set (seed 0). Its threshold (0.962) is NOT used: the quickstart's distinct images (one
    # 32 px shape on a flat background, 12 captions) are as alike as a JPEG re-encode of one, so it would
    # confirm look-alikes; NEAR_SIMILARITY is measured between the planted copies (aligned cosine >= 0.9995)
    # and clean nearest candidates (none above 0.995); bench/results/issue23/. (The earlier hash-only rule,
    # dHash within 3 bits, removed 18 clean look-alikes: a 32 px shape on a flat background has few hashes.)
    clip_threshold: float = 0.7
    near_dedup_hashes: tuple[str, ...] = ("phash", "dhash")
    near_dedup_max_distance: int = NEAR_RADIUS
    near_dedup_min_similarity: float = NEAR_SIMILARITY
    near_dedup_blur: float = 0.0


INSTRUCT_VARIANTS = ("full", "zero2", "lora")


def instruct_variant_fields(recipe: Recipe) -> dict[str, Any]:
    """Extra instruct-stage fields for `recipe.instruct_variant`."""
    if recipe.instruct_variant not in INSTRUCT_VARIANTS:
        raise ValueError(f"instruct variant: expected one of {list(INSTRUCT_VARIANTS)}, got {recipe.instruct_variant!r}")
    if recipe.instruct_variant == "zero2":
        return {"strategy": "zero2"}
    if recipe.instruct_variant == "lora":
        rank = recipe.instruct_lora_rank
        return {"lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.0}, "optimizer": {"lr": recipe.instruct_lora_lr}}
    return {}


def _uris(paths: list[str]) -> list[str]:
    return [f"file://{os.path.abspath(p)}" for p in paths]


def _stage(
    name: str,
    type_: str,
    shards: list[str],
    eval_shards: list[str],
    fmt: str,
    steps: int,
    lr: float,
    recipe: Recipe,
    seed: int,
    **extra: Any,
) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "name": name,
        "type": type_,
        "data": {"shards": shards, "format": fmt, "evalShards": eval_shards, "maxLength": recipe.max_length,
                 "workers": recipe.data_workers, "cacheMiB": recipe.data_cache_mib},
        "optimizer": {"lr": lr},
        "schedule": {"type": "cosine", "warmupRatio": 0.05},
        "batch": {"globalSize": recipe.global_batch, "microSize": recipe.micro_batch},
        "maxSteps": steps,
        "precision": "fp32",
        "seed": seed,
        "checkpoint": {"everySteps": 100, "keepLast": 1},
        "resources": {"nodes": 1, "procsPerNode": recipe.procs_per_node},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(stage.get(key), dict):
            stage[key] = {**stage[key], **value}
        else:
            stage[key] = value
    return stage


def _job(name: str, model: dict[str, Any], storage_uri: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"model": model, "storage": {"uri": storage_uri}, "stages": stages},
    }
    return dump_job(parse_job(doc))  # validated, with defaults filled in


def curate_stage(raw_shards: list[str], encoder: str, recipe: Recipe, seed: int) -> dict[str, Any]:
    """The quickstart's curate stage: text and image filters, CLIP score, exact and near dedup (candidates from
    two hashes, confirmed by thumbnails; thresholds from `vlmctl curate calibrate`).

    Semantic dedup stays off: the tiny dual encoder knows 12 concepts only, so to it every red circle
    is a semantic duplicate of every other (clean images' nearest-neighbour cosine is ~0.997).
    """
    return {
        "name": "curate",
        "type": "curate",
        "input": {"shards": _uris(raw_shards)},
        "encoder": encoder,
        "filters": {
            "image": {"minSide": IMAGE_SIZE, "maxAspectRatio": 3.0},
            "clipScore": {"threshold": recipe.clip_threshold},
            "nearDedup": {"hashes": list(recipe.near_dedup_hashes), "maxDistance": recipe.near_dedup_max_distance,
                          "verify": {"signal": "thumbnail", "minSimilarity": recipe.near_dedup_min_similarity,
                                     "blur": recipe.near_dedup_blur}},
        },
        "seed": seed,
        "resources": {"nodes": 1, "procsPerNode": recipe.procs_per_node},
    }


def eval_stage(shards: list[str], recipe: Recipe, seed: int) -> dict[str, Any]:
    return {
        "name": "eval",
        "type": "eval",
        "data": {"shards": shards, "format": "conversation", "maxLength": recipe.max_length},
        "eval": {"metrics": ["exact_match"], "maxNewTokens": 4, "batchSize": 100},
        "precision": "fp32",
        "seed": seed,
        "resources": {"nodes": 1, "procsPerNode": recipe.procs_per_node},
    }


def job_documents(out_dir: str, data_paths: list[str], seed: int, recipe: Recipe) -> tuple[dict, dict, dict]:
    """(job.yaml, naive.yaml, raw.yaml) documents for prepared data and stage-0 checkpoints in `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    raw = [p for p in data_paths if os.path.basename(p).startswith("raw-caption-")]
    train = [p for p in data_paths if os.path.basename(p).startswith("train-")]
    heldout = [p for p in data_paths if os.path.basename(p).startswith("heldout-")]
    model = {
        "visionEncoder": f"file://{out_dir}/stage0/vision_encoder",
        "languageModel": f"file://{out_dir}/stage0/language_model",
        "projector": "mlp2x_gelu",
        "visionFeatureLayer": VISION_FEATURE_LAYER,
        "visionFeatureSelectStrategy": "full",
        "imageSize": IMAGE_SIZE,
    }
    storage_uri = f"file://{out_dir}/storage"

    def data(fmt: str) -> tuple[list[str], list[str]]:
        return _uris(shard_paths(train, fmt)), _uris(shard_paths(heldout, fmt))

    variant = instruct_variant_fields(recipe)
    align = _stage(
        "align", "align", [], data("caption")[1], "caption", recipe.align_steps, recipe.align_lr, recipe, seed
    )
    staged = [
        curate_stage(raw, f"file://{out_dir}/stage0/dual_encoder", recipe, seed),
        # align trains on the curate stage's committed output, resolved by the planner.
        {**align, "data": {**{k: v for k, v in align["data"].items() if k != "shards"}, "fromStage": "curate"}},
        # The conversation shards mix caption-style turns into the QA, so captioning is not forgotten.
        _stage(
            "instruct",
            "instruct",
            *data("conversation"),
            "conversation",
            recipe.instruct_steps,
            recipe.instruct_lr,
            recipe,
            seed,
            **{
                **variant,
                "optimizer": {"projectorLrMultiplier": recipe.instruct_projector_mult, **variant.get("optimizer", {})},
            },
        ),
        _stage(
            "dpo",
            "dpo",
            *data("preference"),
            "preference",
            recipe.dpo_steps,
            recipe.dpo_lr,
            recipe,
            seed,
            dpo={"beta": recipe.dpo_beta},
        ),
        # The eval stage: greedy answers of dpo's final/ on held-out colour and shape questions, scored by exact
        # match; its eval.json is the report's "eval stage" section.
        eval_stage(_uris([p for p in heldout if os.path.basename(p).startswith("heldout-eval-")]), recipe, seed),
    ]
    # The baseline the field warns against: everything unfrozen from the start, at a high lr, on the
    # same instruction data for as many steps as align + instruct together.
    naive = [
        _stage(
            "naive",
            "instruct",
            *data("conversation"),
            "conversation",
            recipe.align_steps + recipe.instruct_steps,
            recipe.naive_lr,
            recipe,
            seed,
            trainable=["projector", "language_model", "vision_tower"],
            optimizer={"projectorLrMultiplier": 1.0},
        )
    ]
    # The same align stage on the raw shards: "quality beats quantity", measured on the same steps.
    raw_align = [{**align, "data": {**align["data"], "shards": _uris(raw)}}]
    return (
        _job(JOB_NAME, model, storage_uri, staged),
        _job(NAIVE_JOB_NAME, model, storage_uri, naive),
        _job(RAW_JOB_NAME, model, storage_uri, raw_align),
    )


def prepared_earlier(out_dir: str, seed: int, recipe: Recipe) -> dict[str, Any] | None:
    """quickstart.json of an earlier `prepare` of `out_dir` with this seed and recipe whose files are all there."""
    try:
        with open(os.path.join(out_dir, "quickstart.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if info.get("seed") != seed or info.get("recipe") != json.loads(json.dumps(asdict(recipe))):
        return None
    needed = [info.get(k) for k in ("job", "naive", "raw", "raw_truth", "heldout_text")]
    needed += list((info.get("stage0") or {}).values())
    return info if all(isinstance(p, str) and os.path.exists(p) for p in needed) else None


def prepare(out_dir: str, seed: int = 0, recipe: Recipe | None = None, log: Any = print) -> dict[str, Any]:
    """Write data, stage-0 checkpoints and the job files into `out_dir`; return what was written. A folder
    prepared earlier with the same seed and recipe is reused as it is: rewriting its shards and models would
    change the inputs of every stage trained on them (their fingerprints), and cost a minute."""
    recipe = recipe or Recipe()
    out_dir = os.path.abspath(out_dir)
    earlier = prepared_earlier(out_dir, seed, recipe)
    if earlier is not None:
        log(f"reusing the data, stage-0 models and job files prepared earlier in {out_dir} (same seed and recipe; "
            "delete the folder to start over)")
        return earlier
    data_dir = os.path.join(out_dir, "data")
    t0 = time.perf_counter()
    paths = write_shards(data_dir, "train", TRAIN_SAMPLES, seed) + write_shards(
        data_dir, "heldout", HELDOUT_SAMPLES, seed
    )
    paths.append(write_eval_shard(data_dir, make_samples("heldout", HELDOUT_SAMPLES, seed)[:EVAL_IMAGES]))
    clean = make_samples("train", TRAIN_SAMPLES, seed)
    raw = write_raw_shards(data_dir, clean, seed)
    paths += raw.shards
    with open(os.path.join(data_dir, RAW_TRUTH_FILE), "w") as f:
        json.dump(raw.truth, f, indent=1, sort_keys=True)
    heldout_text = text_documents(HELDOUT_TEXT_DOCS, seed, "text-heldout")
    with open(os.path.join(data_dir, "heldout-text.txt"), "w") as f:
        f.write("\n".join(heldout_text) + "\n")
    planted = len(raw.truth) - len(clean)
    log(
        f"data: {len(paths)} shards in {data_dir}; raw set {len(raw.truth)} pairs = {len(clean)} clean + "
        f"{planted} planted noise ({time.perf_counter() - t0:.1f} s)"
    )

    stage0 = os.path.join(out_dir, "stage0")
    lm = pretrain_language_model(
        os.path.join(stage0, "language_model"),
        seed,
        steps=recipe.lm_pretrain_steps,
        heldout_docs=heldout_text,
    )
    log(
        f"stage 0 language model: {lm.steps} steps, loss {lm.loss_first:.2f} -> {lm.loss_last:.2f}, held-out "
        f"perplexity {lm.perplexity_before:.2f} -> {lm.perplexity_after:.2f} ({lm.wall_seconds:.1f} s)"
    )
    # The dual encoder learns from clean pairs, like a CLIP pretrained elsewhere; its image tower is
    # the VLM's vision encoder and the whole of it scores the raw pairs in the curate stage.
    de = train_dual_encoder(
        os.path.join(stage0, "dual_encoder"),
        [s.image() for s in clean],
        [s.caption for s in clean],
        seed,
        steps=recipe.vision_pretrain_steps,
    )
    export_vision_tower(os.path.join(stage0, "dual_encoder"), os.path.join(stage0, "vision_encoder"))
    log(
        f"stage 0 dual encoder (SigLIP image + text towers): {de.steps} contrastive steps, loss "
        f"{de.loss_first:.2f} -> {de.loss_last:.2f} ({de.wall_seconds:.1f} s); its image tower is the VLM's vision encoder"
    )
    with open(os.path.join(stage0, "pretrain.json"), "w") as f:
        json.dump({"language_model": asdict(lm), "dual_encoder": asdict(de)}, f, indent=2)

    job, naive, raw_job = job_documents(out_dir, paths, seed, recipe)
    files = {}
    for name, doc in (("job.yaml", job), ("naive.yaml", naive), ("raw.yaml", raw_job)):
        files[name] = os.path.join(out_dir, name)
        with open(files[name], "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    info = {
        "seed": seed,
        "dir": out_dir,
        "job": files["job.yaml"],
        "naive": files["naive.yaml"],
        "raw": files["raw.yaml"],
        "raw_truth": os.path.join(data_dir, RAW_TRUTH_FILE),
        "heldout_text": os.path.join(data_dir, "heldout-text.txt"),
        "heldout_shards": {
            fmt: shard_paths([p for p in paths if "/heldout-" in p], fmt)
            for fmt in ("caption", "conversation", "preference")
        },
        "stage0": {
            "language_model": os.path.join(stage0, "language_model"),
            "vision_encoder": os.path.join(stage0, "vision_encoder"),
            "dual_encoder": os.path.join(stage0, "dual_encoder"),
        },
        "recipe": asdict(recipe),
        "prepare_seconds": time.perf_counter() - t0,
        "prepared_at": time.time(),
    }
    with open(os.path.join(out_dir, "quickstart.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(
        f"jobs: {files['job.yaml']} (curate -> align -> instruct -> dpo -> eval), {files['raw.yaml']} (align on the raw "
        f"set), {files['naive.yaml']} (naive baseline)"
    )
    return info
