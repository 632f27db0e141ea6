"""The global decisions of the curate stage: which sample is kept, and the one reason each other one is not.

`decide` takes every sample's record in global order (input shard index, then position in the shard) in one
process; the stage itself runs the same decisions with each rank holding only its own records
(`curate.scale.decide_columns`, which `decide` calls with one rank), and the result does not depend on the
number of ranks. Filters run in the seed's order; a sample is judged by the first filter that drops it,
and deduplication keeps the first sample of each group in that global order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vlm_core.spec import CurateFiltersSpec

from vlm_trainer.curate.scale import REASONS, columns_from_records, concept_matcher, decide_columns

__all__ = ["REASONS", "FILTERS", "Decisions", "concept_matcher", "decide", "filters_enabled"]

# The fixed reason names of decisions.jsonl, in pipeline order, are `scale.REASONS`.
# The funnel's filters, in pipeline order, each with the reasons it gives.
FILTERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text", ("text",)),
    ("image", ("image_decode", "image_size", "aspect_ratio")),
    ("clip_score", ("clip_score",)),
    ("nsfw", ("nsfw",)),
    ("exact_dedup", ("exact_duplicate",)),
    ("near_dedup", ("near_duplicate",)),
    ("semantic_dedup", ("semantic_duplicate",)),
    ("balance", ("concept_cap",)),
)


@dataclass
class Decisions:
    """`reasons[i]` is None for a kept sample, else its reason; `duplicate_of[i]` the kept sample it repeats."""

    reasons: list[str | None]
    duplicate_of: dict[int, int] = field(default_factory=dict)
    enabled: dict[str, bool] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # the dedup steps' counts (candidates, groups, ...)

    def alive(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]


def filters_enabled(filters: CurateFiltersSpec) -> dict[str, bool]:
    return {
        "text": filters.text.enabled,
        "image": filters.image.enabled,
        "clip_score": filters.clip_score is not None,
        "nsfw": filters.nsfw is not None,
        "exact_dedup": filters.exact_dedup.enabled,
        "near_dedup": filters.near_dedup.enabled,
        "semantic_dedup": filters.semantic_dedup is not None,
        "balance": filters.balance is not None,
    }


def decide(
    records: list[dict[str, Any]],
    filters: CurateFiltersSpec,
    *,
    concepts: list[str] | None = None,
    embeddings: Any = None,
    seed: int = 0,
) -> Decisions:
    """The decisions over all samples, `records` in global order.

    A record holds `reason` (the local text/image verdict, or None), `pixel` (exact hash), `phash` (near
    hash), `caption`, and with an encoder `clip` (score) and `nsfw` (flag); `embeddings` are the image
    embeddings of the samples (row i = record i; rows of samples dropped locally may be zero).
    """
    cols = columns_from_records(records, np.arange(len(records)), embeddings, filters)
    stats = decide_columns(cols, filters, concepts=concepts, seed=seed)
    return Decisions([REASONS[c - 1] if c else None for c in cols.reason.tolist()],
                     {i: int(g) for i, g in enumerate(cols.dup_of.tolist()) if g >= 0},
                     enabled=filters_enabled(filters), stats=stats)
