"""A training stage's data: shards or a weighted mix of sources, their format, and the image resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator

from vlm_core import kinds, parquet, storage, validators
from vlm_core.spec.base import ContentOf, NoEffect, Strict

if TYPE_CHECKING:  # the type checker sees a string; pydantic sees the kinds table's formats as a Literal
    DataFormat = str
else:
    DataFormat = Literal[kinds.FORMATS]
ResolutionPolicy = Literal["fixed", "anyres"]


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

    shards: Annotated[list[str], ContentOf("shards")] = Field(min_length=1, description="WebDataset shard URLs of this source (brace patterns allowed), or Parquet files (*.parquet); all of one kind.")
    format: DataFormat = Field(description="The samples' format (see data.format).")
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative share of this source in the mix (> 0).")

    @field_validator("shards")
    @classmethod
    def _shard_uris(cls, v: list[str]) -> list[str]:
        return one_shard_kind(validators.input_uris(v))


def one_shard_kind(v: list[str]) -> list[str]:
    """A list of shards is all WebDataset tars or all Parquet files (`.parquet`, read in place)."""
    if v:
        parquet.shard_kind(storage.expand_shards(v), None)  # the error's location names the field
    return v


class DataSpec(Strict):
    """Training data of a stage: WebDataset shards (`shards` + `format`), or a weighted mix (`sources`)."""

    shards: Annotated[list[str], ContentOf("shards")] = Field(
        default_factory=list,
        description="WebDataset shard URLs (brace patterns allowed, e.g. data/train-{000..003}.tar), or Parquet "
        "files (*.parquet, HF-style rows read in place, split by row group); all of one kind. "
        "Relative ones resolve against spec.storage.uri. Exactly one of shards, fromStage or sources.",
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
    workers: Annotated[int, NoEffect("the order and resume do not depend on it (loader.py)")] = Field(
        0, ge=0, le=64, description="DataLoader worker processes per rank that read, decode and tokenize off the "
        "training process; 0 does it in the training process. The order (and resume) does not depend on it.",
    )
    cache_mib: Annotated[int, NoEffect("results identical to uncached")] = Field(
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
    eval_shards: Annotated[list[str], ContentOf("shards")] = Field(
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
    def _shard_uris(cls, v: list[str]) -> list[str]:
        return one_shard_kind(validators.input_uris(v))

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
