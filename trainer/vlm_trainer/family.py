"""The model family adapter: one row per family in `FAMILIES`, read by every part of the trainer.

Everything that differs between families lives in its row: the config/model/processor classes, the inputs
the forward pass needs beyond ids and pixels (`image_sizes` for LlavaNext), whether the processor tiles
images (AnyRes) and which family a fixed-resolution one becomes when it starts to tile, the module paths of
the three trainable parts (projector, language_model, vision_tower) and the loose parameters that train
with one of them (LlavaNext's `image_newline` trains with the projector, as in LLaVA-NeXT), the lists of
decoder blocks (FSDP units, activation checkpointing, ZeRO-3 leaves), and the modules QLoRA leaves
unquantised. The functions below answer from the row; model, resolution, objective, LoRA, optimizer
groups, the frozen tower and the feature cache ask them instead of naming modules or families.

How many `<image>` tokens one image expands to is always the processor's own count (`image_token_counts`:
`replace_image_token`, the rule its `__call__` applies), never a number computed in the trainer. LoRA's
default target modules have one home: `LoRASpec.target_modules` in the schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from vlm_core.spec import TRAINABLE_PARTS

PARTS = TRAINABLE_PARTS  # the schema's names of the three parts


@dataclass(frozen=True)
class Family:
    """One model family's traits."""

    name: str
    model_type: str
    config_class: type
    model_class: type
    processor_class: type
    extra_inputs: tuple[str, ...]  # forward inputs besides input_ids/attention_mask/position_ids/pixel_values
    tiles: bool  # the processor tiles images (AnyRes): each image is (patches, C, H, W)
    tiled_form: str | None  # model_type this family becomes under an anyres policy (None: it tiles already)
    tile_image_processor_class: type | None  # the tiling image processor (tiling families)
    parts: Mapping[str, tuple[str, ...]]  # part -> module paths in the model (the LM part includes the head)
    loose_parameters: Mapping[str, str]  # parameter path -> part, for parameters outside the part modules
    block_lists: tuple[str, ...]  # paths of the ModuleLists of transformer blocks (first found of each part)
    unquantized_modules: tuple[str, ...]  # module names QLoRA keeps in full precision


_LLAVA_PARTS = {
    "projector": ("model.multi_modal_projector",),
    "language_model": ("model.language_model", "lm_head"),
    "vision_tower": ("model.vision_tower",),
}
# LM blocks, then the vision encoder's (CLIP/SigLIP vision models keep them under vision_model.encoder)
_LLAVA_BLOCKS = ("model.language_model.layers", "model.vision_tower.vision_model.encoder.layers|"
                 "model.vision_tower.encoder.layers")
_LLAVA_UNQUANTIZED = ("vision_tower", "multi_modal_projector", "lm_head")

LLAVA = Family(
    name="llava", model_type="llava", config_class=LlavaConfig, model_class=LlavaForConditionalGeneration,
    processor_class=LlavaProcessor, extra_inputs=(), tiles=False, tiled_form="llava_next",
    tile_image_processor_class=None, parts=_LLAVA_PARTS, loose_parameters={}, block_lists=_LLAVA_BLOCKS,
    unquantized_modules=_LLAVA_UNQUANTIZED,
)
LLAVA_NEXT = Family(
    name="llava_next", model_type="llava_next", config_class=LlavaNextConfig,
    model_class=LlavaNextForConditionalGeneration, processor_class=LlavaNextProcessor, extra_inputs=("image_sizes",),
    tiles=True, tiled_form=None, tile_image_processor_class=LlavaNextImageProcessorPil, parts=_LLAVA_PARTS,
    loose_parameters={"model.image_newline": "projector"}, block_lists=_LLAVA_BLOCKS,
    unquantized_modules=_LLAVA_UNQUANTIZED,
)
FAMILIES = {f.model_type: f for f in (LLAVA, LLAVA_NEXT)}
ASSEMBLED = LLAVA  # the family a first stage joins spec.model's vision encoder and LM into
# Every family's extra forward inputs: a batch carries only those its collator made (image_sizes for tiles).
EXTRA_INPUTS = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.extra_inputs))

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
    return of_config(base_model(model).config)


def tiled_form(family: Family) -> Family:
    """The family a model of `family` becomes under an anyres policy (itself when it tiles already)."""
    return family if family.tiled_form is None else of_model_type(family.tiled_form)


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


# --- the model's parts ----------------------------------------------------------------------------------


def base_model(model: nn.Module) -> nn.Module:
    """The family's model class inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def part_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The three parts as modules. Parts are found by module, not by parameter name, so a PEFT-wrapped model
    needs no special case."""
    base = base_model(model)
    return {part: [base.get_submodule(p) for p in paths] for part, paths in of_model(base).parts.items()}


def parameter_parts(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the part it belongs to (loose parameters first: LlavaNext's image_newline, projector)."""
    base = base_model(model)
    out: dict[int, str] = {}
    for path, part in of_model(base).loose_parameters.items():
        param = base.get_parameter(path)
        out[id(param)] = part
    for part, modules in part_modules(model).items():
        for module in modules:
            for p in module.parameters():
                out.setdefault(id(p), part)
    return out


def check_parts(trainable: list[str]) -> None:
    unknown = set(trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"stage.trainable: unknown parts {sorted(unknown)}; allowed: {list(PARTS)}")


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower module (the feature cache and the frozen-tower inference mode wrap its forward)."""
    return part_modules(model)["vision_tower"][0]


def part_module_names(family: Family, part: str) -> list[str]:
    """The last path component of each module of `part` (what PEFT's patterns and modules_to_save name)."""
    return [p.rsplit(".", 1)[-1] for p in family.parts[part]]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the LM and of the vision encoder, in that order (FSDP units, activation
    checkpointing, ZeRO-3 leaves)."""
    base = base_model(model)
    blocks: list[nn.Module] = []
    for alternatives in of_model(base).block_lists:
        for path in alternatives.split("|"):
            try:
                blocks += list(base.get_submodule(path))
                break
            except AttributeError:
                continue
    return blocks


def decoder_block_class_names(model: nn.Module) -> list[str]:
    """Class names of the decoder blocks (e.g. for DeepSpeed's ZeRO-3 leaf modules), in first-seen order."""
    return list(dict.fromkeys(type(b).__name__ for b in decoder_blocks(model)))


# --- inputs and image tokens ----------------------------------------------------------------------------


def forward_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries a forward pass takes besides input_ids/attention_mask/position_ids/pixel_values:
    the family's extra inputs the collator made (`image_sizes` for LlavaNext)."""
    return {k: batch[k] for k in EXTRA_INPUTS if batch.get(k) is not None}


def image_token_counts(processor: Any, image_inputs: dict[str, Any]) -> list[int]:
    """`<image>` tokens for every image in `image_inputs` (the image processor's output), by the processor's
    own expansion rule (the one `processor(text=..., images=...)` applies)."""
    n = len(image_inputs["pixel_values"])
    token = processor.image_token
    return [processor.replace_image_token(image_inputs, i).count(token) for i in range(n)]


def square_image_token_count(processor: Any, size: int) -> int:
    """The processor's count for one `size` x `size` image (a fixed-resolution model's `image_seq_length`)."""
    probe = processor.image_processor(images=Image.new("RGB", (size, size)), return_tensors="pt")
    return image_token_counts(processor, probe)[0]

