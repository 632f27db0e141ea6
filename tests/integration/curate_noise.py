"""A synthetic raw image-text set with planted noise of each kind the curate stage removes (test helper).

Clean pairs are scenes (`Scene`): a captioned colour-shape (the quickstart's colours and shapes) with three
small greyish distractor shapes on a grey background lit by a random smooth light field, all at random
places, sizes and shades, so two clean scenes differ everywhere (never perceptual-hash neighbours, and far
apart for an embedding that keeps instances apart). Planted, each with a known key: junk captions (`text`),
undecodable / tiny / extreme-aspect images, mismatched captions (`clip_score`), "unsafe" images (`nsfw`: red
shapes stand in for unsafe content, which a probe fitted on the dual encoder's embeddings flags), exact
duplicates (the same pixels in another PNG encoding), near duplicates (re-encoded as JPEG with faint noise,
or resized), semantic duplicates (`rerender`: the same scene drawn again with objects moved <= 2 px,
resized, re-coloured and re-lit, kept only when more than SEMANTIC_MIN_PHASH bits from the original's
perceptual hash, so neither hash catches it), and an over-represented concept (yellow triangles) past the
balancing cap. Every duplicate's original sits in the first half of the shards and its copies in the second
half, so the original comes first in global order and the groups cross ranks. `train_curation_encoder`
trains a SLIP dual encoder, fits the probe, and measures the CLIP and SemDeDup thresholds on held-out scenes.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from vlm_quickstart.vocab import COLOUR_RGB, COLOURS, SHAPES, caption_of
from vlm_trainer.curate.image import phash

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
DISTRACTORS = 3
SEMANTIC_MIN_PHASH = 6  # bits; the stage below proposes near-duplicate candidates within 4 pHash bits
SHIFT = 2.0  # px a re-render moves each object, at most
RELIGHT = 10.0  # rms change of a re-render's light field
ENCODER_WIDTH = 128
CLIP_WEIGHT = 0.5  # SLIP: weight of the caption loss next to the SimCLR loss
SIMCLR_TEMPERATURE = 0.05
SEMDEDUP_CLUSTERS = 1  # k-means is a speed-up; at 4 clusters, 2 of 30 pairs (cos 0.98) straddled a boundary (seed 1)
TRAIN_SCENES = 2000  # the encoder's training scenes (600 x 3 renders generalised worse to unseen scenes)
CLEAN_PAIRS = [(c, s) for c in COLOURS for s in SHAPES if c != UNSAFE_COLOUR and (c, s) != CONCEPT_PAIR]


@dataclass
class NoisySet:
    shards: list[str]
    truth: dict[str, str | None]  # key -> planted reason (None: clean)
    groups: list[list[str]] = field(default_factory=list)  # duplicate groups, original first
    order: list[str] = field(default_factory=list)  # keys in global order


@dataclass(frozen=True)
class Scene:
    """What a picture shows: objects (shape, centre x, centre y, radius, rgb; the captioned one last) on a
    grey background of `level` lit by a smooth 4x4 `light` field. A re-render draws the same scene again."""

    colour: str
    shape: str
    objects: tuple[tuple[str, float, float, float, tuple[int, ...]], ...]
    level: int
    light: tuple[float, ...]


def _object(rng: np.random.Generator, rgb: tuple[int, ...], shape: str, rmin: float, rmax: float,
            size: int) -> tuple[str, float, float, float, tuple[int, ...]]:
    r = float(rng.uniform(size * rmin, size * rmax))
    cx, cy = (float(rng.uniform(r + 1, size - r - 1)) for _ in range(2))
    return shape, cx, cy, r, tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in rgb)


def random_scene(rng: np.random.Generator, colour: str, shape: str, size: int = 64) -> Scene:
    """The captioned shape (radius 0.25-0.32 of the side) and DISTRACTORS small greyish shapes (no caption
    colour), at random places, sizes and shades, on a random background: clean scenes differ in all of it."""
    objects = [_object(rng, (int(rng.integers(40, 200)),) * 3, SHAPES[int(rng.integers(len(SHAPES)))], 0.08, 0.13, size)
               for _ in range(DISTRACTORS)]
    objects.append(_object(rng, COLOUR_RGB[colour], shape, 0.25, 0.32, size))
    return Scene(colour, shape, tuple(objects), int(rng.integers(170, 246)),
                 tuple(float(v) for v in rng.integers(0, 256, 16)))


def render(rng: np.random.Generator, scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a picture, with fresh pixel noise."""
    im = Image.new("RGB", (size, size), (scene.level,) * 3)
    pen = ImageDraw.Draw(im)
    for shape, cx, cy, r, rgb in scene.objects:
        if shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif shape == "square":
            pen.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=rgb)
        else:
            pen.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=rgb)
    light = np.clip(np.array(scene.light, dtype=np.float32).reshape(4, 4), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(light).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, (size, size, 3)) + (smooth[..., None] - 128) * 0.5
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def rerender(rng: np.random.Generator, scene: Scene, size: int = 64) -> Scene:
    """The same scene again: every object moved up to SHIFT px, resized up to 6%, re-coloured up to 8 levels
    per channel; the background re-lit (level +-8, light field RELIGHT rms)."""
    objects = []
    for shape, cx, cy, r, rgb in scene.objects:
        r2 = r * float(rng.uniform(0.94, 1.06))
        objects.append((shape, float(np.clip(cx + rng.uniform(-SHIFT, SHIFT), r2, size - r2)),
                        float(np.clip(cy + rng.uniform(-SHIFT, SHIFT), r2, size - r2)), r2,
                        tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in rgb)))
    light = np.clip(np.array(scene.light) + rng.normal(0, RELIGHT, 16), 0, 255)
    return Scene(scene.colour, scene.shape, tuple(objects), int(np.clip(scene.level + rng.integers(-8, 9), 0, 255)),
                 tuple(float(v) for v in light))


def semantic_copy(rng: np.random.Generator, scene: Scene, others: list[Image.Image], tries: int = 30) -> Image.Image | None:
    """A re-render of `scene` whose perceptual hash is more than SEMANTIC_MIN_PHASH bits from each of `others`
    (the original and earlier copies; the near-dedup filter's default allows 4): a duplicate only an embedding
    can find. None when `tries` re-renders all stay within the hash's reach (the caller takes another scene)."""
    hashes = [phash(im) for im in others]
    for _ in range(tries):
        im = render(rng, rerender(rng, scene))
        h = phash(im)
        if all(bin(h ^ o).count("1") > SEMANTIC_MIN_PHASH for o in hashes):
            return im
    return None


def semantic_group(rng: np.random.Generator, copies: int) -> tuple[Scene, Image.Image, list[Image.Image]]:
    """A clean scene of a clean pair, its picture and `copies` semantic duplicates of it."""
    while True:
        scene = random_scene(rng, *CLEAN_PAIRS[int(rng.integers(len(CLEAN_PAIRS)))])
        original = render(rng, scene)
        found: list[Image.Image] = []
        while len(found) < copies:
            im = semantic_copy(rng, scene, [original, *found])
            if im is None:
                break
            found.append(im)
        if len(found) == copies:
            return scene, original, found


def draw(rng: np.random.Generator, colour: str, shape: str, size: int = 64) -> Image.Image:
    """A fresh random scene around a `colour` `shape`."""
    return render(rng, random_scene(rng, colour, shape, size), size)


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
        if encoder_kinds:  # a scene and 1-2 re-renders of it that neither hash catches
            scene, orig, images = semantic_group(rng, 1 + j % 2)
            cap = caption_of(scene.colour, scene.shape)
            o = key()
            first.append((o, _png(orig), cap, None))
            copies = [key() for _ in images]
            for c, im in zip(copies, images, strict=True):
                second.append((c, _png(im), cap, "semantic_duplicate"))
            groups.append([o, *copies])
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


def _slip_config(tokenizer: Any) -> Any:
    """SiglipModel: the quickstart's text tower and, as image tower, one 32x32 patch (hidden 256, no
    transformer layer, SigLIP's pooling head): see train_curation_encoder for why."""
    from vlm_quickstart.components import vision_encoder_config
    from vlm_quickstart.dual_encoder import dual_encoder_config

    config = dual_encoder_config(tokenizer)
    config.vision_config = vision_encoder_config(image_size=32, patch=32, hidden=ENCODER_WIDTH, layers=0)
    config.vision_config.vision_use_head = True
    config.text_config.projection_size = ENCODER_WIDTH
    return config


def train_slip_encoder(out_dir: str, scenes: list[Scene], rng: np.random.Generator, *, seed: int = 0,
                       steps: int = 150, views: int = 2, batch: int = 64) -> None:
    """SLIP (Mu et al. 2022: CLIP's image-text loss plus SimCLR's image-image loss) on `scenes`: the caption
    loss (identical captions are positives) ties images to their colour-shape caption, and the SimCLR loss
    between two renders of one scene (`rerender`, drawn afresh here) keeps different scenes apart. Saved with
    its tokenizer and image processor, as `curate.embed.load_dual_encoder` loads it."""
    import torch
    import torch.nn.functional as F
    from transformers import SiglipModel
    from vlm_quickstart.components import build_image_processor, build_tokenizer
    from vlm_quickstart.dual_encoder import CAPTION_TOKENS, multi_positive_contrastive_loss
    from vlm_quickstart.pretrain import adamw, pixel_tensor
    from vlm_trainer.curate.embed import tokenize_captions

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = CAPTION_TOKENS
    model = SiglipModel(_slip_config(tokenizer))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.zero_()
    pixels = torch.stack([pixel_tensor([render(rng, sc)] + [render(rng, rerender(rng, sc)) for _ in range(views - 1)])
                          for sc in scenes])  # [scenes, views, 3, 32, 32]
    captions = [caption_of(sc.colour, sc.shape) for sc in scenes]
    text = tokenize_captions(tokenizer, model, captions)
    opt, schedule = adamw(model.parameters(), 2e-3, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(scenes), (batch,), generator=gen)
        va = torch.randint(views, (batch,), generator=gen)
        vb = (va + torch.randint(1, views, (batch,), generator=gen)) % views
        out = model(pixel_values=pixels[idx, va], **{k: v[idx] for k, v in text.items()})
        clip_loss = multi_positive_contrastive_loss(out.logits_per_image, [captions[int(i)] for i in idx])
        a = F.normalize(out.image_embeds, dim=-1)
        b = F.normalize(model.get_image_features(pixel_values=pixels[idx, vb]).pooler_output, dim=-1)
        same = (idx[:, None] == idx[None, :]).float()
        logits = a @ b.T / SIMCLR_TEMPERATURE
        simclr_loss = 0.5 * (F.cross_entropy(logits, same / same.sum(1, keepdim=True))
                             + F.cross_entropy(logits.T, same / same.sum(1, keepdim=True)))
        loss = CLIP_WEIGHT * clip_loss + simclr_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_image_processor(32).save_pretrained(out_dir)


def measure_semantic_separation(enc: Any, rng: np.random.Generator, *, clean: int = 300,
                                groups: int = 60) -> dict[str, float]:
    """On fresh scenes: cosine of each planted semantic duplicate to its original vs each clean image's
    nearest clean neighbour; the SemDeDup threshold is set halfway between the 1st percentile of the first
    and the 99th of the second."""
    import torch

    made = [semantic_group(rng, 1) for _ in range(groups)]
    scenes = [sc for sc, _, _ in made] + [random_scene(rng, *CLEAN_PAIRS[int(rng.integers(len(CLEAN_PAIRS)))])
                                         for _ in range(clean - groups)]
    images = [im for _, im, _ in made] + [render(rng, sc) for sc in scenes[groups:]]
    copies = [c[0] for _, _, c in made]
    emb, emb_copies = enc.embed_images(images), enc.embed_images(copies)
    sims = emb @ emb.T
    sims.fill_diagonal_(-2.0)
    nearest = sims.max(1).values
    dup = (emb[:groups] * emb_copies).sum(1)
    dup_p01, clean_p99 = float(torch.quantile(dup, 0.01)), float(torch.quantile(nearest, 0.99))
    return {"duplicate_cos_min": float(dup.min()), "duplicate_cos_p01": dup_p01,
            "duplicate_cos_median": float(dup.median()), "clean_nearest_cos_median": float(nearest.median()),
            "clean_nearest_cos_p99": clean_p99, "clean_nearest_cos_max": float(nearest.max()),
            "semdedup_threshold": round((dup_p01 + clean_p99) / 2, 4)}


def balanced_threshold(matched: Any, mismatched: Any) -> float:
    """A score t that maximises min(share of matched >= t, share of mismatched < t), halfway between the
    lowest such held-out score and the score below it (the middle of the gap when the two separate)."""
    import torch

    cands = torch.sort(torch.cat([matched, mismatched])).values.tolist()
    quality = [min(float((matched >= t).float().mean()), float((mismatched < t).float().mean())) for t in cands]
    best = quality.index(max(quality))
    return float((cands[best - 1] + cands[best]) / 2) if best > 0 else float(cands[0])


def train_curation_encoder(out_dir: str, *, seed: int = 0, steps: int = 150) -> dict[str, Any]:
    """The dual encoder the curate stage uses for CLIP score, NSFW probe and SemDeDup, with thresholds
    measured on fresh held-out data.

    Why SLIP and a one-patch image tower: the quickstart's dual encoder (a patch-8 ViT trained on the 12
    colour-shape captions) maps every image of one caption to nearly one point, so it cannot tell a re-render
    of a scene from another scene with the same caption; patch-8 towers trained here with SimCLR added did
    not generalise to unseen scenes in a few seconds of CPU either. A one-patch tower (a linear patch
    embedding of the whole 32x32 image and the pooling head's MLP) trained SLIP-style does: the measured
    cosines are returned (`separation`). The probe flags the unsafe colour; the CLIP threshold is the held-out
    score that keeps as large a share of matched pairs as it removes of mismatched ones (`balanced_threshold`)."""
    import torch
    from vlm_trainer.curate.embed import clip_scores, load_dual_encoder, save_linear_probe

    rng = np.random.default_rng(seed + 1)
    every = [(c, s) for c in COLOURS for s in SHAPES]
    scenes = [random_scene(rng, *every[int(rng.integers(len(every)))]) for _ in range(TRAIN_SCENES)]
    encoder_dir = os.path.join(out_dir, "dual-encoder")
    train_slip_encoder(encoder_dir, scenes, rng, seed=seed, steps=steps)
    enc = load_dual_encoder(encoder_dir)
    held = [random_scene(rng, *every[int(rng.integers(len(every)))]) for _ in range(400)]
    images = [render(rng, sc) for sc in held]
    captions = [caption_of(sc.colour, sc.shape) for sc in held]
    img, txt = enc.embed(images, captions)
    _, wrong = enc.embed(images, [_mismatched(rng, c) for c in captions])
    matched, mismatched = clip_scores(img, txt), clip_scores(img, wrong)
    threshold = balanced_threshold(matched, mismatched)
    y = torch.tensor([float(sc.colour == UNSAFE_COLOUR) for sc in held])
    probe = torch.nn.Linear(img.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(img).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe_uri = f"file://{out_dir}/unsafe-probe.safetensors"
    save_linear_probe(probe_uri, probe.weight.detach(), float(probe.bias.detach()), concept=UNSAFE_COLOUR)
    separation = measure_semantic_separation(enc, rng)
    return {"encoder": encoder_dir, "probe": probe_uri, "threshold": round(threshold, 4),
            "matched_mean": float(matched.mean()), "mismatched_mean": float(mismatched.mean()),
            "matched_kept": float((matched >= threshold).float().mean()),
            "mismatched_removed": float((mismatched < threshold).float().mean()),
            "semdedup_threshold": separation["semdedup_threshold"], "separation": separation}


def curate_stage(shards: list[str], encoder: dict[str, Any] | None = None) -> dict:
    """The curate stage these tests run: every filter, thresholds set (the encoder's from `train_curation_encoder`)."""
    stage: dict[str, Any] = {
        "name": "curate", "type": "curate", "input": {"shards": shards},
        "filters": {"text": {"languages": ["latin"]},
                    # pHash candidates within 4 bits (confirmed by thumbnails): the planted semantic duplicates
                    # sit more than SEMANTIC_MIN_PHASH bits away, so near dedup leaves them to SemDeDup
                    "nearDedup": {"hashes": ["phash"], "maxDistance": SEMANTIC_MIN_PHASH - 2},
                    "balance": {"concepts": [CONCEPT], "perConceptCap": CONCEPT_CAP}},
    }
    if encoder is not None:
        stage["encoder"] = encoder["encoder"]
        stage["filters"]["clipScore"] = {"threshold": encoder["threshold"]}
        stage["filters"]["nsfw"] = {"probe": encoder["probe"], "threshold": 0.5}
        stage["filters"]["semanticDedup"] = {"clusters": SEMDEDUP_CLUSTERS, "threshold": encoder["semdedup_threshold"]}
    return stage


def read_decisions(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
