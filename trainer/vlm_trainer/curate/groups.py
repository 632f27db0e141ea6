"""Duplicate decisions as pure numpy functions: candidates from hashes, verification, groups, who is kept.

Near-duplicate removal in four steps, each a function of arrays only (no records, ranks or I/O), so the
single-process path (`select.decide`) and a distributed one can run the same code on their share:

1. `candidate_pairs(hashes, radius)`: pairs (i < j) whose 64-bit perceptual hashes differ in at most
   `radius` bits in at least one hash column. Multi-index hashing: each hash is cut into `radius + 1`
   bands of contiguous bits; by the pigeonhole principle two hashes within `radius` bits agree exactly on
   at least one band, so only samples sharing a band value (a bucket) are compared. A generous radius
   only proposes; it decides nothing. Its parts, for a distributed caller: `band_keys` (the band values
   that route a hash), `bucket_pairs` (all pairs within buckets), `hamming_pairs` (the exact check).
2. Confirmation by a second signal with its own threshold: `aligned_similarity(pairs, thumbs)` (the best
   cosine of two blurred thumbnails over small zooms and shifts, so crops, shifts, resizes, re-encodes and
   colour shifts of one picture match and different layouts do not) then `confirm_scores`; or
   `confirm(pairs, vectors, min_similarity)` for L2-normalised vectors (the curate encoder's image
   embeddings).
3. `components(n, pairs)`: duplicate groups, the connected components of the confirmed pairs; a group's
   id is its smallest member index (union-find by label propagation with pointer jumping).
4. `keep_best(n, pairs, score)`: who stays. Members are visited best first (highest `score`, then the
   first in global order, i.e. the smallest index); a member is removed only when it is itself a
   confirmed duplicate of an already kept member (its `duplicate_of`). So every group keeps at least its
   best member, a group whose members all repeat that member keeps exactly one, and nothing is removed
   through a chain: with A~B and B~C confirmed but A, C distinct, A is kept, B removed (a copy of A),
   and C kept (it repeats only B, which is gone).

`group_sizes` summarises groups for the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HASH_BITS = 64
PAIR_CHUNK = 1 << 20  # pairs whose similarity is computed at once (bounds the temporary memory)


def bands(radius: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of the `radius + 1` contiguous bit bands a `bits`-bit hash is cut into (widths differ by
    at most one). Two hashes within `radius` bits agree on at least one band."""
    if not 0 <= radius < bits:
        raise ValueError(f"radius: must be in [0, {bits - 1}], got {radius}")
    count = radius + 1
    widths = [bits // count + (1 if k < bits % count else 0) for k in range(count)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def band_keys(column: np.ndarray, radius: int) -> np.ndarray:
    """The value of each of the `radius + 1` bands (`bands`) of each hash: int64 [n, radius + 1]. Two hashes
    within `radius` bits share the value of at least one band, so a band's value can route a hash to the
    place (bucket, rank) where its candidates are found."""
    h = np.asarray(column, dtype=np.uint64)
    return np.stack([((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
                     for shift, width in bands(radius)], axis=1) if h.shape[0] else np.zeros((0, radius + 1), np.int64)


def bucket_pairs(keys: np.ndarray) -> np.ndarray:
    """All (i, j), i < j, of rows with equal `keys` (int64 [n]) as an int64 [m, 2] array."""
    n = keys.shape[0]
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    new = np.ones(n, dtype=bool)
    new[1:] = sk[1:] != sk[:-1]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, n))
    end = np.repeat(starts + sizes, sizes)  # one past the bucket's last position, per sorted position
    pos = np.arange(n)
    partners = end - pos - 1  # later members of the same bucket
    total = int(partners.sum())
    if total == 0:
        return np.empty((0, 2), dtype=np.int64)
    left = np.repeat(pos, partners)
    offset = np.arange(total) - np.repeat(np.cumsum(partners) - partners, partners)
    right = left + 1 + offset
    a, b = order[left], order[right]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)


def hamming_pairs(hashes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Bits in which the hashes of each pair differ: hashes uint64 [n] (one column), pairs [m, 2] -> int [m]."""
    return np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(np.int64)


def candidate_pairs(hashes: np.ndarray, radius: int | Sequence[int]) -> np.ndarray:
    """Pairs (i < j, sorted, unique) whose hashes differ in at most `radius` bits in at least one column.

    `hashes`: uint64 [n] or [n, k] (k hash kinds, e.g. pHash and dHash); `radius`: one radius for every
    column or one per column. Exact for any radius (multi-index hashing, see the module docstring); the work
    is the number of same-band pairs, which grows quickly for radii above ~10 on 64-bit hashes.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    if h.ndim == 1:
        h = h[:, None]
    n, k = h.shape
    radii = [int(radius)] * k if isinstance(radius, (int, np.integer)) else [int(r) for r in radius]
    if len(radii) != k:
        raise ValueError(f"radius: {len(radii)} radii for {k} hash columns")
    found = []
    for col, r in zip(range(k), radii, strict=True):
        column = h[:, col]
        for keys in band_keys(column, r).T:
            pairs = bucket_pairs(keys)
            if pairs.shape[0]:
                found.append(pairs[hamming_pairs(column, pairs) <= r])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    every = np.concatenate(found)
    code = np.unique(every[:, 0] * np.int64(n) + every[:, 1])
    return np.stack([code // n, code % n], axis=1).astype(np.int64)


def pair_similarity(pairs: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine of each pair's rows of L2-normalised `vectors` [n, d] -> float32 [m] (in chunks)."""
    v = np.asarray(vectors, dtype=np.float32)
    out = np.empty(pairs.shape[0], dtype=np.float32)
    for start in range(0, pairs.shape[0], PAIR_CHUNK):
        p = pairs[start : start + PAIR_CHUNK]
        out[start : start + len(p)] = np.einsum("ij,ij->i", v[p[:, 0]], v[p[:, 1]])
    return out


def confirm(pairs: np.ndarray, vectors: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """The candidate `pairs` [m, 2] whose vectors' cosine is at least `min_similarity`, and those cosines.

    `vectors`: L2-normalised rows [n, d] float32 (thumbnails from `thumbnail_vectors`, or image embeddings).
    """
    sims = pair_similarity(pairs, vectors)
    ok = sims >= min_similarity
    return pairs[ok], sims[ok]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id of each of `n` samples under the `pairs` [m, 2]: the smallest index of its connected
    component (a sample in no pair is its own group)."""
    labels = np.arange(n, dtype=np.int64)
    if pairs.shape[0] == 0:
        return labels
    a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        while True:  # pointer jumping: every label points at a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


def priority_order(n: int, score: np.ndarray | None = None) -> np.ndarray:
    """Indices best first: highest `score` (NaN last), then the smallest index; without scores, 0..n-1."""
    if score is None:
        return np.arange(n, dtype=np.int64)
    s = np.asarray(score, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    return np.lexsort((np.arange(n), -s)).astype(np.int64)


def keep_best(n: int, pairs: np.ndarray, score: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept bool [n], duplicate_of int64 [n]: the kept sample each removed one repeats, -1 for kept ones).

    Members are visited in `priority_order`; one is removed exactly when a confirmed pair links it to a
    sample kept before it (it then repeats the best such sample). The first visited member of a group is
    always kept; a sample whose only links are to removed samples is kept (no removal through a chain).
    """
    kept = np.ones(n, dtype=bool)
    dup = np.full(n, -1, dtype=np.int64)
    if pairs.shape[0] == 0:
        return kept, dup
    order = priority_order(n, score)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    # orient each pair better -> worse, then a CSR list of each sample's better neighbours, best first
    better = np.where(rank[a] < rank[b], a, b)
    worse = np.where(rank[a] < rank[b], b, a)
    sort = np.lexsort((rank[better], rank[worse]))
    better, worse = better[sort], worse[sort]
    starts = np.searchsorted(rank[worse], np.arange(n), side="left")
    ends = np.searchsorted(rank[worse], np.arange(n), side="right")
    for r in np.unique(rank[worse]).tolist():  # only samples with a better neighbour can be removed
        i = int(order[r])
        for j in better[starts[r] : ends[r]].tolist():
            if kept[j]:
                kept[i], dup[i] = False, j
                break
    return kept, dup


def group_sizes(group_ids: np.ndarray) -> dict[int, int]:
    """{group size: number of groups} over the groups of two or more members."""
    _, counts = np.unique(np.asarray(group_ids), return_counts=True)
    sizes, how_many = np.unique(counts[counts > 1], return_counts=True)
    return {int(s): int(c) for s, c in zip(sizes, how_many, strict=True)}


ALIGN_SCALES = (0.9, 1.0, 1.1)  # zooms of one thumbnail tried against the other (a crop of up to ~10 %)
ALIGN_SHIFT = 1  # thumbnail pixels tried each way, in x and y
ALIGN_MARGIN = 2  # pixels left out at each border, so every shift compares a full window
ALIGN_BLUR = 1.2  # Gaussian sigma in thumbnail pixels: re-encoding and blur do not count, layout does
ALIGN_CHUNK = 4096  # pairs compared at once


def _gauss_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [m, T, T, c] along the two image axes (edges repeated)."""
    if sigma <= 0:
        return x
    r = int(np.ceil(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    side = x.shape[1]
    p = np.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * p[:, i : i + side] for i in range(2 * r + 1))
    p = np.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    return np.asarray(sum(k[i] * p[:, :, i : i + side] for i in range(2 * r + 1)), dtype=np.float32)


def _zoom(x: np.ndarray, scale: float) -> np.ndarray:
    """[m, T, T, c] zoomed by `scale` about the centre (bilinear, edges repeated)."""
    if scale == 1.0:
        return x
    side = x.shape[1]
    c = (side - 1) / 2
    src = np.clip((np.arange(side) - c) / scale + c, 0, side - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, side - 1)
    w = (src - i0).astype(np.float32)
    x = x[:, i0] * (1 - w)[None, :, None, None] + x[:, i1] * w[None, :, None, None]
    return x[:, :, i0] * (1 - w)[None, None, :, None] + x[:, :, i1] * w[None, None, :, None]


def _window_vectors(w: np.ndarray) -> np.ndarray:
    m, c = w.shape[0], w.shape[-1]
    w = w.reshape(m, -1, c)
    w = (w - w.mean(axis=1, keepdims=True)).reshape(m, -1)
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    return np.where(norm > 1e-6, w / np.maximum(norm, 1e-6), 0.0)


def aligned_similarity(pairs: np.ndarray, thumbs: np.ndarray, *, blur: float = ALIGN_BLUR,
                       scales: tuple[float, ...] = ALIGN_SCALES, shift: int = ALIGN_SHIFT) -> np.ndarray:
    """The cosine of each pair's aligned thumbnails -> float32 [m]: both blurred (`blur`), the second zoomed by
    each of `scales` and shifted up to `shift` pixels each way, the best match over these alignments of the
    central windows (each colour channel minus its mean, as `thumbnail_vectors`). A crop, shift or resize of a
    picture aligns with its original; two different layouts do not. `thumbs`: uint8 [n, T, T, 3]."""
    out = np.empty(pairs.shape[0], dtype=np.float32)
    side = thumbs.shape[1]
    m0 = ALIGN_MARGIN + shift
    for start in range(0, pairs.shape[0], ALIGN_CHUNK):
        p = pairs[start : start + ALIGN_CHUNK]
        a = _gauss_blur(thumbs[p[:, 0]].astype(np.float32), blur)
        b = _gauss_blur(thumbs[p[:, 1]].astype(np.float32), blur)
        wa = _window_vectors(a[:, m0 : side - m0, m0 : side - m0])
        best = np.full(len(p), -1.0, dtype=np.float32)
        for scale in scales:
            bs = _zoom(b, scale)
            for dy in range(-shift, shift + 1):
                for dx in range(-shift, shift + 1):
                    wb = _window_vectors(bs[:, m0 + dy : side - m0 + dy, m0 + dx : side - m0 + dx])
                    best = np.maximum(best, np.einsum("ij,ij->i", wa, wb))
        out[start : start + len(p)] = best
    return out


def confirm_scores(pairs: np.ndarray, sims: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """The `pairs` whose similarity `sims` (one per pair) is at least `min_similarity`, and those similarities."""
    ok = sims >= min_similarity
    return pairs[ok], sims[ok]


def thumbnail_vectors(thumbs: np.ndarray) -> np.ndarray:
    """Aligned thumbnails (uint8 [n, side, side, 3], see `image.thumbnail`) as vectors for `confirm`: each
    colour channel minus its mean (so a brightness or colour-balance shift does not count), flattened and
    L2-normalised; a flat thumbnail is the zero vector (similar to nothing)."""
    x = np.asarray(thumbs, dtype=np.float32)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x - x.mean(axis=1, keepdims=True)
    x = x.reshape(x.shape[0], -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 1e-6, x / np.maximum(norm, 1e-6), 0.0).astype(np.float32)
