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

Chunked linear-cross-entropy (`stage.crossEntropy: chunked`): the LM head and the cross-entropy run together
over chunks of `CHUNK_ROWS` labelled positions, inside the model's forward (the head module's forward, so
DDP/FSDP2/ZeRO-3 see the head used as usual), and each chunk's gradients (softmax minus one-hot, through
the head) are formed right there: no logits tensor larger than one chunk ever exists, in forward or
backward (Liger-Kernel's fused linear-cross-entropy does the same in one Triton kernel; it is not a
dependency). Backward only scales the stored gradients. Loss and gradients equal the plain head's within
float rounding (`tests/unit/test_objective.py`, 1e-6 in fp32).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vlm_trainer import family
from vlm_trainer.samples import IGNORE_INDEX


class Objective(Protocol):
    stat_names: tuple[str, ...]

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def count_tensor(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`count` as a device tensor (the step reads it without a host sync)."""
        ...

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors the model takes: ids, mask, pixels, `position_ids` (and a mask that may be absent)
    for packed rows, plus the family's extra inputs the adapter names (`image_sizes` for LlavaNext)."""
    return {**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}, **family.forward_inputs(batch)}


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


CHUNK_ROWS = 1024  # positions per chunk of the chunked linear-cross-entropy (1024 x vocab fp32 logits at most)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) over rows, chunk by chunk; gradients made in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, grads: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_hidden = torch.zeros_like(hidden) if grads else None
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        g_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grads and bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            total += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
            if not grads:
                continue
            # d(sum CE)/d(logits) = softmax - one_hot(target); 0 on ignored rows
            g = logits.softmax(-1)
            valid = t != IGNORE_INDEX
            g[valid, t[valid]] -= 1.0
            g[~valid] = 0.0
            assert g_hidden is not None and g_weight is not None
            g_hidden[start:start + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            g_weight += g.t() @ h.float()
            if g_bias is not None:
                g_bias += g.sum(0)
        ctx.save_for_backward(g_hidden, g_weight, g_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g_hidden, g_weight, g_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (g_hidden * grad_out.to(g_hidden.dtype), (g_weight * grad_out).to(w_dtype),
                None if g_bias is None else (g_bias * grad_out).to(b_dtype), None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                                 chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets` (-100 ignored), never holding more than
    `chunk` rows of logits. hidden (..., H), targets (...)."""
    flat, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    grads = torch.is_grad_enabled() and (flat.requires_grad or head.weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(flat, head.weight, head.bias, t, chunk, grads)


def _output_head(model: nn.Module) -> nn.Linear:
    """The LM head: the model's output embeddings (through PEFT/DDP wrappers)."""
    inner = getattr(model, "module", model)  # DDP
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"crossEntropy: chunked needs a linear LM head, found {type(head).__name__}")
    return head


def _install_chunked_head(head: nn.Linear) -> None:
    """Make the head's forward return the chunked loss while `_vlm_targets` is set (inside the model's forward)."""
    if getattr(head, "_vlm_chunked", False):
        return
    forward = head.forward

    @functools.wraps(forward)
    def head_forward(hidden: torch.Tensor) -> torch.Tensor:
        targets = getattr(head, "_vlm_targets", None)
        if targets is None:
            return forward(hidden)
        return chunked_linear_cross_entropy(hidden, head, targets, getattr(head, "_vlm_chunk", CHUNK_ROWS))

    head.forward = head_forward  # type: ignore[method-assign]
    head._vlm_chunked = True


def chunked_labelled_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                          chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy at the labelled positions with the chunked head (the model runs to hidden states,
    the head + CE run per chunk of labelled positions)."""
    head = _output_head(model)
    _install_chunked_head(head)
    keep = labelled_positions(labels)
    head._vlm_targets, head._vlm_chunk = labels[:, keep + 1], chunk
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
    finally:
        head._vlm_targets = None
    return out.logits


class CausalLMObjective:
    """Summed cross-entropy over labelled tokens (labels -100 elsewhere), computed where labels are."""

    stat_names: tuple[str, ...] = ()

    def __init__(self, *, labelled_only: bool = True, chunked: bool = False, chunk: int = CHUNK_ROWS):
        self.labelled_only, self.chunked, self.chunk = labelled_only, chunked, chunk

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int(CausalLMObjective.count_tensor(batch))

    @staticmethod
    def count_tensor(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`count` as a device tensor (the step reads it without a host sync)."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.chunked:
            return chunked_labelled_loss(model, model_inputs(batch), batch["labels"], self.chunk), {}
        logits, labels = labelled_logits(model, model_inputs(batch), batch["labels"], labelled_only=self.labelled_only)
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, {}
