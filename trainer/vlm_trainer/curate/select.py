"""The global decisions of the curate stage: which sample is kept, and the one reason each other one is not.

Ranks analyse their own shards (`runner.analyse_shard`: text and image checks, hashes, embedding scores)
and exchange the light per-sample records; every rank then runs `decide` on the same records in the same
global order (input shard index, then position in the shard), so the result does not depend on the
number of ranks. Filters run in the seed's order; a sample is judged by the first filter that drops it.
Exact dedup keeps the first sample of each group in that global order. Near dedup (`groups`): the
perceptual hashes propose candidate pairs within `maxDistance` bits, the second signal (`verify`) confirms
them, confirmed pairs form groups (connected components), and each group keeps its best member (`keep`:
the first in global order, or the highest CLIP score then the first); another member is removed only as a
confirmed duplicate of a kept one, never through a chain of others.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vlm_core.spec import CurateFiltersSpec

from vlm_trainer.curate import groups as G
from vlm_trainer.curate.image import THUMB_SIDE

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
    """`reasons[i]` is None for a kept sample, else its reason; `duplicate_of[i]` the kept sample it repeats;
    `groups[filter]` the duplicate groups (global indices, two or more members) each dedup filter found;
    `similarity[i]` the second signal's cosine between a near duplicate and the sample it repeats."""

    reasons: list[str | None]
    duplicate_of: dict[int, int] = field(default_factory=dict)
    enabled: dict[str, bool] = field(default_factory=dict)
    groups: dict[str, list[list[int]]] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)

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
                                      keep_top_fraction=filters.clip_score.keep_top_fraction,
                                      percentile=filters.clip_score.percentile)
            for i, k in zip(idx, keep.tolist(), strict=True):
                if not k:
                    d.reasons[i] = "clip_score"
    if filters.nsfw is not None:
        for i in d.alive():
            if records[i].get("nsfw"):
                d.reasons[i] = "nsfw"
    if filters.exact_dedup.enabled:
        first: dict[str, int] = {}
        members: dict[int, list[int]] = {}
        for i in d.alive():
            h = records[i]["pixel"]
            if h in first:
                d.reasons[i], d.duplicate_of[i] = "exact_duplicate", first[h]
                members.setdefault(first[h], [first[h]]).append(i)
            else:
                first[h] = i
        d.groups["exact_dedup"] = list(members.values())
    if filters.near_dedup.enabled:
        near_dedup(records, filters, d, embeddings)
    if filters.semantic_dedup is not None:
        from vlm_trainer.curate import embed

        idx = d.alive()
        if len(idx) > 1:
            sem = filters.semantic_dedup
            # zero-padded global positions as keys: semdedup visits a cluster in key order, so the first
            # sample of a group in global order is the one kept (as for exact and near duplicates)
            dropped = embed.semdedup([f"{i:012d}" for i in idx], embeddings[idx], clusters=min(sem.clusters, len(idx)),
                                     threshold=sem.threshold, seed=seed)
            sem_groups: dict[int, list[int]] = {}
            for k, kept in dropped.items():
                d.reasons[int(k)], d.duplicate_of[int(k)] = "semantic_duplicate", int(kept)
                sem_groups.setdefault(int(kept), [int(kept)]).append(int(k))
            d.groups["semantic_dedup"] = [sorted(g) for _, g in sorted(sem_groups.items())]
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


def encode_thumb(thumb: np.ndarray) -> str:
    """A thumbnail (uint8 [side, side, 3]) as the base64 text a record carries."""
    return base64.b64encode(np.ascontiguousarray(thumb, dtype=np.uint8).tobytes()).decode()


def decode_thumbs(texts: list[str], side: int = THUMB_SIDE) -> np.ndarray:
    """Records' thumbnails back as uint8 [n, side, side, 3]."""
    raw = b"".join(base64.b64decode(t) for t in texts)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(texts), side, side, 3)


def near_dedup(records: list[dict[str, Any]], filters: CurateFiltersSpec, d: Decisions, embeddings: Any = None) -> None:
    """The near-duplicate filter over the samples still alive in `d` (see the module docstring and `groups`)."""
    spec = filters.near_dedup
    idx = d.alive()
    if len(idx) < 2:
        d.groups["near_dedup"] = []
        return
    hashes = np.array([[int(records[i]["hashes"][h]) for h in spec.hashes] for i in idx], dtype=np.uint64)
    pairs = G.candidate_pairs(hashes, spec.max_distance)
    sims = np.ones(pairs.shape[0], dtype=np.float32)
    if spec.verify is not None and pairs.shape[0]:
        if spec.verify.signal == "thumbnail":
            # only the samples in a candidate pair need their thumbnails decoded
            used = np.unique(pairs)
            thumbs = np.zeros((len(idx), THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
            thumbs[used] = decode_thumbs([records[idx[k]]["thumb"] for k in used.tolist()])
            sims = G.aligned_similarity(pairs, thumbs, blur=spec.verify.blur)
            pairs, sims = G.confirm_scores(pairs, sims, spec.verify.min_similarity)
        else:
            emb = np.asarray(embeddings[idx].float().numpy() if hasattr(embeddings, "numpy") else embeddings[idx],
                             dtype=np.float32)
            vectors = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            pairs, sims = G.confirm(pairs, vectors, spec.verify.min_similarity)
    score = np.array([float(records[i].get("clip", np.nan)) for i in idx]) if spec.keep == "clipScore" else None
    kept, dup = G.keep_best(len(idx), pairs, score)
    similarity = {(int(a), int(b)): float(s) for (a, b), s in zip(pairs.tolist(), sims.tolist(), strict=True)}
    for local in np.flatnonzero(~kept).tolist():
        i, j = idx[local], idx[int(dup[local])]
        d.reasons[i], d.duplicate_of[i] = "near_duplicate", j
        if spec.verify is not None:
            d.similarity[i] = similarity[(min(local, int(dup[local])), max(local, int(dup[local])))]
    gid = G.components(len(idx), pairs)
    by_group: dict[int, list[int]] = {}
    for local, g in enumerate(gid.tolist()):
        by_group.setdefault(g, []).append(idx[local])
    d.groups["near_dedup"] = [m for _, m in sorted(by_group.items()) if len(m) > 1]
