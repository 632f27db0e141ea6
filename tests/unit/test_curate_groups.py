"""The near-duplicate decisions as pure functions (curate/groups.py): multi-index candidates equal brute force,
confirmation by a second signal, groups, and the keep rule (best first, never removal through a chain)."""

from __future__ import annotations

import numpy as np
import pytest
from vlm_core.spec import CurateFiltersSpec
from vlm_trainer.curate import groups as G
from vlm_trainer.curate.image import THUMB_SIDE as S
from vlm_trainer.curate.select import decide, encode_thumb


def _brute(hashes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    n = hashes.shape[0]
    out = set()
    for i in range(n):
        for j in range(i + 1, n):
            if any(bin(int(hashes[i, c]) ^ int(hashes[j, c])).count("1") <= radius for c in range(hashes.shape[1])):
                out.add((i, j))
    return out


@pytest.mark.parametrize("radius", [0, 3, 8, 12])
def test_multi_index_candidates_equal_brute_force(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=40).astype(np.uint64)
    # near copies: a few random bits flipped, in two hash columns
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, size=int(rng.integers(0, 16)), replace=False)))
             for _ in range(40)]
    col0 = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64)])
    col1 = np.concatenate([base[::-1], rng.integers(0, 2**63, size=40, dtype=np.uint64)])
    hashes = np.stack([col0, col1], axis=1)
    got = G.candidate_pairs(hashes, radius)
    assert got.dtype == np.int64 and (got[:, 0] < got[:, 1]).all()
    assert {tuple(p) for p in got.tolist()} == _brute(hashes, radius)
    assert len(got) == len({tuple(p) for p in got.tolist()})  # unique


def test_bands_cover_the_hash_and_pigeonhole_holds():
    for r in (0, 1, 7, 10, 31):
        b = G.bands(r)
        assert len(b) == r + 1 and sum(w for _, w in b) == 64 and b[0][0] == 0
    with pytest.raises(ValueError, match="radius: must be in"):
        G.bands(64)


def test_confirm_keeps_pairs_at_or_above_the_similarity():
    v = np.eye(4, dtype=np.float32)
    v[1] = np.array([0.8, 0.6, 0, 0], dtype=np.float32)
    pairs = np.array([[0, 1], [0, 2], [1, 2]], dtype=np.int64)
    kept, sims = G.confirm(pairs, v, 0.8)
    assert kept.tolist() == [[0, 1]] and sims.tolist() == pytest.approx([0.8])


def test_chain_a_b_c_keeps_a_and_c_never_zero():
    """A~B and B~C confirmed, A and C distinct: one group {A, B, C}; A (first) is kept, B removed as A's copy,
    C kept (it repeats only B, which is gone): no removal through a chain, and never zero members."""
    pairs = np.array([[0, 1], [1, 2]], dtype=np.int64)
    assert G.components(3, pairs).tolist() == [0, 0, 0]
    kept, dup = G.keep_best(3, pairs)
    assert kept.tolist() == [True, False, True] and dup.tolist() == [-1, 0, -1]
    # B ranked best (highest score): B kept, A and C both its copies -> exactly one kept
    kept, dup = G.keep_best(3, pairs, np.array([0.1, 0.9, 0.2]))
    assert kept.tolist() == [False, True, False] and dup.tolist() == [1, -1, 1]


def test_random_graphs_keep_a_best_member_per_group_and_remove_only_direct_copies():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 40))
        m = int(rng.integers(0, 3 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1)[a != b], axis=0).astype(np.int64)
        score = rng.random(n) if trial % 2 else None
        kept, dup = G.keep_best(n, pairs, score)
        gid = G.components(n, pairs)
        order = G.priority_order(n, score)
        rank = np.empty(n, dtype=int)
        rank[order] = np.arange(n)
        edges = {tuple(p) for p in pairs.tolist()}
        for g in np.unique(gid):
            members = np.flatnonzero(gid == g)
            assert gid[members].min() == members.min() == g
            assert kept[members].any() and kept[members[np.argmin(rank[members])]]  # the best member stays
        for i in np.flatnonzero(~kept):
            j = int(dup[i])
            assert kept[j] and rank[j] < rank[i] and (min(i, j), max(i, j)) in edges  # a direct copy of a kept one
        for i, j in pairs.tolist():
            assert not (kept[i] and kept[j])  # two kept samples are never confirmed duplicates


def test_group_sizes_and_thumbnail_vectors():
    assert G.group_sizes(np.array([0, 0, 2, 3, 3, 3, 6])) == {2: 1, 3: 1}
    rng = np.random.default_rng(1)
    t = rng.integers(0, 200, (3, 16, 16, 3)).astype(np.uint8)
    t[1] = t[0] + 40  # brighter: the same picture to the thumbnail signal
    t[2] = 128  # flat: similar to nothing
    v = G.thumbnail_vectors(t)
    assert float(v[0] @ v[1]) == pytest.approx(1.0, abs=1e-5) and float(np.abs(v[2]).sum()) == 0.0


def test_decide_near_dedup_confirms_candidates_with_thumbnails():
    """Four samples with one hash: 0 and 1 are a copy (hash 2 bits apart, same thumbnail); 2 has 0's hash but
    another picture (a look-alike the hash alone would remove); 3 is a brighter copy of 2."""
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 255, (S, S, 3)).astype(np.uint8) for _ in range(2))
    thumbs = [a, a, b, np.clip(b.astype(int) + 10, 0, 255).astype(np.uint8)]
    hashes = [0b1011, 0b1000, 0b1011, 0b1111]
    records = [{"key": f"k{i}", "caption": "x y", "reason": None, "pixel": f"p{i}", "hashes": {"phash": h, "dhash": h},
                "thumb": encode_thumb(t)} for i, (h, t) in enumerate(zip(hashes, thumbs, strict=True))]
    d = decide(records, CurateFiltersSpec.model_validate({"nearDedup": {"maxDistance": 4,
                                                                        "verify": {"minSimilarity": 0.9}}}))
    assert d.reasons == [None, "near_duplicate", None, "near_duplicate"]
    assert d.duplicate_of == {1: 0, 3: 2} and d.groups["near_dedup"] == [[0, 1], [2, 3]]
    assert d.similarity[1] == pytest.approx(1.0, abs=1e-5)
    hash_only = decide(records, CurateFiltersSpec.model_validate({"nearDedup": {"maxDistance": 4, "verify": None}}))
    assert hash_only.reasons.count("near_duplicate") == 3  # one group of four, the look-alike removed too


def test_youden_threshold_sits_in_the_middle_of_the_gap():
    from vlm_trainer.curate.calibrate import youden_threshold

    pos, neg = np.array([0.97, 0.98, 0.99, 1.0]), np.array([0.5, 0.6, 0.7, 0.8])
    t = youden_threshold(pos, neg)
    assert 0.8 < t <= 0.97 and t == pytest.approx((0.81 + 0.97) / 2, abs=1e-3)
    # a real duplicate among the "distinct" neighbours caps the false-positive rate but does not move the gap
    assert youden_threshold(pos, np.append(neg, 0.995)) == t


def _blocks(rng: np.random.Generator, n: int):
    from PIL import Image

    out = []
    for _ in range(n):
        a = np.full((64, 64, 3), rng.integers(150, 256, 3), dtype=np.uint8)
        for _ in range(3):
            x, y, w, h = rng.integers(0, 40, 2).tolist() + rng.integers(8, 24, 2).tolist()
            a[y : y + h, x : x + w] = rng.integers(0, 150, 3)
        out.append(Image.fromarray(a))
    return out


def test_calibrate_measures_copies_against_nearest_neighbours_and_writes_a_snippet():
    import yaml
    from vlm_trainer.curate import calibrate as C

    rng = np.random.default_rng(3)
    images = _blocks(rng, 80)
    for name, perturb in C.PERTURBATIONS.items():  # every perturbation gives an RGB image, seeded
        a, b = perturb(images[0], np.random.default_rng(1)), perturb(images[0], np.random.default_rng(1))
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b)), name
    h, t = C.signals(images, ["phash", "dhash"])
    pool = C.Pool([f"k{i}" for i in range(80)], images, ["phash", "dhash"], h, t, [f"p{i}" for i in range(80)])
    result = C.calibrate(pool, sample=40, seed=0)
    assert C.calibrate(pool, sample=40, seed=0, suite="light")["recommended"]["blur"] == 0.0
    rec = result["recommended"]
    assert 0 <= rec["maxDistance"] <= C.MAX_RADIUS and 0.5 <= rec["minSimilarity"] <= 1.0
    assert result["sample"] == 40 and sum(v["copies"] for v in result["per_perturbation"].values()) == 40
    radius_recall = [r["copies_proposed"] for r in result["radius_table"]]
    assert radius_recall == sorted(radius_recall)  # a larger radius proposes at least as many copies
    recalls = [r["copies_confirmed"] for r in result["similarity_table"]]
    assert recalls == sorted(recalls, reverse=True) and result["recall"] >= 0.8, result["per_perturbation"]
    text = C.report(result)
    assert "<- recommended" in text and f"maxDistance {rec['maxDistance']}" in text
    near = yaml.safe_load(C.snippet(result))["filters"]["nearDedup"]
    assert near == {"hashes": ["phash", "dhash"], "maxDistance": rec["maxDistance"],
                    "verify": {"signal": "thumbnail", "minSimilarity": rec["minSimilarity"], "blur": rec["blur"]}}
    CurateFiltersSpec.model_validate({"nearDedup": near})  # the snippet is a valid filter spec
    with pytest.raises(ValueError, match="found 2 usable images"):
        C.calibrate(C.Pool(["a", "b"], images[:2], ["phash"], h[:2, :1], t[:2], ["a", "b"]))


def test_funnel_reports_groups_and_the_duplicates_page_shows_pairs():
    from PIL import Image
    from vlm_trainer.curate.report import duplicate_pairs, duplicates_html, duplicates_png, funnel

    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 255, (S, S, 3)).astype(np.uint8) for _ in range(2))
    records = [{"key": f"k{i}", "caption": "two words", "reason": None, "pixel": px, "hashes": {"phash": 0, "dhash": 0},
                "thumb": encode_thumb(th)} for i, (px, th) in enumerate([("p0", a), ("p0", a), ("p1", a), ("p2", b)])]
    d = decide(records, CurateFiltersSpec.model_validate({}))
    assert d.reasons == [None, "exact_duplicate", "near_duplicate", None]
    doc = funnel(records, d)
    steps = {s["filter"]: s for s in doc["filters"]}
    assert steps["exact_dedup"]["groups"] == {"count": 1, "members": 2, "kept": 1, "sizes": {"2": 1}}
    assert steps["near_dedup"]["groups"] == {"count": 1, "members": 2, "kept": 1, "sizes": {"2": 1}}
    assert steps["near_dedup"]["examples"]["near_duplicate"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    pairs = duplicate_pairs(d, 5)
    assert pairs == [("exact_dedup", 1, 0), ("near_dedup", 2, 0)]
    images = {i: Image.fromarray(a) for i in (0, 1, 2)}
    page = duplicates_html(records, d, pairs, images)
    assert page.count("data:image/png;base64,") == 4 and "k2" in page and "1.000" in page
    assert duplicates_png(records, d, pairs, images)[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_clip_score_keeps_the_best_scored_member_of_a_group():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 255, (S, S, 3)).astype(np.uint8)
    records = [{"key": f"k{i}", "caption": "two words", "reason": None, "pixel": f"p{i}", "clip": c,
                "hashes": {"phash": 0, "dhash": 0}, "thumb": encode_thumb(a)} for i, c in enumerate([0.3, 0.9, 0.5])]
    filters = CurateFiltersSpec.model_validate({"clipScore": {"threshold": 0.1}, "nearDedup": {"keep": "clipScore"}})
    d = decide(records, filters)
    assert d.reasons == ["near_duplicate", None, "near_duplicate"] and d.duplicate_of == {0: 1, 2: 1}
