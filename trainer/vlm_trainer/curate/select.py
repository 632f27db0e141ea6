"""The global decisions of the curate stage: which sample is kept, and the one reason each other one is not.

`decide` takes every sample's record in global order (input shard index, then position in the shard) in one
process; the stage itself runs the same decisions with each rank holding only its own records
(`curate.scale.decide_columns`, which `decide` calls with one rank), and the result does not depend on the
number of ranks. Filters run in the seed's order; a sample is judged by the first filter that drops it.
Exact dedup keeps the first sample of each group in that global order. Near dedup (`groups`): the
perceptual hashes propose candidate pairs within `maxDistance` bits, the second signal (`verify`) confirms
them, confirmed pairs form groups (connected components), and each group keeps its best member (`keep`:
the first in global order, or the highest CLIP score then the first); another member is removed only as a
confirmed duplicate of a kept one, never through a chain of others.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vlm_core.spec import CurateFiltersSpec

from vlm_trainer.curate.image import THUMB_SIDE
from vlm_trainer.curate.scale import REASONS, columns_from_records, concept_matcher, decide_columns

__all__ = ["REASONS", "FILTERS", "Decisions", "concept_matcher", "decide", "decisions_of", "filters_enabled",
           "uses_embeddings", "encode_thumb", "decode_thumbs"]

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
    """`reasons[i]` is None for a kept sample, else its reason; `duplicate_of[i]` the kept sample it repeats;
    `groups[filter]` the duplicate groups (global indices, two or more members) each dedup filter found;
    `similarity[i]` the second signal's cosine between a near duplicate and the sample it repeats."""

    reasons: list[str | None]
    duplicate_of: dict[int, int] = field(default_factory=dict)
    enabled: dict[str, bool] = field(default_factory=dict)
    groups: dict[str, list[list[int]]] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # the dedup steps' counts (candidates, confirmed, ...)

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


def uses_embeddings(filters: CurateFiltersSpec) -> bool:
    """Whether `decide` needs the image embeddings (SemDeDup, or near dedup verified by embeddings)."""
    near = filters.near_dedup
    return filters.semantic_dedup is not None or (
        near.enabled and near.verify is not None and near.verify.signal == "embedding")


def decisions_of(reasons: list[str | None], duplicate_of: dict[int, int], filters: CurateFiltersSpec,
                 stats: dict[str, Any]) -> Decisions:
    """The Decisions of all samples (global indices) from their verdicts and `decide_columns`' stats: exact
    and semantic groups are a kept sample and those naming it; near groups are the confirmed pairs' components."""
    d = Decisions(reasons, duplicate_of, enabled=filters_enabled(filters),
                  stats={k: v for k, v in stats.items() if k in ("near_dedup", "semantic_dedup")})
    for name, reason in (("exact_dedup", "exact_duplicate"), ("semantic_dedup", "semantic_duplicate")):
        if d.enabled[name]:
            members: dict[int, list[int]] = {}
            for i, r in enumerate(reasons):
                if r == reason:
                    members.setdefault(duplicate_of[i], [duplicate_of[i]]).append(i)
            d.groups[name] = (list(members.values()) if name == "exact_dedup"
                              else [sorted(g) for _, g in sorted(members.items())])
    if d.enabled["near_dedup"]:
        d.groups["near_dedup"] = stats.get("near_groups", [])
        if filters.near_dedup.verify is not None:
            d.similarity = dict(stats.get("near_similarity", {}))
    return d


def decide(
    records: list[dict[str, Any]],
    filters: CurateFiltersSpec,
    *,
    concepts: list[str] | None = None,
    embeddings: Any = None,
    seed: int = 0,
) -> Decisions:
    """The decisions over all samples, `records` in global order.

    A record holds `reason` (the local text/image verdict, or None), `pixel` (exact hash), `hashes` (the
    perceptual hashes by name), `thumb` (near dedup's thumbnail), `caption`, and with an encoder `clip`
    (score) and `nsfw` (flag); `embeddings` are the image embeddings of the samples (row i = record i; rows of
    samples dropped locally may be zero).
    """
    cols = columns_from_records(records, np.arange(len(records)), embeddings, filters)
    stats = decide_columns(cols, filters, concepts=concepts, seed=seed)
    return decisions_of([REASONS[c - 1] if c else None for c in cols.reason.tolist()],
                        {i: int(g) for i, g in enumerate(cols.dup_of.tolist()) if g >= 0}, filters, stats)


def encode_thumb(thumb: np.ndarray) -> str:
    """A thumbnail (uint8 [side, side, 3]) as the base64 text a record carries."""
    return base64.b64encode(np.ascontiguousarray(thumb, dtype=np.uint8).tobytes()).decode()


def decode_thumbs(texts: list[str], side: int = THUMB_SIDE) -> np.ndarray:
    """Records' thumbnails back as uint8 [n, side, side, 3]."""
    raw = b"".join(base64.b64decode(t) for t in texts)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(texts), side, side, 3)
