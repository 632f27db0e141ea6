"""Deterministic synthetic data: coloured shapes on 32x32 images, as WebDataset shards.

Each sample is one shape (circle / square / triangle) in one of four colours, at a random size and
position, with colour jitter and pixel noise. The same images are written in the three formats of
the data contract: captions, conversations (QA about colour or shape MIXED with caption-style turns,
as LLaVA's instruction mixture does: QA alone makes the model forget captioning) and preference
pairs (chosen = the right answer, rejected = a wrong colour or a wrong shape). Text "documents" for
the language model's stage-0 pretraining come from here too.

Shards are plain tar files written with fixed metadata, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlm_quickstart.vocab import (
    CAPTION_PROMPTS,
    COLOUR_QUESTIONS,
    COLOUR_RGB,
    COLOURS,
    SHAPE_QUESTIONS,
    SHAPES,
    caption_of,
)

IMAGE_SIZE = 32
FORMATS = ("caption", "conversation", "preference")
BARE_CAPTION_SHARE = 0.25  # conversations that are the caption format itself


@dataclass(frozen=True)
class ShapeSample:
    """One image and what is in it."""

    key: str
    colour: str
    shape: str
    png: bytes

    @property
    def caption(self) -> str:
        return caption_of(self.colour, self.shape)

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png)).convert("RGB")


def split_seed(seed: int, split: str) -> int:
    """A seed per (seed, split), so splits never share a random stream."""
    return (seed * 1_000_003 + zlib.crc32(split.encode())) % (2**32)


def draw_shape(rng: np.random.Generator, colour: str, shape: str, size: int = IMAGE_SIZE) -> Image.Image:
    """One image: light noisy background, one jittered-colour shape at a random size and place."""
    bg = int(rng.integers(170, 246))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    radius = float(rng.uniform(size * 0.2, size * 0.4))
    margin = radius + 1
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    rgb = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in COLOUR_RGB[colour])
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=rgb)
    elif shape == "square":
        half = radius * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=rgb)
    elif shape == "triangle":
        draw.polygon(
            [
                (cx, cy - radius),
                (cx - radius * 0.95, cy + radius * 0.8),
                (cx + radius * 0.95, cy + radius * 0.8),
            ],
            fill=rgb,
        )
    else:
        raise ValueError(f"shape: must be one of {SHAPES}, got {shape!r}")
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 8.0, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_samples(split: str, n: int, seed: int) -> list[ShapeSample]:
    """`n` samples of `split`; colours and shapes drawn uniformly."""
    rng = np.random.default_rng(split_seed(seed, split))
    out = []
    for i in range(n):
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        buf = io.BytesIO()
        draw_shape(rng, colour, shape).save(buf, format="PNG")
        out.append(ShapeSample(key=f"{split}-{i:06d}", colour=colour, shape=shape, png=buf.getvalue()))
    return out


def _turn(rng: np.random.Generator, s: ShapeSample, kind: str) -> tuple[str, str]:
    if kind == "caption":
        return CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], s.caption
    if kind == "colour":
        return COLOUR_QUESTIONS[int(rng.integers(len(COLOUR_QUESTIONS)))], s.colour
    return SHAPE_QUESTIONS[int(rng.integers(len(SHAPE_QUESTIONS)))], s.shape


def conversation_record(rng: np.random.Generator, s: ShapeSample) -> dict:
    """A quarter are the caption format itself (user turn = the image alone, the align task); the rest
    are one to three turns drawn from {prompted caption, colour QA, shape QA}, `<image>` opening the
    first turn. Without the caption share, instruction tuning erodes plain captioning."""
    if rng.random() < BARE_CAPTION_SHARE:
        conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": s.caption}]
        return {"conversations": conv, "colour": s.colour, "shape": s.shape}
    kinds = ["caption", "colour", "shape"]
    order = [kinds[int(j)] for j in rng.permutation(3)][: int(rng.integers(1, 4))]
    conv = []
    for t, kind in enumerate(order):
        question, answer = _turn(rng, s, kind)
        conv.append({"role": "user", "content": f"<image>\n{question}" if t == 0 else question})
        conv.append({"role": "assistant", "content": answer})
    return {"conversations": conv, "colour": s.colour, "shape": s.shape}


def eval_records(samples: list[ShapeSample]) -> list[tuple[ShapeSample, str, dict]]:
    """The quickstart eval stage's held-out set: per image a colour and a shape question, each a one-turn
    conversation scored by exact match (`task`)."""
    out = []
    for s in samples:
        for suffix, q, a in (("colour", COLOUR_QUESTIONS[0], s.colour), ("shape", SHAPE_QUESTIONS[0], s.shape)):
            conv = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
            out.append((s, suffix, {"conversations": conv, "task": "exact_match", "colour": s.colour, "shape": s.shape}))
    return out


def write_eval_shard(out_dir: str, samples: list[ShapeSample]) -> str:
    """heldout-eval-00000.tar: `eval_records` of the held-out images (conversation format, a `task` each)."""
    path = os.path.join(out_dir, "heldout-eval-00000.tar")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s, suffix, rec in eval_records(samples):
            _add(tar, f"{s.key}-{suffix}.png", s.png)
            _add(tar, f"{s.key}-{suffix}.json", json.dumps(rec, sort_keys=True).encode())
    return path


def preference_record(rng: np.random.Generator, s: ShapeSample) -> dict:
    """A one-turn prompt, the right answer, and a wrong-colour or wrong-shape answer."""
    kind = ["caption", "colour", "shape"][int(rng.integers(3))]
    question, chosen = _turn(rng, s, kind)
    prompt = f"<image>\n{question}" if kind != "caption" or rng.random() < 0.5 else "<image>"
    wrong_colour = [c for c in COLOURS if c != s.colour][int(rng.integers(len(COLOURS) - 1))]
    wrong_shape = [x for x in SHAPES if x != s.shape][int(rng.integers(len(SHAPES) - 1))]
    if kind == "colour":
        rejected = wrong_colour
    elif kind == "shape":
        rejected = wrong_shape
    elif rng.random() < 0.5:
        rejected = caption_of(wrong_colour, s.shape)
    else:
        rejected = caption_of(s.colour, wrong_shape)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "colour": s.colour, "shape": s.shape}


def caption_record(s: ShapeSample) -> dict:
    return {"caption": s.caption, "colour": s.colour, "shape": s.shape}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_format(
    out_dir: str, split: str, fmt: str, samples: list[ShapeSample], records: list[dict], per_shard: int
) -> list[str]:
    paths = []
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        path = os.path.join(out_dir, f"{split}-{fmt}-{shard:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s, rec in zip(
                samples[start : start + per_shard], records[start : start + per_shard], strict=True
            ):
                _add(tar, f"{s.key}.png", s.png)
                _add(tar, f"{s.key}.json", json.dumps(rec, sort_keys=True).encode())
        paths.append(path)
    return paths


def write_shards(out_dir: str, split: str, n: int, seed: int, per_shard: int = 500) -> list[str]:
    """Write `n` samples of `split` in all three formats; return the shard paths (caption,
    conversation, preference; each in order). Same (split, n, seed) -> byte-identical files."""
    os.makedirs(out_dir, exist_ok=True)
    samples = make_samples(split, n, seed)
    rng = np.random.default_rng(split_seed(seed, split + "/text"))
    records = {
        "caption": [caption_record(s) for s in samples],
        "conversation": [conversation_record(rng, s) for s in samples],
        "preference": [preference_record(rng, s) for s in samples],
    }
    paths: list[str] = []
    for fmt in FORMATS:
        paths += _write_format(out_dir, split, fmt, samples, records[fmt], per_shard)
    return paths


def shard_paths(paths: list[str], fmt: str) -> list[str]:
    """The shards of one format among `write_shards`' output."""
    return [p for p in paths if os.path.basename(p).split("-")[1] == fmt]


def read_shards(paths: list[str]) -> list[tuple[str, Image.Image, dict]]:
    """(key, image, json) of every sample in `paths`, in order (evaluation and tests)."""
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in members.items():
            out.append((key, Image.open(io.BytesIO(parts["png"])).convert("RGB"), json.loads(parts["json"])))
    return out


def text_document(rng: np.random.Generator) -> str:
    """A short multi-sentence document about one shape whose later sentences repeat its attributes.

    Single sentences are not enough (TESTING.md): the LM must learn to copy attributes from earlier
    context, which is what it later does with the image tokens. Half the documents are chat-formatted
    like the trainer's inputs (user / assistant turns ending in `</s>`), after a description.
    """
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    s = ShapeSample(key="", colour=colour, shape=shape, png=b"")
    return document_about(rng, s, ("caption", "colour", "shape"), lambda kind: _turn(rng, s, kind))


def document_about(rng: np.random.Generator, s: ShapeSample, kinds: tuple[str, ...],
                   turn: Callable[[str], tuple[str, str]]) -> str:
    """A stage-0 document about `s`: an opening, then either 2-4 prose sentences or 1-3 chat turns of `kinds`
    (`turn(kind)` -> question, answer), in a random order."""
    colour, shape = s.colour, s.shape
    opening = [
        f"a {colour} {shape} .",
        f"there is a {colour} {shape} .",
        f"this picture is a {colour} {shape} .",
    ]
    prose = [
        f"the {shape} is {colour} .",
        f"it is a {shape} .",
        f"the colour is {colour} .",
        f"the shape is a {shape} .",
        f"i see a {colour} {shape} .",
        f"here the object is a {colour} {shape} .",
    ]
    parts = [opening[int(rng.integers(len(opening)))]]
    if rng.random() < 0.5:
        for j in rng.permutation(len(prose))[: int(rng.integers(2, 5))]:
            parts.append(prose[int(j)])
    else:
        for j in rng.permutation(len(kinds))[: int(rng.integers(1, 4))]:
            question, answer = turn(kinds[int(j)])
            parts.append(f"user : {question} assistant : {answer} </s>")
    return " ".join(parts)


def text_documents(n: int, seed: int, split: str = "text") -> list[str]:
    """`n` documents for LM pretraining (`split='text'`) or held-out perplexity (`'text-heldout'`)."""
    rng = np.random.default_rng(split_seed(seed, split))
    return [text_document(rng) for _ in range(n)]
