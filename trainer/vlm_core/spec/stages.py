"""The training stage (align, instruct, dpo, ...): what trains, on which data, how long, how distributed.

Defaults by kind come from the kinds table (vlm_core.kinds); the cross-field rules from vlm_core.spec.rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from pydantic import Field, model_validator

from vlm_core import kinds, strategies
from vlm_core.spec.common import StageBase
from vlm_core.spec.data import DataSpec
from vlm_core.spec.rl import RLSpec
from vlm_core.spec.rules import stage_rule_problems
from vlm_core.spec.training_parts import (
    DEFAULT_CROSS_ENTROPY,
    BatchSpec,
    CheckpointSpec,
    CrossEntropy,
    DPOSpec,
    LoRASpec,
    OptimizerSpec,
    RewardSpec,
    ScheduleSpec,
)
from vlm_core.strategies import or_list

if TYPE_CHECKING:  # the type checker sees strings; pydantic sees the tables' names as Literals
    StageType = str
    Strategy = str
    Offload = str
else:
    StageType = Literal[kinds.TRAINING_TYPES]  # training stages (StageSpec); curate is a CurateStage
    Strategy = Literal[strategies.STRATEGIES]
    Offload = Literal[strategies.OFFLOADS]
TrainablePart = Literal["projector", "language_model", "vision_tower"]  # a VLM's three parts
TRAINABLE_PARTS: tuple[str, ...] = get_args(TrainablePart)
Precision = Literal["bf16", "fp32"]


def _owners(field: str) -> tuple[str, ...]:
    """The kinds that own a stage field (kinds table: own_fields)."""
    return tuple(t for t, k in kinds.KINDS.items() if field in k.own_fields)


class StageSpec(StageBase):
    """One stage: what trains, on which data, how long, how distributed."""

    type: StageType = Field(description="; ".join(f"{t}: {k.summary}" for t, k in kinds.KINDS.items())
                            + f". {or_list(kinds.DATA_TYPES)} stages have their own fields (see input, filters, output).")
    data: DataSpec
    trainable: list[TrainablePart] | None = Field(
        None, description="Parts that train; everything else is frozen. Default by type."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    max_steps: int | None = Field(None, gt=0, le=1_000_000_000, description="Optimizer steps; exactly one of maxSteps or epochs.")
    epochs: float | None = Field(None, gt=0, le=10_000, description="Passes over the data; exactly one of maxSteps or epochs.")
    precision: Precision = Field(
        "bf16",
        description="bf16 or fp32 compute. bf16 on CUDA: autocast (ddp), bf16 compute with fp32 reduce (fsdp), "
        "DeepSpeed bf16 (zero2/zero3); master weights and optimizer state stay fp32. CPU runs compute in fp32.",
    )
    strategy: Strategy = Field(
        strategies.DEFAULT_STRATEGY,
        description="How the model is spread over processes: "
        + or_list([f"{n} ({t.summary})" for n, t in strategies.TRAITS.items()]) + ".",
    )
    offload: Offload = Field(
        strategies.NO_OFFLOAD,
        description=f"CPU offload: none, optimizer (optimizer state in host memory; strategy "
        f"{or_list(strategies.allowing_offload('optimizer'))}) or optimizer_and_params (parameters too; strategy "
        f"{or_list(strategies.allowing_offload('optimizer_and_params'))}).",
    )
    lora: LoRASpec | None = Field(
        None, description="Train PEFT LoRA adapters on the language model instead of its full weights."
    )
    qlora: bool = Field(
        False,
        description="QLoRA: the frozen base in 4-bit NF4 with double quantisation (bitsandbytes), bf16 compute, "
        f"paged AdamW. Needs lora and CUDA GPUs (resources.gpusPerNode > 0); strategy {or_list(strategies.supporting('lora'))} "
        "only.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (LM and vision encoder; torchtitan's order: after "
        f"activation checkpointing, before the strategy wraps the model). Strategy {or_list(strategies.supporting('compile'))} "
        "only.",
    )
    cache_vision_features: bool = Field(
        False,
        description="Compute the frozen vision tower's features once per image and reuse them across epochs and "
        "later stages with the same encoder and image transform (stored under <storage.uri>/<job>/vision-features/"
        "<encoder fingerprint>/). Needs a frozen vision tower (vision_tower not in trainable) and strategy "
        f"{or_list(strategies.supporting('cache_vision_features'))}.",
    )
    cross_entropy: CrossEntropy = Field(
        DEFAULT_CROSS_ENTROPY,
        description=f"How the LM head and cross-entropy run ({'/'.join(kinds.with_trait('token_loss'))}): labelled (the head "
        "on the labelled "
        "positions only) or chunked (also over chunks of those positions, so the logits tensor is never held "
        "whole; Liger-Kernel's fused kernel on CUDA when installed). Equal loss and gradients.",
    )
    dpo: DPOSpec | None = Field(None, description=f"DPO settings (type {or_list(_owners('dpo'))} only).")
    reward: RewardSpec | None = Field(None, description=f"Reward-model settings (type {or_list(_owners('reward'))} only).")
    rl: RLSpec | None = Field(None, description=f"PPO/GRPO settings (type {or_list(_owners('rl'))} only).")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)

    @model_validator(mode="after")
    def _defaults_and_rules(self) -> StageSpec:
        k = kinds.kind(self.type)
        if self.trainable is None:
            self.trainable = list(k.default_trainable)  # type: ignore[arg-type]
        if self.optimizer.lr is None:
            self.optimizer.lr = k.default_lr
        if self.optimizer.projector_lr_multiplier is None:
            self.optimizer.projector_lr_multiplier = k.default_projector_lr_multiplier
        if "dpo" in k.own_fields and self.dpo is None:
            self.dpo = DPOSpec()
        if "reward" in k.own_fields and self.reward is None:
            self.reward = RewardSpec()
        if "rl" in k.own_fields and self.rl is None:
            self.rl = RLSpec()
        problems = stage_rule_problems(self.model_dump(by_alias=True))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.batch.global_size // (self.batch.micro_size * self.world_size)
