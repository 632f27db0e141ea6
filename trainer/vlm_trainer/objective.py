"""The supervised objective (align, instruct): next-token cross-entropy on answer tokens only.

An objective returns a SUM over its units (label tokens here, preference pairs for DPO) plus summed
statistics; the loop divides by the global count of units across ranks and micro-batches, so a step's
gradient is the mean over the whole global batch however the samples are split.

Loss only where there are labels: most positions of a VLM batch are image or prompt tokens that carry no
label, yet a plain loop runs the LM head and the cross-entropy over all of them (the logits, micro batch x
sequence x vocab, are often the step's largest tensor). The objective asks the model for logits at the
labelled positions only (transformers' `logits_to_keep` with a tensor of positions: the LM runs to hidden
states, the head runs on the kept positions). The kept positions are the union over the rows of the
micro-batch (one index tensor for all rows), so rows whose label falls elsewhere are ignored exactly as
before: loss and gradients equal the full-logits loss (`tests/unit/test_objective.py`).
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


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors the model takes: ids, mask, pixels; `image_sizes` for LlavaNext (AnyRes);
    `position_ids` (and a mask that may be absent) for packed rows."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose logits predict a label (labels[:, t + 1] set in any row): a 1-D index tensor."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def labelled_logits(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, labelled_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets): the model's next-token logits (fp32) and the labels they predict, shape
    (batch, kept, vocab) and (batch, kept). With `labelled_only` the head runs at the labelled positions
    only; without it at every position but the last (the plain loop's full logits)."""
    if labelled_only:
        keep = labelled_positions(labels)
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
        return out.logits.float(), labels[:, keep + 1]
    out = model(**inputs, use_cache=False)
    return out.logits[:, :-1].float(), labels[:, 1:]


class CausalLMObjective:
    """Summed cross-entropy over labelled tokens (labels -100 elsewhere), computed where labels are."""

    stat_names: tuple[str, ...] = ()

    def __init__(self, *, labelled_only: bool = True):
        self.labelled_only = labelled_only

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, labels = labelled_logits(model, model_inputs(batch), batch["labels"], labelled_only=self.labelled_only)
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, {}
