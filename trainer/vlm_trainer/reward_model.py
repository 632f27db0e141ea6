"""A reward model: the VLM with a scalar head on its last non-padding token, and the loader of a `reward` stage's final/.

The `reward` stage kind (vlm_trainer.stages.reward) trains it; the `rl` kind scores rollouts with it. The model is
the family's own class (`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`) whose LM head (the
output embeddings) is replaced by a one-output linear layer, as transformers' `*ForSequenceClassification` classes do
for text LMs (Llava has no such class). The forward pass is the model's own, so every strategy (DDP, FSDP2,
ZeRO-2/3) and PEFT see the head used inside it; the head gives one value per position and the reward of a sequence
is the value at its last non-padding token (the last position whose `attention_mask` is 1: right and left padding
both work, and so does a generation batch laid out as [pads, prompt, response, pads]).

final/ of a reward stage (what `RewardModel.load` reads):
- the VLM folder, loadable as is by `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor` (its body is
  the reward model's; its LM head is the starting model's, untouched: tied to the embeddings, or the original
  weights for an untied head);
- `reward_head.safetensors`: `weight`, shape [1, hidden] (no bias);
- `reward_head.json`: the pooling rule, the hidden size and the margin the stage trained with.

Public API (stable; the `rl` stage kind uses it):

    rm = RewardModel.load(final_uri, device=torch.device("cuda"), dtype=torch.bfloat16)
    batch = rm.collate([rm.encode(prompt, answer, image) for ...])   # or the trainer's own collate output
    rewards = rm.score(batch)                                        # float32 tensor [B], no gradients

`score(batch)` takes the batch layout the training collate makes for one sequence per row
(`vlm_trainer.samples.collate`): `input_ids` and `attention_mask` [B, T], `pixel_values` (and the family's extra
inputs, `image_sizes` for LlavaNext); `labels` and other keys are ignored. Tensors may be on any device; they are
moved to the model's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load, load_file, save_file
from torch import nn
from transformers import AutoProcessor
from vlm_core import storage

from vlm_trainer import family
from vlm_trainer.model import ModelConfigError, local_dir
from vlm_trainer.samples import Encoded, SampleEncoder, collate, with_image_tokens

HEAD_FILE = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"
POOLING = "last_non_padding_token"
# an untied LM head set aside when the scalar head replaces it (written back into final/'s VLM folder)
_ORIGINAL_HEAD = "_vlm_original_lm_head"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last position whose mask is 1 (0 for a row of padding only)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.ne(0).long() * positions).argmax(-1)


def pool_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] (or [B, T, 1]) at each row's last non-padding token: [B]."""
    if values.dim() == 3:
        values = values.squeeze(-1)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def new_head(hidden: int, *, device: torch.device | str, dtype: torch.dtype) -> nn.Linear:
    """The scalar head, zero-initialised: every reward starts at 0 (no preference), the first loss is log(1 + e^margin)."""
    head = nn.Linear(hidden, 1, bias=False, device=device, dtype=dtype)
    if head.weight.device.type != "meta":
        nn.init.zeros_(head.weight)
    return head


def hidden_size(model: nn.Module) -> int:
    """The width of the LM's last hidden state (the head's input)."""
    return int(family.base_model(model).config.get_text_config().hidden_size)


def head_key(model: nn.Module) -> str:
    """The state-dict key of the head's weight in the family's model (`lm_head.weight` for Llava)."""
    base = family.base_model(model)
    head = base.get_output_embeddings()
    for name, module in base.named_modules():
        if module is head:
            return f"{name}.weight"
    raise ValueError(f"{type(base).__name__} has no output embeddings to replace with a scalar head")


def install_scalar_head(model: nn.Module, weight: torch.Tensor | None = None) -> nn.Linear:
    """Replace the model's LM head by a scalar head in place (zero-initialised, or `weight` [1, hidden]).

    An untied LM head with real weights is set aside (not a parameter) so final/ can keep the starting model's head."""
    base = family.base_model(model)
    old = base.get_output_embeddings()
    if not isinstance(old, nn.Linear):
        raise TypeError(f"a scalar head replaces a linear LM head; {type(base).__name__} has {type(old).__name__}")
    tied = bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False)) or bool(
        getattr(base.config, "tie_word_embeddings", False))
    if not tied and old.weight.device.type != "meta" and old.out_features != 1:
        object.__setattr__(base, _ORIGINAL_HEAD, old.weight.detach().to("cpu", torch.float32).clone())
    head = new_head(old.in_features, device=old.weight.device, dtype=old.weight.dtype)
    if weight is not None:
        with torch.no_grad():
            head.weight.copy_(weight.reshape(1, -1).to(head.weight.dtype))
    base.set_output_embeddings(head)
    return head


def original_lm_head(model: nn.Module) -> torch.Tensor | None:
    """The untied LM head `install_scalar_head` set aside (None for a tied head, or on ranks that hold no weights)."""
    return getattr(family.base_model(model), _ORIGINAL_HEAD, None)


def sequence_rewards(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One reward per row (fp32): the model's own forward, its scalar head at every position, pooled at the last
    non-padding token. `inputs`: what the model takes (ids, attention_mask, pixels, the family's extras)."""
    out = model(**inputs, use_cache=False)
    return pool_last(out.logits.float(), inputs["attention_mask"])


def write_head(folder: str, weight: torch.Tensor, *, margin: float) -> None:
    """reward_head.safetensors and reward_head.json into `folder` (a final/ being written)."""
    weight = weight.detach().to("cpu", torch.float32).reshape(1, -1).contiguous()
    save_file({"weight": weight}, os.path.join(folder, HEAD_FILE), metadata={"format": "pt"})
    with open(os.path.join(folder, HEAD_CONFIG), "w") as f:
        json.dump({"pooling": POOLING, "hidden_size": int(weight.shape[1]), "margin": margin,
                   "loader": "vlm_trainer.reward_model.RewardModel.load"}, f, indent=2)


def read_head(folder_uri: str) -> torch.Tensor | None:
    """The head weight [1, hidden] stored in a committed folder, or None when it holds no reward head."""
    uri = storage.join(folder_uri, HEAD_FILE)
    if not storage.exists(uri):
        return None
    return load(storage.read_bytes(uri))["weight"]


class RewardModel(nn.Module):
    """A trained reward model: `score(batch) -> [B]` rewards. Build with `RewardModel.load(final_uri, device, dtype)`."""

    def __init__(self, model: nn.Module, processor: Any, *, max_length: int = 4096):
        super().__init__()
        self.model = model
        self.processor = processor
        self.encoder = SampleEncoder(processor, max_length=max_length)
        self.model.eval()

    @classmethod
    def load(cls, final_uri: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             *, max_length: int = 4096) -> RewardModel:
        """A reward stage's committed final/ (verified against its manifest): the VLM plus its scalar head."""
        verification = storage.verify_committed(final_uri, check_sha256=True)
        if not verification.ok:
            raise ModelConfigError(f"reward model {final_uri}: {verification.reason}")
        path = local_dir(final_uri, "reward model")
        if not os.path.exists(os.path.join(path, HEAD_FILE)):
            raise ModelConfigError(f"reward model {final_uri}: no {HEAD_FILE}, so it is not the final/ of a reward stage")
        model = family.load_model(path)
        install_scalar_head(model, load_file(os.path.join(path, HEAD_FILE))["weight"])
        model.to(device=device, dtype=dtype)
        model.requires_grad_(False)
        return cls(model, AutoProcessor.from_pretrained(path), max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return int(self.processor.tokenizer.pad_token_id)

    def encode(self, prompt: str, answer: str, images: Image.Image | list[Image.Image]) -> Encoded:
        """One user prompt (with `<image>` markers, or none: the images go first) and one answer, rendered with the
        chat template exactly as the reward stage rendered its preference pairs."""
        images = images if isinstance(images, list) else [images]
        messages = with_image_tokens([{"role": "user", "content": prompt}], None, len(images))
        return self.encoder.tokenize([*messages, {"role": "assistant", "content": answer}], images)

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Encoded sequences as one right-padded batch (the training collate)."""
        return collate(items, self.pad_token_id)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        names = ("input_ids", "attention_mask", "pixel_values", *family.EXTRA_INPUTS)
        inputs = {k: batch[k].to(self.device) for k in names if batch.get(k) is not None}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        return sequence_rewards(self.model, inputs)

    @torch.no_grad()
    def score(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rewards [B] (float32, on the model's device) of the batch's rows; see the module docstring for the layout."""
        return self.forward(batch)
