"""The `VLMTrainingJob` schema: one typed source of truth for the CRD, the operator and the trainer.

Torch-free on purpose: `vlm_operator` imports this module (never torch). Field names are camelCase
on the wire (Kubernetes convention) and snake_case in Python. Unknown fields are errors, so a typo
never passes silently.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from vlm_core import __version__, storage, validators

API_GROUP = "training.vlm.dev"
API_VERSION = "v1alpha1"
KIND = "VLMTrainingJob"
PLURAL = "vlmtrainingjobs"

StageType = Literal["align", "instruct", "dpo"]  # training stages (StageSpec)
CURATE_TYPE = "curate"  # the data-curation stage (CurateStage)
# Scripts the curate stage's built-in language (script) detector tells apart.
SCRIPTS = ("latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "hangul", "kana", "han")
# Fields only training stages have: a curate stage naming one is rejected with the field's name.
TRAINING_ONLY_FIELDS = ("data", "trainable", "optimizer", "schedule", "batch", "maxSteps", "epochs", "precision",
                        "strategy", "offload", "lora", "qlora", "gradientCheckpointing", "dpo", "checkpoint")
CURATE_ONLY_FIELDS = ("input", "filters", "output", "encoder")  # and a training stage naming one is rejected too
DataFormat = Literal["caption", "conversation", "interleaved", "preference"]
ResolutionPolicy = Literal["fixed", "anyres"]
TrainablePart = Literal["projector", "language_model", "vision_tower"]
Precision = Literal["bf16", "fp32"]
Strategy = Literal["ddp", "fsdp", "zero2", "zero3"]
Offload = Literal["none", "optimizer", "optimizer_and_params"]
DPOReference = Literal["auto", "sharded", "adapter_disabled"]

# Upper bounds, each with the reason a user sees when a value is past it.
BOUND_REASONS: dict[str, str] = {
    "globalSize": "no published VLM recipe uses more than a few thousand samples per step",
    "microSize": "one rank's micro batch",
    "maxSteps": "a stage of a billion optimizer steps would never finish",
    "epochs": "passes over the data",
    "maxLength": "tokens per sample; beyond any model's context window",
    "seed": "numpy's generator takes 32-bit seeds, and each rank adds its rank",
    "lr": "an AdamW learning rate above 1 diverges",
    "projectorLrMultiplier": "projector lr = lr x this",
    "weightDecay": "decoupled weight decay is a fraction",
    "nodes": "pods in one torchrun gang",
    "procsPerNode": "processes (GPUs) per node",
    "gpusPerNode": "GPUs per pod",
    "imageSize": "pixels per side",
    "maxImages": "images in one sample",
    "everySteps": "checkpoint interval in optimizer steps",
    "keepLast": "checkpoints kept",
    "maxRestarts": "gang restarts per stage",
    "ttlSecondsAfterFinished": "one year",
    "shuffleBuffer": "samples held in memory for shuffling",
    "beta": "DPO's KL strength",
    "gradClip": "a global gradient-norm bound",
}


def _number_annotation(annotation: Any) -> str | None:
    """'number' for int/float fields (optional or not), 'boolean' for bool ones, else None."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) else [annotation]
    if args and all(a in (int, float) for a in args):
        return "number"
    if args == [bool]:
        return "boolean"
    return None


class Strict(BaseModel):
    """Base: camelCase field names on the wire, unknown fields forbidden, numbers finite and never
    booleans or strings (YAML's `true` is not 1, `"5"` is not 5), booleans only booleans."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
    )

    @field_validator("*", mode="before")
    @classmethod
    def _exact_scalar_types(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        kind = _number_annotation(field.annotation) if field is not None else None
        if kind == "number" and (isinstance(v, (bool, str))):
            raise ValueError(f"must be a number, got {v!r}")
        if kind == "boolean" and not isinstance(v, bool):
            raise ValueError(f"must be true or false, got {v!r}")
        return v


class ModelSpec(Strict):
    """The VLM's parts: a pretrained vision encoder and language model, joined by a projector."""

    vision_encoder: str = Field(
        description="Path or storage URI (file://, s3://, gs://) of a Hugging Face vision-encoder checkpoint "
        "(CLIP or SigLIP vision model)."
    )
    language_model: str = Field(
        description="Path or storage URI of a Hugging Face causal-LM checkpoint; its tokenizer is used."
    )
    projector: Literal["mlp2x_gelu"] = Field(
        "mlp2x_gelu",
        description="Projector from vision features to LM embeddings: LLaVA-1.5's Linear-GELU-Linear "
        "(transformers' LlavaMultiModalProjector; the only one it implements).",
    )
    vision_feature_layer: int = Field(
        -2, ge=-256, le=256, description="Hidden layer of the vision encoder whose patch features feed the projector."
    )
    vision_feature_select_strategy: Literal["default", "full"] = Field(
        "full", description="'default' drops the CLS token (CLIP); 'full' keeps every token (SigLIP has no CLS)."
    )
    image_size: int = Field(336, gt=0, le=8192, description="Square input resolution in pixels (fixed resolution policy).")

    @field_validator("vision_encoder", "language_model")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return validators.no_credentials(v)


class StorageSpec(Strict):
    """Where checkpoints and outputs live; credentials only by Secret reference, never inline."""

    uri: str = Field(description="Base URI for checkpoints and outputs: file://, s3:// or gs:// (or a local path).")
    secret_ref: str | None = Field(
        None,
        description="Name of a Secret whose keys become the trainer pods' env (e.g. AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL). Kubernetes backend only.",
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, SeaweedFS, ...).")

    def fsspec_options(self, credentials: Mapping[str, str] | None = None) -> dict[str, Any]:
        """fsspec options for this job's storage: its endpoint, plus credentials given as the Secret's
        keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION).
        Without credentials, the filesystem's defaults (the process environment) apply."""
        if not self.uri.startswith("s3://"):
            return {}
        c = credentials or {}
        return storage.s3_options(
            endpoint_url=self.endpoint_url or c.get("AWS_ENDPOINT_URL"),
            key=c.get("AWS_ACCESS_KEY_ID"),
            secret=c.get("AWS_SECRET_ACCESS_KEY"),
            token=c.get("AWS_SESSION_TOKEN"),
            region=c.get("AWS_REGION") or c.get("AWS_DEFAULT_REGION"),
        )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return validators.storage_uri(v)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return validators.endpoint_url(v) if v is not None else None


class ResolutionSpec(Strict):
    """How a stage's images reach the vision tower (per stage; absent = the model's current resolution).

    fixed: every image is resized to imageSize x imageSize; a size above the model's current one
    interpolates the vision tower's position embeddings (bicubic) and the stage's final/ carries the new
    config. anyres: LLaVA-NeXT dynamic tiling through transformers' LlavaNext classes: the image is
    resized/padded to the best of gridPinpoints, cut into imageSize tiles, plus a global thumbnail tile;
    rows of features end in the learned image_newline. Moving fixed -> anyres converts the Llava model to
    LlavaNext with its weights (image_newline initialised as LLaVA-NeXT does); anyres -> fixed is refused.
    """

    policy: ResolutionPolicy = Field(description="fixed (one square size) or anyres (LLaVA-NeXT dynamic tiling).")
    image_size: int | None = Field(
        None, gt=0, le=8192,
        description="fixed: the square input size; anyres: the base tile size. Default: the model's current size.",
    )
    grid_pinpoints: list[list[int]] | None = Field(
        None, min_length=1, max_length=64,
        description="anyres only: candidate [height, width] canvases, multiples of the tile size. Default "
        "LLaVA-NeXT's set in tiles: [1,2], [2,1], [2,2], [3,1], [1,3].",
    )

    @model_validator(mode="after")
    def _pinpoints(self) -> ResolutionSpec:
        if self.grid_pinpoints is None:
            return self
        if self.policy != "anyres":
            raise ValueError("gridPinpoints: only valid with policy anyres")
        for pair in self.grid_pinpoints:
            if len(pair) != 2 or any(v <= 0 or v > 8192 for v in pair):
                raise ValueError(f"gridPinpoints: each entry is [height, width] in 1..8192 pixels, got {pair}")
            if self.image_size and any(v % self.image_size for v in pair):
                raise ValueError(f"gridPinpoints: {pair} is not a multiple of imageSize {self.image_size}")
        return self


class DataSourceSpec(Strict):
    """One data source of a mix: shards in one format, drawn in proportion to its weight."""

    shards: list[str] = Field(min_length=1, description="WebDataset shard URLs of this source (brace patterns allowed).")
    format: DataFormat = Field(description="The samples' format (see data.format).")
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative share of this source in the mix (> 0).")

    @field_validator("shards")
    @classmethod
    def _no_credentials(cls, v: list[str]) -> list[str]:
        validators.no_credentials_in(v)
        return v


class DataSpec(Strict):
    """Training data of a stage: WebDataset shards (`shards` + `format`), or a weighted mix (`sources`)."""

    shards: list[str] = Field(
        default_factory=list,
        description="WebDataset shard URLs (brace patterns allowed, e.g. data/train-{000..003}.tar); "
        "relative ones resolve against spec.storage.uri. Exactly one of shards, fromStage or sources.",
    )
    from_stage: str | None = Field(
        None,
        description="Name of an earlier curate stage whose committed output shards are this stage's data "
        "(resolved by the planner; the stage starts only once they are committed). Exactly one of shards, "
        "fromStage or sources.",
    )
    format: DataFormat | None = Field(
        None,
        description="caption: {png|jpg, txt|json.caption}; conversation: json.conversations (one <image> per "
        "image member); interleaved: json.segments, ordered text and image segments; preference: "
        "json.prompt/chosen/rejected. Images: one png/jpg member, or numbered members 0.png, 1.png, ... "
        "Required with shards.",
    )
    sources: list[DataSourceSpec] = Field(
        default_factory=list,
        description="Instead of shards + format: several sources mixed in deterministic ratios of their weights, "
        "e.g. [{shards: [caps-{000..009}.tar], format: caption, weight: 3}, {shards: [qa-000.tar], format: "
        "conversation, weight: 1}]. evalShards are read in the first source's format.",
    )
    workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes per rank that read, decode and tokenize off the "
        "training process; 0 does it in the training process. The order (and resume) does not depend on it.",
    )
    cache_mib: int = Field(
        0, ge=0, le=1_048_576, alias="cacheMiB", description="Encoded-sample cache per encoding process (each worker, "
        "or the training process with workers 0), in MiB: a later epoch skips decode, image processing and "
        "tokenization of samples already encoded (keyed by a digest of the sample's bytes; results identical to "
        "uncached; valid because encoding is deterministic). Filled until the cap, never evicted. 0 disables it.",
    )
    max_bad_sample_share: float = Field(
        0.01, ge=0, le=1, description="Corrupt samples (undecodable image, bad JSON, no assistant turn, too long, "
        "chosen == rejected, truncated shard) are skipped and counted; the stage fails once more than this share "
        "of the samples read (by all ranks) is bad, checked from 1/share samples on (0: the first bad sample fails).",
    )
    eval_shards: list[str] = Field(
        default_factory=list, description="Held-out shards in the same format, evaluated when the stage ends."
    )
    max_length: int = Field(256, gt=0, le=131072, description="Maximum tokens per sample (image tokens included).")
    shuffle_buffer: int = Field(1000, ge=0, le=1_000_000, description="Sample shuffle buffer; 0 disables shuffling.")
    max_images: int = Field(
        8, ge=1, le=256, description="Most images one sample may carry; a sample with more is a bad sample "
        "(reason too_many_images)."
    )
    resolution: ResolutionSpec | None = Field(
        None, description="This stage's image resolution policy (fixed or anyres); absent keeps the model's "
        "current one (spec.model.imageSize for the first stage, the previous stage's otherwise)."
    )
    num_samples: int | None = Field(
        None, gt=0, le=10**13, description="Examples in the shards, for `vlmctl estimate` (steps, tokens and time of an "
        "epochs-based stage, data-size advice); the trainer counts them itself."
    )

    @field_validator("shards", "eval_shards")
    @classmethod
    def _no_credentials(cls, v: list[str] | None) -> list[str] | None:
        return validators.no_credentials_in(v)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [bool(self.shards), self.from_stage is not None, bool(self.sources)]
        if sum(given) != 1:
            raise ValueError("shards: set exactly one of data.shards (a non-empty list), data.fromStage or data.sources "
                             f"(got shards={self.shards!r}, fromStage={self.from_stage!r}, {len(self.sources)} sources)")
        if self.sources and self.format is not None:
            raise ValueError("data.format: not used with data.sources (each source has its own format)")
        if not self.sources and self.format is None:
            raise ValueError("data.format: required with data.shards or data.fromStage "
                             "(caption | conversation | interleaved | preference)")
        return self

    def source_list(self) -> list[DataSourceSpec]:
        """The stage's sources: `sources`, or `shards` + `format` as one source of weight 1 (the planner has
        turned fromStage into shards by the time the trainer reads it)."""
        if self.sources:
            return list(self.sources)
        assert self.format is not None
        return [DataSourceSpec(shards=self.shards, format=self.format)]

    @property
    def eval_format(self) -> DataFormat:
        return self.source_list()[0].format


class OptimizerSpec(Strict):
    """AdamW settings. The projector's learning rate is lr * projectorLrMultiplier."""

    lr: float | None = Field(None, description="Peak learning rate; default by stage type (align 1e-3, instruct 2e-5, dpo 5e-6).")
    projector_lr_multiplier: float | None = Field(
        None, description="Projector lr = lr x this; default 10 for instruct, 1 otherwise."
    )
    weight_decay: float = Field(0.0, ge=0, le=1)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Max global grad norm; 0 disables clipping.")

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        if v is not None and v > 1:
            raise ValueError(f"must be at most 1 ({BOUND_REASONS['lr']}), got {v:g}")
        return v

    @field_validator("projector_lr_multiplier")
    @classmethod
    def _mult_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        if v is not None and v > 1000:
            raise ValueError(f"must be at most 1000 ({BOUND_REASONS['projectorLrMultiplier']}), got {v:g}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        for b in v:
            if not 0 <= b < 1:
                raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class ScheduleSpec(Strict):
    """Learning-rate schedule: linear warmup, then cosine (or constant) decay."""

    type: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent in linear warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a share of the peak lr.")


class BatchSpec(Strict):
    """Global batch = micro batch x world size x gradient-accumulation steps."""

    global_size: int = Field(32, gt=0, le=65536, description="Samples per optimizer step across all ranks.")
    micro_size: int = Field(8, gt=0, le=65536, description="Samples per forward/backward on one rank.")
    tokens_per_micro_batch: int | None = Field(
        None, gt=0, le=10_000_000, description="Sequence packing: instead of microSize samples padded to the "
        "longest, each forward/backward takes one row packed with whole samples, in order, up to this many tokens "
        "(image tokens count; no attention across samples; loss as unpacked). Must be >= data.maxLength. Steps "
        "still take globalSize / (microSize x world size) micro-batches. align/instruct only.",
    )


class DPOSpec(Strict):
    """Direct Preference Optimization (Rafailov et al. 2023) with a frozen reference model."""

    beta: float = Field(0.1, gt=0, le=100, description="KL strength; the implicit reward is beta * log-ratio.")
    reference: DPOReference = Field(
        "auto",
        description="Where the frozen reference's log-probs come from. sharded: a second copy of the "
        "starting weights, placed by the stage's strategy like the policy (FSDP/ZeRO-3 shard it); "
        "adapter_disabled: the policy with its "
        "LoRA adapter switched off (lora stages only). auto: adapter_disabled with lora, else sharded.",
    )


class LoRASpec(Strict):
    """PEFT LoRA on the language model: frozen base weights plus trainable low-rank adapters."""

    rank: int = Field(16, gt=0, le=4096, description="LoRA rank r of each adapter.")
    alpha: float = Field(32.0, gt=0, le=65536, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names (last path component) of the language model that get adapters; default "
        "the LM's attention and MLP projections. Vision-tower modules get adapters only if 'vision_tower' "
        "is in stage.trainable. The projector is always fully trained (PEFT modules_to_save).",
    )


class CheckpointSpec(Strict):
    """Resumable checkpoints under <output>/checkpoint-<step>/ (manifest.json written last)."""

    every_steps: int = Field(100, gt=0, le=1_000_000_000, description="Save a resumable checkpoint every N optimizer steps.")
    keep_last: int = Field(2, gt=0, le=1000, description="Committed checkpoints kept; older ones are deleted.")


class ResourcesSpec(Strict):
    """How many nodes and processes; Kubernetes requests for each node's pod."""

    nodes: int = Field(1, gt=0, le=4096, description="Nodes (pods) in the torchrun gang.")
    procs_per_node: int = Field(1, gt=0, le=64, description="torchrun --nproc_per_node: processes (GPUs) per node.")
    gpus_per_node: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod (0 on CPU).")
    cpu: str | None = Field(None, description="CPU request/limit per pod, a Kubernetes quantity, e.g. '8' or '500m'.")
    memory: str | None = Field(
        None, description="Memory request/limit per pod, a Kubernetes quantity, e.g. '64Gi' (default when omitted: 32Gi)."
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, le=4096, alias="gpuMemoryGiB", description="Memory of one GPU in GiB (e.g. 79.6 for an H100 80GB). The operator estimates "
        "each stage's memory per GPU before starting it and refuses a stage that does not fit "
        "(spec.runPolicy.admission)."
    )

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        return validators.positive_quantity(v) if v is not None else None


_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The field's standard recipe (LLaVA-1.5): align trains the projector only at 1e-3; instruct trains
    # LM + projector at 2e-5 (projector 10x); DPO trains the LM at a small lr against a frozen reference.
    "align": {"trainable": ["projector"], "lr": 1e-3, "mult": 1.0},
    "instruct": {"trainable": ["projector", "language_model"], "lr": 2e-5, "mult": 10.0},
    "dpo": {"trainable": ["projector", "language_model"], "lr": 5e-6, "mult": 1.0},
}


class StageSpec(Strict):
    """One stage: what trains, on which data, how long, how distributed."""

    name: str = Field(description="DNS label, unique in the job; names the stage's storage prefix and Job.")
    type: StageType = Field(description="align (projector only), instruct (LM + projector), dpo (preference) or "
                            "curate (data curation: a CurateStage; see input, filters, output).")
    data: DataSpec
    trainable: list[TrainablePart] | None = Field(
        None, description="Parts that train; everything else is frozen. Default by type."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    max_steps: int | None = Field(None, gt=0, le=1_000_000_000, description="Optimizer steps; exactly one of maxSteps or epochs.")
    epochs: float | None = Field(None, gt=0, le=10_000, description="Passes over the data; exactly one of maxSteps or epochs.")
    precision: Precision = Field(
        "bf16",
        description="bf16 or fp32 compute. bf16 on CUDA: autocast (ddp), bf16 compute with fp32 reduce (fsdp), "
        "DeepSpeed bf16 (zero2/zero3); master weights and optimizer state stay fp32. CPU runs compute in fp32.",
    )
    strategy: Strategy = Field(
        "ddp",
        description="How the model is spread over processes: ddp (replicated, DistributedDataParallel), fsdp "
        "(FSDP2 fully_shard per block, bf16 compute / fp32 reduce and master weights), zero2 (DeepSpeed ZeRO-2: "
        "optimizer state and gradients sharded) or zero3 (DeepSpeed ZeRO-3: parameters sharded too).",
    )
    offload: Offload = Field(
        "none",
        description="CPU offload: none, optimizer (optimizer state in host memory; fsdp, zero2, zero3) or "
        "optimizer_and_params (parameters too; fsdp and zero3).",
    )
    lora: LoRASpec | None = Field(
        None, description="Train PEFT LoRA adapters on the language model instead of its full weights."
    )
    qlora: bool = Field(
        False,
        description="QLoRA: the frozen base in 4-bit NF4 with double quantisation (bitsandbytes), bf16 compute, "
        "paged AdamW. Needs lora and CUDA GPUs (resources.gpusPerNode > 0); strategy ddp only.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (LM and vision encoder; torchtitan's order: after "
        "activation checkpointing, before the strategy wraps the model). ddp and fsdp only.",
    )
    cache_vision_features: bool = Field(
        False,
        description="Compute the frozen vision tower's features once per image and reuse them across epochs and "
        "later stages with the same encoder and image transform (stored under <storage.uri>/<job>/vision-features/"
        "<encoder fingerprint>/). Needs a frozen vision tower (vision_tower not in trainable) and strategy ddp or zero2.",
    )
    cross_entropy: Literal["labelled", "chunked"] = Field(
        "labelled",
        description="How the LM head and cross-entropy run (align/instruct): labelled (the head on the labelled "
        "positions only) or chunked (also over chunks of those positions, so the logits tensor is never held "
        "whole; Liger-Kernel's fused kernel on CUDA when installed). Equal loss and gradients.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of initialisation, data order and dropout (rank r uses seed + r).")
    dpo: DPOSpec | None = Field(None, description="DPO settings (type dpo only).")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_restarts: int | None = Field(None, ge=0, le=1000, description="Gang restarts of this stage; default spec.runPolicy.maxRestarts.")

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return validators.dns_label(v, max_length=40)

    @model_validator(mode="before")
    @classmethod
    def _no_curate_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            found = [k for k in CURATE_ONLY_FIELDS if k in data]
            if found:
                raise ValueError("\n".join(f"{k}: only valid for type curate, this stage is {data.get('type')!r}"
                                           for k in found))
        return data

    @model_validator(mode="after")
    def _defaults_and_rules(self) -> StageSpec:
        d = _TYPE_DEFAULTS[self.type]
        if self.trainable is None:
            self.trainable = list(d["trainable"])
        if self.optimizer.lr is None:
            self.optimizer.lr = d["lr"]
        if self.optimizer.projector_lr_multiplier is None:
            self.optimizer.projector_lr_multiplier = d["mult"]
        if self.type == "dpo" and self.dpo is None:
            self.dpo = DPOSpec()
        if self.cache_vision_features and "vision_tower" in self.trainable:
            raise ValueError("cacheVisionFeatures: needs a frozen vision tower, but this stage trains it (trainable "
                             f"{self.trainable} includes vision_tower, which is also how LoRA reaches it); remove "
                             "vision_tower from trainable or set cacheVisionFeatures: false")
        if self.cache_vision_features and self.strategy in ("fsdp", "zero3"):
            raise ValueError(f"cacheVisionFeatures: needs strategy ddp or zero2, got {self.strategy!r} (it shards the "
                             "vision tower's blocks, so their forward is a collective: a cache hit on one rank and a "
                             "miss on another would hang)")
        if self.cross_entropy != "labelled" and self.type == "dpo":
            raise ValueError(f"crossEntropy: {self.cross_entropy!r} is for align/instruct stages; dpo computes "
                             "per-sequence log-probabilities (use the default 'labelled')")
        problems = stage_rule_problems(self.model_dump(by_alias=True))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.procs_per_node

    @property
    def grad_accum_steps(self) -> int:
        return self.batch.global_size // (self.batch.micro_size * self.world_size)


class CurateInputSpec(Strict):
    """Raw image-text pairs to curate: WebDataset caption shards ({png|jpg|webp, txt|json.caption})."""

    shards: list[str] = Field(
        min_length=1,
        description="WebDataset shard URLs (brace patterns allowed); relative ones resolve against spec.storage.uri. "
        "Ranks take shards round-robin; each input shard gives one output shard.",
    )

    @field_validator("shards")
    @classmethod
    def _no_credentials(cls, v: list[str]) -> list[str]:
        validators.no_credentials_in(v)
        return v


class TextFilterSpec(Strict):
    """Caption filters (reason 'text'): length, junk patterns, special and repeated characters, script."""

    enabled: bool = Field(True, description="Run the text filter.")
    min_words: int = Field(2, ge=0, le=10_000, description="Fewest words a caption may have.")
    max_words: int = Field(128, gt=0, le=100_000, description="Most words a caption may have.")
    junk_patterns: bool = Field(
        True, description="Drop captions that are a URL, a file name ('IMG_0371.jpg') or boilerplate ('click here', "
        "'untitled', 'image', 'no description')."
    )
    extra_patterns: list[str] = Field(
        default_factory=list, description="More junk patterns: Python regular expressions, matched case-insensitively "
        "anywhere in the caption."
    )
    max_special_share: float = Field(
        0.3, ge=0, le=1, description="Largest share of characters that are neither letters, digits nor whitespace."
    )
    max_repeated_chars: int = Field(
        4, gt=0, le=1000, description="Longest run of one repeated character ('!!!!!', 'aaaaa' is 5)."
    )
    languages: list[str] = Field(
        default_factory=list,
        description="Allowed scripts of the caption's letters, as detected by the built-in script detector (no model "
        "download): latin, cyrillic, greek, arabic, hebrew, devanagari, thai, hangul, kana, han. Empty: any.",
    )

    @field_validator("extra_patterns")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"{p!r} is not a valid regular expression: {err}") from None
        return v

    @field_validator("languages")
    @classmethod
    def _scripts(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in SCRIPTS]
        if bad:
            raise ValueError(f"unknown scripts {bad}; accepted: {', '.join(SCRIPTS)}")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> TextFilterSpec:
        if self.min_words > self.max_words:
            raise ValueError(f"minWords: {self.min_words} is above maxWords ({self.max_words})")
        return self


class ImageFilterSpec(Strict):
    """Image filters: decodable (reason image_decode), smallest side (image_size), aspect ratio (aspect_ratio)."""

    enabled: bool = Field(True, description="Run the image filter.")
    min_side: int = Field(32, ge=1, le=65536, description="Smallest allowed width or height in pixels.")
    max_aspect_ratio: float = Field(
        3.0, ge=1, le=1000, description="Largest allowed long side / short side."
    )


class ClipScoreSpec(Strict):
    """Image-text cosine similarity from the stage's dual encoder (reason clip_score)."""

    threshold: float | None = Field(None, ge=-1, le=1, description="Drop pairs whose cosine is below this.")
    keep_top_fraction: float | None = Field(
        None, gt=0, le=1, description="Keep this share of the pairs reaching this filter, by highest score "
        "(DataComp's clip_score_*_30_percent is 0.3); global across ranks."
    )

    @model_validator(mode="after")
    def _one(self) -> ClipScoreSpec:
        if self.threshold is None and self.keep_top_fraction is None:
            raise ValueError("threshold: set threshold or keepTopFraction (or both: a sample must pass both)")
        return self


class NsfwSpec(Strict):
    """A linear probe over the dual encoder's image embeddings (reason nsfw). Off unless given."""

    probe: str = Field(description="Path or URI of the probe file (weights and bias over the image embedding).")
    threshold: float = Field(0.5, ge=0, le=1, description="Drop images whose probe probability is at least this.")

    @field_validator("probe")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return validators.no_credentials(v)


class ExactDedupSpec(Strict):
    """Identical decoded pixels (reason exact_duplicate); the first sample in input order is kept."""

    enabled: bool = Field(True, description="Run exact deduplication (global across ranks and shards).")


class NearDedupSpec(Strict):
    """Perceptual-hash near duplicates (reason near_duplicate); the first sample of each group is kept."""

    enabled: bool = Field(True, description="Run near deduplication (global across ranks and shards).")
    hash: Literal["phash", "dhash"] = Field("phash", description="64-bit perceptual hash: phash (DCT) or dhash (gradient).")
    max_distance: int = Field(
        4, ge=0, le=64, description="Images whose hashes differ in at most this many bits are duplicates."
    )


class SemanticDedupSpec(Strict):
    """SemDeDup over the dual encoder's image embeddings (reason semantic_duplicate). Off unless given."""

    clusters: int = Field(8, gt=0, le=1_000_000, description="k-means clusters the embeddings are split into.")
    threshold: float = Field(
        0.95, ge=-1, le=1, description="Pairs in one cluster with cosine at least this are duplicates."
    )


class BalanceSpec(Strict):
    """MetaCLIP-style balancing (reason concept_cap): captions matched to concepts, at most `perConceptCap`
    kept per concept (in input order). Off unless given."""

    concepts: list[str] = Field(
        default_factory=list, description="Concepts, matched as whole words or phrases in the caption (case-insensitive)."
    )
    concepts_file: str | None = Field(
        None, description="Path or URI of a text file with one concept per line (added to `concepts`)."
    )
    per_concept_cap: int = Field(gt=0, le=10**12, description="Most samples kept per concept.")
    drop_unmatched: bool = Field(False, description="Drop samples whose caption matches no concept (MetaCLIP does).")

    @model_validator(mode="after")
    def _some(self) -> BalanceSpec:
        if not self.concepts and self.concepts_file is None:
            raise ValueError("concepts: give concepts or conceptsFile")
        return self


class CurateFiltersSpec(Strict):
    """The filter pipeline, run in this order; each one switchable."""

    text: TextFilterSpec = Field(default_factory=TextFilterSpec)
    image: ImageFilterSpec = Field(default_factory=ImageFilterSpec)
    clip_score: ClipScoreSpec | None = Field(None, description="CLIP-score filter; needs the stage's encoder. Off unless given.")
    nsfw: NsfwSpec | None = Field(None, description="NSFW probe; needs the stage's encoder. Off unless given.")
    exact_dedup: ExactDedupSpec = Field(default_factory=ExactDedupSpec)
    near_dedup: NearDedupSpec = Field(default_factory=NearDedupSpec)
    semantic_dedup: SemanticDedupSpec | None = Field(
        None, description="SemDeDup; needs the stage's encoder. Off unless given."
    )
    balance: BalanceSpec | None = Field(None, description="Per-concept cap. Off unless given.")


class CurateOutputSpec(Strict):
    """What the stage writes to <output>/final/ (committed like a checkpoint: files first, manifest last)."""

    examples_per_reason: int = Field(
        5, ge=0, le=1000, description="Example keys and captions per reason in funnel.json."
    )


class CurateStage(Strict):
    """A data-curation stage: filters, deduplicates and balances raw image-text shards into curated shards
    that a later training stage reads with `data: {fromStage: <this stage's name>}`."""

    name: str = Field(description="DNS label, unique in the job; names the stage's storage prefix and Job.")
    type: Literal["curate"] = Field(description="curate: filter the input shards into committed output shards.")
    input: CurateInputSpec
    filters: CurateFiltersSpec = Field(default_factory=CurateFiltersSpec)
    output: CurateOutputSpec = Field(default_factory=CurateOutputSpec)
    encoder: str | None = Field(
        None, description="Path or URI of a CLIP-style dual encoder (transformers CLIPModel or SiglipModel with its "
        "processor) for clipScore, nsfw and semanticDedup; GPU when present."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of initialisation, data order and dropout (rank r uses seed + r).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_restarts: int | None = Field(None, ge=0, le=1000, description="Gang restarts of this stage; default spec.runPolicy.maxRestarts.")

    @model_validator(mode="before")
    @classmethod
    def _no_training_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            found = [k for k in TRAINING_ONLY_FIELDS if k in data]
            if found:
                raise ValueError("\n".join(
                    f"{k}: a curate stage has no training fields (its fields: name, type, input, filters, output, "
                    "encoder, seed, resources, maxRestarts)" for k in found))
        return data

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return validators.dns_label(v, max_length=40)

    @field_validator("encoder")
    @classmethod
    def _enc(cls, v: str | None) -> str | None:
        return validators.no_credentials(v) if v is not None else None

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.procs_per_node

    @model_validator(mode="after")
    def _encoder_needed(self) -> CurateStage:
        f = self.filters
        for field, value in (("clipScore", f.clip_score), ("nsfw", f.nsfw), ("semanticDedup", f.semantic_dedup)):
            if value is not None and self.encoder is None:
                raise ValueError(f"filters.{field}: needs the stage's encoder (a CLIP-style dual encoder URI)")
        return self


def _stage_kind(v: Any) -> str:
    """The union's tag: 'curate' for curate stages, 'training' for every other type (whose own Literal then
    names the accepted types). A callable discriminator, because Strict's before-validator runs on `type`."""
    t = v.get("type") if isinstance(v, Mapping) else getattr(v, "type", None)
    return "curate" if t == CURATE_TYPE else "training"


AnyStage = Annotated[
    Annotated[StageSpec, Tag("training")] | Annotated[CurateStage, Tag("curate")], Discriminator(_stage_kind)
]
STAGE_TYPES = (*get_args(StageType), CURATE_TYPE)
STAGE_TAGS = ("training", "curate")  # union tags in validation error locations (left out of field paths)


def field_default(model: type[Strict], camel_name: str) -> Any:
    """A field's default by its wire (camelCase) name: the one value both these rules and the CRD's CEL
    rules fall back to when the field is absent."""
    for name, info in model.model_fields.items():
        if to_camel(name) == camel_name:
            return info.get_default(call_default_factory=True)
    raise KeyError(f"{model.__name__} has no field {camel_name!r}")


def stage_rule_problems(stage: Mapping[str, Any]) -> list[str]:
    """Cross-field rules of one stage, on its camelCase dict: one 'field.path: message' per broken rule.

    Works on raw input too (wrong types are skipped: their own field errors report them), so a stage with
    a bad field still gets its cross-field problems reported in the same run.
    """

    def num(d: Any, model: type[Strict], key: str) -> int | None:
        default = field_default(model, key)
        v = d.get(key, default) if isinstance(d, Mapping) else default
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    out = []
    stype, data = stage.get("type"), stage.get("data")
    fmt = data.get("format") if isinstance(data, Mapping) else None
    fmts = {fmt} if isinstance(fmt, str) else set()
    if isinstance(data, Mapping) and isinstance(data.get("sources"), list):
        fmts |= {s["format"] for s in data["sources"] if isinstance(s, Mapping) and isinstance(s.get("format"), str)}
    tokens = (stage.get("batch") or {}).get("tokensPerMicroBatch")
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        if stype == "dpo":
            out.append("batch.tokensPerMicroBatch: packing is for align/instruct stages, not dpo (pairs are not packed)")
        max_length = data.get("maxLength", field_default(DataSpec, "maxLength")) if isinstance(data, Mapping) else None
        if isinstance(max_length, int) and tokens < max_length:
            out.append(f"batch.tokensPerMicroBatch: {tokens} must be >= data.maxLength ({max_length}) so that every "
                       "sample fits in a row")
    if stage.get("trainable") == []:
        out.append("trainable: at least one part must train, got []")
    if (stage.get("maxSteps") is None) == (stage.get("epochs") is None):
        out.append(f"maxSteps: set exactly one of maxSteps or epochs (got maxSteps={stage.get('maxSteps')}, "
                   f"epochs={stage.get('epochs')})")
    if stype == "dpo" and fmts - {"preference"}:
        out.append(f"data.format: a dpo stage needs 'preference' data, got {', '.join(repr(f) for f in sorted(fmts))}")
    if stype in ("align", "instruct"):
        if stage.get("dpo") is not None:
            out.append(f"dpo: only valid for type dpo, this stage is {stype!r}")
        if "preference" in fmts:
            out.append(f"data.format: 'preference' data needs type dpo, this stage is {stype!r}")
    out += _strategy_rule_problems(stage)
    batch, res = stage.get("batch") or {}, stage.get("resources") or {}
    sizes = (num(batch, BatchSpec, "globalSize"), num(batch, BatchSpec, "microSize"),
             num(res, ResourcesSpec, "nodes"), num(res, ResourcesSpec, "procsPerNode"))
    glob, micro, nodes, procs = sizes
    if glob is not None and micro is not None and nodes is not None and procs is not None:
        if glob % (micro * nodes * procs):
            out.append(f"batch.globalSize: {glob} must be a multiple of batch.microSize ({micro}) x world size "
                       f"({nodes * procs} = resources.nodes x resources.procsPerNode)")
    return out


def _strategy_rule_problems(stage: Mapping[str, Any]) -> list[str]:
    """Rules tying strategy, offload, lora, qlora and the DPO reference together."""
    out = []
    strategy, offload = stage.get("strategy", "ddp"), stage.get("offload", "none")
    lora, qlora = stage.get("lora"), stage.get("qlora", False)
    raw_res = stage.get("resources")
    res: Mapping[str, Any] = raw_res if isinstance(raw_res, Mapping) else {}
    if offload == "optimizer" and strategy == "ddp":
        out.append("offload: 'optimizer' needs strategy fsdp, zero2 or zero3 (ddp keeps everything on the device)")
    if offload == "optimizer_and_params" and strategy not in ("fsdp", "zero3"):
        out.append(f"offload: 'optimizer_and_params' needs strategy fsdp or zero3 (parameters are not sharded "
                   f"under {strategy!r})")
    if lora is not None and strategy != "ddp":
        out.append(f"lora: supports strategy ddp only (adapters are small; the base is replicated), got {strategy!r}")
    if qlora is True:
        if lora is None:
            out.append("qlora: true needs lora settings (stage.lora) for the adapters trained on the 4-bit base")
        if res.get("gpusPerNode", 0) == 0:
            out.append("qlora: true needs CUDA GPUs (bitsandbytes 4-bit); set resources.gpusPerNode > 0 or "
                       "use lora without qlora on CPU")
        if strategy != "ddp":
            out.append(f"qlora: true supports strategy ddp only, got {strategy!r}")
    if stage.get("compile") is True and strategy not in ("ddp", "fsdp"):
        out.append(f"compile: true supports strategy ddp or fsdp (DeepSpeed wraps the model itself), got {strategy!r}")
    dpo = stage.get("dpo")
    if isinstance(dpo, Mapping) and dpo.get("reference") == "adapter_disabled" and lora is None:
        out.append("dpo.reference: 'adapter_disabled' needs lora (the reference is the base without adapters)")
    return out


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class RunPolicySpec(Strict):
    """Restarts, suspension and scheduling hints (Kubernetes backend)."""

    max_restarts: int = Field(3, ge=0, le=1000, description="Gang restarts per stage before the job fails.")
    suspend: bool = Field(False, description="Suspended jobs hold no pods; resuming continues the current stage.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=365 * 24 * 3600, description="Delete the job this long after it finishes.")
    priority_class_name: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    queue_name: str | None = Field(None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    admission: Literal["enforce", "warn", "off"] | None = Field(
        None, description="GPU-memory admission of each stage: enforce (do not start a stage whose estimate "
        "exceeds resources.gpuMemoryGiB), warn (start it with a Warning event) or off. Default: enforce where "
        "a stage declares gpuMemoryGiB."
    )
    service_account_name: str | None = Field(
        None,
        description="ServiceAccount of the trainer pods (default: vlm-trainer, created by the chart); "
        "its API token is never mounted.",
    )


class ImageSpec(Strict):
    """Trainer container image (Kubernetes backend)."""

    repository: str = "ghcr.io/vlm-training-operator/trainer"
    tag: str = Field(__version__, description="Image tag; defaults to this release of the operator.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class JobSpec(Strict):
    """spec of a VLMTrainingJob."""

    model: ModelSpec
    storage: StorageSpec
    stages: list[AnyStage] = Field(
        min_length=1, description="Run in order. A training stage starts from the previous training stage's final/ "
        "(spec.model for the first); a curate stage's output is read by a later stage's data.fromStage."
    )
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    image: ImageSpec = Field(default_factory=ImageSpec)
    suspend: bool = Field(False, description="Suspend the job (Kueue-compatible); same as runPolicy.suspend.")

    @model_validator(mode="after")
    def _unique_names(self) -> JobSpec:
        dups = duplicate_stage_names([s.name for s in self.stages])
        if dups:
            raise ValueError("; ".join(dups))
        refs = from_stage_problems([(s.type, s.name, s.data.from_stage if isinstance(s, StageSpec) else None)
                                    for s in self.stages])
        if refs:
            raise ValueError("\n".join(refs))
        return self


def from_stage_problems(stages: list[tuple[Any, Any, Any]]) -> list[str]:
    """One 'stages[i].data.fromStage: ...' problem per (type, name, fromStage) whose fromStage does not name an
    earlier curate stage."""
    out = []
    for i, (_type, _name, ref) in enumerate(stages):
        if ref is None:
            continue
        earlier = [n for t, n, _ in stages[:i] if t == CURATE_TYPE]
        if ref not in earlier:
            accepted = ", ".join(repr(n) for n in earlier) or "none before this stage"
            out.append(f"stages[{i}].data.fromStage: {ref!r} is not an earlier curate stage (curate stages: {accepted})")
    return out


def duplicate_stage_names(names: list[Any]) -> list[str]:
    """One 'stages[i].name: ...' problem per stage whose name an earlier stage already uses."""
    seen: set[Any] = set()
    out = []
    for i, name in enumerate(names):
        if name in seen:
            out.append(f"stages[{i}].name: {name!r} is used by an earlier stage; names must be unique")
        seen.add(name)
    return out


class ObjectMeta(Strict):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return validators.dns_label(v) if v is not None else None

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return validators.dns_label(v, max_length=40)


class VLMTrainingJob(Strict):
    """The resource: apiVersion training.vlm.dev/v1alpha1, kind VLMTrainingJob."""

    model_config = ConfigDict(extra="ignore")  # status etc. are not ours to validate
    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    spec: JobSpec

    @field_validator("api_version")
    @classmethod
    def _api(cls, v: str) -> str:
        want = f"{API_GROUP}/{API_VERSION}"
        if v != want:
            raise ValueError(f"must be {want!r}, got {v!r}")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != KIND:
            raise ValueError(f"must be {KIND!r}, got {v!r}")
        return v

    @property
    def name(self) -> str:
        return self.metadata.name


class SpecError(ValueError):
    """A job file failed validation; `problems` holds one 'field.path: message' line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid VLMTrainingJob:\n" + "\n".join(f"  {p}" for p in problems))


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    prev: Any = None
    for part in loc:
        tag, prev = isinstance(prev, int) and part in STAGE_TAGS, part
        if isinstance(part, int):
            out += f"[{part}]"
        elif tag or str(part).startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        path = _loc_to_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `kubectl explain vlmjob.spec`)"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        elif e["type"] in ("less_than_equal", "less_than") and str(e["loc"][-1]) in BOUND_REASONS:
            msg = f"{msg} ({BOUND_REASONS[str(e['loc'][-1])]}), got {e.get('input')!r}"
        elif e["type"] in ("finite_number",):
            msg = f"must be a finite number, got {e.get('input')!r}"
        for line in msg.split("\n"):
            # Model-level rules name their own sub-field ("batch.globalSize: ..."); join it to the path.
            m = re.match(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+)*):\s(.*)$", line)
            full, text = path, line
            if m and e["type"] == "value_error":
                full, text = (f"{path}.{m.group(1)}" if path else m.group(1)), m.group(2)
            problems.append(f"{full}: {text}" if full else text)
    return problems


def parse_job(doc: dict[str, Any]) -> VLMTrainingJob:
    """Validate a job document; raise SpecError listing every problem by field path."""
    if not isinstance(doc, dict):
        raise SpecError([f"the document must be a mapping, got {type(doc).__name__}"])
    try:
        return VLMTrainingJob.model_validate(doc)
    except ValidationError as err:
        problems = format_errors(err)
        # Job-level rules only run once every stage is valid; report duplicates now too.
        raw = (doc.get("spec") or {}).get("stages") if isinstance(doc.get("spec"), dict) else None
        if isinstance(raw, list):
            stages: list[dict[str, Any]] = [s if isinstance(s, dict) else {} for s in raw]
            data: list[dict[str, Any]] = [d if isinstance(d := s.get("data"), dict) else {} for s in stages]
            for p in [*duplicate_stage_names([s.get("name") for s in stages]),
                      *from_stage_problems([(s.get("type"), s.get("name"), d.get("fromStage"))
                                            for s, d in zip(stages, data, strict=True)])]:
                if f"spec.{p}" not in problems:
                    problems.append(f"spec.{p}")
            # A stage with a bad field never reached its cross-field rules; run them on the raw input.
            for i, stage in enumerate(raw):
                training = isinstance(stage, dict) and stage.get("type") != CURATE_TYPE
                for p in stage_rule_problems(stage) if training else []:
                    if f"spec.stages[{i}].{p}" not in problems:
                        problems.append(f"spec.stages[{i}].{p}")
        raise SpecError(problems) from None


MAX_JOB_FILE_BYTES = 1 << 20  # the API server refuses objects past ~1.5 MB; a job file is a few KB


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a repeated key is an error, not 'the later one silently wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_job_text(data: bytes, source: str = "<input>") -> VLMTrainingJob:
    """Validate a job file's bytes (UTF-8, a BOM and CRLF line ends allowed; one YAML document)."""
    if len(data) > MAX_JOB_FILE_BYTES:
        raise SpecError([f"{source}: {len(data)} bytes; a job file is at most {MAX_JOB_FILE_BYTES} bytes"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError([f"{source}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})"]) from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        return parse_job(doc)
    except yaml.YAMLError as err:
        raise SpecError([f"not valid YAML: {err}"]) from None
    except RecursionError:
        raise SpecError([f"{source}: nested too deeply to be a VLMTrainingJob"]) from None


def load_job(path: str) -> VLMTrainingJob:
    """Read and validate a job YAML file (one document); `-` reads standard input. Every failure is a
    SpecError or an OSError with a message, never a traceback-worthy surprise."""
    if path == "-":
        return parse_job_text(sys.stdin.buffer.read(), "<stdin>")
    if os.path.isdir(path):
        raise SpecError([f"{path}: is a directory; give the path of a job YAML file"])
    with open(path, "rb") as f:
        data = f.read(MAX_JOB_FILE_BYTES + 1)
    return parse_job_text(data, path)


def dump_job(job: VLMTrainingJob) -> dict[str, Any]:
    """The job as a camelCase dict with defaults filled in (what the operator and trainer see)."""
    doc = job.model_dump(by_alias=True, mode="json", exclude_none=True)
    for stage in doc["spec"]["stages"]:
        if stage.get("data", {}).get("fromStage") is not None:
            stage["data"].pop("shards", None)  # the planner fills them in; the CRD wants none or some
    return doc


class TrainerConfig(Strict):
    """One stage, resolved by the planner: everything a trainer process needs, nothing it must look up.

    `init_from` is the previous stage's committed `final/` (None for the first stage, which assembles
    the VLM from spec.model's vision encoder and language model); `output` is this stage's prefix.
    """

    job: str
    stage_index: int = Field(ge=0)
    stage: AnyStage
    model: ModelSpec
    storage: StorageSpec
    init_from: str | None = None
    output: str

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")

    @classmethod
    def load(cls, doc: dict[str, Any]) -> TrainerConfig:
        return cls.model_validate(doc)
