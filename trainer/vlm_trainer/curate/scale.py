"""The curate stage's global decisions, with each rank holding only its own records (O(N / ranks)).

`select.decide` (one process) and the distributed stage (`runner`) both run `decide_columns` here: the same
code, over an `exchange.Exchange` (one rank, torch.distributed, or simulated ranks in tests). Every rank holds
the columns of the samples it analysed (`Columns`: global position `gid`, hashes, CLIP score, NSFW flag,
embedding); a global step moves only small fixed-width records to the rank that owns their key:

- CLIP top fraction and percentile: exact distributed selections (bisection on the score's bits, then on the
  global position for ties; ~64-130 all-reduces of one integer), so the kept set is the one a global stable
  sort (or numpy's percentile over all scores) would give;
- exact dedup: (128-bit pixel hash, gid) routed to the hash's owner, which keeps the first in global order and
  answers the others' ranks;
- near dedup (`groups`' decisions, distributed): multi-index hashing; for each hash column and each of its
  radius + 1 bands, (band value, hashes, gid) is routed to the rank owning the band value, where same-value
  pairs meet and are candidates when within the radius in some column (a pair several buckets hold is
  reported by the first only). The second signal's rows (thumbnails or embeddings) of the candidates are
  fetched from the ranks holding them and confirmed (`groups.aligned_similarity` + `confirm_scores`, or
  `groups.confirm` for embeddings); the confirmed pairs (few) are gathered,
  and every rank runs `groups.keep_best` and `groups.components` on them;
- semantic dedup (SemDeDup): spherical k-means with the sums exchanged as exact integers (embeddings
  quantised to 2^-20, so any number of ranks gives bit-identical centres and assignments), seeded by
  k-means++ on a sample chosen by a hash of the global position; each cluster goes to one rank (cluster mod
  ranks), which runs the within-cluster pass in global order;
- concept cap: the per-concept totals are summed; only samples holding a concept whose total exceeds the cap
  need the ordered pass, and only those (gid, concept) pairs are gathered.

Whatever the number of ranks, the decisions are the same (tests/unit/test_curate_scale.py runs 1, 2, 3
simulated ranks; the integration test 1 and 2 torchrun ranks).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vlm_core.spec import CurateFiltersSpec

from vlm_trainer.curate import groups as G
from vlm_trainer.curate.exchange import Exchange, Solo, all_count, all_gather, owner, route
from vlm_trainer.curate.image import THUMB_SIDE

REASONS = ("text", "image_decode", "image_size", "aspect_ratio", "clip_score", "nsfw", "exact_duplicate",
           "near_duplicate", "semantic_duplicate", "concept_cap")
CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0: kept (so far)
QUANT = float(2**20)  # embedding quantisation of the k-means sums (exact integers in float64)


def concept_matcher(concepts: list[str]) -> re.Pattern[str] | None:
    """One regex matching any concept as a whole word or phrase, case-insensitively (longest first)."""
    names = sorted({c.strip().lower() for c in concepts if c.strip()}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


@dataclass
class Columns:
    """One rank's samples, column by column (row i = local sample i)."""

    gid: np.ndarray  # int64: position in global input order
    reason: np.ndarray  # int16: 0 kept so far, else CODE[reason]
    pixel: np.ndarray  # uint64 [n, 2]: 128 bits of the exact (pixel) hash
    hashes: np.ndarray  # uint64 [n, k]: the perceptual hashes near dedup proposes candidates with
    clip: np.ndarray | None = None  # float32 CLIP score (NaN where none)
    nsfw: np.ndarray | None = None  # bool
    emb: np.ndarray | None = None  # [n, d] image embeddings (float16/32)
    thumbs: np.ndarray | None = None  # uint8 [n, side, side, 3]: aligned thumbnails (near dedup's second signal)
    captions: list[str | None] | None = None  # for the concept cap
    dup_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # gid of the kept one, or -1

    def __post_init__(self) -> None:
        if self.dup_of.shape[0] != self.gid.shape[0]:
            self.dup_of = np.full(self.gid.shape[0], -1, dtype=np.int64)

    def alive(self) -> np.ndarray:
        return np.nonzero(self.reason == 0)[0]


def pixel_key(value: Any) -> tuple[int, int]:
    """128 bits of an exact hash: the first 32 hex digits of a sha256 hex digest, else sha256 of its text."""
    text = str(value)
    if len(text) >= 32:
        try:
            return int(text[:16], 16), int(text[16:32], 16)
        except ValueError:
            pass
    d = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:16], "big")


def columns_from_records(records: list[dict[str, Any]], gids: np.ndarray, embeddings: Any = None,
                         filters: CurateFiltersSpec | None = None) -> Columns:
    """Columns of analysed records (`runner.Analyser` / `select.decide`'s dicts); `embeddings` row i = record i."""
    n = len(records)
    names = hash_names(filters)
    reason = np.array([CODE[r["reason"]] if r.get("reason") else 0 for r in records], dtype=np.int16)
    pixel = np.zeros((n, 2), dtype=np.uint64)
    hashes = np.zeros((n, len(names)), dtype=np.uint64)
    for i, r in enumerate(records):
        if r.get("pixel") is not None:
            pixel[i] = pixel_key(r["pixel"])
        got = r.get("hashes") or ({names[0]: r["phash"]} if r.get("phash") is not None else {})
        for k, name in enumerate(names):
            if got.get(name) is not None:
                hashes[i, k] = np.uint64(int(got[name]) & 0xFFFFFFFFFFFFFFFF)
    clip = np.array([float(r["clip"]) if r.get("clip") is not None else np.nan for r in records], dtype=np.float32)
    nsfw = np.array([bool(r.get("nsfw")) for r in records], dtype=bool)
    emb = None
    if embeddings is not None:
        emb = embeddings.detach().cpu().float().numpy() if hasattr(embeddings, "detach") else np.asarray(embeddings)
    thumbs = None
    verify = filters.near_dedup.verify if filters is not None else None
    if any(r.get("thumb") for r in records) or (verify is not None and verify.signal == "thumbnail"):
        # base64 uint8 [side, side, 3] (select.encode_thumb); present on every rank, even one without samples
        thumbs = np.zeros((n, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
        for i, r in enumerate(records):
            if r.get("thumb"):
                thumbs[i] = np.frombuffer(base64.b64decode(r["thumb"]), dtype=np.uint8).reshape(thumbs.shape[1:])
    return Columns(gid=np.asarray(gids, dtype=np.int64), reason=reason, pixel=pixel, hashes=hashes, clip=clip,
                   nsfw=nsfw, emb=emb, thumbs=thumbs, captions=[r.get("caption") for r in records])


def hash_names(filters: CurateFiltersSpec | None) -> list[str]:
    """The perceptual hashes near dedup uses, in the spec's order."""
    if filters is None:
        return ["phash"]
    return list(filters.near_dedup.hashes)


@dataclass(frozen=True)
class NearParams:
    radius: int  # Hamming distance of a candidate pair (inclusive), in any hash column
    min_similarity: float | None = None  # a candidate is confirmed by the second signal's cosine >= this
    signal: str = "thumbnail"  # the second signal: "thumbnail" (cols.thumbs) or "embedding" (cols.emb)
    keep_by_score: bool = False  # a group keeps its highest CLIP score (then the first), else the first
    blur: float = G.ALIGN_BLUR  # thumbnails: `groups.aligned_similarity`'s blur


def near_params(filters: CurateFiltersSpec) -> NearParams:
    near = filters.near_dedup
    return NearParams(radius=near.max_distance,
                      min_similarity=None if near.verify is None else near.verify.min_similarity,
                      signal="thumbnail" if near.verify is None else near.verify.signal,
                      keep_by_score=near.keep == "clipScore",
                      blur=G.ALIGN_BLUR if near.verify is None else near.verify.blur)


def _band(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    mask = np.uint64((1 << width) - 1)
    return (h >> np.uint64(shift)) & mask


def sortable_f32(x: np.ndarray) -> np.ndarray:
    """uint64 keys ordered as the float32 values (-0.0 == 0.0)."""
    bits = (np.asarray(x, dtype=np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)
    neg = (bits >> np.uint64(31)) == 1
    return np.where(neg, ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))


def select_top(key: np.ndarray, gid: np.ndarray, k: int, ex: Exchange) -> np.ndarray:
    """Which local rows are among the global top `k` by (key descending, then gid ascending): an exact
    distributed selection by bisection (each step one all-reduce of a count)."""
    total = all_count(ex, key.shape[0])[0]
    if k >= total:
        return np.ones(key.shape[0], dtype=bool)
    if k <= 0:
        return np.zeros(key.shape[0], dtype=bool)
    lo, hi = 0, 2**64 - 1  # the largest t with count(key >= t) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if all_count(ex, int(np.count_nonzero(key >= np.uint64(mid))))[0] >= k:
            lo = mid
        else:
            hi = mid - 1
    t = np.uint64(lo)
    above = key > t
    need = k - all_count(ex, int(np.count_nonzero(above)))[0]
    tie = key == t
    lo, hi = 0, 2**62  # the smallest g with count(tie & gid < g) >= need
    while lo < hi:
        mid = (lo + hi) // 2
        if all_count(ex, int(np.count_nonzero(tie & (gid < mid))))[0] >= need:
            hi = mid
        else:
            lo = mid + 1
    return above | (tie & (gid < lo))


def kth_smallest(key: np.ndarray, k: int, ex: Exchange) -> int:
    """The k-th smallest (0-based) of the keys on all ranks, by bisection (one all-reduce per bit)."""
    lo, hi = 0, 2**64 - 1  # the smallest t with count(key <= t) >= k + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if all_count(ex, int(np.count_nonzero(key <= np.uint64(mid))))[0] >= k + 1:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _f32_of(key: int) -> np.float64:
    """The float32 value (as float64) of a `sortable_f32` key."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.float64(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def percentile_cut(scores: np.ndarray, percentile: float, ex: Exchange) -> np.float64:
    """numpy's `percentile(all scores, p)` (method "linear", float64 of the float32 scores) over all ranks: the
    two order statistics it interpolates between come from `kth_smallest`, the arithmetic is numpy's own."""
    n = all_count(ex, scores.shape[0])[0]
    key = sortable_f32(scores)
    q = np.true_divide(np.asanyarray(percentile, dtype=np.float64), 100)
    virtual = (n - 1) * q  # numpy's "linear" virtual index
    if virtual >= n - 1:
        return _f32_of(kth_smallest(key, n - 1, ex))
    prev = int(np.floor(virtual))
    a, b = _f32_of(kth_smallest(key, prev, ex)), _f32_of(kth_smallest(key, prev + 1, ex))
    gamma = virtual - np.floor(virtual)
    diff = b - a  # numpy's _lerp
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


_DROP = np.dtype([("li", np.int64), ("dup", np.int64)])


def _answer(cols: Columns, ex: Exchange, src: np.ndarray, li: np.ndarray, dup: np.ndarray, reason: str) -> None:
    """Send each dropped sample's verdict (local index `li` on rank `src`, duplicate of gid `dup`) to its rank."""
    msg = np.empty(li.shape[0], dtype=_DROP)
    msg["li"], msg["dup"] = li, dup
    for part in ex.all_to_all(route(msg, np.asarray(src, dtype=np.int64), ex.world)):
        cols.reason[part["li"]] = CODE[reason]
        cols.dup_of[part["li"]] = part["dup"]


def _cat(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)


def _received(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate what each rank sent; the sending rank of each row."""
    return np.concatenate(parts), np.concatenate([np.full(p.shape[0], r, dtype=np.int64) for r, p in enumerate(parts)])


def clip_filter(cols: Columns, filters: CurateFiltersSpec, ex: Exchange) -> None:
    spec = filters.clip_score
    assert spec is not None and cols.clip is not None
    a = cols.alive()
    scores = cols.clip[a]
    keep = np.ones(a.shape[0], dtype=bool)
    if spec.threshold is not None:
        keep &= scores >= spec.threshold
    if spec.percentile is not None and all_count(ex, a.shape[0])[0]:
        keep &= scores.astype(np.float64) >= percentile_cut(scores, spec.percentile, ex)
    if spec.keep_top_fraction is not None:
        n = all_count(ex, a.shape[0])[0]
        keep &= select_top(sortable_f32(scores), cols.gid[a], math.ceil(spec.keep_top_fraction * n), ex)
    cols.reason[a[~keep]] = CODE["clip_score"]


_EXACT = np.dtype([("k0", np.uint64), ("k1", np.uint64), ("gid", np.int64), ("li", np.int64)])


def exact_dedup(cols: Columns, ex: Exchange) -> None:
    """Identical pixel hashes: the first in global order is kept."""
    a = cols.alive()
    msg = np.empty(a.shape[0], dtype=_EXACT)
    msg["k0"], msg["k1"], msg["gid"], msg["li"] = cols.pixel[a, 0], cols.pixel[a, 1], cols.gid[a], a
    got, src = _received(ex.all_to_all(route(msg, owner(msg["k0"], ex.world), ex.world)))
    order = np.lexsort((got["gid"], got["k1"], got["k0"]))
    s = got[order]
    start = np.ones(s.shape[0], dtype=bool)
    start[1:] = (s["k0"][1:] != s["k0"][:-1]) | (s["k1"][1:] != s["k1"][:-1])
    first = np.maximum.accumulate(np.where(start, np.arange(s.shape[0]), 0))
    drop = ~start
    _answer(cols, ex, src[order][drop], s["li"][drop], s["gid"][first[drop]], "exact_duplicate")


EDGE = np.dtype([("ga", np.int64), ("gb", np.int64), ("ra", np.int64), ("la", np.int64), ("rb", np.int64),
                 ("lb", np.int64), ("ca", np.float32), ("cb", np.float32), ("sim", np.float32)])


def _band_dtype(k: int) -> np.dtype:
    return np.dtype([("v", np.uint64), ("h", np.uint64, (k,)), ("gid", np.int64), ("li", np.int64), ("clip", np.float32)])


def bucket_pair_steps(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All (i, j), i < j, of rows with equal `keys` (sorted), offset by offset (j = i + 1, i + 2, ...): each
    step is vectorised and the caller filters it at once, so memory stays O(rows), not O(pairs)."""
    n = keys.shape[0]
    if n < 2:
        return
    start = np.ones(n, dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    run = np.cumsum(start) - 1
    run_start = np.flatnonzero(start)
    run_end = np.append(run_start[1:], n)
    left = run_end[run] - np.arange(n) - 1  # rows after this one in its run
    active = np.flatnonzero(left > 0)
    off = 1
    while active.size:
        yield active, active + off
        off += 1
        active = active[left[active] >= off]


def bucket_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`bucket_pair_steps` in one piece."""
    steps = list(bucket_pair_steps(keys))
    if not steps:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate([i for i, _ in steps]), np.concatenate([j for _, j in steps])


def near_candidates(got: np.ndarray, src: np.ndarray, radius: int, column: int, band: int) -> np.ndarray:
    """The candidate pairs among the records one rank received for band `band` of hash column `column` (EDGE
    records, gid a < gid b): same band value, within `radius` bits in some column (`groups.candidate_pairs`'
    rule). A pair that several (column, band) buckets hold is reported by the first of them only."""
    order = np.lexsort((got["gid"], got["v"]))
    s, ssrc = got[order], src[order]
    k = s["h"].shape[1] if s.ndim and s.shape[0] else 0
    found = []
    for i, j in bucket_pair_steps(s["v"]):
        x = s["h"][i] ^ s["h"][j]  # [m, k]
        near = np.bitwise_count(x) <= radius
        ok = near[:, column].copy()
        for c in range(k):  # drop the pair if an earlier (column, band) bucket also holds it
            for b, (shift, width) in enumerate(G.bands(radius)):
                if (c, b) >= (column, band):
                    break
                ok &= ~(near[:, c] & (_band(x[:, c], shift, width) == 0))
        found.append((i[ok], j[ok]))
    i = np.concatenate([f[0] for f in found]) if found else np.zeros(0, dtype=np.int64)
    j = np.concatenate([f[1] for f in found]) if found else np.zeros(0, dtype=np.int64)
    e = np.empty(i.shape[0], dtype=EDGE)
    e["ga"], e["gb"], e["ra"], e["la"], e["rb"], e["lb"] = s["gid"][i], s["gid"][j], ssrc[i], s["li"][i], ssrc[j], s["li"][j]
    e["ca"], e["cb"], e["sim"] = s["clip"][i], s["clip"][j], 1.0
    return e


def fetch_rows(table: np.ndarray, ex: Exchange, rank: np.ndarray, li: np.ndarray) -> np.ndarray:
    """Rows of each rank's `table` (its embeddings, thumbnails) at (rank, local index) pairs, from the ranks
    that hold them: one request, one reply."""
    req = np.empty(li.shape[0], dtype=[("li", np.int64), ("pos", np.int64)])
    req["li"], req["pos"] = li, np.arange(li.shape[0])
    asked = ex.all_to_all(route(req, rank, ex.world))
    row = np.dtype([("pos", np.int64), ("e", table.dtype, table.shape[1:])])
    replies = []
    for part in asked:
        rep = np.empty(part.shape[0], dtype=row)
        rep["pos"], rep["e"] = part["pos"], table[part["li"]]
        replies.append(rep)
    back = np.concatenate(ex.all_to_all(replies))
    out = np.empty((li.shape[0], *table.shape[1:]), dtype=table.dtype)
    out[back["pos"]] = back["e"]
    return out


def _vectors(rows: np.ndarray) -> np.ndarray:
    """Fetched embedding rows, L2-normalised (as `groups.confirm` takes them)."""
    x = rows.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class NearOutcome:
    """What near dedup found (the same on every rank): counts, the groups (gids, two or more members: the
    connected components of the confirmed pairs) and each removed sample's similarity to the one it repeats."""

    candidates: int = 0
    confirmed: int = 0
    groups: list[list[int]] = field(default_factory=list)
    similarity: dict[int, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"candidates": self.candidates, "confirmed": self.confirmed, "groups": len(self.groups)}


def near_dedup(cols: Columns, params: NearParams, ex: Exchange) -> NearOutcome:
    """Near duplicates (`groups`' decisions, distributed): candidates by multi-index hashing, each (hash column,
    band) routed to the rank owning its value; confirmation by the second signal, its rows fetched from their
    ranks; the confirmed pairs (few) gathered, and `groups.keep_best` / `groups.components` on them."""
    a = cols.alive()
    k = cols.hashes.shape[1]
    dtype = _band_dtype(k)
    found = []
    for c in range(k):
        keys = G.band_keys(cols.hashes[a, c], params.radius)  # the values that route a hash
        for b in range(keys.shape[1]):  # one band at a time: O(N / ranks) memory
            m = np.empty(a.shape[0], dtype=dtype)
            m["v"] = keys[:, b]
            m["h"], m["gid"], m["li"] = cols.hashes[a], cols.gid[a], a
            m["clip"] = cols.clip[a] if cols.clip is not None else np.nan
            salt = np.uint64((c * 64 + b + 1) * 0x9E3779B97F4A7C15 % 2**64)
            parts = route(m, owner(m["v"] ^ salt, ex.world), ex.world)
            del m
            got, src = _received(ex.all_to_all(parts))
            del parts
            found.append(near_candidates(got, src, params.radius, c, b))
            del got, src
        del keys
    edges = np.concatenate(found) if found else np.empty(0, dtype=EDGE)
    out = NearOutcome(candidates=all_count(ex, edges.shape[0])[0])
    if params.min_similarity is not None:
        table = cols.thumbs if params.signal == "thumbnail" else cols.emb
        if table is None:
            raise ValueError(f"near dedup: verify by {params.signal} needs the samples' {params.signal}s")
        ra = fetch_rows(table, ex, edges["ra"], edges["la"])  # collectives: every rank takes part
        rb = fetch_rows(table, ex, edges["rb"], edges["lb"])
        m = edges.shape[0]
        if m:
            pairs = np.stack([np.arange(m), m + np.arange(m)], axis=1)
            if params.signal == "thumbnail":
                sims = G.aligned_similarity(pairs, np.concatenate([ra, rb]), blur=params.blur)
                pairs, sims = G.confirm_scores(pairs, sims, params.min_similarity)
            else:
                pairs, sims = G.confirm(pairs, np.concatenate([_vectors(ra), _vectors(rb)]), params.min_similarity)
            edges = edges[pairs[:, 0]]
            edges["sim"] = sims
    confirmed = np.concatenate(all_gather(ex, edges))  # few: every rank forms the same groups
    out.confirmed = int(confirmed.shape[0])
    if out.confirmed == 0:
        return out
    nodes, inv = np.unique(np.concatenate([confirmed["ga"], confirmed["gb"]]), return_inverse=True)
    pairs = np.stack([inv[:out.confirmed], inv[out.confirmed:]], axis=1).astype(np.int64)  # gid order = global order
    score = None
    if params.keep_by_score:
        score = np.full(nodes.shape[0], np.nan)
        score[pairs[:, 0]], score[pairs[:, 1]] = confirmed["ca"], confirmed["cb"]
    kept, dup = G.keep_best(nodes.shape[0], pairs, score)
    label = G.components(nodes.shape[0], pairs)
    by_group: dict[int, list[int]] = {}
    for node, g in zip(nodes.tolist(), label.tolist(), strict=True):
        by_group.setdefault(g, []).append(node)
    out.groups = [m for _, m in sorted(by_group.items())]
    sim = {(int(x), int(y)): float(v) for x, y, v in zip(pairs[:, 0], pairs[:, 1], confirmed["sim"], strict=True)}
    where = np.full((nodes.shape[0], 2), -1, dtype=np.int64)  # each node's rank and local index
    where[pairs[:, 0]] = np.stack([confirmed["ra"], confirmed["la"]], axis=1)
    where[pairs[:, 1]] = np.stack([confirmed["rb"], confirmed["lb"]], axis=1)
    for node in np.flatnonzero(~kept).tolist():
        other = int(dup[node])
        out.similarity[int(nodes[node])] = sim[(min(node, other), max(node, other))]
        if where[node, 0] == ex.rank:
            cols.reason[where[node, 1]] = CODE["near_duplicate"]
            cols.dup_of[where[node, 1]] = nodes[other]
    return out


def splitmix(x: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit mix of each value with the seed (rank-independent pseudo-random keys)."""
    z = x.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


CHUNK = 65536  # rows normalised and quantised at a time (k-means works chunk by chunk: memory O(chunk x d))


def kmeans_pp(emb: Any, k: int, seed: int) -> Any:
    """k-means++ start centres [<= k, d] of L2-normalised rows (a torch tensor; seeded; fewer when fewer
    distinct points)."""
    import torch

    n = emb.shape[0]
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [emb[first]]
    best = emb @ emb[first]
    for _ in range(1, k):
        weights = (1.0 - best).clamp_min(0.0) ** 2  # squared distance on the sphere, up to a factor
        if float(weights.sum()) <= 0.0:  # fewer distinct points than clusters
            break
        nxt = int(torch.multinomial(weights.double(), 1, generator=gen))
        centres.append(emb[nxt])
        best = torch.maximum(best, emb @ emb[nxt])
    return torch.stack(centres)


def greedy_within(x: np.ndarray, threshold: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup's pass over one cluster, rows (L2-normalised) in global order: a row is dropped when its cosine
    to an already kept row is >= threshold, naming the most similar kept row (the earliest on ties). Returns
    (dropped rows, the kept row each names).

    Block by block: the cosines to the rows kept in earlier blocks are one matrix product; inside a block only
    the rows with an earlier in-block row at or above the threshold need the ordered pass (few: duplicates)."""
    n = x.shape[0]
    kept = np.zeros(n, dtype=np.int64)
    n_kept = 0
    dropped, names = [], []
    for b0 in range(0, n, block):
        blk = x[b0:b0 + block]
        m = blk.shape[0]
        best = np.full(m, -np.inf)
        who = np.full(m, -1, dtype=np.int64)
        if n_kept:
            prev = blk @ x[kept[:n_kept]].T
            arg = prev.argmax(1)
            best, who = prev[np.arange(m), arg], kept[arg]
        inner = blk @ blk.T
        close = np.tril(inner >= threshold, k=-1).any(1)  # an earlier row of this block is close
        keep = best < threshold
        for j in np.flatnonzero(close).tolist():  # in order: earlier rows' verdicts are final
            earlier = np.flatnonzero(keep[:j])
            if earlier.size:
                t = int(inner[j, earlier].argmax())
                if float(inner[j, earlier[t]]) > best[j]:
                    best[j], who[j] = inner[j, earlier[t]], b0 + earlier[t]
            keep[j] = not best[j] >= threshold
        gone = np.flatnonzero(~keep)
        dropped.append(b0 + gone)
        names.append(who[gone])
        stay = b0 + np.flatnonzero(keep)
        kept[n_kept:n_kept + stay.size] = stay
        n_kept += stay.size
    if not dropped:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(dropped), np.concatenate(names)


def kmeans(emb: np.ndarray, gid: np.ndarray, k: int, seed: int, ex: Exchange, *, iterations: int = 50,
           sample: int = 8192) -> np.ndarray:
    """Cluster ids of the local rows `emb` of a spherical k-means over all ranks (rows L2-normalised here)."""
    import torch

    n = all_count(ex, emb.shape[0])[0]
    d = emb.shape[1]
    pick = np.flatnonzero(select_top(~splitmix(gid, seed), gid, min(n, max(sample, 64 * k)), ex))  # rank-independent
    row = np.dtype([("gid", np.int64), ("e", np.float64, (d,))])
    part = np.empty(pick.shape[0], dtype=row)
    part["gid"], part["e"] = gid[pick], _normalise(emb[pick])
    seed_rows = np.concatenate(all_gather(ex, part))
    seed_rows = seed_rows[np.argsort(seed_rows["gid"])]
    centres = kmeans_pp(torch.from_numpy(seed_rows["e"].copy()), k, seed).numpy()
    del seed_rows, part
    assign = np.full(emb.shape[0], -1, dtype=np.int64)
    for _ in range(iterations):
        cq = np.round(centres * QUANT).T
        sums = np.zeros((centres.shape[0], d))
        changed = 0
        for lo in range(0, emb.shape[0], CHUNK):
            # integers: their float64 dot products and sums are exact, so any split over ranks agrees
            q = np.round(_normalise(emb[lo:lo + CHUNK]) * QUANT)
            new = np.argmax(q @ cq, axis=1)
            changed += int(np.count_nonzero(new != assign[lo:lo + CHUNK]))
            assign[lo:lo + CHUNK] = new
            order = np.argsort(new, kind="stable")
            present = np.unique(new)
            sums[present] += np.add.reduceat(q[order], np.searchsorted(new[order], present), axis=0)
        if all_count(ex, changed)[0] == 0:
            break
        total = ex.all_sum(sums.astype(np.int64).reshape(-1)).reshape(sums.shape).astype(np.float64)
        norm = np.linalg.norm(total, axis=1, keepdims=True)
        centres = np.where(norm > 0, total / np.maximum(norm, 1e-300), centres)  # an empty cluster keeps its centre
    return assign


def semantic_dedup(cols: Columns, clusters: int, threshold: float, seed: int, ex: Exchange, *,
                   iterations: int = 50) -> dict[str, int]:
    assert cols.emb is not None
    a = cols.alive()
    n = all_count(ex, a.shape[0])[0]
    if n <= 1:
        return {"clusters": 0}
    emb = cols.emb[a]
    assign = kmeans(emb, cols.gid[a], min(clusters, n), seed, ex, iterations=iterations)
    row = np.dtype([("c", np.int64), ("gid", np.int64), ("li", np.int64), ("e", emb.dtype, (emb.shape[1],))])
    msg = np.empty(a.shape[0], dtype=row)
    msg["c"], msg["gid"], msg["li"], msg["e"] = assign, cols.gid[a], a, emb
    del emb
    parts = route(msg, assign % ex.world, ex.world)
    del msg
    got, src = _received(ex.all_to_all(parts))
    del parts
    order = np.lexsort((got["gid"], got["c"]))
    got, src = got[order], src[order]
    bounds = np.flatnonzero(np.diff(got["c"])) + 1
    d_src, d_li, d_dup = [], [], []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, got.shape[0]], strict=True):
        if hi - lo < 2:
            continue
        dropped, names = greedy_within(_normalise(got["e"][lo:hi]), threshold)
        d_src.append(src[lo:hi][dropped])
        d_li.append(got["li"][lo:hi][dropped])
        d_dup.append(got["gid"][lo:hi][names])
    _answer(cols, ex, _cat(d_src), _cat(d_li), _cat(d_dup), "semantic_duplicate")
    return {"clusters": min(clusters, n)}


_CONCEPT = np.dtype([("gid", np.int64), ("li", np.int64), ("cid", np.int64), ("free", np.bool_)])


def concept_cap(cols: Columns, filters: CurateFiltersSpec, concepts: list[str], ex: Exchange) -> None:
    """At most `perConceptCap` kept per concept in global order (a sample holding several concepts is kept while
    any of them is under the cap, and counts for all)."""
    spec = filters.balance
    assert spec is not None
    pattern = concept_matcher(concepts)
    names = sorted({c.strip().lower() for c in concepts if c.strip()})
    index = {c: i for i, c in enumerate(names)}
    captions = cols.captions or [None] * cols.gid.shape[0]
    a = cols.alive()
    found: dict[int, list[int]] = {}
    counts = np.zeros(len(names), dtype=np.int64)
    for i in a.tolist():
        ids = sorted({index[m.lower()] for m in pattern.findall(captions[i] or "")}) if pattern else []
        if not ids:
            if spec.drop_unmatched:
                cols.reason[i] = CODE["concept_cap"]
            continue
        found[i] = ids
        counts[ids] += 1
    total = ex.all_sum(counts) if len(names) else counts
    over = total > spec.per_concept_cap  # only these can ever be at the cap
    rows = []
    for i, ids in found.items():
        full = [c for c in ids if over[c]]
        if full:
            free = len(full) < len(ids)  # an under-full concept keeps it
            rows += [(int(cols.gid[i]), i, c, free) for c in full]
    msg = np.array(rows, dtype=_CONCEPT) if rows else np.empty(0, dtype=_CONCEPT)
    got, src = _received(all_gather(ex, msg))
    order = np.lexsort((got["cid"], got["gid"]))
    got, src = got[order], src[order]
    count: dict[int, int] = {}
    bounds = np.r_[0, np.flatnonzero(np.diff(got["gid"])) + 1, got.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi <= lo:
            continue
        ids = got["cid"][lo:hi].tolist()
        if bool(got["free"][lo]) or any(count.get(c, 0) < spec.per_concept_cap for c in ids):
            for c in ids:
                count[c] = count.get(c, 0) + 1
        elif src[lo] == ex.rank:
            cols.reason[int(got["li"][lo])] = CODE["concept_cap"]


def decide_columns(cols: Columns, filters: CurateFiltersSpec, ex: Exchange | None = None, *,
                   concepts: list[str] | None = None, seed: int = 0, near: NearParams | None = None,
                   kmeans_iterations: int = 50) -> dict[str, Any]:
    """Run the global filters in the pipeline's order on this rank's columns (in place); every rank calls it
    together. Returns counts of the dedup steps (the same on every rank) and this rank's seconds per step."""
    ex = ex or Solo()
    stats: dict[str, Any] = {"seconds": {}}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stats["seconds"][step] = round(now - clock, 3)
        clock = now

    if filters.clip_score is not None:
        clip_filter(cols, filters, ex)
        lap("clip_score")
    if filters.nsfw is not None and cols.nsfw is not None:
        cols.reason[(cols.reason == 0) & cols.nsfw] = CODE["nsfw"]
    if filters.exact_dedup.enabled:
        exact_dedup(cols, ex)
        lap("exact_dedup")
    if filters.near_dedup.enabled:
        outcome = near_dedup(cols, near or near_params(filters), ex)
        stats["near_dedup"], stats["near_groups"], stats["near_similarity"] = (
            outcome.counts(), outcome.groups, outcome.similarity)
        lap("near_dedup")
    if filters.semantic_dedup is not None:
        sem = filters.semantic_dedup
        stats["semantic_dedup"] = semantic_dedup(cols, sem.clusters, sem.threshold, seed, ex, iterations=kmeans_iterations)
        lap("semantic_dedup")
    if filters.balance is not None:
        concept_cap(cols, filters, concepts or [], ex)
        lap("balance")
    return stats
