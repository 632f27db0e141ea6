"""Synthetic analysed records with planted duplicate groups, for the scale bench and the distribution tests.

No images: each sample's columns (`scale.Columns`) are drawn from its global position alone (a 64-bit mix of
gid and seed), so any split over ranks describes the same data set and a rank generates only its own rows.
Kinds (by a draw per sample): base samples (random 64-bit phash, 128-bit pixel hash, Gaussian embedding (`_gauss`),
CLIP score uniform in [0.1, 0.4]); and copies of an earlier base sample (the root): exact copies (same pixel
hash, phash and embedding), near copies (1-2 phash bits flipped, embedding + small noise, cosine ~0.99),
semantic copies (unrelated phash, embedding + noise, cosine ~0.97). Rows are held in "shards" of `block`
samples dealt round-robin to ranks, as the stage deals its input shards.
"""

from __future__ import annotations

import numpy as np

from vlm_trainer.curate.scale import Columns, splitmix

EXACT, NEAR, SEMANTIC = 20, 40, 55  # per mille: [0, 20) exact copies, [20, 40) near, [40, 55) semantic, rest base
KINDS = {"exact": 1, "near": 2, "semantic": 3}


def rank_gids(n: int, rank: int, world: int, block: int) -> np.ndarray:
    """The global positions rank `rank` holds: shards of `block` samples dealt round-robin."""
    shards = np.arange(rank, (n + block - 1) // block, world, dtype=np.int64)
    if shards.size == 0:
        return np.zeros(0, dtype=np.int64)
    g = (shards[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
    return g[g < n]


def _unit(gid: np.ndarray, seed: int, stream: int) -> np.ndarray:
    return (splitmix(gid, seed * 1000 + stream) >> np.uint64(11)).astype(np.float64) / float(2**53)


def kind_of(gid: np.ndarray, seed: int) -> np.ndarray:
    """0 base, 1 exact copy, 2 near copy, 3 semantic copy (gid 0 is always base)."""
    draw = (splitmix(gid, seed * 1000 + 1) % np.uint64(1000)).astype(np.int64)
    k = np.select([draw < EXACT, draw < NEAR, draw < SEMANTIC], [1, 2, 3], 0)
    return np.where(gid == 0, 0, k)


def root_of(gid: np.ndarray, seed: int) -> np.ndarray:
    """The base sample each one copies (itself for a base sample): an earlier gid, followed until a base one."""
    root = gid.copy()
    todo = kind_of(root, seed) != 0
    step = 2
    while todo.any():
        r = root[todo]
        root[todo] = (splitmix(r, seed * 1000 + step) % r.astype(np.uint64)).astype(np.int64)
        todo = kind_of(root, seed) != 0
        step += 1
    return root


TABLE_ROWS = 65536


def _gauss(gid: np.ndarray, seed: int, stream: int, table: np.ndarray) -> np.ndarray:
    """A standard normal vector per gid: the sum of three rows of a seeded Gaussian table picked by hashes of
    gid, over sqrt(3) (two gids share a row with probability ~5e-5: then their cosine is ~1/3)."""
    out = np.zeros((gid.shape[0], table.shape[1]))
    for k in range(3):
        out += table[(splitmix(gid, seed * 1000 + stream + k) % np.uint64(TABLE_ROWS)).astype(np.int64)]
    return out / np.sqrt(3.0)


def columns(gid: np.ndarray, *, seed: int = 0, dim: int = 64, dtype: type = np.float16, chunk: int = 262144) -> Columns:
    """The columns of the samples at `gid` (this rank's rows)."""
    n = gid.shape[0]
    kind = kind_of(gid, seed)
    root = root_of(gid, seed)
    phash = splitmix(root, seed * 1000 + 10)
    near = kind == 2
    flips = 1 + (splitmix(gid[near], seed * 1000 + 11) % np.uint64(2)).astype(np.int64)
    for b in range(2):
        bit = (splitmix(gid[near], seed * 1000 + 12 + b) % np.uint64(64)).astype(np.uint64)
        phash[near] ^= np.where(flips > b, np.uint64(1) << bit, np.uint64(0))
    sem = kind == 3
    phash[sem] = splitmix(gid[sem], seed * 1000 + 15)
    exact = kind == 1
    pix_src = np.where(exact, root, gid)
    pixel = np.stack([splitmix(pix_src, seed * 1000 + 20), splitmix(pix_src, seed * 1000 + 21)], axis=1)
    clip = (0.1 + 0.3 * _unit(pix_src, seed, 30)).astype(np.float32)
    emb = np.empty((n, dim), dtype=dtype)
    table = np.random.default_rng(seed).standard_normal((TABLE_ROWS, dim))
    for lo in range(0, n, chunk):
        g, r, k = gid[lo:lo + chunk], root[lo:lo + chunk], kind[lo:lo + chunk]
        e = _gauss(r, seed, 40, table)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        scale = np.select([k == 2, k == 3], [0.1, 0.25], 0.0)[:, None]
        if scale.any():
            noise = _gauss(g, seed, 50, table) / np.sqrt(dim)
            e = e + scale * noise
        emb[lo:lo + chunk] = e.astype(dtype)
    return Columns(gid=gid.astype(np.int64), reason=np.zeros(n, dtype=np.int16), pixel=pixel, hashes=phash[:, None],
                   clip=clip,
                   nsfw=np.zeros(n, dtype=bool), emb=emb)


def truth(gid: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kind, root) of each sample: the planted groups."""
    return kind_of(gid, seed), root_of(gid, seed)
