"""The table of stage kinds: what each `stages[].type` is, torch-free.

One row per kind. The Python validation (vlm_core.spec) and the CRD's CEL rules (vlm_operator.crd) read
this table, the planner, estimator, admission and local report read it, and the trainer's registry
(vlm_trainer.stages) has one module per row. Adding a stage kind = one row here + one module there.

A row says what the operator side must know without importing the trainer: whether the stage trains
weights (and so hands them to the next training stage) or writes data (which a later stage reads with
`data.fromStage`), its defaults, the data formats it accepts, the fields only it has, and the facts the
FLOP/memory accounting and the data-size advice need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Output = Literal["weights", "shards"]


@dataclass(frozen=True)
class DataAdvice:
    """Published guidance on a stage's data size, turned into `vlmctl estimate` warnings."""

    min_samples: int | None = None  # fewer examples than this: warn (with `min_reason`)
    min_reason: str = ""
    max_samples: int | None = None  # more than this: warn (with `max_reason`)
    max_reason: str = ""
    max_epochs: float | None = None  # more passes than this: warn (with `epochs_reason`)
    epochs_reason: str = ""


@dataclass(frozen=True)
class StageKind:
    """One stage kind (`stages[].type`)."""

    type: str
    summary: str  # one line, for the CRD's description and the docs
    output: Output  # "weights": a model in final/ (the next training stage starts from it); "shards": data
    formats: tuple[str, ...] = ()  # accepted data.format values (training kinds)
    own_fields: tuple[str, ...] = ()  # wire names of stage fields only this kind may set (e.g. "dpo")
    default_trainable: tuple[str, ...] = ()
    default_lr: float | None = None
    default_projector_lr_multiplier: float | None = None
    sequences_per_sample: int = 1  # a preference pair runs two sequences (chosen, rejected)
    reference_model: bool = False  # holds a frozen reference policy (memory and FLOPs)
    scalar_head: bool = False  # a one-output head replaces the LM head (reward models): no vocab-sized logits
    packing: bool = False  # accepts batch.tokensPerMicroBatch (sequence packing)
    token_loss: bool = False  # a per-token LM loss (crossEntropy: labelled | chunked applies)
    generates: bool = False  # samples answers inside the stage (needs whole parameters on every rank)
    advice: DataAdvice = field(default_factory=DataAdvice)

    @property
    def trains(self) -> bool:
        """True for kinds that train weights (everything a `StageSpec` holds); False for data kinds."""
        return self.output == "weights"


KINDS: dict[str, StageKind] = {
    k.type: k
    for k in (
        StageKind(
            type="curate",
            summary="data curation: filter, deduplicate and balance raw image-text shards into curated shards",
            output="shards",
        ),
        # The field's standard recipe (LLaVA-1.5): align trains the projector only at 1e-3; instruct trains
        # LM + projector at 2e-5 (projector 10x); DPO trains the LM at a small lr against a frozen reference.
        StageKind(
            type="align",
            summary="vision-language alignment: the projector only, on caption data",
            output="weights",
            formats=("caption", "conversation", "interleaved"),
            default_trainable=("projector",),
            default_lr=1e-3,
            default_projector_lr_multiplier=1.0,
            packing=True,
            token_loss=True,
            advice=DataAdvice(max_epochs=1.0, epochs_reason="stage 1 (projector only) needs at most 1 epoch"),
        ),
        StageKind(
            type="instruct",
            summary="instruction tuning: language model + projector on conversations",
            output="weights",
            formats=("caption", "conversation", "interleaved"),
            default_trainable=("projector", "language_model"),
            default_lr=2e-5,
            default_projector_lr_multiplier=10.0,
            packing=True,
            token_loss=True,
            advice=DataAdvice(
                min_samples=100_000, min_reason="the guidance is 500K-1M (below 100K the model tends to overfit "
                "the format)",
                max_samples=5_000_000, max_reason="beyond 5M the returns are small (guidance 500K-1M)",
            ),
        ),
        StageKind(
            type="dpo",
            summary="preference alignment: Direct Preference Optimization against a frozen reference",
            output="weights",
            formats=("preference",),
            own_fields=("dpo",),
            default_trainable=("projector", "language_model"),
            default_lr=5e-6,
            default_projector_lr_multiplier=1.0,
            sequences_per_sample=2,
            reference_model=True,
        ),
        # reward (issue 22): the VLM with a scalar head on the last non-padding token, Bradley-Terry loss on the
        # preference pairs DPO reads (InstructGPT, LLaVA-RLHF); lr as TRL's reward examples (1e-5).
        StageKind(
            type="reward",
            summary="reward model: the VLM with a scalar head on the last token, Bradley-Terry loss on preference pairs",
            output="weights",
            formats=("preference",),
            own_fields=("reward",),
            default_trainable=("projector", "language_model"),
            default_lr=1e-5,
            default_projector_lr_multiplier=1.0,
            sequences_per_sample=2,
            scalar_head=True,
        ),
        # rl (issue 22): PPO or GRPO on answers the policy samples inside the stage; prompts are conversations
        # whose last assistant turn is the reference answer. TRL's GRPO default lr is 1e-6.
        StageKind(
            type="rl",
            summary="reinforcement learning: PPO or GRPO on sampled answers, rewards from a reward model or a "
            "verifier, KL to a frozen reference",
            output="weights",
            formats=("conversation",),
            own_fields=("rl",),
            default_trainable=("projector", "language_model"),
            default_lr=1e-6,
            default_projector_lr_multiplier=1.0,
            reference_model=True,
            generates=True,
        ),
    )
}

STAGE_TYPES: tuple[str, ...] = tuple(KINDS)
TRAINING_TYPES: tuple[str, ...] = tuple(t for t, k in KINDS.items() if k.trains)
DATA_TYPES: tuple[str, ...] = tuple(t for t, k in KINDS.items() if not k.trains)
FORMATS: tuple[str, ...] = tuple(dict.fromkeys(f for k in KINDS.values() for f in k.formats))  # every data.format


def with_trait(trait: str) -> tuple[str, ...]:
    """The training kinds whose boolean `trait` (packing, token_loss, reference_model) is true."""
    return tuple(t for t, k in KINDS.items() if k.trains and getattr(k, trait))


def number(x: float) -> str:
    """A default as the docs write it: 1e-3 -> '1e-3', 2.5e-5 -> '2.5e-5', 10.0 -> '10'."""
    if 0 < abs(x) < 0.01:
        mantissa, exp = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:g}"


def defaults_text(attr: str) -> str:
    """'align 0.001, instruct 2e-5, dpo 5e-6': a per-kind default, for field descriptions."""
    return ", ".join(f"{t} {number(getattr(k, attr))}" for t, k in KINDS.items() if k.trains)


def kind(stage_type: str) -> StageKind:
    """The row of `stage_type`; a KeyError names the accepted types."""
    try:
        return KINDS[stage_type]
    except KeyError:
        raise KeyError(f"unknown stage type {stage_type!r}; accepted: {', '.join(STAGE_TYPES)}") from None


def kinds_accepting(fmt: str) -> tuple[str, ...]:
    """The training kinds whose data may be in format `fmt`."""
    return tuple(t for t, k in KINDS.items() if fmt in k.formats)
