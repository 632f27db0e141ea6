"""`vlmctl quickstart --variant hallucination`: a quickstart whose data has a language prior, so that
hallucination is measurable, and preference alignment that tries to cut it.

The data (`prior.py`): in training, each colour nearly always comes with one shape; held-out images and
the preference pool break that pairing. The steps, in one working folder (one job, `hallucination`, whose
job files add stages to the same committed ones: a later file's earlier stages are done and skipped):

1. `prepare --variant hallucination`: data, stage-0 models (the LM learns the prior from its documents;
   the vision encoder is pretrained on uniform pairs), the job files;
2. `vlmctl run instruct.yaml`: align -> instruct;
3. `pairs`: the step between two job files. The instruct model answers every question kind about each
   image of the pool (greedy plus sampled answers); ground truth labels them; each wrong answer becomes a
   rejected answer against one of the model's own right ones (else the reference), as RLAIF-V and
   LLaVA-RLHF build on-policy pairs. Written as preference shards (the format the dpo stage reads);
4. `vlmctl run dpo.yaml`: align -> instruct -> dpo on those pairs (align and instruct are done);
5. `evaluate`: every policy stage on the held-out split (uniform pairing): hallucination rate of
   generated answers (overall, on images that keep the prior, on images that break it), answer and
   caption accuracy, a POPE-style yes/no probe, text perplexity on held-out documents; report.json.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import yaml
from vlm_core import contract, storage
from vlm_core.spec import load_job
from vlm_core.stage_classes import training_stage

from vlm_quickstart import prior
from vlm_quickstart.checks import GATE, Check, check_rows, exit_code
from vlm_quickstart.dual_encoder import export_vision_tower, train_dual_encoder
from vlm_quickstart.evaluate import LoadedStage, MissingStageOutput, generate_answers, load_final
from vlm_quickstart.prepare import (
    HELDOUT_SAMPLES,
    HELDOUT_TEXT_DOCS,
    TRAIN_SAMPLES,
    Recipe,
    _job,
    _stage,
    _uris,
)
from vlm_quickstart.pretrain import (
    VISION_FEATURE_LAYER,
    load_language_model,
    pretrain_language_model,
    text_perplexity,
)
from vlm_quickstart.shapes import IMAGE_SIZE, _add, make_samples, read_shards, shard_paths, split_seed

VARIANT = "hallucination"
JOB_NAME = "hallucination"
PAIRS_SPLIT = "pairs"  # on-policy preference pairs for training (data/pairs-preference-00000.tar)
PAIRS_EVAL_SPLIT = "pairseval"  # ... and held out for the dpo stage's reward accuracy
RL_SPLIT, RL_EVAL_SPLIT = "rlprompts", "rlpromptseval"  # the rl stages' prompts (pool images, reference answers)
REWARD_HEAD_FILE = "reward_head.json"  # a reward stage's final/ has it (vlm_trainer.reward_model.HEAD_CONFIG)
BASE_JOB_FILE = "instruct.yaml"  # align -> instruct; every later job file adds alignment stages after them
SEED_CUT = 0.58  # LLaVA-RLHF: 58% fewer hallucinated objects (the seed's claim)
PPL_BOUND = 1.25  # the quickstart's perplexity gate: staged over stage 0 at most 1.25


@dataclass
class HallucinationRecipe(Recipe):
    """The quickstart's recipe plus the variant's: the prior's strength, the pool and the sampling of candidates."""

    pairing: float = prior.TRAIN_PAIRING
    pool_images: int = 800
    pool_eval_share: float = 0.1
    samples_per_question: int = 3  # sampled answers per question, on top of the greedy one
    sample_temperature: float = 1.0
    dpo_steps: int = 100  # (dpo_lr, dpo_beta: the quickstart's)
    # (b) reward model on the same on-policy pairs, then PPO with it; (c) GRPO with the exact-match verifier.
    reward_steps: int = 100
    reward_lr: float = 1e-4
    rl_steps: int = 40
    rl_lr: float = 5e-5
    rl_group: int = 4
    rl_beta: float = 0.04
    rl_prompts_per_step: int = 16


def job_documents(out_dir: str, seed: int, recipe: HallucinationRecipe) -> dict[str, dict[str, Any]]:
    """{file name: job document}: instruct.yaml (align -> instruct) and dpo.yaml (the same + dpo on the pairs)."""
    out_dir = os.path.abspath(out_dir)
    data = os.path.join(out_dir, "data")
    model = {
        "visionEncoder": f"file://{out_dir}/stage0/vision_encoder",
        "languageModel": f"file://{out_dir}/stage0/language_model",
        "projector": "mlp2x_gelu",
        "visionFeatureLayer": VISION_FEATURE_LAYER,
        "visionFeatureSelectStrategy": "full",
        "imageSize": IMAGE_SIZE,
    }
    storage_uri = f"file://{out_dir}/storage"

    def shards(split: str, fmt: str) -> list[str]:
        n = TRAIN_SAMPLES if split == "train" else HELDOUT_SAMPLES
        return _uris([os.path.join(data, f"{split}-{fmt}-{i:05d}.tar") for i in range((n + 499) // 500)])

    align = _stage("align", "align", shards("train", "caption"), shards("heldout", "caption"), "caption",
                   recipe.align_steps, recipe.align_lr, recipe, seed)
    instruct = _stage("instruct", "instruct", shards("train", "conversation"), shards("heldout", "conversation"),
                      "conversation", recipe.instruct_steps, recipe.instruct_lr, recipe, seed,
                      optimizer={"projectorLrMultiplier": recipe.instruct_projector_mult})
    dpo = _stage("dpo", "dpo", _uris([pairs_shard(out_dir, PAIRS_SPLIT)]), _uris([pairs_shard(out_dir, PAIRS_EVAL_SPLIT)]),
                 "preference", recipe.dpo_steps, recipe.dpo_lr, recipe, seed, dpo={"beta": recipe.dpo_beta})
    reward = _stage("reward", "reward", _uris([pairs_shard(out_dir, PAIRS_SPLIT)]),
                    _uris([pairs_shard(out_dir, PAIRS_EVAL_SPLIT)]), "preference", recipe.reward_steps, recipe.reward_lr,
                    recipe, seed)

    def rl(name: str, reward_source: dict[str, Any]) -> dict[str, Any]:
        prompts = [os.path.join(data, f"{split}-conversation-00000.tar") for split in (RL_SPLIT, RL_EVAL_SPLIT)]
        stage = _stage(name, "rl", _uris(prompts[:1]), _uris(prompts[1:]), "conversation", recipe.rl_steps,
                       recipe.rl_lr, recipe, seed, schedule={"type": "constant", "warmupRatio": 0.0},
                       rl={"algorithm": name, "groupSize": recipe.rl_group, "maxNewTokens": 6, "beta": recipe.rl_beta,
                           "reward": reward_source})
        stage["batch"] = {"globalSize": recipe.rl_prompts_per_step, "microSize": recipe.rl_prompts_per_step // 2}
        return stage

    # (b) instruct -> reward -> ppo in one file: the reward stage is the one reward.yaml committed (same settings,
    # so it is skipped), PPO's policy starts from instruct (a reward stage is no policy) and is scored by the
    # reward stage's model (rl.reward.fromStage). (c) GRPO is scored by the exact-match verifier.
    return {
        "instruct.yaml": _job(JOB_NAME, model, storage_uri, [align, instruct]),
        "dpo.yaml": _job(JOB_NAME, model, storage_uri, [align, instruct, dpo]),
        "reward.yaml": _job(JOB_NAME, model, storage_uri, [align, instruct, reward]),
        "ppo.yaml": _job(JOB_NAME, model, storage_uri, [align, instruct, reward, rl("ppo", {"fromStage": "reward"})]),
        "grpo.yaml": _job(JOB_NAME, model, storage_uri, [align, instruct, rl("grpo", {"verifier": "exact"})]),
    }


def pairs_shard(out_dir: str, split: str) -> str:
    return os.path.join(os.path.abspath(out_dir), "data", f"{split}-preference-00000.tar")


def prepare(out_dir: str, seed: int = 0, recipe: HallucinationRecipe | None = None, log: Any = print) -> dict[str, Any]:
    """Write the variant's data, stage-0 models and job files into `out_dir`; reuse an earlier identical prepare."""
    recipe = recipe or HallucinationRecipe()
    out_dir = os.path.abspath(out_dir)
    info_path = os.path.join(out_dir, "quickstart.json")
    try:
        with open(info_path) as f:
            earlier = json.load(f)
        if (earlier.get("variant") == VARIANT and earlier.get("seed") == seed
                and earlier.get("recipe") == json.loads(json.dumps(asdict(recipe)))
                and all(os.path.exists(p) for p in earlier["jobs"].values())):
            log(f"reusing the data and stage-0 models prepared earlier in {out_dir} (same seed and recipe)")
            write_jobs(out_dir, seed, recipe)  # the job files follow this release's code
            return dict(earlier)
    except (OSError, ValueError, KeyError):
        pass
    data = os.path.join(out_dir, "data")
    t0 = time.perf_counter()
    paths = prior.write_prior_shards(data, "train", TRAIN_SAMPLES, seed, recipe.pairing)
    paths += prior.write_prior_shards(data, "heldout", HELDOUT_SAMPLES, seed, prior.UNIFORM)
    pool = prior.write_prior_shards(data, "pool", recipe.pool_images, seed, prior.UNIFORM)
    paths += pool
    paths += write_rl_prompts(data, pool, seed, recipe)
    heldout_text = prior.text_documents(HELDOUT_TEXT_DOCS, seed, recipe.pairing, "text-heldout")
    with open(os.path.join(data, "heldout-text.txt"), "w") as f:
        f.write("\n".join(heldout_text) + "\n")
    log(f"data: {len(paths)} shards in {data}: train pairs each colour with its usual shape at {recipe.pairing:.2f}; "
        f"held-out and pool images break the pairing ({time.perf_counter() - t0:.1f} s)")
    stage0 = os.path.join(out_dir, "stage0")
    lm = pretrain_language_model(
        os.path.join(stage0, "language_model"), seed, steps=recipe.lm_pretrain_steps, heldout_docs=heldout_text,
        docs=prior.text_documents(4000, seed, recipe.pairing), extra_words=prior.EXTRA_WORDS,
    )
    log(f"stage 0 language model (documents with the prior): {lm.steps} steps, held-out perplexity "
        f"{lm.perplexity_before:.2f} -> {lm.perplexity_after:.2f} ({lm.wall_seconds:.1f} s)")
    # The vision encoder is pretrained elsewhere, on pairs without the prior (the default quickstart's clean set).
    clean = make_samples("train", TRAIN_SAMPLES, seed)
    de = train_dual_encoder(os.path.join(stage0, "dual_encoder"), [s.image() for s in clean], [s.caption for s in clean],
                            seed, steps=recipe.vision_pretrain_steps)
    export_vision_tower(os.path.join(stage0, "dual_encoder"), os.path.join(stage0, "vision_encoder"))
    log(f"stage 0 dual encoder on uniform pairs: {de.steps} steps ({de.wall_seconds:.1f} s)")
    with open(os.path.join(stage0, "pretrain.json"), "w") as f:
        json.dump({"language_model": asdict(lm), "dual_encoder": asdict(de)}, f, indent=2)
    jobs = write_jobs(out_dir, seed, recipe)
    info = {
        "variant": VARIANT,
        "seed": seed,
        "dir": out_dir,
        "jobs": jobs,
        # what `vlmctl quickstart --variant hallucination` runs, in order: job files, and the pairs step between
        "steps": [["run", jobs["instruct.yaml"]], ["pairs"],
                  *[["run", jobs[f]] for f in ("dpo.yaml", "reward.yaml", "ppo.yaml", "grpo.yaml")]],
        "heldout_text": os.path.join(data, "heldout-text.txt"),
        "heldout_shards": {fmt: shard_paths([p for p in paths if "/heldout-" in p], fmt) for fmt in ("caption", "conversation")},
        "pool_shards": shard_paths(pool, "caption"),
        "stage0": {"language_model": os.path.join(stage0, "language_model"),
                   "vision_encoder": os.path.join(stage0, "vision_encoder")},
        "recipe": asdict(recipe),
        "prepare_seconds": time.perf_counter() - t0,
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    log(f"jobs: {', '.join(jobs.values())}")
    return info


def write_rl_prompts(data: str, pool: list[str], seed: int, recipe: HallucinationRecipe) -> list[str]:
    """The rl stages' prompts: every question kind about each pool image, with its reference answer (the tail of
    the pool held out, as for the pairs)."""
    samples = read_shards(shard_paths(pool, "caption"))
    rng = np.random.default_rng(split_seed(seed, "prior/pool/rl"))
    n_eval = int(round(len(samples) * recipe.pool_eval_share))
    out: dict[str, list[tuple[str, bytes, dict]]] = {RL_SPLIT: [], RL_EVAL_SPLIT: []}
    pngs = {}
    for path in shard_paths(pool, "caption"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    pngs[m.name[:-4]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    for i, (key, _, m) in enumerate(samples):
        for q in prior.questions_for(rng, m["colour"], m["shape"], i):
            split = RL_EVAL_SPLIT if i >= len(samples) - n_eval else RL_SPLIT
            out[split].append((f"{key}-{q.kind}", pngs[key], prior.rl_prompt_record(q)))
    paths = []
    for split, recs in out.items():
        path = os.path.join(data, f"{split}-conversation-00000.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in rng.permutation(len(recs)):
                key, png, rec = recs[int(j)]
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.json", json.dumps(rec, sort_keys=True).encode())
        paths.append(path)
    return paths


def write_jobs(out_dir: str, seed: int, recipe: HallucinationRecipe) -> dict[str, str]:
    jobs = {}
    for name, doc in job_documents(out_dir, seed, recipe).items():
        jobs[name] = os.path.join(out_dir, name)
        with open(jobs[name], "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    return jobs


def _load_info(qdir: str) -> dict[str, Any]:
    with open(os.path.join(qdir, "quickstart.json")) as f:
        return json.load(f)


def _stage_final(info: dict[str, Any], stage: str) -> str:
    job = load_job(info["jobs"][BASE_JOB_FILE])
    return contract.stage_final(job.spec.storage.uri, job.name, stage)


def answer_all(stage: LoadedStage, images: list, questions: list[prior.Question], temperature: float | None = None) -> list[str]:
    """One answer per (image, question)."""
    return generate_answers(stage, images, [q.question for q in questions], batch=200, temperature=temperature)


def build_pairs(qdir: str, log: Any = print) -> dict[str, Any]:
    """The step between instruct.yaml and dpo.yaml: on-policy preference shards from the instruct model."""
    info = _load_info(qdir)
    recipe = info["recipe"]
    t0 = time.perf_counter()
    pool = read_shards(info["pool_shards"])
    rng = np.random.default_rng(split_seed(info["seed"], "prior/pool/questions"))
    items = [(key, img, q) for i, (key, img, m) in enumerate(pool) for q in prior.questions_for(rng, m["colour"], m["shape"], i)]
    images, questions = [img for _, img, _ in items], [q for _, _, q in items]
    with tempfile.TemporaryDirectory() as cache:
        stage = load_final(_stage_final(info, "instruct"), cache)
        answers = [answer_all(stage, images, questions)]
        torch.manual_seed(info["seed"])
        for _ in range(recipe["samples_per_question"]):
            answers.append(answer_all(stage, images, questions, temperature=recipe["sample_temperature"]))
    n_eval = int(round(len(pool) * recipe["pool_eval_share"]))
    eval_keys = {key for key, _, _ in pool[len(pool) - n_eval :]}
    pngs = {}
    for path in info["pool_shards"]:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    pngs[m.name[:-4]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    out: dict[str, list[tuple[str, bytes, dict]]] = {PAIRS_SPLIT: [], PAIRS_EVAL_SPLIT: []}
    greedy_wrong = 0
    for j, (key, _, q) in enumerate(items):
        cands = [a[j] for a in answers]
        greedy_wrong += not prior.correct(q, cands[0])
        for n, pair in enumerate(prior.onpolicy_pairs(q, cands)):
            rec = {**pair, "kind": q.kind, "colour": q.colour, "shape": q.shape}
            out[PAIRS_EVAL_SPLIT if key in eval_keys else PAIRS_SPLIT].append((f"{key}-{q.kind}-{n}", pngs[key], rec))
    order = np.random.default_rng(split_seed(info["seed"], "prior/pairs/order"))
    for split, recs in out.items():
        if not recs:
            raise SystemExit(f"pairs: the instruct model answered every {split} question right; no preference pair to write")
        with tarfile.open(pairs_shard(qdir, split), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in order.permutation(len(recs)):  # one shard: mix images and question kinds
                key, png, rec = recs[int(i)]
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.json", json.dumps(rec, sort_keys=True).encode())
    by_kind: dict[str, int] = {}
    for _, _, rec in out[PAIRS_SPLIT] + out[PAIRS_EVAL_SPLIT]:
        by_kind[rec["kind"]] = by_kind.get(rec["kind"], 0) + 1
    summary = {
        "pool_images": len(pool),
        "questions": len(items),
        "answers_per_question": len(answers),
        "greedy_wrong_share": greedy_wrong / len(items),
        "pairs": len(out[PAIRS_SPLIT]),
        "eval_pairs": len(out[PAIRS_EVAL_SPLIT]),
        "pairs_by_kind": by_kind,
        "seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(qdir, "data", "pairs.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"pairs: {summary['pairs']} on-policy preference pairs (+{summary['eval_pairs']} held out) from "
        f"{len(pool)} pool images x {len(items) // max(len(pool), 1)} questions x {len(answers)} answers; "
        f"the instruct model's greedy answer was wrong for {summary['greedy_wrong_share']:.3f} ({summary['seconds']:.1f} s)")
    return summary


# --- evaluation ---------------------------------------------------------------------------------------

# The variant's claims (issue 22): instruct hallucinates measurably; an alignment stage cuts it by half
# without losing answer accuracy or the language model's perplexity (the quickstart's bound). Gates, as the
# quickstart's: each was met with margin in the committed run (bench/results/hallucination.md).
VARIANT_CHECKS: dict[str, Check] = {
    "instruct_hallucination_rate_min": Check(0.10, ">=", GATE, "the prior makes instruct hallucinate measurably"),
    "best_hallucination_cut_min": Check(0.50, ">=", GATE, "an alignment stage cuts the rate by half (seed: 0.58)"),
    "best_answer_accuracy_kept": Check(0.0, ">=", GATE, "that stage's answer accuracy minus instruct's"),
    "best_perplexity_ratio_max": Check(PPL_BOUND, "<=", GATE, "that stage's text perplexity over stage 0's"),
}


def measure(stage: LoadedStage, heldout: list, heldout_text: list[str], seed: int) -> dict[str, Any]:
    """`prior.rates` of greedy answers to every question kind about each held-out image, and text perplexity."""
    rng = np.random.default_rng(split_seed(seed, "prior/heldout/questions"))
    items = [(img, q) for i, (_, img, m) in enumerate(heldout) for q in prior.questions_for(rng, m["colour"], m["shape"], i)]
    answers = answer_all(stage, [img for img, _ in items], [q for _, q in items])
    row = prior.rates([(q, a) for (_, q), a in zip(items, answers, strict=True)])
    row["text_perplexity"] = text_perplexity(stage.model, stage.processor.tokenizer, heldout_text)
    first = {q.kind: a for (_, q), a in zip(items[:6], answers[:6], strict=True)}
    row["example"] = {"image": f"{items[0][1].colour} {items[0][1].shape}", **first}
    return row


def variant_checks(stage0_ppl: float, rows: list[dict]) -> dict[str, dict[str, Any]]:
    by = {r["stage"]: r for r in rows}
    inst = by["instruct"]
    aligned = [r for r in rows if r["aligned"]]
    # the stage that cuts most while keeping answer accuracy and perplexity; else the one that cuts most
    keeps = [r for r in aligned if r["answer_accuracy"] >= inst["answer_accuracy"]
             and r["text_perplexity"] / stage0_ppl <= PPL_BOUND]
    best = max(keeps or aligned, key=lambda r: -1.0 if r["hallucination_cut"] is None else r["hallucination_cut"],
               default=None)
    got = {
        "instruct_hallucination_rate_min": inst["hallucination_rate"],
        "best_hallucination_cut_min": best["hallucination_cut"] if best else None,
        "best_answer_accuracy_kept": best["answer_accuracy"] - inst["answer_accuracy"] if best else None,
        "best_perplexity_ratio_max": best["text_perplexity"] / stage0_ppl if best else None,
    }
    return {
        name: {"value": got[name], "threshold": c.threshold, "op": c.op, "role": c.role, "met": c.met(got[name]),
               "measures": c.measures + (f" ({best['stage']})" if best and name.startswith("best") else "")}
        for name, c in VARIANT_CHECKS.items()
    }


def evaluate(qdir: str) -> int:
    """Measure every policy stage of the variant's job files; print and store report.json; exit as the gates say."""
    info = _load_info(qdir)
    with open(info["heldout_text"]) as f:
        heldout_text = [line.strip() for line in f if line.strip()]
    heldout = read_shards(info["heldout_shards"]["caption"])
    lm_dir = info["stage0"]["language_model"]
    from transformers import AutoTokenizer

    stage0_ppl = text_perplexity(load_language_model(lm_dir), AutoTokenizer.from_pretrained(lm_dir), heldout_text)
    rows: list[dict[str, Any]] = []
    reward_models: list[dict[str, Any]] = []
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as cache:
        for file, path in info["jobs"].items():
            job = load_job(path)
            for stage in job.spec.stages:
                spec = training_stage(stage)
                if spec is None or spec.name in seen:
                    continue
                seen.add(spec.name)
                output = contract.stage_output(job.spec.storage.uri, job.name, spec.name)
                final = storage.join(output, contract.FINAL_DIR)
                if not storage.verify_committed(final).ok:
                    print(f"evaluate: stage {spec.name!r} of {file} has no committed final/ (not run, or failed); skipped")
                    continue
                if storage.exists(storage.join(final, REWARD_HEAD_FILE)):  # a reward model, not a policy
                    ev_uri = storage.join(output, contract.EVAL_FILE)
                    reward_models.append({"stage": spec.name, "job_file": file,
                                          **(storage.read_json(ev_uri) if storage.exists(ev_uri) else {})})
                    continue
                ev_uri = storage.join(output, contract.EVAL_FILE)
                ev = storage.read_json(ev_uri) if storage.exists(ev_uri) else {}
                row: dict[str, Any] = {"stage": spec.name, "type": spec.type, "job_file": file,
                                       "aligned": file != BASE_JOB_FILE,
                                       "steps": ev.get("steps"), "wall_seconds": ev.get("wall_seconds"),
                                       "train_loss_first": ev.get("train_loss_first"),
                                       "train_loss_last": ev.get("train_loss_last"),
                                       **{k: ev[k] for k in ("reward_accuracy", "reward_margin") if k in ev}}
                try:
                    row.update(measure(load_final(final, cache), heldout, heldout_text, info["seed"]))
                except MissingStageOutput as err:
                    print(f"evaluate: {err}")
                    return 2
                rows.append(row)
    if not any(r["stage"] == "instruct" for r in rows):
        print("evaluate: the instruct stage has no committed output; run instruct.yaml first")
        return 2
    inst = next(r for r in rows if r["stage"] == "instruct")
    for r in rows:
        r["hallucination_cut"] = 1 - r["hallucination_rate"] / inst["hallucination_rate"] if inst["hallucination_rate"] else None
        r["text_perplexity_ratio"] = r["text_perplexity"] / stage0_ppl
    pairs_file = os.path.join(qdir, "data", "pairs.json")
    report = {
        "variant": VARIANT,
        "job": JOB_NAME,
        "seed": info["seed"],
        "pairing": info["recipe"]["pairing"],
        "prior": prior.PRIOR_SHAPE,
        "stage0": {"text_perplexity": stage0_ppl},
        "pairs": json.load(open(pairs_file)) if os.path.exists(pairs_file) else None,
        "stages": rows,
        "reward_models": reward_models,
        "seed_claim_cut": SEED_CUT,
        "checks": variant_checks(stage0_ppl, rows),
    }
    job = load_job(info["jobs"][BASE_JOB_FILE])
    uri = storage.join(contract.job_output(job.spec.storage.uri, job.name), contract.REPORT_FILE)
    storage.write_json(uri, report)
    print(report_markdown(report))
    print(f"report: {uri}")
    return exit_code(report["checks"])


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def report_markdown(report: dict[str, Any]) -> str:
    """The variant's table (one row per policy stage) and its checks, as Markdown."""
    lines = [
        f"Hallucination variant, seed {report['seed']}: training pairs each colour with its usual shape "
        f"({', '.join(f'{c} {s}' for c, s in report['prior'].items())}) at {report['pairing']:.2f}; held-out images "
        f"break the pairing (uniform). Stage 0 text perplexity {report['stage0']['text_perplexity']:.3f}.",
        "",
        "| stage | halluc. rate | kept prior | broke prior | cut vs instruct | answer acc | colour | shape | caption acc "
        "| POPE acc | POPE P | POPE R | POPE F1 | yes-ratio | text ppl (x stage 0) | DPO reward acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["stages"]:
        p = r["pope"]
        lines.append(
            f"| {r['stage']} | {_f(r['hallucination_rate'])} | {_f(r['hallucination_rate_prior_kept'])} | "
            f"{_f(r['hallucination_rate_prior_broken'])} | {_f(r['hallucination_cut']) if r['aligned'] else ''} | "
            f"{_f(r['answer_accuracy'])} | {_f(r['colour_answer_accuracy'])} | {_f(r['shape_answer_accuracy'])} | "
            f"{_f(r['caption_accuracy'])} | {_f(p['accuracy'])} | {_f(p['precision'])} | {_f(p['recall'])} | "
            f"{_f(p['f1'])} | {_f(p['yes_ratio'])} | {_f(r['text_perplexity'])} ({_f(r['text_perplexity_ratio'], 2)}) | "
            f"{_f(r.get('reward_accuracy'))} |"
        )
    lines += ["", f"Seed's claim (LLaVA-RLHF): {report['seed_claim_cut']:.0%} fewer hallucinated objects.", ""]
    if report.get("pairs"):
        p = report["pairs"]
        lines.append(f"On-policy pairs: {p['pairs']} (+{p['eval_pairs']} held out) from {p['pool_images']} pool images; "
                     f"instruct's greedy answers wrong on {p['greedy_wrong_share']:.3f} of the pool's questions; by kind "
                     + ", ".join(f"{k} {n}" for k, n in sorted(p["pairs_by_kind"].items())) + ".")
        lines.append("")
    lines += ["| check | role | value | threshold | verdict | measures |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in check_rows(report["checks"])]
    return "\n".join(lines)
