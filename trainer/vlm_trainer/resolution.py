"""A stage's resolution policy applied to the model it starts from (`stage.data.resolution`).

Policy is per stage; absent keeps the model as it is (the first stage starts at spec.model.imageSize).
- fixed, a new size: the vision tower is rebuilt at the new size with its position embeddings
  interpolated (bicubic over the patch grid, CLS position kept, as transformers' own
  `interpolate_pos_encoding` does), the image processor resizes to the new size and `image_seq_length`
  follows; the stage's final/ carries the new config, so the next stage starts there.
- anyres: a Llava model becomes LlavaNext (same vision tower, projector and LM weights; `image_newline`
  initialised as LLaVA-NeXT does, N(0, 1/hidden)); the processor becomes LlavaNextProcessor with a
  LlavaNext image processor (base tile = imageSize, candidate canvases = gridPinpoints, global thumbnail
  first). A LlavaNext model only changes its pinpoints. anyres -> fixed is refused (LlavaNext weights
  have no fixed-resolution equivalent).
Ranks that build the model on the meta device (`materialize=False`) get the converted skeleton; the
strategy fills its weights from rank 0's converted model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from vlm_core.spec import ResolutionSpec

from vlm_trainer import family

POSITION_KEY = "embeddings.position_embedding.weight"
# Copied from the base image processor into the tiling one (normalisation must not change with the policy).
_PIXEL_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb", "resample")


class ResolutionError(ValueError):
    """A resolution policy the model cannot take; the message names the field."""


def default_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's canvases (336: 336x672, 672x336, 672x672, 1008x336, 336x1008) in units of `tile`."""
    return [[tile * h, tile * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def vision_size(config: Any) -> int:
    return int(config.vision_config.image_size)


def apply(vlm: Any, res: ResolutionSpec | None, *, seed: int, materialize: bool = True) -> Any:
    """The stage's starting VLM (`model.VLM`) under `res` (the same object when nothing changes). What a
    family can do comes from its row: whether it tiles already, and which family it becomes when it starts to."""
    if res is None:
        return vlm
    model, processor = vlm.model, vlm.processor
    fam = family.of_model(model)
    size = res.image_size or vision_size(model.config)
    if res.policy == "fixed":
        if fam.tiles:
            raise ResolutionError(
                f"data.resolution.policy: fixed after an anyres stage is not supported (the {fam.name} model has "
                "no fixed-resolution form); keep policy anyres"
            )
        if size != vision_size(model.config):
            model, processor = resize_fixed(model, processor, size, materialize=materialize)
        return replace(vlm, model=model, processor=processor)
    pinpoints = res.grid_pinpoints or default_pinpoints(size)
    bad = [p for p in pinpoints if p[0] % size or p[1] % size]
    if bad:
        raise ResolutionError(f"data.resolution.gridPinpoints: {bad} are not multiples of the tile size {size}")
    if size != vision_size(model.config):
        if fam.tiles:
            raise ResolutionError(
                f"data.resolution.imageSize: the {fam.name} model's tile is {vision_size(model.config)}px; changing "
                "the tile of a tiling model is not supported"
            )
        model, processor = resize_fixed(model, processor, size, materialize=materialize)
    if fam.tiles:
        model.config.image_grid_pinpoints = pinpoints
        processor.image_processor.image_grid_pinpoints = pinpoints
    else:
        model, processor = to_anyres(model, processor, pinpoints, seed=seed, materialize=materialize)
    return replace(vlm, model=model, processor=processor)


def interpolate_positions(weight: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """(extra + old_grid^2, dim) position embeddings -> (extra + new_grid^2, dim), bicubic over the grid."""
    extra = weight.shape[0] - old_grid * old_grid
    if extra not in (0, 1):
        raise ResolutionError(f"vision position embeddings: {weight.shape[0]} rows do not form a {old_grid}^2 grid")
    head, grid = weight[:extra], weight[extra:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(weight.dtype)
    return torch.cat([head, grid], dim=0)


def resize_fixed(model: Any, processor: Any, size: int, *, materialize: bool) -> tuple[Any, Any]:
    """The Llava model and processor at a new square input size (position embeddings interpolated)."""
    config = model.config
    patch = int(config.vision_config.patch_size)
    if size % patch:
        raise ResolutionError(f"data.resolution.imageSize: {size} is not a multiple of the vision patch size {patch}")
    old_grid, new_grid = vision_size(config) // patch, size // patch
    new_config = config.__class__.from_dict(config.to_dict())
    new_config.vision_config.image_size = size
    new_processor = _processor_at(processor, size)
    new_config.image_seq_length = family.square_image_token_count(new_processor, size)  # the processor's count
    if not materialize:
        return family.skeleton(new_config), new_processor
    state = model.state_dict()
    for key in list(state):
        if key.endswith(POSITION_KEY) and "vision_tower" in key:
            state[key] = interpolate_positions(state[key], old_grid, new_grid)
        elif key.endswith("embeddings.position_ids") and "vision_tower" in key:
            del state[key]
    new_model = family.of_config(new_config).model_class(new_config)
    _load(new_model, state, allowed_missing=("position_ids",))
    new_model.generation_config = model.generation_config
    return new_model, new_processor


def _image_processor_dict(image_processor: Any) -> dict[str, Any]:
    d = image_processor.to_dict()
    for key in ("image_processor_type", "processor_class", "_processor_class"):
        d.pop(key, None)
    return d


def _processor_at(processor: Any, size: int) -> Any:
    ip = processor.image_processor
    d = _image_processor_dict(ip)
    size_d = d.get("size") or {}
    d["size"] = {"shortest_edge": size} if "shortest_edge" in size_d else {"height": size, "width": size}
    if d.get("crop_size"):
        d["crop_size"] = {"height": size, "width": size}
    new_ip = type(ip)(**d)
    return type(processor)(
        image_processor=new_ip, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template, image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )


def tiling_processor(processor: Any, pinpoints: list[list[int]], tile: int, tiled: family.Family) -> Any:
    """The tiling family's processor with the base processor's tokenizer, template and pixel normalisation."""
    d = _image_processor_dict(processor.image_processor)
    kwargs = {k: d[k] for k in _PIXEL_KEYS if k in d}
    crops = bool(d.get("do_center_crop")) and bool(d.get("crop_size"))
    assert tiled.tile_image_processor_class is not None
    image_processor = tiled.tile_image_processor_class(
        size={"shortest_edge": tile} if crops else {"height": tile, "width": tile},
        crop_size={"height": tile, "width": tile},
        do_center_crop=crops,
        image_grid_pinpoints=pinpoints,
        do_pad=True,
        **kwargs,
    )
    return tiled.processor_class(
        image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template, image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )


def to_anyres(model: Any, processor: Any, pinpoints: list[list[int]], *, seed: int, materialize: bool) -> tuple[Any, Any]:
    """Llava -> LlavaNext (the family's `tiled_form`): every weight carried over, image_newline new
    (N(0, 1/sqrt(hidden)), LLaVA-NeXT's init)."""
    c = model.config
    tiled = family.tiled_form(family.of_model(model))
    config = tiled.config_class(
        vision_config=c.vision_config.to_dict(),
        text_config=c.text_config.to_dict(),
        image_token_index=c.image_token_index,
        image_seq_length=c.image_seq_length,
        projector_hidden_act=c.projector_hidden_act,
        vision_feature_select_strategy=c.vision_feature_select_strategy,
        vision_feature_layer=c.vision_feature_layer,
        multimodal_projector_bias=c.multimodal_projector_bias,
        tie_word_embeddings=c.tie_word_embeddings,
        image_grid_pinpoints=pinpoints,
    )
    new_processor = tiling_processor(processor, pinpoints, vision_size(c), tiled)
    if not materialize:
        return family.skeleton(config), new_processor
    torch.manual_seed(seed)  # every rank draws the same image_newline
    new_model = tiled.model_class(config)
    hidden = int(c.text_config.hidden_size)
    with torch.no_grad():
        new_model.model.image_newline.copy_(torch.randn(hidden) / math.sqrt(hidden))
    _load(new_model, model.state_dict(), allowed_missing=("image_newline",))
    new_model.generation_config = model.generation_config
    return new_model, new_processor


def _load(model: Any, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...]) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(a in k for a in allowed_missing)]
    if missing or result.unexpected_keys:
        raise ResolutionError(
            f"resolution change: weights did not carry over (missing {missing}, unexpected {result.unexpected_keys})"
        )
