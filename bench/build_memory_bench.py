"""Benchmark (not a test): host memory per rank while a stage's model is built, per strategy, before vs after
the memory-safe build (issue 8).

- before: every rank reads the full fp32 weights (what the trainer did until issue 8), then the strategy
  places them;
- after: only rank 0 reads them; ranks 1.. build the model on the meta device and receive their values
  (ddp, zero2: broadcast; fsdp: only their shards via set_model_state_dict(broadcast_from_rank0);
  zero3: zero.Init keeps only their partition).

Two sizes, built from transformers configs: ~20x the quickstart's model (the issue's size; LM hidden 384 x 4
layers, SigLIP hidden 256 x 4 layers, 9.5 M parameters, 36 MB fp32) and ~200x, where the weights dominate. Each (strategy, mode) runs as its own
`torchrun --nproc_per_node 2` (gloo, CPU), so the peak RSS (ru_maxrss) is that build's alone. Reported per
rank: RSS after imports, peak RSS during the build, RSS after it, and the parameter bytes the rank holds
(its "device" memory on CPU: full replica, FSDP shard or ZeRO-3 partition).

    PYTHONPATH=operator:trainer .venv/bin/python bench/build_memory_bench.py

Writes bench/results/build_memory.json and bench/results/build_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
MODES = ("before", "after")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(parts_json: str, strategy: str, mode: str) -> None:
    """One rank of one build (run under torchrun)."""
    import resource

    import torch.distributed as dist
    import transformers
    from vlm_core.spec import ModelSpec, StageSpec
    from vlm_trainer.model import apply_freezing, build_vlm, param_groups
    from vlm_trainer.optim import build_optimizer
    from vlm_trainer.parallel import dist_env, gather_objects, init_distributed, set_threads
    from vlm_trainer.strategies import build_strategy

    transformers.logging.set_verbosity_error()
    env = dist_env()
    set_threads(env)
    init_distributed(env)
    if strategy.startswith("zero"):
        import deepspeed  # noqa: F401 - imported before the baseline, like the trainer does on first use
    parts = json.loads(open(parts_json).read())
    model_spec = ModelSpec.model_validate({"visionEncoder": parts["vision"], "languageModel": parts["lm"],
                                           "imageSize": 32, "visionFeatureSelectStrategy": "full"})
    stage = StageSpec.model_validate({
        "name": "bench", "type": "instruct", "maxSteps": 1, "strategy": strategy, "precision": "fp32",
        "data": {"shards": ["unused.tar"], "format": "conversation"},
        "batch": {"globalSize": 2 * env.world_size, "microSize": 2}, "resources": {"procsPerNode": env.world_size},
    })
    # Baseline after everything but the weights: imports of the model classes, tokenizer, processor, config.
    build_vlm(model_spec, None, seed=0, materialize=False)
    baseline = rss_bytes()
    started = time.perf_counter()
    vlm = build_vlm(model_spec, None, seed=0, materialize=mode == "before" or env.is_main)
    apply_freezing(vlm.model, list(stage.trainable))
    strat = build_strategy(stage, env)
    strat.prepare(vlm.model, lambda m: build_optimizer(param_groups(m, stage), stage))
    seconds = time.perf_counter() - started
    held = 0
    for p in strat.module.parameters():
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
    row = {
        "rank": env.rank,
        "rss_after_imports_mb": baseline / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mb": rss_bytes() / 2**20,
        "param_bytes_held_mb": held / 2**20,
        "build_seconds": seconds,
    }
    rows = gather_objects(row, env)
    if env.is_main:
        total = sum(p.numel() for p in vlm.model.parameters()) if mode == "before" else None
        print("RESULT " + json.dumps({"strategy": strategy, "mode": mode, "ranks": rows, "params": total}), flush=True)
    dist.barrier()  # then exit: destroy_process_group() after the peer left hung in gloo here


SIZES = {
    # ~20x the quickstart's 0.44 M parameters (the size), and a larger one where weights dominate RSS.
    "20x": {"lm": {"hidden": 384, "layers": 4, "heads": 6, "mlp": 1024}, "vision": {"hidden": 256, "layers": 4}},
    "200x": {"lm": {"hidden": 1024, "layers": 6, "heads": 8, "mlp": 2816}, "vision": {"hidden": 512, "layers": 6}},
}


def build_parts(root: str, size: str) -> str:
    from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder

    tokenizer = build_tokenizer()
    lm = build_language_model(os.path.join(root, "lm"), tokenizer, **SIZES[size]["lm"])
    vision = build_vision_encoder(os.path.join(root, "vision"), image_size=32, patch=8, **SIZES[size]["vision"])
    path = os.path.join(root, "parts.json")
    with open(path, "w") as f:
        json.dump({"lm": lm, "vision": vision}, f)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("PARTS", "STRATEGY", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    lines = ["# Host memory per rank while the model is built (issue 8)", ""]
    everything = []
    for size in args.sizes:
        results = run_size(size)
        if results is None:
            return 1
        everything.append({"size": size, "results": results})
        lines += table(size, results)
    meta = {"command": "PYTHONPATH=operator:trainer .venv/bin/python bench/build_memory_bench.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines[1:1] = [f"Command: `{meta['command']}` ({meta['machine']}, {meta['date']}); 2 ranks (torchrun, gloo, "
                  "CPU). Growth = peak RSS during the build (ru_maxrss) minus RSS after imports, tokenizer, processor "
                  "and config (MB); held = parameter bytes the rank keeps (full replica, FSDP shard or ZeRO-3 "
                  "partition; optimizer state is allocated at the first step, not at build). Build seconds are "
                  "wall time on a machine shared with other work.", ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "build_memory.json"), "w") as f:
        json.dump({**meta, "sizes": everything}, f, indent=2)
    with open(os.path.join(args.out, "build_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def run_size(size: str) -> list[dict[str, Any]] | None:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vlm-build-bench-") as root:
        parts = build_parts(root, size)
        for strategy in STRATEGIES:
            for mode in MODES:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       os.path.abspath(__file__), "--worker", parts, strategy, mode]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return None
                results.append(json.loads(line[0][len("RESULT "):]))
                growth = [round(r["peak_rss_mb"] - r["rss_after_imports_mb"], 1) for r in results[-1]["ranks"]]
                print(size, strategy, mode, growth, flush=True)
    return results


def table(size: str, results: list[dict[str, Any]]) -> list[str]:
    params = next(r["params"] for r in results if r["params"])
    lines = [
        f"## {size} the quickstart: {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.0f} MB fp32)", "",
        "| strategy | mode | rank 0 growth | rank 1 growth | rank 0 held | rank 1 held | build s (rank 0) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        r0, r1 = sorted(r["ranks"], key=lambda x: x["rank"])
        lines.append(
            f"| {r['strategy']} | {r['mode']} | {r0['peak_rss_mb'] - r0['rss_after_imports_mb']:.1f} | "
            f"{r1['peak_rss_mb'] - r1['rss_after_imports_mb']:.1f} | {r0['param_bytes_held_mb']:.1f} | "
            f"{r1['param_bytes_held_mb']:.1f} | {r0['build_seconds']:.2f} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())
