"""What a model's `config.json` says, read without torch: the facts the spec must agree with.

One home for these rules: the operator's and the local backend's preflight check them before any
process starts, and the trainer (`model.assemble_vlm`) applies the same function when it builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlm_core.spec import ModelSpec

VISION_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model")


@dataclass(frozen=True)
class VisionFacts:
    model_type: str
    image_size: int
    patch_size: int
    num_hidden_layers: int

    @property
    def has_cls_token(self) -> bool:
        return self.model_type == "clip_vision_model"  # CLIP prepends a CLS token; SigLIP has none


def vision_facts(config: Mapping[str, Any]) -> VisionFacts:
    """From a vision-encoder config.json (a full CLIP/SigLIP config's `vision_config` is used)."""
    if config.get("model_type") in ("clip", "siglip") and isinstance(config.get("vision_config"), Mapping):
        inner = dict(config["vision_config"])
        inner.setdefault("model_type", f"{config['model_type']}_vision_model")
        config = inner
    return VisionFacts(
        model_type=str(config.get("model_type", "")),
        image_size=int(config.get("image_size", 0) or 0),
        patch_size=int(config.get("patch_size", 0) or 0),
        num_hidden_layers=int(config.get("num_hidden_layers", 0) or 0),
    )


def stage_image_size(model: ModelSpec, stages: list[Any]) -> int:
    """The fixed size (or AnyRes base tile) in effect at the last of `stages`: spec.model.imageSize, changed by
    each stage's `data.resolution.imageSize` up to it (stages without data, e.g. curate ones, change nothing)."""
    size = model.image_size
    for stage in stages:
        res = getattr(getattr(stage, "data", None), "resolution", None)
        if res is not None and res.image_size:
            size = int(res.image_size)
    return size


def tokens_per_image(*, image_size: int, patch_size: int, has_cls_token: bool, feature_select: str) -> int:
    """`<image>` tokens of one square image, from the configs alone: the torch-free side's one copy of the
    processor's rule (transformers' `LlavaProcessor.replace_image_token`: patches, + CLS, - 1 for 'default';
    checked against the processor in tests/unit/test_accounting.py). The trainer never uses it: it takes
    the processor's own count (`vlm_trainer.family.image_token_counts`)."""
    per_side = image_size // max(patch_size, 1)
    n = per_side * per_side + (1 if has_cls_token else 0)
    return n - 1 if feature_select == "default" else n


def image_token_count(model: ModelSpec, facts: VisionFacts, image_size: int | None = None) -> int:
    """`<image>` tokens per image at `image_size` (default spec.model.imageSize; `tokens_per_image`). An AnyRes
    image takes at least this many (its global thumbnail alone)."""
    return tokens_per_image(image_size=image_size or model.image_size, patch_size=facts.patch_size,
                            has_cls_token=facts.has_cls_token, feature_select=model.vision_feature_select_strategy)


def vision_problems(model: ModelSpec, facts: VisionFacts) -> list[str]:
    """Every way spec.model disagrees with the vision encoder's config, as 'field: message' lines."""
    out = []
    if facts.model_type not in VISION_MODEL_TYPES:
        out.append(f"spec.model.visionEncoder: expected a SigLIP or CLIP vision model, got model_type "
                   f"{facts.model_type or '(none)'!r}")
        return out
    if facts.image_size != model.image_size:
        out.append(f"spec.model.imageSize: {model.image_size} does not match the vision encoder at "
                   f"{model.vision_encoder}, which was trained at {facts.image_size}px; set imageSize: {facts.image_size}")
    layers = facts.num_hidden_layers
    # hidden_states holds the embeddings plus one entry per layer: valid indices are -(L+1) .. L
    if layers and not -(layers + 1) <= model.vision_feature_layer <= layers:
        out.append(f"spec.model.visionFeatureLayer: {model.vision_feature_layer} is outside the encoder's "
                   f"{layers} layers; use -{layers + 1}..{layers} (LLaVA uses -2, the penultimate layer)")
    return out


def max_length_problem(
    model: ModelSpec, facts: VisionFacts, max_length: int, field: str, image_size: int | None = None
) -> str | None:
    """A sample is its image tokens plus text; a maxLength at or below the image tokens trains nothing."""
    n = image_token_count(model, facts, image_size)
    if max_length <= n:
        return (f"{field}: {max_length} tokens cannot hold one image ({n} image tokens at imageSize "
                f"{image_size or model.image_size}, patch {facts.patch_size}) and any text; use at least {n + 64}")
    return None
