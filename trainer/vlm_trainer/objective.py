"""The supervised objective (align, instruct): next-token cross-entropy on answer tokens only.

An objective returns a SUM over its units (label tokens here, preference pairs for DPO) plus summed
statistics; the loop divides by the global count of units across ranks and micro-batches, so a step's
gradient is the mean over the whole global batch however the samples are split.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vlm_trainer.samples import IGNORE_INDEX


class Objective(Protocol):
    stat_names: tuple[str, ...]

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class CausalLMObjective:
    """Summed cross-entropy over labelled tokens (labels -100 elsewhere)."""

    stat_names: tuple[str, ...] = ()

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            **{k: batch[k] for k in ("image_sizes",) if k in batch},  # LlavaNext (AnyRes) needs each image's size
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, {}
