"""Our trainer against the plain Hugging Face loop, in one process, on the SAME model, data and batch.

Variants (each a full optimizer step, one micro-batch per step):
- `hf_eager`: transformers' `LlavaForConditionalGeneration` in a plain loop: `model(**batch, labels=...)`
  (HF's own full-logits loss), backward, fused AdamW, on the trainer's batches (prepared outside the timed
  step: the plain loop is charged no data time);
- `hf_compiled`: the same loop over `torch.compile(model)` (the same module and optimizer);
- `ours`: `vlm_trainer.trainer.Trainer.train_step()` of a Trainer built from a real TrainerConfig (stage
  align: projector trains; instruct: LM + projector), reading its own shards through its own data path
  (`_next_batch`, the loader/packing of the data issue once merged) INSIDE the timed step;
- `ours_compiled`: the same with `stage.compile: true` (per-block torch.compile).
- `ours_cached`: `ours` with `stage.cacheVisionFeatures: true` (the frozen tower's features computed once per
  image); before the warm-up it runs one pass over the shard, so the timed steps read cached features as a
  second epoch (or a later stage with the same encoder) does;
- `ours_chunked`: `ours` with `stage.crossEntropy: chunked` (head + cross-entropy over chunks).

Every variant starts from the same weights (copies of the first Trainer's model) and the same freezing.
Steps are interleaved (repeat r runs every variant once, the order rotating) and the medians are
compared. MFU uses `vlm_core.accounting` (the estimator's FLOPs, one formula for all variants; the
step's tokens are the batch's non-padding tokens).

    PYTHONPATH=operator:trainer python bench/vlm_speed.py --cpu            # CPU-feasible size, ratios
    PYTHONPATH=operator:trainer python bench/vlm_speed.py                   # GPU: CLIP-L/336 + 1.1B Llama

Writes bench/results/issue14/vlm_speed_{cpu,gpu}.json (and a .md table). Not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

os.environ.setdefault("VLM_METRICS_PORT", "off")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from vlm_core import accounting  # noqa: E402
from vlm_core.spec import DataSpec, TrainerConfig  # noqa: E402
from vlm_quickstart.components import build_image_processor, build_tokenizer, vocabulary  # noqa: E402
from vlm_trainer.parallel import DistEnv  # noqa: E402
from vlm_trainer.stages import training_kind  # noqa: E402
from vlm_trainer.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "issue14"


@dataclass(frozen=True)
class Size:
    """Model and data shape of one benchmark size."""

    name: str
    vision: str  # "siglip" or "clip"
    image_size: int
    patch: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    vocab: int
    text_words: int  # words of text per sample (the quickstart tokenizer is one token per word)
    precision: str


CPU = Size("cpu", "siglip", 64, 8, 128, 2, 4, 256, 4, 4, 4, 688, 2048, 28, "fp32")
# The baseline: CLIP ViT-L/14-336 (576 image tokens) + a 1.1B Llama-shaped LM (TinyLlama's shape);
# 831 tokens per sample of which 576 are image tokens.
GPU = Size("gpu", "clip", 336, 14, 1024, 24, 16, 2048, 22, 32, 4, 5632, 32000, 240, "bf16")


# --- parts and data ---------------------------------------------------------------------------------


def build_parts(root: Path, size: Size) -> tuple[str, str]:
    """A random-init vision encoder and LM saved like real checkpoints (the trainer assembles them)."""
    tokenizer = build_tokenizer()
    lm_dir, vision_dir = root / "lm", root / "vision"
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=max(size.vocab, len(tokenizer)), hidden_size=size.lm_hidden, intermediate_size=size.lm_mlp,
        num_hidden_layers=size.lm_layers, num_attention_heads=size.lm_heads, num_key_value_heads=size.lm_kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    del lm
    if size.vision == "clip":
        cfg = json.loads((ROOT / "model_configs" / "clip-vit-large-patch14-336" / "config.json").read_text())
        vision: torch.nn.Module = CLIPVisionModel(CLIPVisionConfig(**cfg))
        processor: Any = CLIPImageProcessorPil(size={"shortest_edge": size.image_size},
                                               crop_size={"height": size.image_size, "width": size.image_size})
    else:
        vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=size.vision_hidden, intermediate_size=size.vision_hidden * 4,
            num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
            image_size=size.image_size, patch_size=size.patch, vision_use_head=False,
        ))
        processor = build_image_processor(size.image_size)
    vision.save_pretrained(vision_dir)
    processor.save_pretrained(vision_dir)
    return str(vision_dir), str(lm_dir)


def write_shard(path: Path, size: Size, fmt: str, mixed: bool, samples: int, seed: int) -> str:
    """Random images and word texts; `mixed` varies the text length per sample (padding in a batch)."""
    rng = np.random.default_rng(seed)
    words = [w for w in vocabulary() if w.isalpha()]
    n = size.text_words

    def text(k: int) -> str:
        return " ".join(rng.choice(words, size=max(1, k)))

    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            pixels = rng.integers(0, 256, (size.image_size, size.image_size, 3), dtype=np.uint8)
            png = BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            k = int(rng.integers(n // 4, n + 1)) if mixed else n
            if fmt == "caption":
                record: dict[str, Any] = {"caption": text(k - 8)}
            else:  # an instruction, then an answer of ~ 2/3 of the text
                record = {"conversations": [
                    {"role": "user", "content": "<image>\n" + text(k // 3 - 6)},
                    {"role": "assistant", "content": text(k - k // 3 - 6)},
                ]}
            for name, data in ((f"{i:06d}.png", png.getvalue()), (f"{i:06d}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
    return f"file://{path}"


def trainer_config(root: Path, tag: str, stage_type: str, shard: str, size: Size, parts: tuple[str, str],
                   micro: int, *, compile_blocks: bool, packing: bool, workers: int = 0,
                   cached: bool = False, chunked: bool = False, cache_mib: int = 0) -> TrainerConfig:
    stage: dict[str, Any] = {
        "name": stage_type, "type": stage_type, "maxSteps": 1_000_000, "precision": size.precision,
        "data": {"shards": [shard], "format": "caption" if stage_type == "align" else "conversation",
                 "maxLength": 2048, "shuffleBuffer": 0},
        "batch": {"globalSize": micro, "microSize": micro},
        "optimizer": {"lr": 1e-5},
    }
    if compile_blocks:
        stage["compile"] = True
    if cached:
        stage["cacheVisionFeatures"] = True
    if chunked:
        stage["crossEntropy"] = "chunked"
    if packing:
        stage["batch"]["tokensPerMicroBatch"] = micro * 1024
    if workers:
        stage["data"]["workers"] = workers  # the data issue's worker loader (spec.data.workers)
    if cache_mib:
        stage["data"]["cacheMiB"] = cache_mib  # encoded samples kept: later epochs skip decode/process/tokenize
    store = root / f"store-{tag}"
    return TrainerConfig.load({
        "job": "bench", "stageIndex": 0, "stage": stage,
        "model": {"visionEncoder": parts[0], "languageModel": parts[1], "imageSize": size.image_size,
                  "visionFeatureSelectStrategy": "default" if size.vision == "clip" else "full",
                  "visionFeatureLayer": -2 if size.vision == "clip" else -1},
        "storage": {"uri": f"file://{store}"}, "output": f"file://{store}/{stage_type}",
    })


# --- the variants -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFLoop:
    """The plain loop: HF's own loss over the full logits, backward, fused AdamW (bf16 autocast on GPU)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool, compiled: bool):
        self.model = torch.compile(model) if compiled else model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        self.device, self.bf16 = device, bf16

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def packing_available() -> bool:
    try:
        import vlm_trainer.packing  # noqa: F401
    except ImportError:
        return False
    return True


def scenario(root: Path, size: Size, stage_type: str, mixed: bool, parts: tuple[str, str], env: DistEnv,
             args: argparse.Namespace) -> dict[str, Any]:
    fmt = "caption" if stage_type == "align" else "conversation"
    tag = f"{stage_type}-{'mixed' if mixed else 'fixed'}"
    shard = write_shard(root / f"{tag}.tar", size, fmt, mixed, args.samples, seed=1)
    variants = [v for v in args.variants.split(",") if v]
    trainers: dict[str, Trainer] = {}
    for v in variants:
        if v.startswith("ours"):
            cfg = trainer_config(root, f"{tag}-{v}", stage_type, shard, size, parts, args.micro,
                                 compile_blocks=v == "ours_compiled", packing=args.packing, workers=args.workers,
                                 cached=v == "ours_cached", chunked=v == "ours_chunked", cache_mib=args.cache_mib)
            trainers[v] = training_kind(stage_type).build_trainer(cfg, env)
    first = next(iter(trainers.values())) if trainers else training_kind(stage_type).build_trainer(
        trainer_config(root, f"{tag}-data", stage_type, shard, size, parts, args.micro,
                       compile_blocks=False, packing=args.packing), env)
    reference = first.hf_model
    for t in trainers.values():  # the same starting weights everywhere
        t.hf_model.load_state_dict(reference.state_dict())
    hf_model: torch.nn.Module | None = None
    loops: dict[str, HFLoop] = {}
    bf16 = size.precision == "bf16" and env.device.type == "cuda"
    for v in variants:
        if v.startswith("hf"):
            if hf_model is None:
                hf_model = copy.deepcopy(reference)
            loops[v] = HFLoop(hf_model, env.device, bf16, compiled=v == "hf_compiled")
    # The plain loop's batches come from the trainer's own data path (prepared outside its timed step).
    batches = [first._next_batch() for _ in range(args.batches)]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    flops = first.flop_rates

    data_wait: dict[str, list[float]] = {v: [] for v in variants}

    def run(v: str, i: int) -> tuple[float, int, int]:
        if v in loops:
            batch = batches[i % len(batches)]
            sync(env.device)
            start = time.perf_counter()
            loops[v].step(batch)
            sync(env.device)
            return time.perf_counter() - start, tokens[i % len(batches)], batch["input_ids"].shape[0]
        result = trainers[v].train_step()
        data_wait[v].append(result.data_wait_seconds)
        return result.seconds, result.local_tokens, result.local_samples

    # One pass over the shard fills the caches (a first epoch / an earlier stage): the vision-feature cache of
    # ours_cached, and with --cache-mib the encoded-sample cache of every variant of ours.
    for v in [v for v in trainers if v == "ours_cached" or args.cache_mib]:
        for _ in range(-(-args.samples // args.micro)):
            trainers[v].train_step()
    for i in range(args.warmup):
        for v in variants:
            run(v, i)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    tok: dict[str, list[int]] = {v: [] for v in variants}
    smp: dict[str, list[int]] = {v: [] for v in variants}
    peak: dict[str, int] = dict.fromkeys(variants, 0)
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            s, t, n = run(v, args.warmup + r)
            seconds[v].append(s)
            tok[v].append(t)
            smp[v].append(n)
            if env.device.type == "cuda":
                peak[v] = max(peak[v], torch.cuda.max_memory_allocated(env.device))
    out: dict[str, Any] = {"stage": stage_type, "data": "mixed" if mixed else "fixed", "micro_batch": args.micro,
                           "tokens_per_sample": statistics.mean(tokens) / args.micro, "variants": {}}
    peak_flops = accounting.peak_flops_for_device(torch.cuda.get_device_name(env.device)) \
        if env.device.type == "cuda" else None
    for v in variants:
        med = statistics.median(seconds[v])
        samples_s = statistics.mean(smp[v]) / med
        tokens_s = statistics.mean(tok[v]) / med
        step_flops = flops.step_flops(int(statistics.mean(tok[v])), int(statistics.mean(smp[v]))) if flops else None
        out["variants"][v] = {
            "median_step_seconds": med,
            "median_data_wait_seconds": statistics.median(data_wait[v]) if data_wait[v] else 0.0,
            # the step without its sample preparation (what a worker loader that keeps up would give)
            "samples_per_second_excluding_data_wait": statistics.mean(smp[v]) / statistics.median(
                [s - w for s, w in zip(seconds[v], data_wait[v][-len(seconds[v]):], strict=True)])
            if data_wait[v] else samples_s,
            "step_seconds": seconds[v],
            "samples_per_second": samples_s,
            "tokens_per_second": tokens_s,
            "mfu": (step_flops / med / peak_flops) if (step_flops and peak_flops) else None,
            "peak_memory_gib": peak[v] / 2**30 if env.device.type == "cuda" else None,
        }
    ours = [v for v in variants if v.startswith("ours")]
    for v in ours:  # per repeat, each of ours against the plain loop's step of the same repeat
        if "hf_eager" in seconds:
            out["variants"][v]["paired_speedup_vs_hf_eager"] = statistics.median(
                b / o for b, o in zip(seconds["hf_eager"], seconds[v], strict=True))
    best = max(ours, key=lambda v: out["variants"][v]["samples_per_second"]) if ours else None
    out["best_ours"] = best
    for base in ("hf_eager", "hf_compiled"):
        if best and base in out["variants"]:
            out[f"speedup_vs_{base}"] = out["variants"][best]["samples_per_second"] / out["variants"][base]["samples_per_second"]
            # per repeat: the two steps ran back to back, so their ratio cancels the machine's slow drifts
            out[f"paired_speedup_vs_{base}"] = statistics.median(
                b / o for b, o in zip(seconds[base], seconds[best], strict=True))
            out[f"speedup_vs_{base}_excluding_data_wait"] = (
                out["variants"][best]["samples_per_second_excluding_data_wait"]
                / out["variants"][base]["samples_per_second"])
    cache = trainers["ours_cached"].feature_cache if "ours_cached" in trainers else None
    if cache is not None:
        out["vision_feature_cache"] = cache.stats.as_dict()
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# vlm_speed ({report['mode']})", "", f"Command: `{report['command']}`", "",
             f"Device: {report['device']}; torch {report['versions']['torch']}, transformers "
             f"{report['versions']['transformers']}; micro batch {report['micro_batch']}; "
             f"{report['repeats']} interleaved repeats (medians) after {report['warmup']} warm-up steps.", "",
             "| stage | data | tokens/sample | variant | samples/s | tokens/s | MFU | peak GiB | vs hf_eager | "
             "vs hf_eager without data wait |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for sc in report["scenarios"]:
        base = sc["variants"].get("hf_eager", {}).get("samples_per_second")
        for v, r in sc["variants"].items():
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            ratio = f"{r['samples_per_second'] / base:.2f}x" if base else "-"
            if "paired_speedup_vs_hf_eager" in r:
                ratio += f" (paired {r['paired_speedup_vs_hf_eager']:.2f}x)"
            bare = f"{r['samples_per_second_excluding_data_wait'] / base:.2f}x" if base and v.startswith("ours") else "-"
            lines.append(f"| {sc['stage']} | {sc['data']} | {sc['tokens_per_sample']:.0f} | {v} | "
                         f"{r['samples_per_second']:.2f} | {r['tokens_per_second']:.0f} | {mfu} | {mem} | {ratio} | "
                         f"{bare} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    for key in ("speedup_vs_hf_eager", "speedup_vs_hf_compiled", "paired_speedup_vs_hf_eager",
                "paired_speedup_vs_hf_compiled", "speedup_vs_hf_eager_excluding_data_wait"):
        report[key] = {f"{s['stage']}/{s['data']}": s.get(key) for s in report["scenarios"]}
    report["mfu"] = {f"{s['stage']}/{s['data']}": (s["variants"][s["best_ours"]]["mfu"] if s["best_ours"] else None)
                     for s in report["scenarios"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU-feasible size (ratios only)")
    parser.add_argument("--micro", type=int, default=None, help="micro batch (default 8)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches the plain loop cycles through")
    parser.add_argument("--samples", type=int, default=None, help="samples per shard")
    parser.add_argument("--stages", default="align,instruct")
    parser.add_argument("--data", default="fixed,mixed")
    parser.add_argument("--variants", default=None,
                        help="comma list of hf_eager,hf_compiled,ours,ours_compiled,ours_cached,ours_chunked "
                             "(default: hf_eager,hf_compiled,ours,ours_compiled on GPU, hf_eager,ours on CPU)")
    parser.add_argument("--packing", action="store_true",
                        help="our trainer packs sequences (batch.tokensPerMicroBatch; needs vlm_trainer.packing)")
    parser.add_argument("--cache-mib", type=int, default=0,
                        help="our trainer's data.cacheMiB (encoded-sample cache; the shard is read several times)")
    parser.add_argument("--workers", type=int, default=0,
                        help="our trainer's data.workers (sample preparation in worker processes; needs the "
                             "data issue's loader)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="result JSON path")
    args = parser.parse_args(argv)
    if args.packing and not packing_available():
        parser.error("--packing: vlm_trainer.packing is not available in this checkout (the data issue's "
                     "packing is not merged yet); run without --packing")
    if args.workers and "workers" not in DataSpec.model_fields:
        parser.error("--workers: spec.data.workers is not available in this checkout (the data issue's loader "
                     "is not merged yet); run without --workers")
    cuda = torch.cuda.is_available() and not args.cpu
    size = GPU if cuda else CPU
    args.micro = args.micro or 8
    args.repeats = args.repeats or (20 if cuda else 9)
    args.warmup = args.warmup or (5 if cuda else 2)
    args.samples = args.samples or (512 if cuda else 128)
    args.variants = args.variants or ("hf_eager,hf_compiled,ours,ours_compiled" if cuda else "hf_eager,ours")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    report: dict[str, Any] = {
        "mode": "gpu" if cuda else "cpu",
        "command": "python bench/vlm_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                                   f"{torch.get_num_threads()} threads)",
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "size": size.__dict__, "micro_batch": args.micro, "repeats": args.repeats, "warmup": args.warmup,
        "packing": args.packing, "workers": args.workers, "cache_mib": args.cache_mib, "scenarios": [],
    }
    out = Path(args.out) if args.out else RESULTS / f"vlm_speed_{report['mode']}.json"
    with tempfile.TemporaryDirectory(prefix="vlm-speed-") as tmp:
        root = Path(tmp)
        parts = build_parts(root, size)
        for stage_type in args.stages.split(","):
            for data in args.data.split(","):
                started = time.perf_counter()
                sc = scenario(root, size, stage_type, data == "mixed", parts, env, args)
                sc["wall_seconds"] = time.perf_counter() - started
                report["scenarios"].append(sc)
                print(json.dumps({k: v for k, v in sc.items() if k != "variants"}), flush=True)
                write_report(report, out)  # after each scenario: a time-out keeps what was measured
                gc.collect()  # the scenario's trainers and compiled graphs go before the next builds its own
                if cuda:
                    torch.cuda.empty_cache()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
