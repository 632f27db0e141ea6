"""Sequence packing: several whole samples in one row, no attention across them, loss as if unpacked.

`batch.tokensPerMicroBatch` = T turns a micro-batch into ONE row holding consecutive samples of the stream
(in stream order, never split, never reordered, so resume stays exact) while their total length (image
tokens included) fits T. In the row:
- `position_ids` restart at 0 for every sample (RoPE sees each sample at the positions it would have alone);
- attention is block-diagonal causal. transformers 5.17's `masking_utils` (read for this choice):
  `_preprocess_mask_arguments` returns a 4D `attention_mask` as is, and when `attention_mask` is None it
  derives the blocks from the resets in `position_ids` (`find_packed_sequence_indices`); flash-attention
  kernels take the same resets as varlen `cu_seqlens` (what `DataCollatorWithFlattening` relies on).
  So: `mode="mask"` (CPU, eager/sdpa) puts an explicit 4D block-diagonal causal mask in the batch (bool for
  sdpa, additive float for eager); `mode="position_ids"` (CUDA with a flash-attention implementation) sends
  position_ids only and no mask, i.e. varlen attention without any L x L tensor;
- the label of every sample's FIRST token is -100: unpacked, nothing predicts it (the loss shifts by one),
  packed it would be predicted from the previous sample's last token. With that, the summed loss and the
  count of labelled tokens are exactly those of the unpacked samples, so the token-mean is unchanged.
Images: pixel values are stacked in row order, the order Llava merges image features in (with
`image_sizes` for AnyRes tiles, as `samples.collate` does).

Packing efficiency = real tokens / row capacity (T), reported per step and in the stage report.
"""

from __future__ import annotations

from typing import Literal

import torch

from vlm_trainer.samples import IGNORE_INDEX, Encoded, stack_images

PackingMode = Literal["mask", "position_ids"]


def packing_mode(attn_implementation: str | None) -> PackingMode:
    """position_ids-only (varlen) for flash-attention implementations, an explicit 4D mask otherwise."""
    return "position_ids" if (attn_implementation or "").startswith("flash") else "mask"


def fits(lengths: list[int], next_length: int, capacity: int) -> bool:
    """Whether a sample of `next_length` tokens still fits a row already holding `lengths` (an empty row
    takes any sample: the spec guarantees capacity >= maxLength)."""
    return not lengths or sum(lengths) + next_length <= capacity


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, L, L) causal mask that lets a token see only earlier tokens of its own sample, the samples
    being delimited by position_ids resets. bool (True = attend) when dtype is None, else additive
    (0 / dtype's min), the form transformers' eager attention adds to its scores."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seq = starts.long().cumsum(-1)  # sample index of every token
    same = seq[:, :, None] == seq[:, None, :]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def pack_row(items: list[Encoded], *, mode: PackingMode = "mask", mask_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One packed row of `items` (batch dimension 1). `mask_dtype` None gives a bool mask (sdpa)."""
    if not items:
        raise ValueError("pack_row needs at least one sample")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in items:
        ids += e.input_ids
        labels += [IGNORE_INDEX, *e.labels[1:]]
        positions += range(len(e.input_ids))
    position_ids = torch.tensor([positions], dtype=torch.long)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": position_ids,
        **stack_images(items),  # pixel values in row order (+ image_sizes for AnyRes tiles)
    }
    if mode == "mask":
        batch["attention_mask"] = block_causal_mask(position_ids, mask_dtype)
    return batch


def efficiency(real_tokens: int, capacity_tokens: int) -> float:
    """Real tokens over the tokens the rows could hold (packed: rows x T; padded: rows x longest)."""
    return real_tokens / capacity_tokens if capacity_tokens else 0.0
