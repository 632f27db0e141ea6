"""Estimated vs measured memory of one training step on CPU (fp32), per component.

Models: the quickstart's VLM (tiny Llama + SigLIP, built from `vlm_quickstart.components`) and
one ~20x larger (wider and deeper, 8K vocabulary). Stages: align (projector only), instruct (projector +
LM), instruct with gradient checkpointing. One step = forward, the trainer's causal-LM loss, backward,
AdamW step, on a single process (ddp at world size 1: no wrapper, as the trainer runs it).

Measured:
- parameter, gradient and optimizer-state bytes: summed from the tensors themselves (numel x element
  size; AdamW's exp_avg and exp_avg_sq; its scalar `step` counters are excluded), compared exactly;
- activation peak: torch's memory profiler (`torch.profiler` with profile_memory=True and its
  `_memory_profiler.MemoryProfileTimeline`, which labels every CPU allocation as parameter, gradient,
  optimizer state, input, activation, temporary, autograd detail or unknown); "activations measured" is
  the peak over the step of everything that is not a parameter, gradient, optimizer state or input,
  compared with the estimate's activations + logits.

    PYTHONPATH=operator:trainer python bench/memory_cpu_bench.py --out bench/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from vlm_core import accounting as A
from vlm_quickstart import components as Q
from vlm_trainer.model import apply_freezing

# MemoryProfileTimeline columns: 0 time, then PARAMETER, OPTIMIZER_STATE, INPUT, TEMPORARY, ACTIVATION,
# GRADIENT, AUTOGRAD_DETAIL, unknown (torch/profiler/_memory_profiler.py, _CATEGORY_TO_INDEX + 1).
PARAM, OPTIM, INPUT, GRAD = 1, 2, 3, 6


def quickstart_configs() -> tuple[dict, dict, int]:
    tok = Q.build_tokenizer()
    lm = Q.language_model_config(tok).to_dict()
    vision = Q.vision_encoder_config().to_dict()
    return vision, lm, tok.convert_tokens_to_ids(Q.IMAGE)


def large_configs() -> tuple[dict, dict, int]:
    lm = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=True).to_dict()
    vision = Q.vision_encoder_config(image_size=64, patch=8, hidden=192, layers=4).to_dict()
    return vision, lm, 8191


def build(vision: dict, lm: dict, image_id: int, seed: int = 0) -> LlavaForConditionalGeneration:
    shape = A.ModelShape.from_configs(vision, lm)
    cfg = LlavaConfig(vision_config=vision, text_config=lm, image_token_index=image_id,
                      image_seq_length=shape.image_tokens, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="full", tie_word_embeddings=bool(lm.get("tie_word_embeddings")))
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg)


def batch(shape: A.ModelShape, image_id: int, micro: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (micro, seq), generator=g)
    ids[ids == image_id] = 0
    ids[:, : shape.image_tokens] = image_id
    size = shape.vision.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.where(ids == image_id, -100, ids),  # image tokens are context, not predicted
        "pixel_values": torch.randn(micro, 3, size, size, generator=g),
    }


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, b: dict[str, torch.Tensor]) -> None:
    """The trainer's CausalLMObjective and one AdamW step."""
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    del out, logits
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_case(name: str, configs: tuple[dict, dict, int], stage_type: str, trainable: tuple[str, ...],
             ckpt: bool, micro: int, seq: int) -> dict:
    vision, lm, image_id = configs
    shape = A.ModelShape.from_configs(vision, lm)
    model = build(vision, lm, image_id)
    apply_freezing(model, list(trainable))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    b = batch(shape, image_id, micro, seq, lm["vocab_size"])
    inp = A.StageInput(stage_type=stage_type, trainable=trainable, strategy="ddp", precision="fp32", micro_batch=micro,
                       seq_len=seq, gradient_checkpointing=ckpt, world_size=1, on_gpu=False)
    est = A.estimate_memory(shape, inp).components

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(model, opt, b)
    seconds = time.perf_counter() - started
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    s = np.array(sizes, dtype=np.int64)
    other = s[:, 1:].sum(axis=1) - s[:, PARAM] - s[:, OPTIM] - s[:, INPUT] - s[:, GRAD]

    measured = {
        "weights": tensor_bytes(model.parameters()),
        "gradients": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_states": sum(tensor_bytes(v for k, v in st.items() if k != "step") for st in opt.state.values()),
        "activations_and_logits_peak": int(other.max()),
        "profiler_parameter_peak": int(s[:, PARAM].max()),
        "profiler_gradient_peak": int(s[:, GRAD].max()),
        "profiler_optimizer_peak": int(s[:, OPTIM].max()),
    }
    estimate = {k: est.get(k, 0) for k in ("weights", "gradients", "optimizer_states")}
    estimate["activations_and_logits"] = est["activations"] + est["logits"]

    def err(e: int, m: int) -> float | None:
        return None if m == 0 else round(100.0 * (e - m) / m, 1)

    return {
        "model": name,
        "params": shape.params,
        "stage": stage_type + (" + gradient checkpointing" if ckpt else ""),
        "trainable": list(trainable),
        "micro_batch": micro,
        "seq_len": seq,
        "estimate_bytes": estimate,
        "measured_bytes": measured,
        "error_percent": {
            "weights": err(estimate["weights"], measured["weights"]),
            "gradients": err(estimate["gradients"], measured["gradients"]),
            "optimizer_states": err(estimate["optimizer_states"], measured["optimizer_states"]),
            "activations_and_logits": err(estimate["activations_and_logits"], measured["activations_and_logits_peak"]),
        },
        "step_seconds_profiled": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/memory_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = {"quickstart": (quickstart_configs(), 32, 96), "large": (large_configs(), 8, 256)}
    rows = []
    for name, (configs, micro, seq) in models.items():
        for stage_type, trainable, ckpt in (("align", ("projector",), False),
                                            ("instruct", ("projector", "language_model"), False),
                                            ("instruct", ("projector", "language_model"), True)):
            row = run_case(name, configs, stage_type, trainable, ckpt, micro, seq)
            rows.append(row)
            e = row["error_percent"]
            print(f"{name:<10} {row['params'] / 1e6:6.2f}M {row['stage']:<38} weights {e['weights']:+.1f}% "
                  f"grads {e['gradients']}% optim {e['optimizer_states']}% "
                  f"activations+logits {e['activations_and_logits']:+.1f}% "
                  f"(est {row['estimate_bytes']['activations_and_logits'] / 2**20:.1f} MiB, "
                  f"measured {row['measured_bytes']['activations_and_logits_peak'] / 2**20:.1f} MiB)", flush=True)
    ratio = rows[3]["params"] / rows[0]["params"]
    doc = {"command": "PYTHONPATH=operator:trainer python " + " ".join(sys.argv), "torch": torch.__version__,
           "machine": platform.machine(), "large_over_quickstart_params": round(ratio, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"large model / quickstart model parameters: {ratio:.1f}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
