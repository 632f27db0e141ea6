"""Does the `rl` stage learn? GRPO and PPO, 2 ranks on CPU (torchrun, gloo), tiny untrained quickstart parts.

The task is one a random policy rarely solves and a policy can learn without seeing the image: the response
must START with a colour word (regex verifier `^\\s*(red|green|blue|yellow)\\b`; 4 of the ~45 words, so a
random first token scores ~0.1). Each algorithm runs `--steps` optimizer steps; the step events give the mean
reward, KL to the reference (per-token k3), entropy, response length and clip fraction per step. Written to
bench/results/issue22/rl_bench.json and .md: mean reward over the first and the last quarter of the steps,
and the largest per-token KL seen.

    python bench/rl_bench.py --steps 24 --out bench/results/issue22
    python bench/rl_bench.py --steps 24 --lora 8 --out bench/results/issue22/lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlm_core import contract
from vlm_core.spec import parse_job
from vlm_operator.planner import resolve_stage
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_quickstart.shapes import shard_paths, write_shards

COLOUR_FIRST = r"^\s*(red|green|blue|yellow)\b"


def job(root: Path, algorithm: str, steps: int, lr: float, beta: float, lora: int = 0) -> dict:
    tokenizer = build_tokenizer()
    lm = build_language_model(str(root / "lm"), tokenizer, hidden=32, layers=1, heads=2, mlp=64)
    vision = build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=1)
    train = write_shards(str(root / "data"), "train", 256, seed=0, per_shard=128)
    return {
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": algorithm},
        "spec": {
            "model": {"visionEncoder": vision, "languageModel": lm, "imageSize": 32,
                      "visionFeatureSelectStrategy": "full"},
            "storage": {"uri": f"file://{root}/storage"},
            "stages": [{
                "name": "rl", "type": "rl", "maxSteps": steps, "precision": "fp32",
                "data": {"shards": [f"file://{p}" for p in shard_paths(train, "conversation")],
                         "format": "conversation", "maxLength": 64},
                "batch": {"globalSize": 8, "microSize": 2}, "resources": {"procsPerNode": 2},
                "optimizer": {"lr": lr}, "schedule": {"type": "constant", "warmupRatio": 0.0},
                "checkpoint": {"everySteps": 1000},
                "rl": {"algorithm": algorithm, "groupSize": 4, "maxNewTokens": 4, "beta": beta,
                       "reward": {"verifier": "regex", "pattern": COLOUR_FIRST}},
                **({"lora": {"rank": lora}} if lora else {}),
            }],
        },
    }


def run(algorithm: str, steps: int, lr: float, beta: float, lora: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rl-bench-{algorithm}-") as tmp:
        root = Path(tmp)
        config = resolve_stage(parse_job(job(root, algorithm, steps, lr, beta, lora)), 0)
        path = root / "config.json"
        path.write_text(json.dumps(config.dump()))
        env = {**os.environ, "OMP_NUM_THREADS": "1", contract.METRICS_PORT_ENV: "off"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "vlm_trainer", "--config", str(path)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{algorithm} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    events = [e for e in map(contract.parse_event, proc.stdout.splitlines()) if e]
    steps_ = [e for e in events if e["event"] == contract.EVENT_STEP]
    q = max(1, len(steps_) // 4)
    first = sum(e["reward_mean"] for e in steps_[:q]) / q
    last = sum(e["reward_mean"] for e in steps_[-q:]) / q
    return {
        "algorithm": algorithm + (f" + LoRA r{lora}" if lora else ""), "steps": len(steps_), "lr": lr, "beta": beta, "wall_seconds": round(seconds, 1),
        "reward_mean_first_quarter": round(first, 4), "reward_mean_last_quarter": round(last, 4),
        "kl_max": max(e["kl"] for e in steps_), "kl_last": steps_[-1]["kl"],
        "per_step": [{k: e.get(k) for k in ("step", "loss", "reward_mean", "reward_std", "kl", "entropy",
                                             "response_length", "clip_fraction", "value_loss") if k in e}
                     for e in steps_],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--algorithms", default="grpo,ppo")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank (the "
                        "reference is the policy with its adapter disabled)")
    parser.add_argument("--out", default="bench/results/issue22")
    args = parser.parse_args()
    results = [run(a, args.steps, args.lr, args.beta, args.lora) for a in args.algorithms.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| algorithm | steps | mean reward, first quarter | mean reward, last quarter | max per-token KL | "
             "wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['algorithm']} | {r['steps']} | {r['reward_mean_first_quarter']} | "
              f"{r['reward_mean_last_quarter']} | {r['kl_max']:.4f} | {r['wall_seconds']} |" for r in results]
    (out / "rl_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
