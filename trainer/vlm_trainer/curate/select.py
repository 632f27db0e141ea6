"""The global decisions of the curate stage: which sample is kept, and the one reason each other one is not.

Ranks analyse their own shards (`runner.analyse_shard`: text and image checks, hashes, embedding scores)
and exchange the light per-sample records; every rank then runs `decide` on the same records in the same
global order (input shard index, then position in the shard), so the result does not depend on the
number of ranks. Filters run in the seed's order; a sample is judged by the first filter that drops it,
and deduplication keeps the first sample of each group in that global order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vlm_core.spec import CurateFiltersSpec

from vlm_trainer.curate.image import hamming

# The fixed reason names of decisions.jsonl, in pipeline order.
REASONS = ("text", "image_decode", "image_size", "aspect_ratio", "clip_score", "nsfw", "exact_duplicate",
           "near_duplicate", "semantic_duplicate", "concept_cap")
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


def concept_matcher(concepts: list[str]) -> re.Pattern[str] | None:
    """One regex matching any concept as a whole word or phrase, case-insensitively (longest first)."""
    names = sorted({c.strip().lower() for c in concepts if c.strip()}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


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
    d = Decisions([r.get("reason") for r in records], enabled=filters_enabled(filters))
    if filters.clip_score is not None:
        import torch

        from vlm_trainer.curate import embed

        idx = d.alive()
        if idx:
            scores = torch.tensor([float(records[i]["clip"]) for i in idx])
            keep = embed.keep_by_clip(scores, threshold=filters.clip_score.threshold,
                                      keep_top_fraction=filters.clip_score.keep_top_fraction)
            for i, k in zip(idx, keep.tolist(), strict=True):
                if not k:
                    d.reasons[i] = "clip_score"
    if filters.nsfw is not None:
        for i in d.alive():
            if records[i].get("nsfw"):
                d.reasons[i] = "nsfw"
    if filters.exact_dedup.enabled:
        first: dict[str, int] = {}
        for i in d.alive():
            h = records[i]["pixel"]
            if h in first:
                d.reasons[i], d.duplicate_of[i] = "exact_duplicate", first[h]
            else:
                first[h] = i
    if filters.near_dedup.enabled:
        idx = d.alive()
        kept_hashes = np.zeros(len(idx), dtype=np.uint64)
        kept_ids: list[int] = []
        for i in idx:
            h = int(records[i]["phash"])
            if kept_ids:
                dist = hamming(kept_hashes[: len(kept_ids)], h)
                j = int(np.argmin(dist))
                if dist[j] <= filters.near_dedup.max_distance:
                    d.reasons[i], d.duplicate_of[i] = "near_duplicate", kept_ids[j]
                    continue
            kept_hashes[len(kept_ids)] = np.uint64(h)
            kept_ids.append(i)
    if filters.semantic_dedup is not None:
        from vlm_trainer.curate import embed

        idx = d.alive()
        if len(idx) > 1:
            sem = filters.semantic_dedup
            # zero-padded global positions as keys: semdedup visits a cluster in key order, so the first
            # sample of a group in global order is the one kept (as for exact and near duplicates)
            dropped = embed.semdedup([f"{i:012d}" for i in idx], embeddings[idx], clusters=min(sem.clusters, len(idx)),
                                     threshold=sem.threshold, seed=seed)
            for k, kept in dropped.items():
                d.reasons[int(k)], d.duplicate_of[int(k)] = "semantic_duplicate", int(kept)
    if filters.balance is not None:
        pattern = concept_matcher(concepts or [])
        counts: dict[str, int] = {}
        cap = filters.balance.per_concept_cap
        for i in d.alive():
            found = {m.lower() for m in pattern.findall(records[i].get("caption") or "")} if pattern else set()
            if not found:
                if filters.balance.drop_unmatched:
                    d.reasons[i] = "concept_cap"
                continue
            if all(counts.get(c, 0) >= cap for c in found):
                d.reasons[i] = "concept_cap"
                continue
            for c in found:
                counts[c] = counts.get(c, 0) + 1
    return d
