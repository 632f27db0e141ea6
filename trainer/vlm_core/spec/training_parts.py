"""The settings a training stage is made of: optimizer, schedule, batch, DPO, LoRA and checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from vlm_core import kinds
from vlm_core.spec.base import BOUND_REASONS, NoEffect, Strict

DPOReference = Literal["auto", "sharded", "adapter_disabled"]
CrossEntropy = Literal["labelled", "chunked"]  # stages[].crossEntropy, for kinds with a per-token loss
DEFAULT_CROSS_ENTROPY: CrossEntropy = "labelled"


class OptimizerSpec(Strict):
    """AdamW settings. The projector's learning rate is lr * projectorLrMultiplier."""

    lr: float | None = Field(None, description=f"Peak learning rate; default by stage type ({kinds.defaults_text('default_lr')}).")
    projector_lr_multiplier: float | None = Field(
        None, description="Projector lr = lr x this; default by stage type "
        f"({kinds.defaults_text('default_projector_lr_multiplier')})."
    )
    weight_decay: float = Field(0.0, ge=0, le=1)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Max global grad norm; 0 disables clipping.")

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        if v is not None and v > 1:
            raise ValueError(f"must be at most 1 ({BOUND_REASONS['lr']}), got {v:g}")
        return v

    @field_validator("projector_lr_multiplier")
    @classmethod
    def _mult_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        if v is not None and v > 1000:
            raise ValueError(f"must be at most 1000 ({BOUND_REASONS['projectorLrMultiplier']}), got {v:g}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        for b in v:
            if not 0 <= b < 1:
                raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class ScheduleSpec(Strict):
    """Learning-rate schedule: linear warmup, then cosine (or constant) decay."""

    type: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent in linear warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the peak lr.")


class BatchSpec(Strict):
    """Global batch = micro batch x world size x gradient-accumulation steps."""

    global_size: int = Field(32, gt=0, le=65536, description="Samples per optimizer step across all ranks.")
    micro_size: int = Field(8, gt=0, le=65536, description="Samples per forward/backward on one rank.")
    tokens_per_micro_batch: int | None = Field(
        None, gt=0, le=10_000_000, description="Sequence packing: instead of microSize samples padded to the "
        "longest, each forward/backward takes one row packed with whole samples, in order, up to this many tokens "
        "(image tokens count; no attention across samples; loss as unpacked). Must be >= data.maxLength. Steps "
        f"still take globalSize / (microSize x world size) micro-batches. {'/'.join(kinds.with_trait('packing'))} only.",
    )


class DPOSpec(Strict):
    """Direct Preference Optimization (Rafailov et al. 2023) with a frozen reference model."""

    beta: float = Field(0.1, gt=0, le=100, description="KL strength; the implicit reward is beta * log-ratio.")
    reference: DPOReference = Field(
        "auto",
        description="Where the frozen reference's log-probs come from. sharded: a second copy of the "
        "starting weights, placed by the stage's strategy like the policy (FSDP/ZeRO-3 shard it); "
        "adapter_disabled: the policy with its "
        "LoRA adapter switched off (lora stages only). auto: adapter_disabled with lora, else sharded.",
    )

    def resolved_reference(self, *, lora: bool) -> str:
        """`reference` with `auto` resolved: the adapter-disabled policy for LoRA, else a sharded copy (the one
        rule the trainer and the estimator both apply)."""
        if self.reference != "auto":
            return self.reference
        return "adapter_disabled" if lora else "sharded"


class RewardSpec(Strict):
    """Reward model (`reward` stages): Bradley-Terry on preference pairs, with an optional margin."""

    margin: float = Field(
        0.0, ge=0, le=100,
        description="Reward gap the chosen answer must clear: loss = -log sigmoid(r_chosen - r_rejected - margin) "
        "(Llama 2's margin loss); 0 is the plain Bradley-Terry loss.",
    )


class LoRASpec(Strict):
    """PEFT LoRA on the language model: frozen base weights plus trainable low-rank adapters."""

    rank: int = Field(16, gt=0, le=4096, description="LoRA rank r of each adapter.")
    alpha: float = Field(32.0, gt=0, le=65536, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names (last path component) of the language model that get adapters; default "
        "the LM's attention and MLP projections. Vision-tower modules get adapters only if 'vision_tower' "
        "is in stage.trainable. The projector is always fully trained (PEFT modules_to_save).",
    )


class CheckpointSpec(Strict):
    """Resumable checkpoints under <output>/checkpoint-<step>/ (manifest.json written last)."""

    every_steps: Annotated[int, NoEffect("resume is exact, so where checkpoints fall does not change the result")] = Field(100, gt=0, le=1_000_000_000, description="Save a resumable checkpoint every N optimizer steps.")
    keep_last: Annotated[int, NoEffect("checkpoints kept")] = Field(2, gt=0, le=1000, description="Committed checkpoints kept; older ones are deleted.")
