"""The VLM: transformers' own `LlavaForConditionalGeneration` (or `LlavaNextForConditionalGeneration` after an
AnyRes stage; `vlm_trainer.family` keeps both on one code path), assembled, frozen per stage, grouped for AdamW.

Two ways in, both giving the same class:
- first stage (`init_from is None`): a vision-encoder checkpoint (SigLIP/CLIP vision model + image
  processor) and a causal-LM checkpoint (+ tokenizer with a chat template) are joined by a freshly
  initialised LLaVA projector (`mlp2x_gelu` = `multi_modal_projector`: Linear, GELU, Linear);
- later stages: the previous stage's committed `final/` via `from_pretrained` (its own family's class).
Then the stage's resolution policy (`vlm_trainer.resolution`) may resize or convert it.

Master weights are always fp32 (bf16 is applied by autocast in the loop). Nothing here knows about
ranks or process groups; parallelism wraps the model from outside (`vlm_trainer.parallel`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
)

# transformers 5.17's top-level `AutoImageProcessor` is a placeholder that demands torchvision even
# though the PIL backends work; the class in its own module resolves SigLIP/CLIP to their PIL processors.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from vlm_core import storage
from vlm_core.spec import ModelSpec, ResolutionSpec, StageSpec

from vlm_trainer import family, resolution
from vlm_trainer.samples import IMAGE_TOKEN


class ModelConfigError(ValueError):
    """The model spec and the checkpoints it names do not fit together; the message names the field."""


@dataclass
class VLM:
    """The assembled model and the processor that feeds it (tokenizer + image processor + template)."""

    model: family.VLMModel
    processor: family.VLMProcessor


def local_dir(uri: str, what: str) -> str:
    """A local folder holding the checkpoint at `uri` (remote ones are downloaded to a temp folder)."""
    if not storage.exists(uri):
        raise ModelConfigError(f"{what}: no checkpoint at {uri}")
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    return storage.download_dir(uri, tempfile.mkdtemp(prefix="vlm-ckpt-"))


def build_vlm(
    model_spec: ModelSpec, init_from: str | None, *, seed: int, materialize: bool = True,
    resolution_policy: ResolutionSpec | None = None,
) -> VLM:
    """The stage's starting model: from `init_from` (previous stage's final/) or assembled from parts, then
    under the stage's resolution policy (None keeps the model's own).

    `materialize=False` builds the same model on the meta device (config and processor only, no weights
    read): ranks other than 0 do that, and the strategy fills them from rank 0 (memory-safe build).
    """
    if init_from is not None:
        vlm = load_vlm(init_from, materialize=materialize)
    else:
        vlm = assemble_vlm(model_spec, seed=seed, materialize=materialize)
    return resolution.apply(vlm, resolution_policy, seed=seed, materialize=materialize)


def load_vlm(uri: str, *, materialize: bool = True) -> VLM:
    """A committed stage output (`final/`): its family's model class (Llava or LlavaNext) + AutoProcessor, fp32."""
    verification = storage.verify_committed(uri, check_sha256=True)
    if not verification.ok:
        raise ModelConfigError(f"initFrom: {verification.reason}")
    path = local_dir(uri, "initFrom")
    processor = AutoProcessor.from_pretrained(path)
    return VLM(family.load_model(path, materialize=materialize), processor)


def assemble_vlm(model_spec: ModelSpec, *, seed: int, materialize: bool = True) -> VLM:
    """Join a pretrained vision encoder and causal LM with a new projector (seeded: every rank builds
    the same initial projector, which FSDP requires and DDP checks)."""
    vision_path = local_dir(model_spec.vision_encoder, "spec.model.visionEncoder")
    lm_path = local_dir(model_spec.language_model, "spec.model.languageModel")

    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelConfigError(
            f"spec.model.languageModel: the tokenizer at {model_spec.language_model} has no chat_template; "
            "the trainer renders every sample with it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    added_image_token = IMAGE_TOKEN not in tokenizer.get_vocab()
    if added_image_token:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm_config = AutoConfig.from_pretrained(lm_path)
    if added_image_token:
        lm_config.vocab_size = len(tokenizer)

    vision_config = AutoConfig.from_pretrained(vision_path)
    if getattr(vision_config, "model_type", "") not in ("siglip_vision_model", "clip_vision_model"):
        raise ModelConfigError(
            f"spec.model.visionEncoder: expected a SigLIP or CLIP vision model, got "
            f"{type(vision_config).__name__} ({vision_config.model_type})"
        )
    if vision_config.image_size != model_spec.image_size:
        raise ModelConfigError(
            f"spec.model.imageSize: {model_spec.image_size} does not match the vision encoder at "
            f"{model_spec.vision_encoder}, which was trained at {vision_config.image_size}px; set imageSize: "
            f"{vision_config.image_size}"
        )
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    is_clip = vision_config.model_type == "clip_vision_model"
    processor = family.ASSEMBLED.processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=model_spec.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if is_clip else 0,  # CLIP prepends a CLS token; SigLIP has none
    )
    probe = image_processor(images=Image.new("RGB", (model_spec.image_size,) * 2), return_tensors="pt")
    if tuple(probe["pixel_values"].shape[-2:]) != (model_spec.image_size,) * 2:
        raise ModelConfigError(
            f"spec.model.visionEncoder: its image processor produces {tuple(probe['pixel_values'].shape[-2:])} "
            f"pixels, the model expects {model_spec.image_size}"
        )

    config = family.ASSEMBLED.config_class(
        vision_config=vision_config.to_dict(),
        text_config=lm_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=family.image_token_counts(processor, probe)[0],  # the processor's own count
        projector_hidden_act="gelu",
        vision_feature_layer=model_spec.vision_feature_layer,
        vision_feature_select_strategy=model_spec.vision_feature_select_strategy,
        tie_word_embeddings=bool(getattr(lm_config, "tie_word_embeddings", False)),
    )
    if not materialize:
        return VLM(family.skeleton(config), processor)

    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32)
    if added_image_token:
        lm.resize_token_embeddings(len(tokenizer))
    vision = AutoModel.from_pretrained(vision_path, dtype=torch.float32)
    torch.manual_seed(seed)
    model = family.ASSEMBLED.model_class(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    lm_state = lm.state_dict()
    del lm, vision
    model.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in lm_state.items() if k.startswith("model.")}
    )
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict({"weight": lm_state["lm_head.weight"]})
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            setattr(model.generation_config, key, value)
    return VLM(model, processor)


def apply_freezing(model: nn.Module, trainable: list[str], *, always: tuple[str, ...] = ()) -> None:
    """Only the stage's trainable parts get gradients (and the modules at the paths `always`, e.g. a reward model's
    head); a frozen vision tower runs in eval mode."""
    family.check_parts(trainable)
    parts = family.parameter_parts(model)
    for name, param in model.named_parameters():
        if id(param) not in parts:
            raise ValueError(f"parameter {name!r} belongs to no known part of {type(family.base_model(model)).__name__}")
        param.requires_grad_(parts[id(param)] in trainable)
    for path in always:
        family.base_model(model).get_submodule(path).requires_grad_(True)
    set_train_modes(model, trainable)


def set_train_modes(model: nn.Module, trainable: list[str]) -> None:
    """Train mode, except a frozen vision tower (eval: no dropout in a part that does not learn)."""
    model.train()
    if "vision_tower" not in trainable:
        family.vision_tower(model).eval()


def param_groups(model: nn.Module, stage: StageSpec) -> list[dict]:
    """AdamW groups: projector at lr x projectorLrMultiplier, the rest at lr; no decay on norms/biases.
    Each group carries `part` ("projector" or "model") so the loop can report the lr actually used."""
    opt = stage.optimizer
    lr = float(opt.lr)
    mult = float(opt.projector_lr_multiplier)
    parts = family.parameter_parts(model)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        key = (parts.get(id(param)) == "projector", param.ndim >= 2)
        buckets.setdefault(key, []).append(param)
    groups = []
    for (is_projector, decays), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "lr": lr * mult if is_projector else lr,
            "weight_decay": opt.weight_decay if decays else 0.0,
            "part": "projector" if is_projector else "model",
        })
    return groups
