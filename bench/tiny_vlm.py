"""Shared harness of the issue-10 measurements (bench/multi_image.py, bench/resolution.py), not a test.

A tiny VLM built by the trainer's own code path (quickstart parts -> `model.assemble_vlm` ->
`resolution.apply`), samples encoded by the trainer's `SampleEncoder` (images counted by the model's own
processor) and batched by `collate`, trained in one process with AdamW on the summed answer-token loss
(the trainer's objective), and scored by the answer word the model ranks first among the candidates.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from vlm_core.spec import ModelSpec, ResolutionSpec
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_trainer.model import apply_freezing, assemble_vlm
from vlm_trainer.objective import CausalLMObjective
from vlm_trainer.resolution import apply as apply_resolution
from vlm_trainer.samples import Encoded, SampleEncoder, collate

# A sample: (image members {"0.png": bytes, ...}, question text with <image> markers, answer word)
Sample = tuple[dict[str, bytes], str, str]


class Transcript:
    """What a bench script printed, saved with its figures as results/<dir>/<name>.json and <name>.txt."""

    def __init__(self, script: str, argv: list[str], out_dir: str) -> None:
        self.command = " ".join([script, *argv])
        self.out_dir = out_dir
        self.lines: list[str] = []

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, name: str, figures: dict[str, Any]) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"{name}.json"), "w") as f:
            json.dump({"command": self.command, **figures}, f, indent=1)
        with open(os.path.join(self.out_dir, f"{name}.txt"), "w") as f:
            f.write(f"$ python {self.command}\n" + "\n".join(self.lines) + "\n")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build(extra_words: list[str], resolution: ResolutionSpec | None, *, seed: int = 0, hidden: int = 64) -> Any:
    """The tiny VLM (SigLIP 32px patch 8, Llama 2 layers) under a resolution policy."""
    tmp = tempfile.mkdtemp(prefix="bench-vlm-")
    tok = build_tokenizer()
    tok.add_tokens(extra_words)
    spec = ModelSpec(
        visionEncoder=build_vision_encoder(os.path.join(tmp, "vision"), image_size=32, patch=8, hidden=64, layers=2),
        languageModel=build_language_model(os.path.join(tmp, "lm"), tok, hidden=hidden, layers=2, heads=4,
                                           mlp=2 * hidden, seed=seed),
        imageSize=32,
    )
    vlm = assemble_vlm(spec, seed=seed)
    return apply_resolution(vlm, resolution, seed=seed)


def encode(encoder: SampleEncoder, samples: list[Sample]) -> list[Encoded]:
    out = []
    for i, (images, question, answer) in enumerate(samples):
        doc = {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        out.append(encoder.encode({"__key__": str(i), **images, "json": json.dumps(doc).encode()}, "conversation"))
    return out  # type: ignore[return-value]


def train_and_score(
    vlm: Any, train: list[Sample], test: list[Sample], candidates: list[str], *, steps: int, batch: int,
    lr: float, trainable: list[str], seed: int = 0, max_length: int = 2048, log: Callable[[str], None] = print,
    generate: Callable[[Any, list[Encoded]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train `steps` AdamW steps on `train`, then the accuracy of the first answer token on `test`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoder = SampleEncoder(vlm.processor, max_length=max_length, max_images=4)
    pad = vlm.processor.tokenizer.pad_token_id
    t0 = time.perf_counter()
    train_enc, test_enc = encode(encoder, train), encode(encoder, test)
    encode_s = time.perf_counter() - t0
    model = vlm.model
    apply_freezing(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    objective = CausalLMObjective()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        items = [train_enc[rng.randrange(len(train_enc))] for _ in range(batch)]
        b = collate(items, pad)
        loss_sum, _ = objective(model, b)
        loss = loss_sum / objective.count(b)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step:4d} loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    train_s = time.perf_counter() - t0
    ids = [vlm.processor.tokenizer.convert_tokens_to_ids(c) for c in candidates]
    correct = 0
    model.eval()
    extra: dict[str, float] = {}
    if generate is not None:
        extra = generate(vlm, test_enc)
    with torch.no_grad():
        for i in range(0, len(test_enc), 32):
            chunk = test_enc[i:i + 32]
            b = collate(chunk, pad)
            logits = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits
            for row, e in enumerate(chunk):
                pos = next(j for j, t in enumerate(e.labels) if t != -100)  # the answer word
                pred = int(logits[row, pos - 1, ids].argmax())
                correct += int(ids[pred] == e.labels[pos])
    image_tokens = sum(sum(e.image_tokens) for e in train_enc) / max(1, sum(len(e.image_tokens) for e in train_enc))
    return {
        "first_answer_word_accuracy": correct / len(test_enc),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": round(train_s, 1),
        "encode_seconds": round(encode_s, 1),
        "image_tokens_per_image": round(image_tokens, 1),
        "steps": steps,
        "batch": batch,
        "test_samples": len(test_enc),
        **extra,
    }


def greedy_answers(vlm: Any, items: list[Encoded], max_new_tokens: int = 8) -> list[str]:
    """The model's own greedy answer to each sample's prompt (everything before the first trained token)."""
    tok = vlm.processor.tokenizer
    out = []
    with torch.no_grad():
        for e in items:
            pos = next(j for j, t in enumerate(e.labels) if t != -100)
            prompt = Encoded(e.input_ids[:pos], e.labels[:pos], e.pixel_values, e.image_sizes, e.image_tokens)
            b = collate([prompt], tok.pad_token_id)
            gen = vlm.model.generate(**{k: v for k, v in b.items() if k != "labels"}, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(gen[0, b["input_ids"].shape[1]:], skip_special_tokens=True))
    return out
