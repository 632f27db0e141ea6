"""The curate stage's distributed decisions (curate/scale.py, curate/exchange.py), with ranks simulated as threads
of this process (`exchange.simulate`): 1, 2 and 3 ranks decide exactly alike on synthetic records with planted
duplicate groups, and each routed step agrees with a brute-force answer on all the records."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from vlm_core.spec import CurateFiltersSpec
from vlm_trainer.curate import groups as G
from vlm_trainer.curate import synthetic
from vlm_trainer.curate.exchange import all_gather, owner, route, simulate
from vlm_trainer.curate.scale import (
    CODE,
    Columns,
    NearParams,
    bucket_pairs,
    decide_columns,
    percentile_cut,
    select_top,
    sortable_f32,
)

N, BLOCK = 2400, 100

FILTERS = CurateFiltersSpec.model_validate({
    "clipScore": {"threshold": 0.12, "keepTopFraction": 0.9},
    "nearDedup": {"maxDistance": 4},
    "semanticDedup": {"clusters": 6, "threshold": 0.95},
})


def _split(cols: Columns, rank: int, world: int) -> Columns:
    """Rank `rank`'s rows of `cols` (shards of BLOCK rows dealt round-robin), as the stage deals shards."""
    take = np.flatnonzero((cols.gid // BLOCK) % world == rank)
    return Columns(gid=cols.gid[take], reason=cols.reason[take].copy(), pixel=cols.pixel[take], hashes=cols.hashes[take],
                   clip=None if cols.clip is None else cols.clip[take], nsfw=None if cols.nsfw is None else cols.nsfw[take],
                   emb=None if cols.emb is None else cols.emb[take], thumbs=None if cols.thumbs is None else cols.thumbs[take],
                   captions=None if cols.captions is None else [cols.captions[i] for i in take])


def _decide_on(world: int, cols: Columns, filters: CurateFiltersSpec, **kw) -> tuple[np.ndarray, np.ndarray, list]:
    """(reason, dup_of) by gid, deciding on `world` simulated ranks; and each rank's stats."""

    def rank(ex):
        mine = _split(cols, ex.rank, ex.world)
        stats = decide_columns(mine, filters, ex, **kw)
        return mine.gid, mine.reason, mine.dup_of, stats

    reason = np.zeros(cols.gid.shape[0], dtype=np.int16)
    dup = np.zeros(cols.gid.shape[0], dtype=np.int64)
    outs = simulate(world, rank)
    for gid, r, d, _ in outs:
        reason[gid], dup[gid] = r, d
    return reason, dup, [o[3] for o in outs]


def test_one_two_and_three_ranks_decide_alike_and_each_planted_group_keeps_one():
    cols = synthetic.columns(np.arange(N), seed=3, dim=32, dtype=np.float32)
    kind, root = synthetic.truth(cols.gid, seed=3)
    assert {int(k) for k in np.unique(kind)} == {0, 1, 2, 3}
    near = NearParams(4, min_similarity=0.9, signal="embedding")
    base_reason, base_dup, stats = _decide_on(1, cols, FILTERS, seed=5, near=near)
    for world in (2, 3):
        reason, dup, st = _decide_on(world, cols, FILTERS, seed=5, near=near)
        assert np.array_equal(reason, base_reason) and np.array_equal(dup, base_dup), world
        same = [{k: v for k, v in s.items() if k != "seconds"} for s in st + stats]
        assert all(s == same[0] for s in same)  # every rank reports the same global counts
    removed = {r: int(np.count_nonzero(base_reason == c)) for r, c in CODE.items()}
    assert removed["exact_duplicate"] > 20 and removed["near_duplicate"] > 20 and removed["semantic_duplicate"] > 10
    # the CLIP top fraction removed exactly ceil(0.1 x those passing the threshold...) of the entering rows
    assert removed["clip_score"] >= N - math.ceil(0.9 * N)
    # a planted group's root and its exact and near copies (all past the CLIP filter) keep exactly the root
    # (semantic copies may fall in another k-means cluster, as SemDeDup allows)
    groups = 0
    for r in np.unique(root[(kind == 1) | (kind == 2)]):
        members = np.flatnonzero((root == r) & (kind != 3))
        if np.any(base_reason[members] == CODE["clip_score"]):
            continue
        groups += 1
        assert np.flatnonzero(base_reason[members] == 0).tolist() == [0] and members[0] == r, (r, base_reason[members])
    assert groups > 20
    # a duplicate names a kept sample
    named = base_dup[base_dup >= 0]
    assert np.all(base_reason[named] == 0)


def test_simulated_ranks_match_the_single_process_decide_on_records():
    """select.decide (records in one process) and 3 simulated ranks over the same data agree."""
    from vlm_trainer.curate.select import decide

    cols = synthetic.columns(np.arange(600), seed=1, dim=16, dtype=np.float32)
    records = [{"key": f"k{i}", "reason": None, "caption": "a dog" if i % 3 else "a cat and a dog",
                "pixel": f"{int(cols.pixel[i, 0]):016x}{int(cols.pixel[i, 1]):016x}", "phash": int(cols.hashes[i, 0]),
                "clip": float(cols.clip[i]), "nsfw": i % 97 == 0} for i in range(600)]
    filters = CurateFiltersSpec.model_validate({
        **FILTERS.model_dump(by_alias=True, exclude_none=True), "nsfw": {"probe": "x"},
        "nearDedup": {"hashes": ["phash"], "maxDistance": 4, "verify": {"signal": "embedding", "minSimilarity": 0.9},
                      "keep": "clipScore"},
        "balance": {"concepts": ["dog", "cat"], "perConceptCap": 150}})
    d = decide(records, filters, concepts=["dog", "cat"], embeddings=cols.emb, seed=2)
    cols.captions = [r["caption"] for r in records]
    cols.nsfw = np.array([r["nsfw"] for r in records])
    reason, dup, _ = _decide_on(3, cols, filters, concepts=["dog", "cat"], seed=2)
    assert [c - 1 if c else None for c in reason.tolist()] == [
        list(CODE).index(r) if r else None for r in d.reasons]
    assert {i: int(g) for i, g in enumerate(dup) if g >= 0} == d.duplicate_of
    assert {"nsfw", "concept_cap", "near_duplicate", "exact_duplicate", "semantic_duplicate", "clip_score"} <= set(d.reasons)
    assert d.groups["near_dedup"] and d.similarity and d.groups["exact_dedup"]


def test_select_top_is_a_stable_global_sort_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.choice(np.float32([0.1, 0.2, 0.25, -0.0, 0.0, -0.3]), 500)
    gid = rng.permutation(500)
    order = sorted(range(500), key=lambda i: (-float(scores[i]), gid[i]))
    for k in (0, 1, 7, 250, 499, 500, 501):
        want = np.zeros(500, dtype=bool)
        want[order[:k]] = True
        for world in (1, 2, 3):
            parts = simulate(world, lambda ex, k=k: (np.arange(ex.rank, 500, ex.world), select_top(
                sortable_f32(scores[ex.rank::ex.world]), gid[ex.rank::ex.world], k, ex)))
            got = np.zeros(500, dtype=bool)
            for idx, mask in parts:
                got[idx] = mask
            assert np.array_equal(got, want), (k, world)


def test_percentile_cut_is_numpys_percentile_over_all_ranks():
    rng = np.random.default_rng(2)
    for n in (1, 2, 5, 101):
        scores = rng.choice(np.float32([0.1, 0.2, 0.25, 0.31]), n) + rng.normal(0, 0.01, n).astype(np.float32) * (n > 50)
        scores = scores.astype(np.float32)
        for p in (0.0, 12.5, 50.0, 70.0, 99.9):
            want = np.percentile(scores.astype(np.float64), p)
            for world in (1, 3):
                got = simulate(world, lambda ex, s=scores, p=p: percentile_cut(s[ex.rank::ex.world], p, ex))
                assert all(g == want for g in got), (n, p, world, got, want)


def test_blocked_semdedup_pass_is_the_plain_ordered_pass():
    """scale.greedy_within (blocked, vectorised) drops and names exactly as the plain one-row-at-a-time pass."""
    from vlm_trainer.curate.scale import greedy_within

    rng = np.random.default_rng(4)
    base = rng.normal(size=(60, 8))
    x = np.concatenate([base, base[rng.integers(0, 60, 140)] + rng.normal(0, 0.15, (140, 8))])[rng.permutation(200)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for threshold in (0.9, 0.97):
        kept, want = [], {}
        for j in range(200):
            if kept:
                sims = x[kept] @ x[j]
                t = int(sims.argmax())
                if sims[t] >= threshold:
                    want[j] = kept[t]
                    continue
            kept.append(j)
        for block in (7, 64, 1024):
            gone, names = greedy_within(x, threshold, block=block)
            assert dict(zip(gone.tolist(), names.tolist(), strict=True)) == want and len(want) > 20


def test_bucket_pairs_lists_every_pair_of_equal_keys_once():
    keys = np.sort(np.random.default_rng(1).integers(0, 30, 200).astype(np.uint64))
    i, j = bucket_pairs(keys)
    want = {(a, b) for a, b in itertools.combinations(range(200), 2) if keys[a] == keys[b]}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == want and len(i) == len(want)


@pytest.mark.parametrize("radius", [0, 3, 6])
def test_routed_candidates_are_groups_candidate_pairs(radius):
    """The candidates found where the (hash column, band) buckets meet are exactly `groups.candidate_pairs` over
    all the samples (two hash columns), each once, for 1, 2 and 3 ranks."""
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**63, (40, 2), dtype=np.int64).astype(np.uint64)

    def flipped(bits: int) -> np.ndarray:  # each hash with `bits` distinct bits flipped
        out = base.copy()
        for row in np.ndindex(out.shape):
            for b in rng.choice(64, bits, replace=False):
                out[row] ^= np.uint64(1) << np.uint64(b)
        return out

    hashes = np.concatenate([base, flipped(0), flipped(1), flipped(radius), flipped(radius + 1)])
    n = hashes.shape[0]
    cols = Columns(gid=np.arange(n), reason=np.zeros(n, dtype=np.int16), pixel=np.stack([np.arange(n)] * 2, 1)
                   .astype(np.uint64), hashes=hashes)
    filters = CurateFiltersSpec.model_validate({"nearDedup": {"maxDistance": radius}, "exactDedup": {"enabled": False}})
    want = G.candidate_pairs(hashes, radius)
    assert want.shape[0] > 40
    for world in (1, 2, 3):
        stats = simulate(world, lambda ex: decide_columns(_split(cols, ex.rank, ex.world), filters, ex,
                                                         near=NearParams(radius)))
        assert stats[0]["near_dedup"]["candidates"] == want.shape[0] == stats[0]["near_dedup"]["confirmed"]
        groups = G.components(n, want)
        assert sorted(map(sorted, stats[0]["near_groups"])) == sorted(
            sorted(np.flatnonzero(groups == g).tolist()) for g in np.unique(groups) if np.count_nonzero(groups == g) > 1)


def test_near_pairs_are_confirmed_by_the_fetched_thumbnails_and_groups_keep_the_best_score():
    """Thumbnails live on the rank that analysed the sample; a candidate pair is confirmed by their cosine
    (`groups.confirm`), and with keep-by-score the group keeps its highest CLIP score (`groups.keep_best`)."""
    rng = np.random.default_rng(7)
    thumbs = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    thumbs[1] = np.clip(thumbs[0].astype(int) + 3, 0, 255)  # a brightness shift of 0: the same picture
    thumbs[3] = thumbs[2]
    b0, b1, b2, b3 = 0x0F0F0F0F0F0F0F0F, 0xF0F0F0F0F0F0F0F0, 0x3333333333333333, 0xCCCCCCCCCCCCCCCC  # >= 32 bits apart
    hashes = np.array([[b0], [b0 ^ 1], [b1], [b1 ^ 3], [b2], [b2 ^ 1], [b3], [b3 ^ 7]], dtype=np.uint64)
    clip = np.array([0.1, 0.3, 0.5, 0.2, 0.1, 0.1, 0.1, 0.1], dtype=np.float32)
    cols = Columns(gid=np.arange(8), reason=np.zeros(8, dtype=np.int16), pixel=np.stack([np.arange(8)] * 2, 1)
                   .astype(np.uint64), hashes=hashes, clip=clip, thumbs=thumbs)
    filters = CurateFiltersSpec.model_validate({"nearDedup": {"maxDistance": 3}})
    params = NearParams(3, min_similarity=0.9, signal="thumbnail", keep_by_score=True)
    for world in (1, 2, 3):
        reason, dup, stats = _decide_on(world, cols, filters, near=params)
        # pairs (0,1), (2,3), (4,5), (6,7) are candidates; only the first two have matching thumbnails
        assert stats[0]["near_dedup"] == {"candidates": 4, "confirmed": 2, "groups": 2}
        assert reason.tolist() == [CODE["near_duplicate"], 0, 0, CODE["near_duplicate"], 0, 0, 0, 0]
        assert dup.tolist()[:4] == [1, -1, -1, 2]
        assert stats[0]["near_similarity"][0] > 0.99


def test_a_chain_of_near_pairs_never_removes_through_the_chain():
    """A~B and B~C, A and C farther apart than the radius, in global order C, A, B: one group {C, A, B}; C and
    A are kept (A repeats only B), B is removed as a copy of C (`groups.keep_best`); never zero members."""
    a, b, c = 0, 0b111, 0b111111  # A-B 3 bits, B-C 3 bits, A-C 6 bits
    cols = Columns(gid=np.arange(4), reason=np.zeros(4, dtype=np.int16), pixel=np.stack([np.arange(4)] * 2, 1)
                   .astype(np.uint64), hashes=np.array([[c], [a], [b], [0xFFFF0000FFFF0000]], dtype=np.uint64))
    filters = CurateFiltersSpec.model_validate({"nearDedup": {"maxDistance": 3}})
    for world in (1, 2):
        reason, dup, stats = _decide_on(world, cols, filters, near=NearParams(3))
        assert reason.tolist() == [0, 0, CODE["near_duplicate"], 0] and dup.tolist() == [-1, -1, 0, -1]
        assert stats[0]["near_groups"] == [[0, 1, 2]]


def test_routing_primitives():
    recs = np.arange(10, dtype=np.int64)
    dest = np.array([2, 0, 1, 2, 0, 0, 1, 2, 2, 1])
    parts = route(recs, dest, 3)
    assert [p.tolist() for p in parts] == [[1, 4, 5], [2, 6, 9], [0, 3, 7, 8]]
    keys = np.arange(1000, dtype=np.uint64)  # low-entropy keys still spread over the ranks
    assert np.bincount(owner(keys, 4), minlength=4).min() > 150
    got = simulate(3, lambda ex: [p.tolist() for p in all_gather(ex, np.array([ex.rank] * (ex.rank + 1)))])
    assert got == [[[0], [1, 1], [2, 2, 2]]] * 3


def test_a_failing_rank_fails_the_simulation():
    def body(ex):
        if ex.rank == 1:
            raise ValueError("rank 1 broke")
        return ex.all_sum(np.array([1]))

    with pytest.raises(ValueError, match="rank 1 broke"):
        simulate(2, body)
