"""Benchmark (not a test): a `reward` stage under every strategy (and LoRA), 2 ranks on CPU, tiny quickstart parts.

For each variant one job with a single reward stage (assembled from untrained tiny parts: this checks that the stage
runs, not how well it ranks; bench/reward_bench.py measures that) runs under `torchrun --nproc_per_node 2`; then its
final/ is loaded with `RewardModel.load` and the held-out pairs are scored: the loaded model must reproduce the
stage's own evaluation (pairwise accuracy exactly, mean margin within 1e-4), and the first training loss must be
log(1 + e^margin) (the zero-initialised head).

    .venv/bin/python bench/reward_strategies.py --out bench/results/reward/strategies.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "ddp": {},
    "ddp-lora": {"lora": {"rank": 4}, "trainable": ["projector", "language_model"]},
    "ddp-lm-frozen": {"trainable": ["projector"]},
    "fsdp": {"strategy": "fsdp"},
    "zero2": {"strategy": "zero2"},
    "zero3": {"strategy": "zero3"},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from vlm_core import contract, storage
    from vlm_core.spec import parse_job
    from vlm_operator.planner import resolve_stage
    from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
    from vlm_quickstart.shapes import read_shards, shard_paths, write_shards
    from vlm_trainer.reward_model import RewardModel

    root = tempfile.mkdtemp(prefix="reward-strategies-")
    tokenizer = build_tokenizer()
    lm = build_language_model(os.path.join(root, "lm"), tokenizer, hidden=64, layers=2, heads=4, mlp=128)
    vision = build_vision_encoder(os.path.join(root, "vision"), image_size=32, patch=8, hidden=32, layers=2)
    train = shard_paths(write_shards(os.path.join(root, "data"), "train", 64, seed=0, per_shard=16), "preference")
    heldout = shard_paths(write_shards(os.path.join(root, "data"), "heldout", 16, seed=0, per_shard=16), "preference")
    margin = 0.1
    results: dict[str, Any] = {}
    for name in args.variants:
        stage = {
            "name": "reward", "type": "reward",
            "data": {"shards": [f"file://{p}" for p in train], "evalShards": [f"file://{p}" for p in heldout],
                     "format": "preference", "maxLength": 64},
            "batch": {"globalSize": 8, "microSize": 2}, "maxSteps": args.steps, "precision": "fp32",
            "optimizer": {"lr": 1e-3}, "reward": {"margin": margin}, "resources": {"procsPerNode": 2},
            **VARIANTS[name],
        }
        job = parse_job({
            "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": f"rm-{name}"},
            "spec": {"model": {"visionEncoder": vision, "languageModel": lm, "imageSize": 32,
                               "visionFeatureSelectStrategy": "full"},
                     "storage": {"uri": f"file://{root}/storage"}, "stages": [stage]},
        })
        config = resolve_stage(job, 0)
        config_path = os.path.join(root, f"{name}.json")
        with open(config_path, "w") as f:
            f.write(json.dumps(config.dump()))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlm_trainer",
             "--config", config_path],
            env={**os.environ, "OMP_NUM_THREADS": "1", contract.METRICS_PORT_ENV: "0"}, capture_output=True, text=True,
            timeout=600,
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            results[name] = {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
            print(name, "FAILED", results[name]["error"][-1500:])
            continue
        report = storage.read_json(storage.join(config.output, contract.EVAL_FILE))
        rm = RewardModel.load(storage.join(config.output, contract.FINAL_DIR))
        rows = read_shards(heldout)
        items = [rm.encode(r["prompt"], r["chosen"], img) for _k, img, r in rows]
        items += [rm.encode(r["prompt"], r["rejected"], img) for _k, img, r in rows]
        scores = rm.score(rm.collate(items))
        chosen, rejected = scores[: len(rows)], scores[len(rows):]
        accuracy = float((chosen > rejected).float().mean())
        mean_margin = float((chosen - rejected).mean())
        checks = {
            "first_loss_is_log1p_exp_margin": abs(report["train_loss_first"] - math.log1p(math.exp(margin))) < 1e-4,
            "loaded_accuracy_equals_eval": abs(accuracy - report["reward_accuracy"]) < 1e-6,
            "loaded_margin_equals_eval": abs(mean_margin - report["reward_margin"]) < 1e-4,
            "head_trained": bool(torch.count_nonzero(rm.model.get_output_embeddings().weight) > 0),
        }
        results[name] = {
            "ok": all(checks.values()), "checks": checks, "wall_seconds": round(wall, 1),
            "train_loss_first": report["train_loss_first"], "train_loss_last": report["train_loss_last"],
            "eval_reward_accuracy": report["reward_accuracy"], "loaded_reward_accuracy": accuracy,
            "eval_reward_margin": report["reward_margin"], "loaded_reward_margin": mean_margin,
        }
        print(name, json.dumps(results[name]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"what": "reward stage per strategy, 2 ranks (gloo, CPU), tiny untrained parts, "
                           f"{args.steps} steps; final/ loaded with RewardModel", "command": " ".join(sys.argv),
                   "results": results}, f, indent=2)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
