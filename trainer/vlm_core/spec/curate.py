"""The data-curation stage (CurateStage): its input shards, filter pipeline, output and dual encoder."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from vlm_core import kinds, parquet, validators
from vlm_core.spec.base import ContentOf, NoEffect, Strict
from vlm_core.spec.common import StageBase

CURATE_TYPE = kinds.kind("curate").type  # the data-curation stage (CurateStage); a KeyError if the table lacks it
# Scripts the curate stage's built-in language (script) detector tells apart.
SCRIPTS = ("latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "hangul", "kana", "han")


class CurateInputSpec(Strict):
    """Raw image-text pairs to curate: WebDataset caption shards ({png|jpg|webp, txt|json.caption})."""

    shards: Annotated[list[str], ContentOf("shards")] = Field(
        min_length=1,
        description="WebDataset shard URLs (brace patterns allowed); relative ones resolve against spec.storage.uri. "
        "Ranks take shards round-robin; each input shard gives one output shard.",
    )

    @field_validator("shards")
    @classmethod
    def _shard_uris(cls, v: list[str]) -> list[str]:
        v = validators.input_uris(v)
        if any(parquet.is_parquet(u) for u in v):
            raise ValueError("a curate stage reads WebDataset tar shards, not Parquet files: convert them with "
                             "`vlmctl data import` first (training stages read Parquet in place)")
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
    percentile: float | None = Field(
        None, ge=0, lt=100, description="Drop pairs scoring below this percentile of the scores of the pairs "
        "reaching this filter (DataComp style: 70 keeps about the top 30%); global across ranks."
    )

    @model_validator(mode="after")
    def _one(self) -> ClipScoreSpec:
        if self.threshold is None and self.keep_top_fraction is None and self.percentile is None:
            raise ValueError("threshold: set threshold, keepTopFraction or percentile (given several, a sample "
                             "must pass each)")
        return self


class NsfwSpec(Strict):
    """A linear probe over the dual encoder's image embeddings (reason nsfw). Off unless given."""

    probe: Annotated[str, ContentOf("file")] = Field(description="Path or URI of the probe file (weights and bias over the image embedding).")
    threshold: float = Field(0.5, ge=0, le=1, description="Drop images whose probe probability is at least this.")

    @field_validator("probe")
    @classmethod
    def _probe_uri(cls, v: str) -> str:
        return validators.input_uri(v)


class ExactDedupSpec(Strict):
    """Identical decoded pixels (reason exact_duplicate); the first sample in input order is kept."""

    enabled: bool = Field(True, description="Run exact deduplication (global across ranks and shards).")


HashName = Literal["phash", "dhash"]
HASHES: tuple[HashName, ...] = ("phash", "dhash")  # the 64-bit perceptual hashes that propose candidates


class NearVerifySpec(Strict):
    """The second signal that confirms a near-duplicate candidate: the cosine of aligned thumbnails (the images
    area-averaged to 24x24 RGB and blurred, each channel minus its mean so brightness and colour-balance shifts
    do not count, the best match over small zooms and shifts so crops and shifts do not either) or of the
    stage encoder's image embeddings."""

    signal: Literal["thumbnail", "embedding"] = Field(
        "thumbnail", description="thumbnail: aligned 24x24 RGB thumbnails (no encoder needed); embedding: the stage "
        "encoder's image embeddings."
    )
    min_similarity: float = Field(
        0.97, ge=-1, le=1, description="A candidate pair is a duplicate when the signal's cosine is at least this "
        "(`vlmctl curate calibrate` measures it on your own images)."
    )
    blur: float = Field(
        1.2, ge=0, le=4, description="thumbnail only: Gaussian blur (sigma, thumbnail pixels) before comparing; 0 "
        "compares sharp thumbnails, where fine texture (sensor noise) tells look-alikes apart. Calibrated too."
    )


class NearDedupSpec(Strict):
    """Near duplicates (reason near_duplicate): perceptual hashes propose candidate pairs at a generous radius,
    a second signal (`verify`) confirms them; confirmed pairs form groups, and each group keeps its best member
    (`keep`); a sample is removed only as a confirmed duplicate of a kept one."""

    enabled: bool = Field(True, description="Run near deduplication (global across ranks and shards).")
    hashes: list[HashName] = Field(
        default_factory=lambda: list(HASHES), min_length=1, max_length=len(HASHES),
        description="64-bit perceptual hashes that propose candidates: phash (DCT), dhash (gradient); a pair "
        "within maxDistance bits in any of them is a candidate.",
    )
    max_distance: int = Field(
        10, ge=0, le=32, description="Candidate radius: images whose hashes differ in at most this many bits are "
        "candidates (without verify: duplicates)."
    )
    verify: NearVerifySpec | None = Field(
        default_factory=NearVerifySpec, description="The second signal that confirms candidates; null: every "
        "candidate is a duplicate (hash only)."
    )
    keep: Literal["first", "clipScore"] = Field(
        "first", description="Which member of a duplicate group stays: first (the first in global input order) "
        "or clipScore (the highest CLIP score, then the first; needs filters.clipScore)."
    )

    @field_validator("hashes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each hash at most once, got {v}; accepted: {', '.join(HASHES)}")
        return v


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
    concepts_file: Annotated[str | None, ContentOf("file")] = Field(
        None, description="Path or URI of a text file with one concept per line (added to `concepts`)."
    )
    per_concept_cap: int = Field(gt=0, le=10**12, description="Most samples kept per concept.")
    drop_unmatched: bool = Field(False, description="Drop samples whose caption matches no concept (MetaCLIP does).")

    @field_validator("concepts_file")
    @classmethod
    def _concepts_uri(cls, v: str | None) -> str | None:
        return validators.input_uri(v) if v is not None else None

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

    examples_per_reason: Annotated[int, NoEffect("examples in the report only")] = Field(
        5, ge=0, le=1000, description="Example keys and captions per reason in funnel.json."
    )


class CurateStage(StageBase):
    """A data-curation stage: filters, deduplicates and balances raw image-text shards into curated shards
    that a later training stage reads with `data: {fromStage: <this stage's name>}`."""

    type: Literal["curate"] = Field(description="curate: filter the input shards into committed output shards.")
    input: CurateInputSpec
    filters: CurateFiltersSpec = Field(default_factory=CurateFiltersSpec)
    output: CurateOutputSpec = Field(default_factory=CurateOutputSpec)
    encoder: Annotated[str | None, ContentOf("folder")] = Field(
        None, description="Path or URI of a CLIP-style dual encoder (transformers CLIPModel or SiglipModel with its "
        "processor) for clipScore, nsfw and semanticDedup; GPU when present."
    )
    @field_validator("encoder")
    @classmethod
    def _enc(cls, v: str | None) -> str | None:
        return validators.input_uri(v, validators.STORAGE_SCHEMES) if v is not None else None

    @model_validator(mode="after")
    def _encoder_needed(self) -> CurateStage:
        f = self.filters
        for field, value in (("clipScore", f.clip_score), ("nsfw", f.nsfw), ("semanticDedup", f.semantic_dedup)):
            if value is not None and self.encoder is None:
                raise ValueError(f"filters.{field}: needs the stage's encoder (a CLIP-style dual encoder URI)")
        near = f.near_dedup
        if near.enabled and near.verify is not None and near.verify.signal == "embedding" and self.encoder is None:
            raise ValueError("filters.nearDedup.verify.signal: embedding needs the stage's encoder (a CLIP-style "
                             "dual encoder URI); thumbnail needs none")
        if near.enabled and near.keep == "clipScore" and f.clip_score is None:
            raise ValueError("filters.nearDedup.keep: clipScore needs filters.clipScore (the scores it ranks by); "
                             "accepted without it: first")
        return self
