"""The eval stage's settings (`stages[].eval`, type eval only): which metrics, how long the answers, which model.

Which metric scores which sample: a held-out sample whose json has a `task` key (one of METRICS) is scored by
that metric alone; every other sample is scored by each metric in `eval.metrics`. The reference answer is the
sample's last assistant turn (conversation format) or its caption (caption format); a json `answers` list
(VQAv2's ten human answers, or several reference captions) replaces it, and a json `choices` list (or the
options in the question, "A. ...") names the options of a multiple-choice sample.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator

from vlm_core import validators
from vlm_core.spec.base import ContentOf, NoEffect, Strict

Metric = Literal["vqa", "exact_match", "relaxed", "multiple_choice", "pope", "caption"]
METRICS: tuple[str, ...] = get_args(Metric)


def _default_metrics() -> list[Metric]:
    return ["exact_match"]


METRIC_WORDS = {
    "vqa": "VQAv2 accuracy (min(1, matching human answers / 3), averaged over the 10 leave-one-out subsets, after "
    "the VQAv2 answer normalisation; needs the json `answers` list)",
    "exact_match": "exact match after the VQAv2 answer normalisation",
    "relaxed": "relaxed accuracy (ChartQA: a numeric answer within 5% of the reference, else exact match)",
    "multiple_choice": "multiple-choice accuracy (the option letter or the option text parsed from the answer)",
    "pope": "POPE yes/no probe: accuracy, precision, recall, F1 (yes = positive) and yes-ratio",
    "caption": "CIDEr and BLEU-4 (pycocoevalcap's scorers) over the json `answers` (or the one reference)",
}


class EvalSpec(Strict):
    """An eval stage: greedy generation on its data.shards (held-out), scored by the field's standard metrics."""

    metrics: list[Metric] = Field(
        default_factory=_default_metrics, min_length=1,
        description="Metrics for samples without a json `task` key (a sample's `task` picks its one metric): "
        + "; ".join(f"{k}: {v}" for k, v in METRIC_WORDS.items()) + ".",
    )
    max_new_tokens: int = Field(16, gt=0, le=4096, description="Most tokens generated per answer (greedy).")
    max_samples: int | None = Field(
        None, gt=0, le=10**9, description="Evaluate the first N held-out samples (in shard order) only; default all."
    )
    batch_size: Annotated[int, NoEffect("batches are formed over the whole set in order, so the answers do not "
                                        "depend on the world size; left padding does not change greedy answers")] = \
        Field(16, gt=0, le=4096, description="Prompts generated together per rank.")
    model: Annotated[str | None, ContentOf("checkpoint")] = Field(
        None, description="A committed final/ (any stage's, any job's) to evaluate instead of the previous training "
        "stage's final/ (spec.model's assembled model when there is none).",
    )

    @field_validator("model")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return validators.input_uris([v])[0] if v is not None else None

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[Metric]) -> list[Metric]:
        return list(dict.fromkeys(v))


_REPORTS = NoEffect("evaluation by generation only reports on the weights; they do not depend on it")


class EvaluationSpec(Strict):
    """A training stage's evaluation by generation (`stages[].evaluation`): greedy answers of the model being
    trained on held-out shards, scored like an eval stage's, at the end of the stage and every `everySteps`.
    Nothing in it changes the weights, so it does not count in the stage's fingerprint."""

    shards: Annotated[list[str], _REPORTS] = Field(
        min_length=1, description="Held-out WebDataset shards (brace patterns allowed; relative ones resolve against "
        "spec.storage.uri), read as an eval stage reads its data.shards.")
    format: Annotated[Literal["caption", "conversation"], _REPORTS] = Field(
        "conversation", description="The held-out samples' format (caption or conversation).")
    every_steps: Annotated[int | None, _REPORTS] = Field(
        None, gt=0, le=10**9, description="Also every this many optimizer steps (default: at the end only).")
    metrics: Annotated[list[Metric], _REPORTS] = Field(
        default_factory=_default_metrics, min_length=1, description="As eval.metrics.")
    max_new_tokens: Annotated[int, _REPORTS] = Field(16, gt=0, le=4096, description="As eval.maxNewTokens.")
    max_samples: Annotated[int | None, _REPORTS] = Field(None, gt=0, le=10**9, description="As eval.maxSamples.")
    batch_size: Annotated[int, _REPORTS] = Field(16, gt=0, le=4096, description="As eval.batchSize.")

    @field_validator("shards")
    @classmethod
    def _uris(cls, v: list[str]) -> list[str]:
        return validators.input_uris(v)
