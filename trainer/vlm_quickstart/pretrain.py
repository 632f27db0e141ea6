"""Stage 0: the quickstart's stand-ins for pretrained components, trained briefly on one process.

- The language model learns the quickstart's text from multi-sentence documents whose later
  sentences repeat earlier attributes, so it learns to copy from context (what it later does with
  image tokens). Single sentences fail (TESTING.md); over-training (400+ steps) hurts stage 1.
- The vision encoder is the image tower of a CLIP-style dual encoder trained here too
  (`dual_encoder.py`). A random frozen encoder carries colour but not shape, so without it stage 1
  cannot learn shape.

Both are saved as Hugging Face folders in the formats `components.py` writes, so the trainer loads
them through its real loading code.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerBase, SiglipVisionModel
from vlm_core.spec import ScheduleSpec
from vlm_trainer.optim import build_scheduler

from vlm_quickstart.components import (
    build_image_processor,
    build_tokenizer,
    language_model_config,
)
from vlm_quickstart.shapes import text_documents

# The encoder layer whose patch features LLaVA reads (job.yaml's visionFeatureLayer); stage 0 trains
# exactly these features.
VISION_FEATURE_LAYER = -1


@dataclass
class PretrainResult:
    """What stage 0 did, for the report."""

    steps: int
    loss_first: float
    loss_last: float
    wall_seconds: float
    perplexity_before: float | None = None
    perplexity_after: float | None = None


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, docs: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for documents, each `<s> doc </s>`, right-padded."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer(d, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        for d in docs
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_nll(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over real tokens, and their count."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return nll, (targets != -100).sum()


@torch.no_grad()
def text_perplexity(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, docs: list[str], batch: int = 128
) -> float:
    """Token-level perplexity of a causal LM (or a LLaVA model, text only) on documents."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(docs), batch):
        ids, mask = encode_documents(tokenizer, docs[start : start + batch])
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll, n = _token_nll(logits, ids, mask)
        total, count = total + float(nll), count + int(n)
    return math.exp(total / count)


def adamw(params: Any, lr: float, steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the trainer's own schedule (`optim.build_scheduler`): 10 warmup steps, then cosine to 0."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = ScheduleSpec.model_validate({"type": "cosine", "warmupRatio": 10 / steps, "minLrRatio": 0.0})
    return opt, build_scheduler(opt, steps, schedule)


def pretrain_language_model(
    out_dir: str,
    seed: int,
    steps: int = 150,
    batch: int = 64,
    lr: float = 2e-3,
    n_docs: int = 4000,
    heldout_docs: list[str] | None = None,
    docs: list[str] | None = None,
    extra_words: tuple[str, ...] = (),
) -> PretrainResult:
    """Train the tiny Llama on text documents (the quickstart's own unless `docs` are given, e.g. a variant's);
    save it with its tokenizer (the quickstart vocabulary plus `extra_words`) to `out_dir`."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_words=extra_words)
    model = LlamaForCausalLM(language_model_config(tokenizer))
    docs = docs if docs is not None else text_documents(n_docs, seed, "text")
    heldout = heldout_docs if heldout_docs is not None else text_documents(300, seed, "text-heldout")
    before = text_perplexity(model, tokenizer, heldout)
    ids_all, mask_all = encode_documents(tokenizer, docs)
    opt, schedule = adamw(model.parameters(), lr, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(docs), (batch,), generator=gen)
        ids, mask = ids_all[idx], mask_all[idx]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        nll, n = _token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        loss = nll / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    after = text_perplexity(model, tokenizer, heldout)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return PretrainResult(steps, losses[0], losses[-1], wall, before, after)


def pixel_tensor(images: list, image_size: int = 32) -> torch.Tensor:
    """Images -> normalised pixel values, exactly as the saved image processor does."""
    return torch.as_tensor(
        np.asarray(build_image_processor(image_size)(images=images, return_tensors="np")["pixel_values"])
    )


def vision_features(model: SiglipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features of the layer LLaVA reads, mean-pooled: (batch, hidden)."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER].mean(1)


def load_language_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path)
