"""`evaluate`: held-out quality of every stage of the quickstart job and of the naive baseline.

Each stage's committed `final/` is loaded the way a user would load it
(`LlavaForConditionalGeneration.from_pretrained` + `AutoProcessor.from_pretrained`) and measured on
the held-out split:
- caption accuracy: greedy caption of each held-out image; right when it names the right colour and
  the right shape and no other colour or shape;
- answer accuracy: one colour question and one shape question per held-out image, greedy answer;
- text perplexity of the language model on held-out text documents (stage-0 LM before, each stage
  after, and the naive baseline): how much of its language the LM kept;
- hallucination rate: the share of generated answers (captions and the colour and shape answers above)
  that name a colour or a shape not in the image (the seed's claim: DPO lowers it);
- from each stage's eval.json (written by the trainer): loss first/last, eval loss, wall time, and
  for dpo the implicit-reward accuracy and margin on held-out preference pairs.

The curate stage is measured against what `prepare` planted in the raw set (data/raw-truth.json): per
planted kind the share removed (and by which filter), the share of clean pairs kept, and whether each
duplicate group kept exactly one sample. The raw job (`raw.yaml`: the same align stage on the raw,
uncurated shards) is measured like align: quality vs quantity on the same steps.

The table is printed and the same numbers go to `<storage>/<job>/report.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from vlm_core import contract, storage
from vlm_core.spec import VLMTrainingJob, load_job
from vlm_core.stage_classes import curate_stage, eval_stage, training_stage

from vlm_quickstart.checks import checks, exit_code, print_checks
from vlm_quickstart.noise import EXPECTED_REASON
from vlm_quickstart.prepare import RAW_JOB_NAME
from vlm_quickstart.pretrain import load_language_model, text_perplexity
from vlm_quickstart.shapes import read_shards
from vlm_quickstart.vocab import CAPTION_PROMPTS, COLOUR_QUESTIONS, COLOURS, SHAPE_QUESTIONS, SHAPES


class MissingStageOutput(RuntimeError):
    """A stage's final/ is absent or not committed."""


@dataclass
class LoadedStage:
    model: LlavaForConditionalGeneration
    processor: Any


def load_final(uri: str, cache_dir: str) -> LoadedStage:
    """A committed final/ through the public transformers loading path."""
    check = storage.verify_committed(uri)
    if not check.ok:
        raise MissingStageOutput(f"{uri}: not a committed stage output ({check.reason})")
    local = storage.download_dir(uri, os.path.join(cache_dir, uri.replace("://", "_").replace("/", "_")))
    model = LlavaForConditionalGeneration.from_pretrained(local, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(local)
    processor.tokenizer.padding_side = "left"
    return LoadedStage(model, processor)


@torch.no_grad()
def generate_answers(
    stage: LoadedStage,
    images: list,
    questions: list[str | None],
    batch: int = 100,
    temperature: float | None = None,
) -> list[str]:
    """Greedy answers to one-turn prompts (`None` = the caption prompt of the caption format); sampled at
    `temperature` when one is given (the hallucination variant's on-policy candidates; seed torch first)."""
    sampling: dict[str, Any] = (
        {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature}
    )
    proc = stage.processor
    out: list[str] = []
    for start in range(0, len(images), batch):
        texts = []
        for q in questions[start : start + batch]:
            content = "<image>" if q is None else f"<image>\n{q}"
            texts.append(
                proc.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
            )
        enc = proc(text=texts, images=images[start : start + batch], return_tensors="pt", padding=True)
        gen = stage.model.generate(
            **enc,
            max_new_tokens=6,
            **sampling,
            pad_token_id=proc.tokenizer.pad_token_id,
            eos_token_id=proc.tokenizer.eos_token_id,
        )
        out += proc.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(a.split()) for a in out]


def names(text: str, vocab: tuple[str, ...]) -> set[str]:
    return {w for w in text.split() if w in vocab}


def hallucinates(text: str, colour: str, shape: str) -> bool:
    """The answer names a colour or a shape that is not the image's."""
    return bool(names(text, COLOURS) - {colour} or names(text, SHAPES) - {shape})


def caption_correct(text: str, colour: str, shape: str) -> bool:
    return names(text, COLOURS) == {colour} and names(text, SHAPES) == {shape}


def measure_stage(stage: LoadedStage, heldout: dict[str, list], heldout_text: list[str]) -> dict[str, float]:
    """Caption accuracy, answer accuracy (colour, shape) and text perplexity of one stage's model."""
    caps = heldout["caption"]
    captions = generate_answers(stage, [img for _, img, _ in caps], [None] * len(caps))
    # Both caption prompts of the conversation format count as captioning too; the caption format
    # (user turn = the image alone) is what align trains.
    conv = heldout["conversation"]
    images = [img for _, img, _ in conv]
    colour_q = [COLOUR_QUESTIONS[i % len(COLOUR_QUESTIONS)] for i in range(len(conv))]
    shape_q = [SHAPE_QUESTIONS[i % len(SHAPE_QUESTIONS)] for i in range(len(conv))]
    caption_q = [CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)] for i in range(len(conv))]
    colour_a = generate_answers(stage, images, colour_q)
    shape_a = generate_answers(stage, images, shape_q)
    prompted_caps = generate_answers(stage, images, caption_q)
    colour_ok = [names(a, COLOURS) == {m["colour"]} for a, (_, _, m) in zip(colour_a, conv, strict=True)]
    shape_ok = [names(a, SHAPES) == {m["shape"]} for a, (_, _, m) in zip(shape_a, conv, strict=True)]
    cap_ok = [
        caption_correct(c, m["colour"], m["shape"]) for c, (_, _, m) in zip(captions, caps, strict=True)
    ]
    pcap_ok = [
        caption_correct(c, m["colour"], m["shape"]) for c, (_, _, m) in zip(prompted_caps, conv, strict=True)
    ]
    ppl = text_perplexity(stage.model, stage.processor.tokenizer, heldout_text)
    generated = [(a, m) for a, (_, _, m) in zip(captions, caps, strict=True)] + [
        (a, m) for answers in (colour_a, shape_a, prompted_caps) for a, (_, _, m) in zip(answers, conv, strict=True)
    ]
    hallucinated = sum(hallucinates(a, m["colour"], m["shape"]) for a, m in generated)
    return {
        "hallucination_rate": hallucinated / len(generated),
        "answers_generated": len(generated),
        "caption_accuracy": sum(cap_ok) / len(cap_ok),
        "prompted_caption_accuracy": sum(pcap_ok) / len(pcap_ok),
        "answer_accuracy": (sum(colour_ok) + sum(shape_ok)) / (len(colour_ok) + len(shape_ok)),
        "colour_answer_accuracy": sum(colour_ok) / len(colour_ok),
        "shape_answer_accuracy": sum(shape_ok) / len(shape_ok),
        "text_perplexity": ppl,
        "example": {"caption": captions[0], "colour_answer": colour_a[0], "shape_answer": shape_a[0]},
    }


def _eval_json(output: str) -> dict[str, Any]:
    uri = storage.join(output, contract.EVAL_FILE)
    return storage.read_json(uri) if storage.exists(uri) else {}


def evaluate_job(
    job: VLMTrainingJob, heldout: dict[str, list], heldout_text: list[str], cache_dir: str
) -> list[dict]:
    rows = []
    for stage in job.spec.stages:
        spec = training_stage(stage)
        if spec is None:  # a data stage (curate): measured by `curate_summary`
            continue
        output = contract.stage_output(job.spec.storage.uri, job.name, spec.name)
        ev = _eval_json(output)
        row: dict[str, Any] = {
            "job": job.name,
            "stage": spec.name,
            "type": spec.type,
            "trainable": list(spec.trainable or []),
            "lr": spec.optimizer.lr,
            "steps": ev.get("steps", spec.max_steps),
            "train_loss_first": ev.get("train_loss_first"),
            "train_loss_last": ev.get("train_loss_last"),
            "eval_loss": ev.get("eval_loss"),
            "wall_seconds": ev.get("wall_seconds"),
        }
        # the kind's eval statistics the table shows (DPO's reward accuracy and margin), where the stage has them
        row.update({k: ev[k] for k in ("reward_accuracy", "reward_margin") if k in ev})
        row.update(
            measure_stage(
                load_final(storage.join(output, contract.FINAL_DIR), cache_dir), heldout, heldout_text
            )
        )
        rows.append(row)
    return rows


def committed_final(job: VLMTrainingJob, stage: str) -> str:
    """Stage `stage`'s final/ URI; MissingStageOutput when it is not committed."""
    final = contract.stage_final(job.spec.storage.uri, job.name, stage)
    check = storage.verify_committed(final)
    if not check.ok:
        raise MissingStageOutput(f"{final}: not a committed stage output ({check.reason})")
    return final


def eval_stage_summary(job: VLMTrainingJob) -> dict[str, Any] | None:
    """The job's eval stage's numbers (its eval.json, written by the stage: vlm_trainer.stages.eval), or None."""
    stage = next((e for s in job.spec.stages if (e := eval_stage(s)) is not None), None)
    if stage is None:
        return None
    final = committed_final(job, stage.name)
    doc = storage.read_json(storage.join(final, contract.EVAL_FILE))
    keys = ("samples", "exact_match", "samples_exact_match", "wall_seconds", "world_size")
    return {"stage": stage.name, **{k: doc.get(k) for k in keys},
            "predictions": storage.join(final, contract.PREDICTIONS_FILE)}


def curate_summary(job: VLMTrainingJob, truth: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The curate stage's funnel, and how it did on what was planted (None when the job has no curate stage)."""
    stage = next((c for s in job.spec.stages if (c := curate_stage(s)) is not None), None)
    if stage is None:
        return None
    final = committed_final(job, stage.name)
    funnel = storage.read_json(storage.join(final, contract.FUNNEL_FILE))
    decisions = {
        d["key"]: d
        for d in map(json.loads, storage.read_text(storage.join(final, contract.DECISIONS_FILE)).splitlines())
        if d
    }
    if set(decisions) != set(truth):
        raise MissingStageOutput(f"{final}: decisions.jsonl does not list exactly the raw set's {len(truth)} keys")
    planted: dict[str, dict[str, Any]] = {}
    for kind, reason in EXPECTED_REASON.items():
        keys = [k for k, t in truth.items() if t["kind"] == kind]
        removed = [decisions[k]["reason"] for k in keys if not decisions[k]["kept"]]
        by_reason: dict[str, int] = {}
        for r in removed:
            by_reason[r] = by_reason.get(r, 0) + 1
        planted[kind] = {
            "planted": len(keys),
            "removed": len(removed),
            "recall": len(removed) / len(keys) if keys else None,
            "expected_reason": reason,
            "by_reason": by_reason,
        }
    clean = [k for k, t in truth.items() if t["kind"] is None]
    groups: dict[str, list[str]] = {}
    for k, t in truth.items():
        if t["kind"] in ("exact_duplicate", "near_duplicate"):
            groups.setdefault(t["of"], [t["of"]]).append(k)
    one_kept = sum(sum(decisions[k]["kept"] for k in g) == 1 for g in groups.values())
    return {
        "stage": stage.name,
        "input": funnel["input"],
        "kept": funnel["kept"],
        "removed": funnel["removed"],
        "filters": [
            {k: f[k] for k in ("filter", "enabled", "entering", "leaving", "removed")} for f in funnel["filters"]
        ],
        "planted": planted,
        "clean": {"count": len(clean), "kept": sum(decisions[k]["kept"] for k in clean)},
        "clean_kept_share": sum(decisions[k]["kept"] for k in clean) / len(clean),
        "duplicate_groups": {"count": len(groups), "exactly_one_kept": one_kept},
        "throughput": funnel.get("throughput"),
    }


def quality_vs_quantity(staged: list[dict], raw: list[dict], curate: dict[str, Any] | None, raw_samples: int) -> dict:
    """Align on the curated shards vs the same align stage on the raw shards (same steps, seed, recipe)."""
    if not raw or curate is None:
        return {}
    keys = ("steps", "caption_accuracy", "colour_answer_accuracy", "shape_answer_accuracy", "eval_loss",
            "train_loss_last", "hallucination_rate")
    curated = next(r for r in staged if r["stage"] == "align")
    return {
        "raw": {"samples": raw_samples, **{k: raw[0].get(k) for k in keys}},
        "curated": {"samples": curate["kept"], **{k: curated.get(k) for k in keys}},
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quickstart (seed {report['seed']}): held-out quality per stage")
    cols = [
        ("stage", "stage"),
        ("steps", "steps"),
        ("loss first", "train_loss_first"),
        ("loss last", "train_loss_last"),
        ("wall s", "wall_seconds"),
        ("caption acc", "caption_accuracy"),
        ("answer acc", "answer_accuracy"),
        ("colour", "colour_answer_accuracy"),
        ("shape", "shape_answer_accuracy"),
        ("DPO reward acc", "reward_accuracy"),
        ("DPO margin", "reward_margin"),
        ("text ppl", "text_perplexity"),
        ("halluc.", "hallucination_rate"),
    ]
    for title, _ in cols:
        table.add_column(title, justify="left" if title == "stage" else "right")
    s0 = report["stage0"]
    table.add_row(
        "stage 0 (pretrained LM)", "", "", "", "", "", "", "", "", "", "", _fmt(s0["text_perplexity"], 2), ""
    )
    for r in report["stages"] + report["naive"] + report.get("raw", []):
        if r["job"] == report["job"]:
            name = r["stage"]
        elif r["job"] == RAW_JOB_NAME:
            name = f"{r['stage']} on the raw, uncurated set"
        else:
            name = f"{r['stage']} (baseline: all unfrozen, lr {r['lr']:g})"
        table.add_row(
            name, *[_fmt(r.get(k), 2 if k in ("text_perplexity", "wall_seconds") else 3) for _, k in cols[1:]]
        )
    console = Console(width=200)
    console.print(table)
    if report.get("curate"):
        print_curate(console, report["curate"])
    qq = report.get("quality_vs_quantity")
    if qq:
        console.print(
            "  quality vs quantity (align, same steps): "
            + "; ".join(
                f"{name} {d['samples']} pairs -> caption acc {_fmt(d['caption_accuracy'])}, held-out loss "
                f"{_fmt(d['eval_loss'])}"
                for name, d in qq.items()
            ),
            highlight=False,
        )
    ev = report.get("eval_stage")
    if ev:
        console.print(
            f"  eval stage {ev['stage']!r} (the job's last model, {ev['samples']} held-out prompts): answer accuracy "
            f"(exact match) {_fmt(ev['exact_match'])}",
            highlight=False,
        )
    h = report.get("hallucination", {})
    if h:
        console.print(
            "  hallucination (generated answers naming a colour or shape not in the image): "
            + ", ".join(f"{stage} {_fmt(rate)}" for stage, rate in h.items()),
            highlight=False,
        )
    print_checks(console, report["checks"])


def print_curate(console: Any, curate: dict[str, Any]) -> None:
    """The funnel (samples left after each filter) and the planted-noise scorecard."""
    from rich.table import Table

    funnel = Table(title=f"curate: {curate['input']} raw pairs -> {curate['kept']} kept")
    for title in ("filter", "entering", "removed", "leaving"):
        funnel.add_column(title, justify="left" if title == "filter" else "right")
    for f in curate["filters"]:
        if f["enabled"]:
            removed = ", ".join(f"{r} {n}" for r, n in f["removed"].items() if n) or "0"
            funnel.add_row(f["filter"], str(f["entering"]), removed, str(f["leaving"]))
    console.print(funnel)
    planted = Table(title="planted noise: share removed (by which filter)")
    for title in ("kind", "planted", "removed", "recall", "by filter"):
        planted.add_column(title, justify="left" if title in ("kind", "by filter") else "right")
    for kind, p in curate["planted"].items():
        by = ", ".join(f"{r} {n}" for r, n in sorted(p["by_reason"].items()))
        planted.add_row(kind, str(p["planted"]), str(p["removed"]), _fmt(p["recall"]), by)
    c, g = curate["clean"], curate["duplicate_groups"]
    planted.add_row("clean pairs (kept)", str(c["count"]), str(c["kept"]), _fmt(curate["clean_kept_share"]), "")
    console.print(planted)
    console.print(
        f"  duplicate groups with exactly one sample kept: {g['exactly_one_kept']} of {g['count']}", highlight=False
    )


def evaluate(qdir: str) -> int:
    """Measure, print and store the report; 2 if a stage output is missing, 1 if a gating check is missed."""
    with open(os.path.join(qdir, "quickstart.json")) as f:
        info = json.load(f)
    job = load_job(info["job"])
    naive_job = load_job(info["naive"]) if os.path.exists(info["naive"]) else None
    raw_job = load_job(info["raw"]) if os.path.exists(info.get("raw", "")) else None
    truth: dict[str, dict[str, Any]] = {}
    if info.get("raw_truth") and os.path.exists(info["raw_truth"]):
        with open(info["raw_truth"]) as f:
            truth = json.load(f)
    with open(info["heldout_text"]) as f:
        heldout_text = [line.strip() for line in f if line.strip()]
    heldout = {fmt: read_shards(paths) for fmt, paths in info["heldout_shards"].items()}
    stage0_ppl = text_perplexity(
        load_language_model(info["stage0"]["language_model"]), _tokenizer(info), heldout_text
    )
    with tempfile.TemporaryDirectory() as cache:
        try:
            staged = evaluate_job(job, heldout, heldout_text, cache)
            naive = evaluate_job(naive_job, heldout, heldout_text, cache) if naive_job else []
            raw = evaluate_job(raw_job, heldout, heldout_text, cache) if raw_job else []
            curate = curate_summary(job, truth) if truth else None
            evaluated = eval_stage_summary(job)
        except MissingStageOutput as err:
            print(f"evaluate: {err}")
            return 2
    with open(os.path.join(qdir, "stage0", "pretrain.json")) as f:
        pretrain = json.load(f)
    report = {
        "job": job.name,
        "seed": info["seed"],
        "stage0": {"text_perplexity": stage0_ppl, "pretrain": pretrain},
        "stages": staged,
        "naive": naive,
        "raw": raw,
        "curate": curate,
        "eval_stage": evaluated,
        "quality_vs_quantity": quality_vs_quantity(staged, raw, curate, len(truth)),
        "hallucination": {r["stage"]: r["hallucination_rate"] for r in staged},
        "checks": checks(stage0_ppl, staged, naive, curate),
    }
    uri = storage.join(contract.job_output(job.spec.storage.uri, job.name), contract.REPORT_FILE)
    storage.write_json(uri, report)
    print_report(report)
    print(f"report: {uri}")
    return exit_code(report["checks"])


def _tokenizer(info: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info["stage0"]["language_model"])
