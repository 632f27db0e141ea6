"""`vlmctl curate calibrate`: the near-duplicate filter's thresholds, measured on your own images.

What it does (all on CPU, no encoder, no download):
1. Reads up to `pool` decodable images from the shards, in shard order (images smaller than `min_side`
   or more elongated than `max_aspect` are skipped, as the image filter would drop them).
2. Picks `sample` of them (seeded) and makes one synthetic copy of each with a perturbation of the
   suite below (round robin over the suite, strength drawn in the documented range); with the web suite
   half of them get a second, random one of the suite after it (a chain of edits). Copies the image
   filter would drop (smaller than `min_side`, more elongated than `max_aspect`) are left out.
3. Positives: each (original, its copy). Negatives: each original against its nearest *other* image in
   the pool: by Hamming distance for the candidate radius, and, among the pool images that are
   candidates at the chosen radius, by the verification signal (aligned thumbnail cosine, as the stage
   computes it, over the NEIGHBOURS candidates most similar by plain thumbnail cosine). That is exactly
   the pair that would wrongly remove a clean image.
4. Prints, per candidate radius, the share of copies proposed (recall) and of originals with a candidate
   neighbour; per similarity threshold, copies confirmed (recall), distinct neighbours confirmed (false
   positives), precision and F1 (one copy per original, so precision is for a pool with as many near
   duplicates as images: on your data, with fewer duplicates, it is lower by that ratio); then the
   recommended values and, with `--write`, a snippet for the job file.

Recommendations: the radius is the smallest (at most MAX_RADIUS) at which RECALL_TARGET (99.5 %) of the copies are
candidates in at least one hash (else the radius with the most); the similarity threshold maximises
recall minus false-positive rate (Youden's J), in the middle of the best plateau (the gap between copies
and distinct neighbours, when they separate). A pool that already holds near duplicates shows them as
"false positives" at high similarity: the pairs confirmed above the recommended threshold are listed with
their keys, so a person can look at them.

The perturbation suites (`SUITES`, `--suite`; sides in pixels of the original). web (the default):
  jpeg     re-encoded as JPEG, quality 30-80
  blur     Gaussian blur, radius 0.4-1.5 % of the shorter side (0.25-1 px at 64 px)
  resize   scaled by 0.5-0.8 or 1.25-2.0 (bicubic), kept at the new size
  crop     3-8 % cut from each side independently, kept at the cropped size
  shift    content moved by 2-4 % of the side in x and y, the edge pixels repeated into the gap
  colour   brightness, contrast and saturation each scaled by 0.85-1.15
  overlay  a filled rectangle (a logo or watermark) covering 1-3 % of the area, near a corner
  web      resized by 0.6-0.9 then JPEG quality 60-85 (a re-upload)
light (re-edits only, for sets whose distinct images are near-identical at thumbnail size): colour, resize,
  jpeg_hq  re-encoded as JPEG, quality 85-95
The thumbnail blur (`verify.blur`) goes with the suite (SUITE_BLUR): 1.2 for web (texture does not survive
re-encoding), 0 for light (sharp texture, such as sensor noise, tells look-alikes apart).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from vlm_trainer.curate import groups as G
from vlm_trainer.curate.image import decode, dhash, phash, pixel_hash, thumbnail

HASHERS: dict[str, Callable[[Image.Image], int]] = {"phash": phash, "dhash": dhash}
MAX_RADIUS = 20  # bits: larger radii make the candidate buckets too big (bands of 3 bits) to be a useful first cut
RECALL_TARGET = 0.995
NEIGHBOURS = 8  # candidate neighbours per original compared aligned (the most similar by plain cosine)
SECOND_SHARE = 0.5  # web suite: copies that get a second perturbation of the suite after the first
# The thumbnail blur each suite's copies are compared with (verify.blur): web copies are re-encoded and blurred,
# so fine texture is not evidence; light re-edits keep it, and sharp texture tells look-alikes apart.
SUITE_BLUR = {"web": 1.2, "light": 0.0}
THRESHOLDS = tuple(round(0.5 + 0.01 * k, 2) for k in range(50)) + (0.995, 0.999)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _shift(im: Image.Image, dx: int, dy: int) -> Image.Image:
    a = np.asarray(im)
    h, w = a.shape[:2]
    padded = np.pad(a, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return Image.fromarray(padded[y0 : y0 + h, x0 : x0 + w])


def _crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    cut = rng.uniform(0.03, 0.08, 4)
    box = (round(w * cut[0]), round(h * cut[1]), w - round(w * cut[2]), h - round(h * cut[3]))
    return im.crop(box)


def _overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = im.copy()
    w, h = out.size
    area = rng.uniform(0.01, 0.03) * w * h
    rw = max(1, round(np.sqrt(area * rng.uniform(1.5, 3.0))))
    rh = max(1, round(area / rw))
    x = round(rng.uniform(0.02, 0.1) * w) if rng.random() < 0.5 else w - rw - round(rng.uniform(0.02, 0.1) * w)
    y = round(rng.uniform(0.02, 0.1) * h) if rng.random() < 0.5 else h - rh - round(rng.uniform(0.02, 0.1) * h)
    ImageDraw.Draw(out).rectangle((x, y, x + rw, y + rh), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return out


def _colour(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.85, 1.15))


def _resize(im: Image.Image, scale: float) -> Image.Image:
    w, h = im.size
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


PERTURBATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "jpeg": lambda im, rng: _jpeg(im, int(rng.integers(30, 81))),
    "blur": lambda im, rng: im.filter(ImageFilter.GaussianBlur(rng.uniform(0.004, 0.015) * min(im.size))),
    "resize": lambda im, rng: _resize(im, float(rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 2.0))),
    "crop": _crop,
    "shift": lambda im, rng: _shift(im, *(int(round(s * rng.uniform(0.02, 0.04))) * (1 if rng.random() < 0.5 else -1)
                                          for s in im.size)),
    "colour": _colour,
    "overlay": _overlay,
    "web": lambda im, rng: _jpeg(_resize(im, float(rng.uniform(0.6, 0.9))), int(rng.integers(60, 86))),
    "jpeg_hq": lambda im, rng: _jpeg(im, int(rng.integers(85, 96))),
}
# Which copies count as duplicates: "web" (re-uploads, crops, edits: the default) or "light" (re-edits only:
# colour, high-quality re-encode, resize), for data whose distinct images are too alike to tell crops apart.
SUITES: dict[str, tuple[str, ...]] = {
    "web": ("jpeg", "blur", "resize", "crop", "shift", "colour", "overlay", "web"),
    "light": ("colour", "jpeg_hq", "resize"),
}


@dataclass
class Pool:
    """The images read for calibration: keys, hashes [n, k] (uint64, in `hashes` order), thumbnails and pixel
    hashes (to skip exact copies, which exact dedup removes first)."""

    keys: list[str]
    images: list[Image.Image]
    hash_names: list[str]
    hashes: np.ndarray
    thumbs: np.ndarray
    pixels: list[str]
    min_side: int = 1
    max_aspect: float = 1000.0


def signals(images: list[Image.Image], hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64 [n, k], thumbnails uint8 [n, side, side, 3]) of images, as the curate stage computes them."""
    h = np.array([[HASHERS[name](im) for name in hashes] for im in images], dtype=np.uint64).reshape(len(images), len(hashes))
    t = np.stack([thumbnail(im) for im in images]) if images else np.zeros((0, 16, 16, 3), dtype=np.uint8)
    return h, t


def read_pool(shards: list[str], pool: int, hashes: list[str], min_side: int = 32, max_aspect: float = 3.0) -> Pool:
    """Up to `pool` decodable images of the shards, in shard order (see the module docstring)."""
    from vlm_core import storage

    from vlm_trainer.curate.runner import read_samples, sample_parts

    keys, images = [], []

    def samples() -> Iterator[tuple[str, bytes | None]]:
        for url in storage.expand_shards(shards, field="shards"):
            for s in read_samples(url):
                yield s.key, sample_parts(s)[1]

    for key, data in samples():
        im = decode(data)
        if im is None or min(im.size) < min_side or max(im.size) / min(im.size) > max_aspect:
            continue
        keys.append(key)
        images.append(im)
        if len(images) >= pool:
            break
    h, t = signals(images, hashes)
    return Pool(keys, images, list(hashes), h, t, [pixel_hash(im) for im in images], min_side, max_aspect)


def _hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min over hash columns of the Hamming distances, [len(a), len(b)]."""
    return np.min(np.bitwise_count(a[:, None, :] ^ b[None, :, :]), axis=2).astype(np.int64)


def youden_threshold(pos: np.ndarray, neg: np.ndarray, grid: tuple[float, ...] = THRESHOLDS) -> float:
    """The threshold with the highest recall(pos >= t) - false-positive rate(neg >= t), in the middle of the
    best plateau (over the grid and the observed scores)."""
    cands = np.unique(np.concatenate([np.asarray(grid, dtype=np.float64), pos, neg]))
    cands = cands[(cands >= min(grid)) & (cands <= 1.0)]
    j = np.array([(pos >= t).mean() - (neg >= t).mean() for t in cands])
    best = np.flatnonzero(j >= j.max() - 1e-12)
    lo, hi = float(cands[best[0]]), float(cands[best[-1]])
    # the plateau reaches up to just below the next candidate; its middle between the lowest and highest best
    return round((lo + hi) / 2, 3)


def recommend_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The recommended similarity threshold for copies `pos` vs nearest distinct neighbours `neg`."""
    return youden_threshold(pos, neg)


def calibrate(pool: Pool, *, sample: int = 300, seed: int = 0, radius: int | None = None,
              suite: str = "web") -> dict[str, Any]:
    """The measurement on a read pool (see the module docstring); returns tables and recommendations."""
    n = len(pool.keys)
    if n < 3:
        raise ValueError(f"calibrate: found {n} usable images; need at least 3 (more than 100 for useful numbers)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    if suite not in SUITES:
        raise ValueError(f"suite: {suite!r} is not a perturbation suite; accepted: {', '.join(SUITES)}")
    names = list(SUITES[suite])
    kinds = [names[k % len(names)] for k in range(len(chosen))]
    copies = []
    for i, kind in zip(chosen.tolist(), kinds, strict=True):
        copy = PERTURBATIONS[kind](pool.images[i], rng)
        if suite == "web" and rng.random() < SECOND_SHARE:  # a chain of edits, as a re-upload of an edited picture
            copy = PERTURBATIONS[names[int(rng.integers(len(names)))]](copy, rng)
        copies.append(copy)
    # a copy the image filter would drop (too small, too elongated) never reaches near dedup: not counted
    fits = np.array([min(c.size) >= pool.min_side and max(c.size) / min(c.size) <= pool.max_aspect for c in copies])
    if not fits.any():
        raise ValueError("calibrate: every synthetic copy fails the image filter (minSide/maxAspectRatio)")
    chosen, kinds = chosen[fits], [k for k, f in zip(kinds, fits.tolist(), strict=True) if f]
    copies = [c for c, f in zip(copies, fits.tolist(), strict=True) if f]
    hashes = pool.hash_names
    ch, ct = signals(copies, hashes)
    pos_bits = np.min(np.bitwise_count(pool.hashes[chosen] ^ ch), axis=1).astype(np.int64)
    # negatives by hash: nearest other image of the pool (exact copies of the original left out)
    bits = _hamming_matrix(pool.hashes[chosen], pool.hashes)
    ids: dict[str, int] = {}
    pixel_ids = np.array([ids.setdefault(px, len(ids)) for px in pool.pixels])
    same = pixel_ids[chosen][:, None] == pixel_ids[None, :]  # itself, and exact copies (exact dedup's job)
    bits[same] = 10**6
    neg_bits = bits.min(axis=1)
    radii = list(range(0, MAX_RADIUS + 1))
    radius_rows = [{"radius": r, "copies_proposed": float((pos_bits <= r).mean()),
                    "originals_with_a_candidate": float((neg_bits <= r).mean())} for r in radii]
    if radius is None:
        reach = [row for row in radius_rows if row["copies_proposed"] >= RECALL_TARGET]
        radius = reach[0]["radius"] if reach else max(radius_rows, key=lambda r: r["copies_proposed"])["radius"]
    pv = G.thumbnail_vectors(pool.thumbs)
    plain = pv[chosen] @ pv.T
    plain[bits > radius] = -np.inf  # only candidates can be confirmed
    near = np.argsort(-plain, axis=1)[:, :NEIGHBOURS]
    valid = np.take_along_axis(plain, near, axis=1) > -np.inf
    cand = np.stack([np.repeat(chosen, near.shape[1]), near.reshape(-1)], 1)
    both = np.concatenate([pool.thumbs[chosen], ct])
    own = np.stack([np.arange(len(chosen)), len(chosen) + np.arange(len(chosen))], 1)
    blur = SUITE_BLUR[suite]
    pos_sim = G.aligned_similarity(own, both, blur=blur)
    pos_sim = np.where(pos_bits <= radius, pos_sim, -1.0)  # a copy the hashes do not propose is never confirmed
    # negatives: among the candidates (within the radius), the NEIGHBOURS most similar by plain thumbnail
    # cosine, compared aligned as the stage compares them; the most similar one counts
    aligned = G.aligned_similarity(cand, pool.thumbs, blur=blur).reshape(near.shape)
    aligned[~valid] = -1.0
    best = aligned.argmax(axis=1)
    neg_idx = near[np.arange(len(chosen)), best]
    neg_sim = aligned[np.arange(len(chosen)), best]
    threshold = recommend_threshold(pos_sim, neg_sim)
    rows = []
    for t in sorted(set(THRESHOLDS) | {threshold}):
        tp, fp = float((pos_sim >= t).mean()), float((neg_sim >= t).mean())
        precision = tp / (tp + fp) if tp + fp else 1.0
        rows.append({"min_similarity": t, "copies_confirmed": tp, "distinct_confirmed": fp, "precision": precision,
                     "f1": 2 * precision * tp / (precision + tp) if precision + tp else 0.0})
    per_kind = {k: {"copies": int(sum(1 for x in kinds if x == k)),
                    "proposed": float(np.mean([b <= radius for b, x in zip(pos_bits, kinds, strict=True) if x == k])),
                    "found": float(np.mean([s >= threshold for s, x in zip(pos_sim, kinds, strict=True) if x == k]))}
                for k in names if k in kinds}
    suspects = [{"key": pool.keys[int(chosen[a])], "neighbour": pool.keys[int(neg_idx[a])], "similarity": float(neg_sim[a])}
                for a in np.argsort(-neg_sim).tolist() if neg_sim[a] >= threshold]
    return {"pool": n, "sample": len(chosen), "hashes": hashes, "seed": seed, "suite": suite,
            "recommended": {"maxDistance": int(radius), "minSimilarity": threshold, "blur": blur},

            "scores": {"copies": [round(float(x), 5) for x in pos_sim],
                       "neighbours": [round(float(x), 5) for x in neg_sim]},
            "radius_table": radius_rows, "similarity_table": rows, "per_perturbation": per_kind,
            "recall": float((pos_sim >= threshold).mean()), "false_positive_rate": float((neg_sim >= threshold).mean()),
            "neighbours_above_threshold": suspects}


def snippet(result: dict[str, Any]) -> str:
    """The job-file lines the recommendation gives (YAML)."""
    rec = result["recommended"]
    return (f"# vlmctl curate calibrate: {result['sample']} synthetic copies of images from a pool of {result['pool']}; "
            f"copies found {result['recall']:.3f}, distinct neighbours confirmed {result['false_positive_rate']:.3f}\n"
            "filters:\n  nearDedup:\n"
            f"    hashes: [{', '.join(result['hashes'])}]\n"
            f"    maxDistance: {rec['maxDistance']}\n"
            f"    verify: {{signal: thumbnail, minSimilarity: {rec['minSimilarity']}, blur: {rec['blur']}}}\n")


def report(result: dict[str, Any]) -> str:
    """The printed tables."""
    lines = [f"near-duplicate calibration: {result['sample']} images (of a pool of {result['pool']}) and one synthetic "
             f"copy each (suite {result['suite']}: {', '.join(SUITES[result['suite']])}); hashes {', '.join(result['hashes'])}", "",
             "candidate radius (bits, any hash) | copies proposed | originals with a candidate neighbour"]
    for row in result["radius_table"]:
        mark = "  <- recommended" if row["radius"] == result["recommended"]["maxDistance"] else ""
        lines.append(f"  {row['radius']:>2} | {row['copies_proposed']:.3f} | {row['originals_with_a_candidate']:.3f}{mark}")
    lines += ["", f"thumbnail cosine at radius {result['recommended']['maxDistance']} | copies confirmed (recall) | "
              "distinct neighbours confirmed | precision | F1"]
    for row in result["similarity_table"]:
        mark = "  <- recommended" if row["min_similarity"] == result["recommended"]["minSimilarity"] else ""
        lines.append(f"  {row['min_similarity']:.3f} | {row['copies_confirmed']:.3f} | {row['distinct_confirmed']:.3f} | "
                     f"{row['precision']:.3f} | {row['f1']:.3f}{mark}")
    lines += ["", "per perturbation at the recommendation: " + ", ".join(
        f"{k} {v['found']:.2f}" for k, v in result["per_perturbation"].items())]
    if result["neighbours_above_threshold"]:
        lines += ["", "pool images confirmed as duplicates of another (real duplicates already in the data, or false "
                  "positives; look at them):"]
        lines += [f"  {s['key']} ~ {s['neighbour']} ({s['similarity']:.3f})" for s in result["neighbours_above_threshold"][:10]]
    rec = result["recommended"]
    lines += ["", f"recommended: nearDedup.maxDistance {rec['maxDistance']}, verify.minSimilarity {rec['minSimilarity']} "
              f"(copies found {result['recall']:.3f}, distinct neighbours confirmed {result['false_positive_rate']:.3f})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlmctl curate calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--shards", nargs="+", required=True, help="shard URLs (brace patterns allowed)")
    p.add_argument("--sample", type=int, default=300, help="images copied (default 300)")
    p.add_argument("--pool", type=int, default=2000, help="images read, the originals' neighbours (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", choices=list(SUITES), default="web", help="which copies count as duplicates: web "
                   "(re-uploads, crops, edits; default) or light (colour, high-quality re-encode, resize only)")
    p.add_argument("--hashes", nargs="+", choices=list(HASHERS), default=list(HASHERS))
    p.add_argument("--min-side", type=int, default=32, help="skip smaller images (the image filter's minSide)")
    p.add_argument("--max-aspect", type=float, default=3.0, help="skip more elongated images (maxAspectRatio)")
    p.add_argument("--write", metavar="FILE", help="write the recommended nearDedup settings as a YAML snippet")
    p.add_argument("--json", metavar="FILE", help="write the whole measurement as JSON")
    args = p.parse_args(argv)
    if args.sample < 1 or args.pool < 3:
        print("error: --sample must be >= 1 and --pool >= 3", file=sys.stderr)
        return 2
    try:
        pool = read_pool(args.shards, args.pool, args.hashes, args.min_side, args.max_aspect)
        result = calibrate(pool, sample=args.sample, seed=args.seed, suite=args.suite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(result), end="")
    if args.write:
        with open(args.write, "w") as f:
            f.write(snippet(result))
        print(f"wrote {args.write}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
