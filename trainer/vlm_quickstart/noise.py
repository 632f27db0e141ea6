"""The quickstart's raw caption set: the clean training pairs plus planted noise of every kind web pairs have.

Planted, each kind with the curate reason expected to remove it:

| kind | what | reason |
|---|---|---|
| junk_caption | a fresh image with alt-text junk ("IMG_0371.jpg", "click here") | text |
| shuffled_caption | a fresh image with another image's caption (wrong colour or shape) | clip_score |
| tiny_image | a shape drawn at 10-20 px | image_size |
| extreme_aspect | a 32 px shape on a 5:1 or 1:5 banner | aspect_ratio |
| exact_duplicate | a clean sample's pixels again, in another PNG encoding | exact_duplicate |
| near_duplicate | a clean sample re-edited (brightness shifted) | near_duplicate |

Keys are opaque (`raw-NNNNNN` in a shuffled order; a duplicate always after its original), so nothing
but the content tells clean from planted. The truth goes to a side file (`RawSet.truth`), never into the
shards. Shards use the caption format of the data contract (`<key>.png` + `<key>.json` with `caption`),
so the raw set trains as is (the raw-vs-curated comparison) or feeds the curate stage.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vlm_quickstart.shapes import IMAGE_SIZE, ShapeSample, _add, draw_shape, split_seed
from vlm_quickstart.vocab import COLOURS, SHAPES, caption_of

# Planted samples per clean sample, by kind (about 40% on top of the clean pairs, as web pools are).
NOISE_SHARES: dict[str, float] = {
    "junk_caption": 0.08,
    "shuffled_caption": 0.15,
    "tiny_image": 0.04,
    "extreme_aspect": 0.04,
    "exact_duplicate": 0.05,
    "near_duplicate": 0.05,
}
EXPECTED_REASON: dict[str, str] = {
    "junk_caption": "text",
    "shuffled_caption": "clip_score",
    "tiny_image": "image_size",
    "extreme_aspect": "aspect_ratio",
    "exact_duplicate": "exact_duplicate",
    "near_duplicate": "near_duplicate",
}
JUNK_CAPTIONS: tuple[str, ...] = (
    "IMG_0371.jpg",
    "DSC_0042.JPG",
    "click here to enlarge",
    "untitled",
    "image",
    "http://example.com/img/123.png",
    "no description available",
    "photo_2019.jpeg",
)


@dataclass
class RawSet:
    """The raw shards and what was planted: key -> {"kind": None | kind, "of": the original's key (duplicates),
    "source": the sample's name before the keys were made opaque, "image": the caption true of the image}."""

    shards: list[str]
    truth: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def keys_of(self, kind: str | None) -> list[str]:
        return [k for k, t in self.truth.items() if t["kind"] == kind]

    def duplicate_groups(self) -> list[list[str]]:
        """Each original with its planted copies (exact and near), original first."""
        groups: dict[str, list[str]] = {}
        for k, t in self.truth.items():
            if t["kind"] in ("exact_duplicate", "near_duplicate"):
                groups.setdefault(str(t["of"]), []).append(k)
        return [[orig, *sorted(copies)] for orig, copies in sorted(groups.items())]


def _png(img: Image.Image, level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _fresh(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[str, str, Image.Image]:
    colour, shape = COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    return colour, shape, draw_shape(rng, colour, shape, size=size)


def _banner(rng: np.random.Generator) -> tuple[str, str, Image.Image]:
    """A 32 px shape on a 5:1 (or 1:5) canvas of its own background: only its aspect ratio is wrong."""
    colour, shape, img = _fresh(rng)
    wide = rng.random() < 0.5
    side = 5 * IMAGE_SIZE
    canvas = Image.new("RGB", (side, IMAGE_SIZE) if wide else (IMAGE_SIZE, side), img.getpixel((0, 0)))
    offset = int(rng.integers(0, side - IMAGE_SIZE + 1))
    canvas.paste(img, (offset, 0) if wide else (0, offset))
    return colour, shape, canvas


def _brightness(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    shift = int(rng.integers(4, 9)) * (1 if rng.random() < 0.5 else -1)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8))


Item = tuple[str, bytes, str, str | None, str | None, str]


def plant_noise(clean: list[ShapeSample], seed: int) -> list[Item]:
    """(name, png, caption, kind, original of a duplicate, the caption true of the image) of the clean
    samples and the planted ones, in the raw order: shuffled, each duplicate somewhere after its original."""
    rng = np.random.default_rng(split_seed(seed, "raw-noise"))
    items: list[Item] = [(s.key, s.png, s.caption, None, None, s.caption) for s in clean]
    counts = {kind: round(share * len(clean)) for kind, share in NOISE_SHARES.items()}
    for i in range(counts["junk_caption"]):
        colour, shape, img = _fresh(rng)
        junk = JUNK_CAPTIONS[int(rng.integers(len(JUNK_CAPTIONS)))]
        items.append((f"junk-{i}", _png(img), junk, "junk_caption", None, caption_of(colour, shape)))
    for i in range(counts["shuffled_caption"]):
        colour, shape, img = _fresh(rng)
        wrong = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)]
        c, s = wrong[int(rng.integers(len(wrong)))]
        items.append((f"shuffled-{i}", _png(img), caption_of(c, s), "shuffled_caption", None, caption_of(colour, shape)))
    for i in range(counts["tiny_image"]):
        colour, shape, img = _fresh(rng, size=int(rng.integers(10, 21)))
        cap = caption_of(colour, shape)
        items.append((f"tiny-{i}", _png(img), cap, "tiny_image", None, cap))
    for i in range(counts["extreme_aspect"]):
        colour, shape, img = _banner(rng)
        cap = caption_of(colour, shape)
        items.append((f"banner-{i}", _png(img), cap, "extreme_aspect", None, cap))
    order = [items[int(j)] for j in rng.permutation(len(items))]
    originals = [clean[int(j)] for j in rng.choice(len(clean), counts["exact_duplicate"] + counts["near_duplicate"], replace=False)]
    for i, orig in enumerate(originals):
        exact = i < counts["exact_duplicate"]
        png = _png(orig.image(), level=1 + i % 9) if exact else _png(_brightness(rng, orig.image()))
        kind = "exact_duplicate" if exact else "near_duplicate"
        after = next(p for p, it in enumerate(order) if it[0] == orig.key) + 1
        copy = (f"{kind}-{i}", png, orig.caption, kind, orig.key, orig.caption)
        order.insert(int(rng.integers(after, len(order) + 1)), copy)
    return order


def write_raw_shards(out_dir: str, clean: list[ShapeSample], seed: int, per_shard: int = 500) -> RawSet:
    """Write `raw-caption-NNNNN.tar` shards of the clean samples plus planted noise; same inputs -> same bytes."""
    os.makedirs(out_dir, exist_ok=True)
    order = plant_noise(clean, seed)
    raw_key = {item[0]: f"raw-{i:06d}" for i, item in enumerate(order)}
    raw = RawSet(shards=[])
    for shard, start in enumerate(range(0, len(order), per_shard)):
        path = os.path.join(out_dir, f"raw-caption-{shard:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, png, caption, kind, of, true_caption in order[start : start + per_shard]:
                key = raw_key[name]
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.json", json.dumps({"caption": caption}, sort_keys=True).encode())
                raw.truth[key] = {"kind": kind, "of": raw_key[of] if of else None, "source": name, "image": true_caption}
        raw.shards.append(path)
    return raw
