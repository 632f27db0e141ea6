"""Greedy generation on held-out shards, distributed over ranks, and its items (prompt, images, references).

The held-out samples are read in shard order and cut into batches of `batchSize` over the whole set; rank r
generates batches r, r + world, ... and the answers are gathered to rank 0 in the set's order. A batch holds
the same samples whatever the world size, so 1 rank and N ranks give the same answers (greedy, no sampling).

What a sample asks and what counts as right:
- conversation format: the prompt is every turn before the last assistant turn; the reference is that turn;
- caption format: the prompt is the image alone (as align trains it); the reference is the caption;
- json `answers` (a list of strings, or of {"answer": ...} as VQAv2 ships them) replaces the reference;
- json `task` (one of vlm_core.spec.evaluation.METRICS) picks the one metric that scores the sample, else
  the stage's `eval.metrics` all do; json `choices` names a multiple-choice sample's options (else the
  question's "A. ..." lines do).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from vlm_core.spec.evaluation import METRICS

from vlm_trainer.data import eval_samples
from vlm_trainer.evaluation.scoring import Scored, options_in
from vlm_trainer.samples import (
    IMAGE_TOKEN,
    SampleError,
    caption_messages,
    conversation_messages,
    decode_json,
    image_members,
    open_image,
)

log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    """One held-out sample made ready to generate: its position in the set, prompt, images and what scores it."""

    index: int
    key: str
    prompt: list[dict[str, str]]
    images: list[Image.Image]
    scored: Scored


def _answers(doc: dict[str, Any]) -> list[str] | None:
    raw = doc.get("answers")
    if not isinstance(raw, list) or not raw:
        return None
    out = [a.get("answer") if isinstance(a, dict) else a for a in raw]
    return [a for a in out if isinstance(a, str)] or None


def make_item(raw: dict[str, Any], index: int, fmt: str, metrics: list[str]) -> EvalItem:
    """The item of one raw sample; a SampleError names what is wrong with it."""
    key = str(raw.get("__key__"))
    members = image_members(raw)
    images = [open_image(raw, m) for m in members]
    if not images:
        raise SampleError(f"sample {key!r}: no image member", "no_image")
    doc = decode_json(raw) if "json" in raw else {}
    if fmt == "caption":
        messages = caption_messages(raw, len(images))
    else:
        messages = conversation_messages(raw, len(images))
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt, reference = messages[:last], messages[last]["content"]
    task = doc.get("task")
    if task is not None and task not in METRICS:
        raise SampleError(f"sample {key!r}: json task {task!r} is not a metric; accepted: {', '.join(METRICS)}",
                          "bad_json")
    chosen = [task] if isinstance(task, str) else list(metrics)
    choices = doc.get("choices")
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    options = [str(c) for c in choices] if isinstance(choices, list) else options_in(question.replace(IMAGE_TOKEN, ""))
    scored = Scored(key=key, prediction="", references=_answers(doc) or [reference], metrics=chosen, options=options,
                    prompt=question.replace(IMAGE_TOKEN, "").strip())
    return EvalItem(index, key, prompt, images, scored)


def my_batches(shards: list[str], *, fmt: str, metrics: list[str], batch_size: int, max_samples: int | None,
               rank: int, world: int, bad: list[str]) -> Iterator[list[EvalItem]]:
    """This rank's batches: the set's batches r, r + world, ...; bad samples are skipped (named in `bad`) on the
    rank whose batch holds them. Every rank reads the tar stream; only its own samples are decoded."""
    stream = eval_samples(shards, rank=0, world=1)
    if max_samples is not None:
        stream = itertools.islice(stream, max_samples)
    batch: list[EvalItem] = []
    for index, raw in enumerate(stream):
        if (index // batch_size) % world != rank:
            continue
        try:
            batch.append(make_item(raw, index, fmt, metrics))
        except SampleError as err:
            bad.append(f"{raw.get('__key__')}: {err}")
            log.warning("eval: skipped a bad sample (%s): %s", err.reason, err)
        if (index + 1) % batch_size == 0 and batch:
            yield batch
            batch = []
    if batch:
        yield batch


def render(processor: Any, prompt: list[dict[str, str]]) -> str:
    tokenizer = processor.tokenizer
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    return tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model: Any, processor: Any, items: list[EvalItem], *, max_new_tokens: int,
             device: torch.device) -> list[str]:
    """Greedy answers to a batch of prompts (left-padded), whitespace-normalised."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [render(processor, it.prompt) for it in items]
    images = [img for it in items for img in it.images]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    dtype = next(model.parameters()).dtype  # pixel values in the model's dtype (bf16 on GPU)
    enc = {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
           else v for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [" ".join(a.split()) for a in answers]


def evaluate_by_generation(model: Any, processor: Any, *, shards: list[str], fmt: str, metrics: list[str],
                           max_new_tokens: int, batch_size: int, max_samples: int | None, env: Any,
                           on_batch: Any = None) -> tuple[dict[str, Any], list[Scored]]:
    """Collective (every rank calls it): generate this rank's batches, gather every answer, score the set.
    Returns (metrics + bad-sample counts, the scored samples in the set's order), the same on every rank.
    `on_batch(done)` is called on each rank after each of its batches (progress)."""
    from vlm_trainer.evaluation.scoring import aggregate, score_sample
    from vlm_trainer.parallel import gather_objects

    was_training = model.training
    model.eval()
    bad: list[str] = []
    mine: list[tuple[int, Scored]] = []
    try:
        for batch in my_batches(shards, fmt=fmt, metrics=metrics, batch_size=batch_size, max_samples=max_samples,
                                rank=env.rank, world=env.world_size, bad=bad):
            answers = generate(model, processor, batch, max_new_tokens=max_new_tokens, device=env.device)
            for item, answer in zip(batch, answers, strict=True):
                item.scored.prediction = answer
                mine.append((item.index, item.scored))
            if on_batch is not None:
                on_batch(len(mine))
    finally:
        model.train(was_training)
    gathered = gather_objects((mine, bad), env)
    samples = [score_sample(s) for _, s in sorted((p for part, _ in gathered for p in part), key=lambda p: p[0])]
    bad_all = [b for _, part in gathered for b in part]
    return {**aggregate(samples), "bad_samples": len(bad_all), "bad_examples": bad_all[:5]}, samples
