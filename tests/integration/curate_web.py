"""A second planted raw set, built NOT like the quickstart's noise (vlm_quickstart/noise.py) nor curate_noise.py: other
drawing code, backgrounds, perturbations and caption source, stored as img2dataset writes it (`<key>.jpg`,
`<key>.txt`, `<key>.json` with url/key/status/caption). Used to check that curate thresholds calibrated on the
data itself (`vlmctl curate calibrate`) hold on data they were not tuned on.

Clean pairs: 1-3 anti-aliased objects (stars, rings, stripes, crosses, diamonds, ellipses; drawn at 3x and
downsampled) in a palette of 8 named colours, at random places and sizes, on a plain or two-tone gradient
background of random colour, 48-96 px sides; captions from a small grammar ("two orange stars and a navy ring on
a pale background"). Many clean images share content (same objects, colours, plain backgrounds).
Planted (truth per key): junk captions (`text`), truncated JPEGs (`image_decode`), tiny images (`image_size`),
banners (`aspect_ratio`), exact duplicates (the same JPEG bytes under another key) and near duplicates: 1-2
copies of a clean image, each made by one or two of: JPEG recompression at quality 30-60 with 4:2:0 chroma,
a 3x3 box blur, a rescale to another size (Lanczos; at least 36 px a side), trimming 4-8 % off two sides and scaling back, a gamma
change of 0.85-1.15. Every copy sits in the second half of the shards, after its original.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE = {"teal": (0, 128, 128), "orange": (255, 140, 0), "purple": (128, 0, 160), "pink": (255, 105, 180),
           "navy": (0, 0, 128), "olive": (128, 128, 0), "brown": (140, 70, 20), "black": (20, 20, 20)}
OBJECTS = ("star", "ring", "stripe", "cross", "diamond", "ellipse")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
JUNK = ("DCIM_2231.JPG", "Screenshot_20210304", "www.cheap-prints.net", "thumbnail", "download", "stock photo of shapes",
        "image not found", "placeholder graphic", "12345", "PXL_20220101_123.jpg", "x", "all rights reserved 2019")
SIDES = (48, 56, 64, 72, 80, 96)
SS = 3  # supersampling factor of the drawing


@dataclass
class WebSet:
    shards: list[str]
    truth: dict[str, str | None]  # key -> planted reason (None: clean)
    groups: list[list[str]] = field(default_factory=list)  # original first, then its copies
    order: list[str] = field(default_factory=list)


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[Image.Image, str]:
    a = rng.integers(150, 256, 3)
    if rng.random() < 0.6:
        return Image.new("RGB", (w, h), tuple(int(v) for v in a)), "plain"
    b = np.clip(a + rng.integers(-60, 61, 3), 0, 255)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    ramp = a[None, :] * (1 - t[:, None]) + b[None, :] * t[:, None]
    arr = np.broadcast_to(ramp[None, :, :], (h, w, 3)) if len(t) == w else np.broadcast_to(ramp[:, None, :], (h, w, 3))
    return Image.fromarray(arr.astype(np.uint8)), "gradient"


def _draw_object(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rgb: tuple[int, ...],
                 angle: float) -> None:
    if kind == "star":
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(angle + k * math.pi / 5),
                cy + (r if k % 2 == 0 else r * 0.45) * math.sin(angle + k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=rgb)
    elif kind == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb, width=max(2, int(r * 0.3)))
    elif kind == "stripe":
        dx, dy = math.cos(angle) * r, math.sin(angle) * r
        d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=rgb, width=max(2, int(r * 0.35)))
    elif kind == "cross":
        w = max(2, int(r * 0.3))
        d.line((cx - r, cy, cx + r, cy), fill=rgb, width=w)
        d.line((cx, cy - r, cx, cy + r), fill=rgb, width=w)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=rgb)
    else:
        d.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=rgb)


def scene(rng: np.random.Generator, w: int | None = None, h: int | None = None) -> tuple[Image.Image, str]:
    """A clean image and its caption."""
    w = w or int(rng.choice(SIDES))
    h = h or int(rng.choice(SIDES))
    bg, bg_kind = _background(rng, w * SS, h * SS)
    d = ImageDraw.Draw(bg)
    count = int(rng.integers(1, 4))
    kinds = [OBJECTS[int(rng.integers(len(OBJECTS)))] for _ in range(count)]
    colours = [list(PALETTE)[int(rng.integers(len(PALETTE)))] for _ in range(count)]
    for kind, colour in zip(kinds, colours, strict=True):
        r = float(rng.uniform(0.12, 0.3) * min(w, h) * SS)
        cx, cy = float(rng.uniform(r, w * SS - r)), float(rng.uniform(r, h * SS - r))
        rgb = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in PALETTE[colour])
        _draw_object(d, kind, cx, cy, r, rgb, float(rng.uniform(0, math.pi)))
    im = bg.resize((w, h), Image.Resampling.LANCZOS)
    groups: dict[tuple[str, str], int] = {}
    for kind, colour in zip(kinds, colours, strict=True):
        groups[(colour, kind)] = groups.get((colour, kind), 0) + 1
    parts = [f"{COUNT_WORDS[n]} {colour} {kind}{'s' if n > 1 else ''}" for (colour, kind), n in groups.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    where = "a pale background" if bg_kind == "plain" else "a soft gradient"
    return im, f"{text} on {where}"


def _jpeg(im: Image.Image, quality: int = 90, subsampling: int = 0) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def _perturb(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    """One or two of: recompress, box blur, rescale, trim and scale back, gamma."""
    ops = rng.choice(5, size=int(rng.integers(1, 3)), replace=False).tolist()
    out = im
    for op in ops:
        if op == 0:
            out = Image.open(io.BytesIO(_jpeg(out, int(rng.integers(30, 61)), subsampling=2))).convert("RGB")
        elif op == 1:
            out = out.filter(ImageFilter.BoxBlur(1))
        elif op == 2:
            scale = float(rng.choice([0.6, 0.75, 1.4, 1.8]))
            if min(out.size) * scale < 36:  # a copy stays big enough to pass the image filter (minSide 32)
                scale = 1.4
            out = out.resize((max(8, round(out.width * scale)), max(8, round(out.height * scale))), Image.Resampling.LANCZOS)
        elif op == 3:
            w, h = out.size
            fx, fy = rng.uniform(0.04, 0.08, 2)
            left = rng.random() < 0.5
            top = rng.random() < 0.5
            box = (round(w * fx) if left else 0, round(h * fy) if top else 0,
                   w if left else w - round(w * fx), h if top else h - round(h * fy))
            out = out.crop(box).resize((w, h), Image.Resampling.LANCZOS)
        else:
            g = float(rng.uniform(0.85, 1.15))
            out = out.point(lambda v, g=g: int(round(255 * (v / 255) ** g)))
    return out


def write_web_set(out_dir: str, *, clean: int = 360, groups: int = 60, per_kind: int = 20, shards: int = 4,
                  seed: int = 0) -> WebSet:
    """Write img2dataset-style shards (jpg/txt/json) with planted noise; return them with the truth."""
    rng = np.random.default_rng(10_000 + seed)
    first: list[tuple[str, bytes, str, str | None]] = []
    second: list[tuple[str, bytes, str, str | None]] = []
    dup_groups: list[list[str]] = []
    n = 0

    def key() -> str:
        nonlocal n
        n += 1
        return f"{seed:03d}{n:06d}"

    for i in range(clean):
        im, cap = scene(rng)
        (first if i % 2 else second).append((key(), _jpeg(im), cap, None))
    for j in range(per_kind):
        im, _ = scene(rng)
        first.append((key(), _jpeg(im), JUNK[j % len(JUNK)], "text"))
        im, cap = scene(rng)
        data = _jpeg(im)
        first.append((key(), data[: len(data) // 2], cap, "image_decode"))
        im, cap = scene(rng, int(rng.integers(8, 28)), int(rng.integers(8, 28)))
        first.append((key(), _jpeg(im), cap, "image_size"))
        long, short = int(rng.integers(160, 240)), int(rng.integers(36, 48))
        im, cap = scene(rng, *((long, short) if j % 2 else (short, long)))
        first.append((key(), _jpeg(im), cap, "aspect_ratio"))
        im, cap = scene(rng)
        o, data = key(), _jpeg(im)
        first.append((o, data, cap, None))
        c = key()
        second.append((c, data, cap, "exact_duplicate"))
        dup_groups.append([o, c])
    for g in range(groups):
        im, cap = scene(rng)
        o = key()
        first.append((o, _jpeg(im), cap, None))
        copies = [key() for _ in range(1 + g % 2)]
        for c in copies:
            second.append((c, _jpeg(_perturb(rng, im)), cap, "near_duplicate"))
        dup_groups.append([o, *copies])
    order_first = [first[i] for i in rng.permutation(len(first))]
    order_second = [second[i] for i in rng.permutation(len(second))]
    half = shards // 2
    parts = [order_first[i::half] for i in range(half)] + [order_second[i::shards - half] for i in range(shards - half)]
    os.makedirs(out_dir, exist_ok=True)
    paths, order = [], []
    for s, samples in enumerate(parts):
        path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, data, caption, _ in samples:
                meta = {"url": f"https://example.org/img/{k}.jpg", "key": k, "status": "success", "caption": caption}
                for name, payload in ((f"{k}.jpg", data), (f"{k}.txt", caption.encode()),
                                      (f"{k}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
                order.append(k)
        paths.append(path)
    truth = {k: t for k, _, _, t in first + second}
    return WebSet(paths, truth, dup_groups, order)


def score(decisions: list[dict], web: WebSet) -> dict:
    """Per planted kind the share removed with its reason, the clean share kept, and the share of duplicate groups
    keeping exactly one member."""
    by_key = {d["key"]: d for d in decisions}
    kinds = sorted({t for t in web.truth.values() if t is not None})
    removed = {}
    for kind in kinds:
        planted = [k for k, t in web.truth.items() if t == kind]
        removed[kind] = sum(by_key[k]["reason"] == kind for k in planted) / len(planted)
    clean = [k for k, t in web.truth.items() if t is None]
    lost = [by_key[k] for k in clean if not by_key[k]["kept"]]
    one = sum(sum(by_key[k]["kept"] for k in g) == 1 for g in web.groups)
    return {"removed": removed, "clean": len(clean), "clean_kept": 1 - len(lost) / len(clean),
            "clean_lost_reasons": {r: sum(d["reason"] == r for d in lost) for r in {d["reason"] for d in lost}},
            "groups": len(web.groups), "groups_exactly_one": one / len(web.groups)}
