"""A synthetic raw image-text set with planted noise of each kind the curate stage removes (test helper).

Clean pairs are the quickstart's shapes (`shapes.draw_shape`, 64 px) on a random smooth background (so
two different clean images are never perceptual-hash neighbours) with their true caption. Planted, each
with a known key: junk captions (`text`), undecodable / tiny / extreme-aspect images, mismatched
captions (`clip_score`), "unsafe" images (`nsfw`: red shapes stand in for unsafe content, which a probe
fitted on the dual encoder's embeddings flags), exact duplicates (the same pixels in another PNG
encoding), near duplicates (re-encoded as JPEG with faint noise, or resized), and an over-represented
concept (yellow triangles) past the balancing cap. Every duplicate's original sits in the first half of
the shards and its copies in the second half, so the original comes first in global order and the groups
cross ranks. `train_curation_encoder` trains the tiny dual encoder (H11b's quickstart trainer) and fits
the probe; the CLIP threshold is set halfway between matched and mismatched held-out scores.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

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
UNSAFE_COLOUR = "red"
CONCEPT_PAIR = ("yellow", "triangle")
CONCEPT = "yellow triangle"
CONCEPT_CAP = 10
CLEAN_PAIRS = [(c, s) for c in COLOURS for s in SHAPES if c != UNSAFE_COLOUR and (c, s) != CONCEPT_PAIR]


@dataclass
class NoisySet:
    shards: list[str]
    truth: dict[str, str | None]  # key -> planted reason (None: clean)
    groups: list[list[str]] = field(default_factory=list)  # duplicate groups, original first
    order: list[str] = field(default_factory=list)  # keys in global order


def draw(rng: np.random.Generator, colour: str, shape: str, size: int = 64) -> Image.Image:
    """A shape on a random smooth background."""
    im = draw_shape(rng, colour, shape, size=size)
    grid = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    smooth = (np.asarray(grid, dtype=np.float32)[..., None] - 128) * 0.6
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + smooth, 0, 255).astype(np.uint8))


def clean_pair(rng: np.random.Generator) -> tuple[Image.Image, str]:
    colour, shape = CLEAN_PAIRS[int(rng.integers(len(CLEAN_PAIRS)))]
    return draw(rng, colour, shape), caption_of(colour, shape)


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


def _mismatched(rng: np.random.Generator, caption: str) -> str:
    """A caption with another colour and another shape than `caption`."""
    while True:
        colour, shape = CLEAN_PAIRS[int(rng.integers(len(CLEAN_PAIRS)))]
        if colour not in caption and shape not in caption:
            return caption_of(colour, shape)


def write_noisy_set(out_dir: str, *, clean: int = 240, per_kind: int = 20, shards: int = 4, seed: int = 0,
                    encoder_kinds: bool = True) -> NoisySet:
    """Write `shards` caption shards (png + txt) to `out_dir`; return them with the planted truth.
    `encoder_kinds`: plant the clip_score and nsfw kinds too (they need a dual encoder to find)."""
    rng = np.random.default_rng(seed)
    first: list[tuple[str, bytes, str, str | None]] = []  # (key, image bytes, caption, truth)
    second: list[tuple[str, bytes, str, str | None]] = []
    groups: list[list[str]] = []
    n = 0

    def key() -> str:
        nonlocal n
        n += 1
        return f"s{n:05d}"

    def pair() -> tuple[bytes, str]:
        im, cap = clean_pair(rng)
        return _png(im), cap

    for i in range(clean):
        (first if i % 2 else second).append((key(), *pair(), None))
    for j in range(per_kind):
        first.append((key(), pair()[0], JUNK_CAPTIONS[j % len(JUNK_CAPTIONS)], "text"))
        good, cap = pair()
        first.append((key(), good[: len(good) // 3] if j % 2 else b"not an image", cap, "image_decode"))
        im, cap = clean_pair(rng)
        first.append((key(), _png(im.resize((int(rng.integers(8, 24)),) * 2)), cap, "image_size"))
        im, cap = clean_pair(rng)
        first.append((key(), _png(im.resize((240, 48)) if j % 2 else im.resize((40, 200))), cap, "aspect_ratio"))
        if encoder_kinds:
            im, cap = clean_pair(rng)
            first.append((key(), _png(im), _mismatched(rng, cap), "clip_score"))
            shape = SHAPES[j % len(SHAPES)]
            first.append((key(), _png(draw(rng, UNSAFE_COLOUR, shape)), caption_of(UNSAFE_COLOUR, shape), "nsfw"))
        orig, cap = clean_pair(rng)
        o = key()
        first.append((o, _png(orig, 6), cap, None))
        copies = [key() for _ in range(1 + j % 2)]
        for c in copies:
            second.append((c, _png(orig, 1 + len(second) % 8), cap, "exact_duplicate"))
        groups.append([o, *copies])
        orig, cap = clean_pair(rng)
        o, c = key(), key()
        first.append((o, _png(orig), cap, None))
        second.append((c, _png(_near_variant(rng, orig, j)), cap, "near_duplicate"))
        groups.append([o, c])
    for j in range(CONCEPT_CAP + 3 * per_kind):
        (first if j < CONCEPT_CAP else second).append(
            (key(), _png(draw(rng, *CONCEPT_PAIR)), caption_of(*CONCEPT_PAIR), None if j < CONCEPT_CAP else "concept_cap"))
    order_first = [first[i] for i in rng.permutation(len(first))]
    order_second = [second[i] for i in rng.permutation(len(second))]
    half = shards // 2
    parts = [order_first[i::half] for i in range(half)] + [order_second[i::shards - half] for i in range(shards - half)]
    os.makedirs(out_dir, exist_ok=True)
    paths, order = [], []
    for s, samples in enumerate(parts):
        path = os.path.join(out_dir, f"raw-{s:03d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, data, caption, _ in samples:
                for name, payload in ((f"{k}.png", data), (f"{k}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
                order.append(k)
        paths.append(path)
    truth = {k: t for k, _, _, t in first + second}
    return NoisySet(paths, truth, groups, order)


def train_curation_encoder(out_dir: str, *, seed: int = 0, steps: int = 150) -> dict[str, Any]:
    """The tiny dual encoder (H11b's quickstart trainer) on clean-style pairs of every colour, a linear
    "unsafe" probe on its image embeddings (flags the unsafe colour), and a CLIP threshold halfway between
    the mean held-out matched and mismatched scores."""
    import torch
    from vlm_trainer.curate.embed import clip_scores, load_dual_encoder, save_linear_probe
    from vlm_trainer.quickstart.dual_encoder import train_dual_encoder

    rng = np.random.default_rng(seed + 1)
    every = [(c, s) for c in COLOURS for s in SHAPES]
    pairs = [every[int(rng.integers(len(every)))] for _ in range(600)]
    images = [draw(rng, c, s) for c, s in pairs]
    encoder_dir = os.path.join(out_dir, "dual-encoder")
    train_dual_encoder(encoder_dir, images, [caption_of(c, s) for c, s in pairs], seed=seed, steps=steps)
    enc = load_dual_encoder(encoder_dir)
    img, txt = enc.embed(images[:200], [caption_of(c, s) for c, s in pairs[:200]])
    _, wrong = enc.embed(images[:200], [_mismatched(rng, caption_of(c, s)) for c, s in pairs[:200]])
    matched, mismatched = clip_scores(img, txt), clip_scores(img, wrong)
    threshold = float((matched.mean() + mismatched.mean()) / 2)
    x = enc.embed_images(images)
    y = torch.tensor([float(c == UNSAFE_COLOUR) for c, _ in pairs])
    probe = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(200):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe_uri = f"file://{out_dir}/unsafe-probe.safetensors"
    save_linear_probe(probe_uri, probe.weight.detach(), float(probe.bias.detach()), concept=UNSAFE_COLOUR)
    return {"encoder": encoder_dir, "probe": probe_uri, "threshold": round(threshold, 4),
            "matched_mean": float(matched.mean()), "mismatched_mean": float(mismatched.mean())}


def curate_stage(shards: list[str], encoder: dict[str, Any] | None = None) -> dict:
    """The curate stage these tests run: every filter but SemDeDup (see test_curate_stage.py), thresholds set."""
    stage: dict[str, Any] = {
        "name": "curate", "type": "curate", "input": {"shards": shards},
        "filters": {"text": {"languages": ["latin"]},
                    "balance": {"concepts": [CONCEPT], "perConceptCap": CONCEPT_CAP}},
    }
    if encoder is not None:
        stage["encoder"] = encoder["encoder"]
        stage["filters"]["clipScore"] = {"threshold": encoder["threshold"]}
        stage["filters"]["nsfw"] = {"probe": encoder["probe"], "threshold": 0.5}
    return stage


def read_decisions(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
