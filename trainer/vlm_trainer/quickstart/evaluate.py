"""`evaluate`: held-out quality of every stage of the quickstart job and of the naive baseline.

Each stage's committed `final/` is loaded the way a user would load it
(`LlavaForConditionalGeneration.from_pretrained` + `AutoProcessor.from_pretrained`) and measured on
the held-out split:
- caption accuracy: greedy caption of each held-out image; right when it names the right colour and
  the right shape and no other colour or shape;
- answer accuracy: one colour question and one shape question per held-out image, greedy answer;
- text perplexity of the language model on held-out text documents (stage-0 LM before, each stage
  after, and the naive baseline): how much of its language the LM kept;
- from each stage's eval.json (written by the trainer): loss first/last, eval loss, wall time, and
  for dpo the implicit-reward accuracy and margin on held-out preference pairs.

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

from vlm_trainer import contract, storage
from vlm_trainer.quickstart.pretrain import load_language_model, text_perplexity
from vlm_trainer.quickstart.shapes import read_shards
from vlm_trainer.quickstart.vocab import CAPTION_PROMPTS, COLOUR_QUESTIONS, COLOURS, SHAPE_QUESTIONS, SHAPES
from vlm_trainer.spec import VLMTrainingJob, load_job

# The claims, checked on every report (`--strict` turns a miss into a non-zero exit).
THRESHOLDS = {
    "caption_accuracy_after_align": 0.90,
    "answer_accuracy_after_instruct": 0.90,
    "caption_accuracy_after_instruct": 0.90,
    "dpo_reward_accuracy": 0.85,
    "dpo_reward_margin": 0.0,
    "perplexity_ratio_staged_over_before_max": 1.25,
    "perplexity_ratio_naive_over_staged_min": 3.0,
}


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
    stage: LoadedStage, images: list, questions: list[str | None], batch: int = 100
) -> list[str]:
    """Greedy answers to one-turn prompts (`None` = the caption prompt of the caption format)."""
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
            do_sample=False,
            pad_token_id=proc.tokenizer.pad_token_id,
            eos_token_id=proc.tokenizer.eos_token_id,
        )
        out += proc.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(a.split()) for a in out]


def names(text: str, vocab: tuple[str, ...]) -> set[str]:
    return {w for w in text.split() if w in vocab}


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
    return {
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
    for i, spec in enumerate(job.spec.stages):
        output = contract.stage_output(job.spec.storage.uri, job.name, job.spec.stages[i].name)
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
        if spec.type == "dpo":
            row["reward_accuracy"] = ev.get("reward_accuracy")
            row["reward_margin"] = ev.get("reward_margin")
        row.update(
            measure_stage(
                load_final(storage.join(output, contract.FINAL_DIR), cache_dir), heldout, heldout_text
            )
        )
        rows.append(row)
    return rows


def checks(stage0_ppl: float, staged: list[dict], naive: list[dict]) -> dict[str, dict[str, Any]]:
    """The issue's quality claims, each with its value, threshold and verdict."""
    by = {r["stage"]: r for r in staged}
    final_ppl = staged[-1]["text_perplexity"]
    got = {
        "caption_accuracy_after_align": by["align"]["caption_accuracy"],
        "answer_accuracy_after_instruct": by["instruct"]["answer_accuracy"],
        "caption_accuracy_after_instruct": by["instruct"]["caption_accuracy"],
        "dpo_reward_accuracy": by["dpo"].get("reward_accuracy"),
        "dpo_reward_margin": by["dpo"].get("reward_margin"),
        "perplexity_ratio_staged_over_before_max": final_ppl / stage0_ppl,
        "perplexity_ratio_naive_over_staged_min": naive[-1]["text_perplexity"] / final_ppl if naive else None,
    }
    out = {}
    for name, threshold in THRESHOLDS.items():
        value = got[name]
        if value is None:
            ok = False
        elif name.endswith("_max"):
            ok = value <= threshold
        elif name == "dpo_reward_margin":
            ok = value > threshold
        else:
            ok = value >= threshold
        out[name] = {"value": value, "threshold": threshold, "ok": ok}
    return out


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
    ]
    for title, _ in cols:
        table.add_column(title, justify="left" if title == "stage" else "right")
    s0 = report["stage0"]
    table.add_row(
        "stage 0 (pretrained LM)", "", "", "", "", "", "", "", "", "", "", _fmt(s0["text_perplexity"], 2)
    )
    for r in report["stages"] + report["naive"]:
        name = (
            r["stage"]
            if r["job"] == report["job"]
            else f"{r['stage']} (baseline: all unfrozen, lr {r['lr']:g})"
        )
        table.add_row(
            name, *[_fmt(r.get(k), 2 if k in ("text_perplexity", "wall_seconds") else 3) for _, k in cols[1:]]
        )
    console = Console(width=200)
    console.print(table)
    for name, c in report["checks"].items():
        mark = "ok  " if c["ok"] else "MISS"
        console.print(f"  {mark} {name}: {_fmt(c['value'])} (threshold {c['threshold']:g})", highlight=False)


def evaluate(qdir: str, strict: bool = False) -> int:
    """Measure, print and store the report; non-zero if a stage output is missing (or, strict, a claim fails)."""
    with open(os.path.join(qdir, "quickstart.json")) as f:
        info = json.load(f)
    job = load_job(info["job"])
    naive_job = load_job(info["naive"]) if os.path.exists(info["naive"]) else None
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
        "checks": checks(stage0_ppl, staged, naive),
    }
    uri = storage.join(contract.job_output(job.spec.storage.uri, job.name), contract.REPORT_FILE)
    storage.write_json(uri, report)
    print_report(report)
    print(f"report: {uri}")
    if strict and not all(c["ok"] for c in report["checks"].values()):
        return 1
    return 0


def _tokenizer(info: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info["stage0"]["language_model"])
