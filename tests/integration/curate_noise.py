"""A synthetic raw image-text set with planted noise of each kind the curate stage removes (test helper).

Clean pairs are the quickstart's shapes (`shapes.draw_shape`, 64 px) on a random smooth background, so
that two different clean images are never perceptual-hash neighbours. Planted, each with a known key:
junk captions (`text`), undecodable / tiny / extreme-aspect images, exact duplicates (the same pixels in
another PNG encoding), near duplicates (re-encoded as JPEG with faint noise, or resized), and an
over-represented concept ("dog") past the balancing cap. Every duplicate's original sits in the first
half of the shards and its copies in the second half, so the original comes first in global order and
the groups cross ranks.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from vlm_trainer.quickstart.shapes import draw_shape
from vlm_trainer.quickstart.vocab import COLOURS, SHAPES, caption_of

JUNK_CAPTIONS = [
    "IMG_0371.jpg", "DSC_0042", "click here to enlarge", "untitled", "image", "http://example.com/a/b.png",
    "www.shop-now.com best deals", "photo_2019.jpeg", "lorem ipsum dolor sit", "no description available",
    "a", "circle", "!!! $$$ ### @@@ %%%", "a reeeeeeeeed circle", "a red circle!!!!!!!!",
    "красный круг на картинке", "红色的圆圈在图片里", " ".join(["word"] * 200), "1234", "*** ~~~ ^^^ +++",
]
CONCEPT = "dog"
CONCEPT_CAP = 10


@dataclass
class NoisySet:
    shards: list[str]
    truth: dict[str, str | None]  # key -> planted reason (None: clean)
    groups: list[list[str]] = field(default_factory=list)  # duplicate groups, original first
    order: list[str] = field(default_factory=list)  # keys in global order


def _clean_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    im = draw_shape(rng, COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))], size=size)
    grid = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    smooth = (np.asarray(grid, dtype=np.float32)[..., None] - 128) * 0.6
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + smooth, 0, 255).astype(np.uint8))


def _png(im: Image.Image, level: int = 6) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _near_variant(rng: np.random.Generator, im: Image.Image, k: int) -> Image.Image:
    if k % 2:
        return im.resize((80, 80), Image.Resampling.BICUBIC)
    noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 3, (im.size[1], im.size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return Image.open(buf).convert("RGB")


def write_noisy_set(out_dir: str, *, clean: int = 240, per_kind: int = 20, shards: int = 4, seed: int = 0) -> NoisySet:
    """Write `shards` caption shards (png + txt) to `out_dir`; return them with the planted truth."""
    rng = np.random.default_rng(seed)
    first: list[tuple[str, bytes, str, str, str | None]] = []  # (key, image bytes, image ext, caption, truth)
    second: list[tuple[str, bytes, str, str, str | None]] = []
    groups: list[list[str]] = []

    def cap(i: int) -> str:
        return caption_of(COLOURS[i % 4], SHAPES[i % 3])

    n = 0

    def key() -> str:
        nonlocal n
        n += 1
        return f"s{n:05d}"

    for i in range(clean):
        (first if i % 2 else second).append((key(), _png(_clean_image(rng)), "png", cap(i), None))
    for j in range(per_kind):
        first.append((key(), _png(_clean_image(rng)), "png", JUNK_CAPTIONS[j % len(JUNK_CAPTIONS)], "text"))
        good = _png(_clean_image(rng))
        first.append((key(), good[: len(good) // 3] if j % 2 else b"not an image", "png", cap(j), "image_decode"))
        first.append((key(), _png(_clean_image(rng).resize((int(rng.integers(8, 24)),) * 2)), "png", cap(j), "image_size"))
        wide = _clean_image(rng).resize((240, 48)) if j % 2 else _clean_image(rng).resize((40, 200))
        first.append((key(), _png(wide), "png", cap(j), "aspect_ratio"))
        orig = _clean_image(rng)
        o = key()
        first.append((o, _png(orig, 6), "png", cap(j), None))
        copies = [key() for _ in range(1 + j % 2)]
        for c in copies:
            second.append((c, _png(orig, 1 + len(second) % 8), "png", cap(j + 1), "exact_duplicate"))
        groups.append([o, *copies])
        orig = _clean_image(rng)
        o, c = key(), key()
        first.append((o, _png(orig), "png", cap(j), None))
        variant = _near_variant(rng, orig, j)
        second.append((c, _png(variant), "png", cap(j), "near_duplicate"))
        groups.append([o, c])
    for j in range(CONCEPT_CAP + 2 * per_kind):
        (first if j < CONCEPT_CAP else second).append(
            (key(), _png(_clean_image(rng)), "png", f"a {COLOURS[j % 4]} {CONCEPT} next to a {SHAPES[j % 3]}",
             None if j < CONCEPT_CAP else "concept_cap"))
    order_first = [first[i] for i in rng.permutation(len(first))]
    order_second = [second[i] for i in rng.permutation(len(second))]
    half = shards // 2
    parts = [order_first[i::half] for i in range(half)] + [order_second[i::shards - half] for i in range(shards - half)]
    os.makedirs(out_dir, exist_ok=True)
    paths, order = [], []
    for s, samples in enumerate(parts):
        path = os.path.join(out_dir, f"raw-{s:03d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, data, ext, caption, _ in samples:
                for name, payload in ((f"{k}.{ext}", data), (f"{k}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
                order.append(k)
        paths.append(path)
    truth = {k: t for k, _, _, _, t in first + second}
    return NoisySet(paths, truth, groups, order)


def curate_stage(shards: list[str]) -> dict:
    """The curate stage these tests run: every local filter, exact and near dedup, and the concept cap."""
    return {
        "name": "curate", "type": "curate", "input": {"shards": shards},
        "filters": {"text": {"languages": ["latin"]},
                    "balance": {"concepts": [CONCEPT], "perConceptCap": CONCEPT_CAP}},
    }


def read_decisions(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
