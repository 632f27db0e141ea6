"""The hallucination variant's data and scoring: a language prior the image must overpower.

In the training data (the language model's stage-0 documents, the align captions, the instruct
conversations) each colour nearly always comes with one shape (`PRIOR_SHAPE`, at `pairing` = 0.95 of
the samples); the held-out images and the pool the on-policy preference pairs are built from break the
pairing (every colour with every shape, uniformly). A model that leans on the prior names the prior's
shape for a red square: a hallucination the image contradicts. The vision encoder is pretrained on
uniform pairs (a CLIP "pretrained elsewhere", as in the default quickstart), so the image does carry
the shape; what the VLM learns to trust is the question.

Also here, pure functions of answers and ground truth:
- the questions asked about an image (`questions_for`) and whether an answer is right
  (`correct`) or names what is not in the image (`hallucinated`);
- the on-policy preference pairs (`onpolicy_pairs`): the model's own wrong answer rejected, one of its
  own right answers (else the reference answer) chosen, as RLAIF-V and LLaVA-RLHF build them;
- a POPE-style yes/no probe (Li et al. 2023, "adversarial" negatives: the shape the prior suggests)
  and its precision / recall / F1 / yes-ratio (`pope_scores`, "yes" is the positive class; an answer
  is "no" when it says no or not, as POPE's own evaluation reads answers).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_quickstart.shapes import (
    BARE_CAPTION_SHARE,
    ShapeSample,
    _turn,
    _write_format,
    document_about,
    draw_shape,
    split_seed,
)
from vlm_quickstart.vocab import (
    CAPTION_PROMPTS,
    COLOUR_QUESTIONS,
    COLOURS,
    SHAPE_QUESTIONS,
    SHAPES,
    caption_of,
)

# Each colour's usual shape in the training data (the language prior).
PRIOR_SHAPE: dict[str, str] = {"red": "circle", "green": "square", "blue": "triangle", "yellow": "square"}
TRAIN_PAIRING = 0.98  # share of training samples whose shape is their colour's prior shape
UNIFORM = 1.0 / len(SHAPES)  # a pairing rate of 1/3: every shape equally likely (the prior broken)
YES, NO = "yes", "no"
EXTRA_WORDS: tuple[str, ...] = (YES, NO)  # the variant's words beyond the quickstart vocabulary
PROBE_QUESTION = "is there a {} ?"
KINDS = ("caption", "prompted_caption", "colour", "shape", "probe_yes", "probe_no")


def draw_prior_shape(rng: np.random.Generator, colour: str, pairing: float) -> str:
    """The colour's prior shape with probability `pairing`, else one of the others uniformly."""
    if rng.random() < pairing:
        return PRIOR_SHAPE[colour]
    others = [s for s in SHAPES if s != PRIOR_SHAPE[colour]]
    return others[int(rng.integers(len(others)))]


def on_prior(colour: str, shape: str) -> bool:
    return PRIOR_SHAPE[colour] == shape


def make_prior_samples(split: str, n: int, seed: int, pairing: float) -> list[ShapeSample]:
    """`n` samples of `split`: colours uniform, shapes by `draw_prior_shape` (pairing 1/3 = uniform)."""
    rng = np.random.default_rng(split_seed(seed, f"prior/{split}"))
    out = []
    for i in range(n):
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        shape = draw_prior_shape(rng, colour, pairing)
        buf = io.BytesIO()
        draw_shape(rng, colour, shape).save(buf, format="PNG")
        out.append(ShapeSample(key=f"{split}-{i:06d}", colour=colour, shape=shape, png=buf.getvalue()))
    return out


def adversarial_shape(rng: np.random.Generator, colour: str, shape: str) -> str:
    """A shape not in the image for a "no" probe: the prior's shape where it is absent (POPE's adversarial
    negative: the object that usually co-occurs), else another shape at random."""
    if PRIOR_SHAPE[colour] != shape:
        return PRIOR_SHAPE[colour]
    others = [s for s in SHAPES if s != shape]
    return others[int(rng.integers(len(others)))]


def probe_turn(rng: np.random.Generator, s: ShapeSample) -> tuple[str, str]:
    """A yes/no question: half ask for the image's shape ("yes"), half for an adversarial absent one ("no")."""
    if rng.random() < 0.5:
        return PROBE_QUESTION.format(s.shape), YES
    return PROBE_QUESTION.format(adversarial_shape(rng, s.colour, s.shape)), NO


def conversation_record(rng: np.random.Generator, s: ShapeSample) -> dict:
    """As the quickstart's conversations (a quarter bare captions; else one to three turns), with yes/no
    probes among the turn kinds so the model learns to answer them."""
    if rng.random() < BARE_CAPTION_SHARE:
        conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": s.caption}]
        return {"conversations": conv, "colour": s.colour, "shape": s.shape}
    kinds = ["caption", "colour", "shape", "probe"]
    order = [kinds[int(j)] for j in rng.permutation(len(kinds))][: int(rng.integers(1, 4))]
    conv = []
    for t, kind in enumerate(order):
        question, answer = probe_turn(rng, s) if kind == "probe" else _turn(rng, s, kind)
        conv.append({"role": "user", "content": f"<image>\n{question}" if t == 0 else question})
        conv.append({"role": "assistant", "content": answer})
    return {"conversations": conv, "colour": s.colour, "shape": s.shape}


def write_prior_shards(out_dir: str, split: str, n: int, seed: int, pairing: float, per_shard: int = 500) -> list[str]:
    """`n` samples of `split` at `pairing` in the caption and conversation formats (same inputs -> same bytes)."""
    os.makedirs(out_dir, exist_ok=True)
    samples = make_prior_samples(split, n, seed, pairing)
    rng = np.random.default_rng(split_seed(seed, f"prior/{split}/text"))
    records = {
        "caption": [{"caption": s.caption, "colour": s.colour, "shape": s.shape} for s in samples],
        "conversation": [conversation_record(rng, s) for s in samples],
    }
    paths: list[str] = []
    for fmt in ("caption", "conversation"):
        paths += _write_format(out_dir, split, fmt, samples, records[fmt], per_shard)
    return paths


def text_document(rng: np.random.Generator, pairing: float) -> str:
    """The quickstart's stage-0 document form (`shapes.text_document`) with the prior's pairing and yes/no
    probes among its chat turns: the language model's prior comes from here."""
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    shape = draw_prior_shape(rng, colour, pairing)
    s = ShapeSample(key="", colour=colour, shape=shape, png=b"")
    return document_about(rng, s, ("caption", "colour", "shape", "probe"),
                          lambda kind: probe_turn(rng, s) if kind == "probe" else _turn(rng, s, kind))


def text_documents(n: int, seed: int, pairing: float, split: str = "text") -> list[str]:
    rng = np.random.default_rng(split_seed(seed, f"prior/{split}"))
    return [text_document(rng, pairing) for _ in range(n)]


# --- questions, answers, judgement -------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One question about one image, and the truth to judge its answers by."""

    kind: str  # one of KINDS
    question: str | None  # the user turn after "<image>\n"; None = the bare caption prompt
    colour: str
    shape: str
    probed: str | None = None  # the shape a yes/no probe asks about

    @property
    def prompt(self) -> str:
        return "<image>" if self.question is None else f"<image>\n{self.question}"

    @property
    def reference(self) -> str:
        """The right answer in the form the training data writes it."""
        if self.kind in ("caption", "prompted_caption"):
            return caption_of(self.colour, self.shape)
        if self.kind == "colour":
            return self.colour
        if self.kind == "shape":
            return self.shape
        return YES if self.probed == self.shape else NO


def questions_for(rng: np.random.Generator, colour: str, shape: str, index: int) -> list[Question]:
    """Every kind of question about one image: bare and prompted caption, colour, shape, a "yes" probe
    and an adversarial "no" probe. Templates rotate with `index` (as the quickstart's evaluation does)."""
    return [
        Question("caption", None, colour, shape),
        Question("prompted_caption", CAPTION_PROMPTS[index % len(CAPTION_PROMPTS)], colour, shape),
        Question("colour", COLOUR_QUESTIONS[index % len(COLOUR_QUESTIONS)], colour, shape),
        Question("shape", SHAPE_QUESTIONS[index % len(SHAPE_QUESTIONS)], colour, shape),
        Question("probe_yes", PROBE_QUESTION.format(shape), colour, shape, probed=shape),
        Question("probe_no", PROBE_QUESTION.format(a := adversarial_shape(rng, colour, shape)), colour, shape, probed=a),
    ]


def rl_prompt_record(q: Question) -> dict:
    """An `rl` stage prompt: a one-turn conversation whose last assistant turn is the reference answer (what the
    exact-match verifier compares sampled answers with; dropped from the prompt by the stage)."""
    conv = [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.reference}]
    return {"conversations": conv, "colour": q.colour, "shape": q.shape, "kind": q.kind}


def names(text: str, vocab: tuple[str, ...]) -> set[str]:
    return {w for w in text.split() if w in vocab}


def yes_no(answer: str) -> str:
    """POPE's reading of an answer: "no" when it says no or not, else "yes"."""
    words = answer.replace(".", " ").replace(",", " ").lower().split()
    return NO if NO in words or "not" in words else YES


def correct(q: Question, answer: str) -> bool:
    if q.kind in ("caption", "prompted_caption"):
        return names(answer, COLOURS) == {q.colour} and names(answer, SHAPES) == {q.shape}
    if q.kind == "colour":
        return names(answer, COLOURS) == {q.colour}
    if q.kind == "shape":
        return names(answer, SHAPES) == {q.shape}
    return yes_no(answer) == q.reference


def hallucinated(q: Question, answer: str) -> bool:
    """The answer names a colour or a shape that is not the image's (for a probe: says yes to an absent shape)."""
    if q.kind in ("probe_yes", "probe_no"):
        return q.probed != q.shape and yes_no(answer) == YES
    return bool(names(answer, COLOURS) - {q.colour} or names(answer, SHAPES) - {q.shape})


def onpolicy_pairs(q: Question, answers: list[str]) -> list[dict[str, str]]:
    """Preference pairs from the model's own answers to `q` (greedy first, then samples).

    Each distinct wrong (non-empty) answer is a rejected answer; the chosen one is the model's own first right answer
    when it gave one (on-policy, as RLAIF-V), else the reference answer. No wrong answer, no pair.
    """
    right = [a for a in answers if a and correct(q, a)]
    chosen = right[0] if right else q.reference
    wrong = list(dict.fromkeys(a for a in answers if a and not correct(q, a)))
    return [{"prompt": q.prompt, "chosen": chosen, "rejected": a} for a in wrong if a != chosen]


def pope_scores(answers: list[str], truth: list[bool]) -> dict[str, float]:
    """POPE's metrics of yes/no answers against whether the probed object is present ("yes" = positive)."""
    said = [yes_no(a) == YES for a in answers]
    tp = sum(s and t for s, t in zip(said, truth, strict=True))
    fp = sum(s and not t for s, t in zip(said, truth, strict=True))
    fn = sum(not s and t for s, t in zip(said, truth, strict=True))
    tn = len(said) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(said),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(said) / len(said),
        "false_yes_rate": fp / (fp + tn) if fp + tn else 0.0,
    }


def rates(judged: list[tuple[Question, str]]) -> dict[str, Any]:
    """Hallucination rate and accuracy of generated answers, overall and on images that keep / break the prior.

    The rate counts the quickstart's four generated answers per image (bare caption, prompted caption,
    colour, shape), as `evaluate.measure_stage` does; the probes are scored by `pope_scores`.
    """
    gen = [(q, a) for q, a in judged if q.kind in ("caption", "prompted_caption", "colour", "shape")]

    def rate(items: list[tuple[Question, str]]) -> float | None:
        return sum(hallucinated(q, a) for q, a in items) / len(items) if items else None

    def acc(kind: str) -> float:
        items = [(q, a) for q, a in gen if q.kind == kind]
        return sum(correct(q, a) for q, a in items) / len(items)

    answers = [(q, a) for q, a in gen if q.kind in ("colour", "shape")]
    probes = [(q, a) for q, a in judged if q.kind in ("probe_yes", "probe_no")]
    pope = pope_scores([a for _, a in probes], [q.probed == q.shape for q, _ in probes]) if probes else {}
    return {
        "hallucination_rate": rate(gen),
        "hallucination_rate_prior_kept": rate([(q, a) for q, a in gen if on_prior(q.colour, q.shape)]),
        "hallucination_rate_prior_broken": rate([(q, a) for q, a in gen if not on_prior(q.colour, q.shape)]),
        "answers_generated": len(gen),
        "answer_accuracy": sum(correct(q, a) for q, a in answers) / len(answers),
        "colour_answer_accuracy": acc("colour"),
        "shape_answer_accuracy": acc("shape"),
        "caption_accuracy": acc("caption"),
        "prompted_caption_accuracy": acc("prompted_caption"),
        "pope": pope,
    }
