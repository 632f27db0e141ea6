"""Measurement (not a test): a detail too fine for the base resolution, answered at three resolution policies.

Each image is 64x64: a light, noisy grey background with one small square (16-24 px) at a random place,
filled with 1-pixel stripes alternating the quickstart's red and blue, either horizontal or vertical. The
question is `<image> which way are the stripes ?`, the answer `horizontal` or `vertical` (chance 0.5).
Resized to the vision encoder's base 32px, 1-pixel stripes average into a plain purple square: the detail
does not survive the base resolution (an earlier variant, a single coloured pixel as the "tiny mark", was
not learned at any resolution in 400 steps: all three stayed at chance; see the closing note). The same
tiny VLM (bench/tiny_vlm.py: quickstart parts through the trainer's own assemble_vlm, resolution.apply,
SampleEncoder, collate, objective; vision tower frozen, projector + LM trained) is trained the same number
of steps on the same samples under:

- fixed 32 (the vision encoder's base size),
- fixed 64 (the stage raises the resolution: position embeddings interpolated 4x4 -> 8x8 grid),
- anyres (LLaVA-NeXT tiling: 32px tiles on the 64x64 canvas, plus the global 32px thumbnail).

Accuracy is the share of held-out images whose answer the model ranks first of the two.

    PYTHONPATH=operator:trainer .venv/bin/python bench/resolution.py [--steps 300] [--policies fixed32 fixed64 anyres]

Writes bench/results/issue10/resolution.json (+ .txt with the printed lines).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from tiny_vlm import Transcript, build, png, train_and_score  # noqa: E402
from vlm_core.spec import ResolutionSpec  # noqa: E402
from vlm_quickstart.vocab import COLOUR_RGB  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "issue10")
SIZE = 64
ANSWERS = ("horizontal", "vertical")
POLICIES = {
    "fixed32": None,
    "fixed64": ResolutionSpec(policy="fixed", imageSize=64),
    "anyres": ResolutionSpec(policy="anyres", gridPinpoints=[[32, 64], [64, 32], [64, 64]]),
}


def make(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    red, blue = (np.array(COLOUR_RGB[c], dtype=np.float32) for c in ("red", "blue"))
    out = []
    for i in range(n):
        horizontal = i % 2 == 0
        bg = int(rng.integers(170, 246))
        pixels = np.full((SIZE, SIZE, 3), bg, dtype=np.float32) + rng.normal(0.0, 8.0, (SIZE, SIZE, 3))
        side = int(rng.integers(16, 25))
        y, x = (int(v) for v in rng.integers(0, SIZE - side, 2))
        for j in range(side):
            colour = red if j % 2 == 0 else blue
            if horizontal:
                pixels[y + j, x:x + side] = colour
            else:
                pixels[y:y + side, x + j] = colour
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        out.append(({"png": png(image)}, "<image> which way are the stripes ?", ANSWERS[not horizontal]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    transcript = Transcript("bench/resolution.py", sys.argv[1:], OUT)
    log = transcript.log

    train, test = make(args.train, args.seed), make(args.test, args.seed + 1000)
    results = {}
    for name in args.policies:
        log(f"policy {name}: {args.steps} steps x batch {args.batch}, {SIZE}px images, 1px stripes")
        vlm = build(["way", "are", "stripes", *ANSWERS], POLICIES[name], seed=args.seed)
        results[name] = train_and_score(vlm, train, test, list(ANSWERS), steps=args.steps, batch=args.batch, lr=2e-3,
                                        trainable=["projector", "language_model"], seed=args.seed, log=log)
        log(f"{name}: {json.dumps(results[name])}")
    log(json.dumps({k: v["first_answer_word_accuracy"] for k, v in results.items()}))
    transcript.save("resolution", {"chance": 0.5, "image_size": SIZE, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
