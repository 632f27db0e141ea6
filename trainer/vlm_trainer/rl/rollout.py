"""Prompts from conversation samples, and rollouts: sampled responses with their log-probabilities.

A prompt is a `conversation` sample (vlm_trainer.samples) whose LAST assistant turn is the reference answer:
the encoder renders the whole conversation with the chat template and labels the assistant turns; here the
tokens before the last labelled run are the prompt (they end with the template's generation prompt, exactly
what `add_generation_prompt=True` renders) and the last run is the reference answer (the verifiers compare
with its text; it is never shown to the policy). Earlier turns stay in the prompt.

A prompt batch is left-padded (generation appends on the right); a rollout batch holds `groupSize` sampled
responses per prompt, adjacent, as [prompt (left-padded) | response (right-padded)] rows with `labels` set
on the response tokens up to and including the first end-of-sequence token, so the objective's forward
(`objective.labelled_logits`) runs the LM head at the response positions only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_trainer import family
from vlm_trainer.objective import labelled_logits, model_inputs
from vlm_trainer.rl.losses import token_logps_and_entropy
from vlm_trainer.samples import IGNORE_INDEX, Encoded, stack_images

PER_IMAGE = ("pixel_values", "image_sizes")  # batch tensors with one row per image (repeated per response)


def split_prompt(e: Encoded) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids): the reference is the last run of labelled tokens."""
    labelled = [i for i, t in enumerate(e.labels) if t != IGNORE_INDEX]
    if not labelled:
        raise ValueError("an rl prompt needs an assistant turn (its reference answer)")
    end = labelled[-1] + 1
    start = end - 1
    while start > 0 and e.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return e.input_ids[:start], e.input_ids[start:end]


def collate_prompts(items: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (`input_ids`, `attention_mask`), reference answers right-padded (`reference_ids`,
    `reference_mask`), images as `samples.collate`."""
    pairs = [split_prompt(e) for e in items]
    width = max(len(p) for p, _ in pairs)
    ref_width = max(len(r) for _, r in pairs)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    refs = torch.full((len(items), ref_width), pad_token_id, dtype=torch.long)
    ref_mask = torch.zeros((len(items), ref_width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
        refs[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        ref_mask[i, :len(r)] = 1
    return {
        "input_ids": ids, "attention_mask": mask, "reference_ids": refs, "reference_mask": ref_mask,
        "images_per_row": torch.tensor([len(e.pixel_values) for e in items], dtype=torch.long),
        **stack_images(items),
    }


def repeat_prompts(batch: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """Each prompt (and its images) `group` times, a prompt's copies adjacent."""
    out = {k: v.repeat_interleave(group, dim=0) for k, v in batch.items() if k not in PER_IMAGE}
    per_row = batch["images_per_row"]
    rows = torch.repeat_interleave(torch.arange(len(per_row), device=per_row.device), per_row)  # image -> its row
    starts = torch.cumsum(per_row, 0) - per_row
    order = torch.cat([torch.arange(s, s + n, device=per_row.device) for s, n in
                       zip(starts.tolist(), per_row.tolist(), strict=True) for _ in range(group)]) \
        if len(rows) else rows
    for k in PER_IMAGE:
        if k in batch:
            out[k] = batch[k][order]
    return out


def response_mask(responses: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    """1 on each response's tokens up to and including its first stop token, 0 after (long)."""
    stop = torch.zeros_like(responses, dtype=torch.bool)
    for s in stop_ids:
        stop |= responses == s
    after = (stop.long().cumsum(1) - stop.long()) > 0  # strictly after the first stop token
    return (~after).long()


def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The model's generation-config EOS ids and the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(family.base_model(model).generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def sample_responses(model: nn.Module, prompts: dict[str, torch.Tensor], *, max_new_tokens: int, temperature: float,
                     top_p: float, pad_token_id: int, stop_ids: set[int],
                     image_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Sample one response per prompt row (the rows are already repeated per group): the rollout rows
    [prompt | response] with `attention_mask`, `labels` on the response tokens and `response_mask`. The image
    token is never sampled (an `<image>` in a response would have no image features behind it)."""
    extra = {k: prompts[k] for k in PER_IMAGE if k in prompts}
    out = model.generate(
        input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], **extra,
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id, eos_token_id=sorted(stop_ids),
        suppress_tokens=[image_token_id] if image_token_id is not None else None,
    )
    width = prompts["input_ids"].shape[1]
    responses = out[:, width:]
    mask = response_mask(responses, stop_ids)
    keep = int(mask.sum(1).max()) if len(mask) else 0
    responses, mask = responses[:, :keep], mask[:, :keep]
    responses = responses.masked_fill(mask == 0, pad_token_id)
    ids = torch.cat([prompts["input_ids"], responses], 1)
    labels = torch.cat([torch.full_like(prompts["input_ids"], IGNORE_INDEX),
                        responses.masked_fill(mask == 0, IGNORE_INDEX)], 1)
    return {
        "input_ids": ids, "attention_mask": torch.cat([prompts["attention_mask"], mask], 1), "labels": labels,
        "response_mask": mask.float(), "prompt_width": torch.tensor(width), **extra,
    }


def response_logps(model: nn.Module, rollout: dict[str, torch.Tensor], *,
                   hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log p of each response token, entropy at each response position, the last hidden state at those positions
    when `hidden`), each (rows, response tokens). The head runs at the response positions only."""
    labels = rollout["labels"]
    width, length = int(rollout["prompt_width"]), rollout["response_mask"].shape[1]
    # every response column is labelled in some row (sample_responses trims), so the kept positions are exactly
    # width-1 .. width+length-2: the logits predicting response tokens 0 .. length-1
    inputs = model_inputs(rollout)
    if hidden:
        keep = torch.arange(width - 1, width + length - 1, device=labels.device)
        out = model(**inputs, use_cache=False, logits_to_keep=keep, output_hidden_states=True)
        logits, targets = out.logits.float(), labels[:, keep + 1]
        states = out.hidden_states[-1][:, width - 1:width + length - 1] if out.hidden_states is not None else None
    else:
        logits, targets = labelled_logits(model, inputs, labels)
        states = None
    logps, entropy = token_logps_and_entropy(logits, targets)
    mask = rollout["response_mask"]
    return logps * mask, entropy * mask, states
