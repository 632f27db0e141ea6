"""The model family adapter: Llava (fixed resolution) and LlavaNext (AnyRes tiling) behind one code path.

Everything that differs between the two families lives here: the config/model/processor classes, the
inputs the forward pass needs beyond ids and pixels (`image_sizes` for LlavaNext), the parameters that
belong to the projector part (LlavaNext's `image_newline` trains with the projector, as in LLaVA-NeXT),
and how many `<image>` tokens one image expands to. That count is always the processor's own
(`replace_image_token`, the rule its `__call__` applies), never a number computed here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)


@dataclass(frozen=True)
class Family:
    """One model family: its transformers classes and the extra forward inputs it takes."""

    name: str
    model_type: str
    config_class: type
    model_class: type
    processor_class: type
    extra_inputs: tuple[str, ...]


LLAVA = Family("llava", "llava", LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, ())
LLAVA_NEXT = Family(
    "llava_next", "llava_next", LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, ("image_sizes",)
)
FAMILIES = {f.model_type: f for f in (LLAVA, LLAVA_NEXT)}

VLMModel = LlavaForConditionalGeneration | LlavaNextForConditionalGeneration
VLMProcessor = LlavaProcessor | LlavaNextProcessor


def of_model_type(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a supported VLM family; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def of_config(config: Any) -> Family:
    return of_model_type(str(getattr(config, "model_type", "")))


def of_folder(path: str) -> Family:
    """The family of a saved model folder, from its config.json."""
    with open(os.path.join(path, "config.json")) as f:
        return of_model_type(str(json.load(f).get("model_type", "")))


def of_model(model: nn.Module) -> Family:
    return of_config(model.config)


def skeleton(config: Any) -> nn.Module:
    """The model's structure on the meta device: no memory, no initialisation; weights come later."""
    with torch.device("meta"):
        return of_config(config).model_class(config)


def load_model(path: str, *, materialize: bool = True) -> nn.Module:
    """A saved model folder as its own family's class (fp32), or its skeleton."""
    family = of_folder(path)
    if not materialize:
        return skeleton(family.config_class.from_pretrained(path))
    return family.model_class.from_pretrained(path, dtype=torch.float32)


def projector_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that are not inside a submodule part but train with the projector (LlavaNext's image_newline)."""
    newline = getattr(getattr(model, "model", None), "image_newline", None)
    return [newline] if isinstance(newline, nn.Parameter) else []


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries a forward pass takes besides input_ids/attention_mask/pixel_values."""
    return {k: batch[k] for k in LLAVA_NEXT.extra_inputs if k in batch}


def image_token_counts(processor: Any, image_inputs: dict[str, Any]) -> list[int]:
    """`<image>` tokens for every image in `image_inputs` (the image processor's output), by the processor's
    own expansion rule (the one `processor(text=..., images=...)` applies)."""
    n = len(image_inputs["pixel_values"])
    token = processor.image_token
    return [processor.replace_image_token(image_inputs, i).count(token) for i in range(n)]


def uses_tiles(processor: Any) -> bool:
    """Whether the processor tiles images (AnyRes), i.e. each image is (patches, C, H, W)."""
    return isinstance(processor, LlavaNextProcessor)
