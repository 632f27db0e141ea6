"""The curate stage's global decisions, with each rank holding only its own records (O(N / ranks)).

`select.decide` (one process) and the distributed stage (`runner`) both run `decide_columns` here: the same
code, over an `exchange.Exchange` (one rank, torch.distributed, or simulated ranks in tests). Every rank holds
the columns of the samples it analysed (`Columns`: global position `gid`, hashes, CLIP score, NSFW flag,
embedding); a global step moves only small fixed-width records to the rank that owns their key:

- CLIP top fraction: an exact distributed selection (bisection on the score's bits, then on the global position
  for ties: ~130 all-reduces of one integer), so the kept set is the one a global stable sort would give;
- exact dedup: (128-bit pixel hash, gid) routed to the hash's owner, which keeps the first in global order and
  answers the others' ranks;
- near dedup (multi-index hashing): each hash is cut into `bands`; (band, value, hash, gid) is routed to the
  owner of (band, value); pairs meet there and are candidates when their full Hamming distance is within the
  radius (a pair sharing several bands is reported by its first shared band only). With `minCosine`, the
  candidates' embeddings are fetched from their ranks and a pair is confirmed by cosine. Confirmed pairs
  (few) are gathered, and duplicates form groups: connected components; each group keeps one member
  (`keep_one`) and the others name it;
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

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vlm_core.spec import CurateFiltersSpec

from vlm_trainer.curate.exchange import Exchange, Solo, all_count, all_gather, owner, route

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
    phash: np.ndarray  # uint64: the 64-bit perceptual hash
    clip: np.ndarray | None = None  # float32 CLIP score (NaN where none)
    nsfw: np.ndarray | None = None  # bool
    emb: np.ndarray | None = None  # [n, d] image embeddings (float16/32)
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


def columns_from_records(records: list[dict[str, Any]], gids: np.ndarray, embeddings: Any = None) -> Columns:
    """Columns of analysed records (`runner.Analyser` / `select.decide`'s dicts); `embeddings` row i = record i."""
    n = len(records)
    reason = np.array([CODE[r["reason"]] if r.get("reason") else 0 for r in records], dtype=np.int16)
    pixel = np.zeros((n, 2), dtype=np.uint64)
    phash = np.zeros(n, dtype=np.uint64)
    for i, r in enumerate(records):
        if r.get("pixel") is not None:
            pixel[i] = pixel_key(r["pixel"])
        if r.get("phash") is not None:
            phash[i] = np.uint64(int(r["phash"]))
    clip = np.array([float(r["clip"]) if r.get("clip") is not None else np.nan for r in records], dtype=np.float32)
    nsfw = np.array([bool(r.get("nsfw")) for r in records], dtype=bool)
    emb = None
    if embeddings is not None:
        emb = embeddings.detach().cpu().float().numpy() if hasattr(embeddings, "detach") else np.asarray(embeddings)
    return Columns(gid=np.asarray(gids, dtype=np.int64), reason=reason, pixel=pixel, phash=phash, clip=clip, nsfw=nsfw,
                   emb=emb, captions=[r.get("caption") for r in records])


@dataclass(frozen=True)
class NearParams:
    radius: int  # Hamming distance of a candidate pair (inclusive)
    bands: int  # the 64 bits cut into this many bands; pairs sharing no band are never compared
    min_cosine: float | None = None  # a candidate is confirmed by image-embedding cosine >= this (None: by hash)


def near_params(filters: CurateFiltersSpec) -> NearParams:
    """radius+1 bands (pigeonhole: every pair within the radius shares a band exactly), at most 64."""
    radius = filters.near_dedup.max_distance
    return NearParams(radius=radius, bands=min(64, radius + 1))


def band_layout(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band: 64 bits cut into `bands` nearly equal runs, high bits first."""
    widths = [64 // bands + (1 if b < 64 % bands else 0) for b in range(bands)]
    out, top = [], 64
    for w in widths:
        top -= w
        out.append((top, w))
    return out


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


_BAND = np.dtype([("b", np.int8), ("v", np.uint64), ("h", np.uint64), ("gid", np.int64), ("li", np.int64),
                  ("clip", np.float32)])
EDGE = np.dtype([("ga", np.int64), ("gb", np.int64), ("ra", np.int64), ("la", np.int64), ("rb", np.int64),
                 ("lb", np.int64), ("ca", np.float32), ("cb", np.float32)])


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


def near_candidates(got: np.ndarray, src: np.ndarray, params: NearParams, layout: list[tuple[int, int]]) -> np.ndarray:
    """The candidate pairs among the band records one rank received for one band (EDGE records, gid a < gid b)."""
    order = np.lexsort((got["gid"], got["v"]))
    s, ssrc = got[order], src[order]
    found = []
    for i, j in bucket_pair_steps(s["v"]):
        x = s["h"][i] ^ s["h"][j]
        ok = np.bitwise_count(x) <= params.radius
        b = s["b"][i].astype(np.int64)
        for k, (shift, width) in enumerate(layout):  # report a pair under its first shared band only
            ok &= ~((_band(x, shift, width) == 0) & (k < b))
        found.append((i[ok], j[ok]))
    i = np.concatenate([f[0] for f in found]) if found else np.zeros(0, dtype=np.int64)
    j = np.concatenate([f[1] for f in found]) if found else np.zeros(0, dtype=np.int64)
    e = np.empty(i.shape[0], dtype=EDGE)
    e["ga"], e["gb"], e["ra"], e["la"], e["rb"], e["lb"] = s["gid"][i], s["gid"][j], ssrc[i], s["li"][i], ssrc[j], s["li"][j]
    e["ca"], e["cb"] = s["clip"][i], s["clip"][j]
    return e


def fetch_rows(cols: Columns, ex: Exchange, rank: np.ndarray, li: np.ndarray) -> np.ndarray:
    """Embedding rows of (rank, local index) pairs, from the ranks that hold them (one request, one reply)."""
    assert cols.emb is not None
    req = np.empty(li.shape[0], dtype=[("li", np.int64), ("pos", np.int64)])
    req["li"], req["pos"] = li, np.arange(li.shape[0])
    asked = ex.all_to_all(route(req, rank, ex.world))
    row = np.dtype([("pos", np.int64), ("e", cols.emb.dtype, (cols.emb.shape[1],))])
    replies = []
    for part in asked:
        rep = np.empty(part.shape[0], dtype=row)
        rep["pos"], rep["e"] = part["pos"], cols.emb[part["li"]]
        replies.append(rep)
    back = np.concatenate(ex.all_to_all(replies))
    out = np.empty((li.shape[0], cols.emb.shape[1]), dtype=cols.emb.dtype)
    out[back["pos"]] = back["e"]
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(den, 1e-12)


def components(ga: np.ndarray, gb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the edges (ga[i], gb[i]): the nodes (sorted gids) and each one's label (the
    smallest gid of its component); min-label propagation with pointer jumping."""
    nodes, inv = np.unique(np.concatenate([ga, gb]), return_inverse=True)
    u, v = inv[: ga.shape[0]], inv[ga.shape[0]:]
    label = np.arange(nodes.shape[0])
    while True:
        m = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        new = new[new]
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def keep_one(group: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """The kept gid of each member's group: the first of the group in global order."""
    order = np.lexsort((gid, group))
    g, ids = group[order], gid[order]
    start = np.ones(g.shape[0], dtype=bool)
    start[1:] = g[1:] != g[:-1]
    first = ids[np.maximum.accumulate(np.where(start, np.arange(g.shape[0]), 0))]
    out = np.empty_like(gid)
    out[order] = first
    return out


def near_dedup(cols: Columns, params: NearParams, ex: Exchange) -> dict[str, int]:
    """Near duplicates by banded candidates, optional cosine confirmation, groups keeping one member."""
    layout = band_layout(params.bands)
    a = cols.alive()
    found = []
    for k, (shift, width) in enumerate(layout):  # one band at a time: memory O(N / ranks) per step
        m = np.empty(a.shape[0], dtype=_BAND)
        m["b"], m["v"] = k, _band(cols.phash[a], shift, width)
        m["h"], m["gid"], m["li"] = cols.phash[a], cols.gid[a], a
        m["clip"] = cols.clip[a] if cols.clip is not None else np.nan
        parts = route(m, owner(m["v"] ^ (np.uint64(k) << np.uint64(58)), ex.world), ex.world)
        del m
        got, src = _received(ex.all_to_all(parts))
        del parts
        found.append(near_candidates(got, src, params, layout))
        del got, src
    edges = np.concatenate(found)
    candidates = edges.shape[0]
    if params.min_cosine is not None and cols.emb is not None:
        ea = fetch_rows(cols, ex, edges["ra"], edges["la"])
        eb = fetch_rows(cols, ex, edges["rb"], edges["lb"])
        edges = edges[cosine(ea, eb) >= params.min_cosine]
    confirmed = np.concatenate(all_gather(ex, edges))  # few: every rank forms the same groups
    stats = {"candidates": all_count(ex, candidates)[0], "confirmed": int(confirmed.shape[0])}
    if confirmed.shape[0] == 0:
        return {**stats, "groups": 0}
    nodes, label = components(confirmed["ga"], confirmed["gb"])
    kept = keep_one(label, nodes)
    # each node's rank and local index, from any edge that names it
    where = np.concatenate([np.stack([confirmed["ga"], confirmed["ra"], confirmed["la"]], 1),
                            np.stack([confirmed["gb"], confirmed["rb"], confirmed["lb"]], 1)])
    where = where[np.unique(where[:, 0], return_index=True)[1]]  # sorted by gid, aligned with `nodes`
    mine = (where[:, 1] == ex.rank) & (kept != nodes)
    cols.reason[where[mine, 2]] = CODE["near_duplicate"]
    cols.dup_of[where[mine, 2]] = kept[mine]
    return {**stats, "groups": int(np.unique(label).shape[0])}


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


def kmeans(emb: np.ndarray, gid: np.ndarray, k: int, seed: int, ex: Exchange, *, iterations: int = 50,
           sample: int = 8192) -> np.ndarray:
    """Cluster ids of the local rows `emb` of a spherical k-means over all ranks (rows L2-normalised here)."""
    import torch

    from vlm_trainer.curate import embed

    n = all_count(ex, emb.shape[0])[0]
    d = emb.shape[1]
    pick = np.flatnonzero(select_top(~splitmix(gid, seed), gid, min(n, max(sample, 64 * k)), ex))  # rank-independent
    row = np.dtype([("gid", np.int64), ("e", np.float64, (d,))])
    part = np.empty(pick.shape[0], dtype=row)
    part["gid"], part["e"] = gid[pick], _normalise(emb[pick])
    seed_rows = np.concatenate(all_gather(ex, part))
    seed_rows = seed_rows[np.argsort(seed_rows["gid"])]
    centres = embed.kmeans_pp(torch.from_numpy(seed_rows["e"].copy()), k, seed).numpy()
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
    from vlm_trainer.curate import embed

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
        dropped, names = embed.greedy_within(_normalise(got["e"][lo:hi]), threshold)
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
    together. Returns counts of the dedup steps (the same on every rank)."""
    ex = ex or Solo()
    stats: dict[str, Any] = {}
    if filters.clip_score is not None:
        clip_filter(cols, filters, ex)
    if filters.nsfw is not None and cols.nsfw is not None:
        cols.reason[(cols.reason == 0) & cols.nsfw] = CODE["nsfw"]
    if filters.exact_dedup.enabled:
        exact_dedup(cols, ex)
    if filters.near_dedup.enabled:
        stats["near_dedup"] = near_dedup(cols, near or near_params(filters), ex)
    if filters.semantic_dedup is not None:
        sem = filters.semantic_dedup
        stats["semantic_dedup"] = semantic_dedup(cols, sem.clusters, sem.threshold, seed, ex, iterations=kmeans_iterations)
    if filters.balance is not None:
        concept_cap(cols, filters, concepts or [], ex)
    return stats
