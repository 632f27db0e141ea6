"""Benchmark (not a test): a `reward` stage after the quickstart's instruct stage, and its held-out pairwise accuracy.

Issue 22's "done" for the reward kind: held-out pairwise accuracy >= 0.9 on the quickstart's preference data, and
`final/` loads with the documented loader and scores a pair the right way round. This script

1. prepares the quickstart in `--dir` (`python -m vlm_quickstart prepare`; reused when already there);
2. writes `<dir>/reward-job.yaml`: the quickstart's job with its stages up to `instruct` (the same specs, so stages
   a `vlmctl quickstart` run already committed in that folder are reused) and one `reward` stage per variant on the
   quickstart's preference shards (the data its DPO stage reads); each variant is a job of its own, so every
   reward stage starts from instruct's final/;
3. runs each job with the local backend (`vlmctl run`, 2 ranks, torchrun);
4. loads each reward stage's final/ with `vlm_trainer.reward_model.RewardModel.load` and scores every held-out pair
   (chosen and rejected answer to one prompt about one image): pairwise accuracy (share with reward(chosen) >
   reward(rejected)), mean margin, accuracy per question kind, and checks the stage's own eval report agrees.

    .venv/bin/python bench/reward_bench.py --dir /tmp/qs-reward --out bench/results/reward/quickstart-seed0.json

Variants: `full` (ddp, projector + LM + head; the kind's defaults except lr), `lora` (LoRA adapters at lr 5e-4, head
fully trained as modules_to_save), `margin` (full with reward.margin 0.5). Stage names carry the step count, so runs
with other `--steps` sit beside each other in the same quickstart folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch
import yaml

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"lora": {"rank": 16, "alpha": 32}, "optimizer": {"lr": 5e-4}},  # LoRA wants a higher lr
    "margin": {"reward": {"margin": 0.5}},
}


def prepare(workdir: str, seed: int) -> dict[str, Any]:
    info_path = os.path.join(workdir, "quickstart.json")
    if not os.path.exists(info_path):
        subprocess.run([sys.executable, "-m", "vlm_quickstart", "prepare", "--dir", workdir, "--seed", str(seed)],
                       check=True)
    with open(info_path) as f:
        return json.load(f)


def reward_job(base: dict[str, Any], variant: str, steps: int, lr: float, margin_field: dict[str, Any]) -> dict[str, Any]:
    """The quickstart job up to instruct, then one reward stage built from the quickstart's dpo stage's data/batch."""
    doc = copy.deepcopy(base)
    stages = doc["spec"]["stages"]
    names = [s["name"] for s in stages]
    dpo = stages[names.index("dpo")]
    kept = stages[: names.index("instruct") + 1]
    stage = {
        "name": f"reward-{variant}-{steps}",
        "type": "reward",
        "data": dpo["data"],
        "batch": dpo["batch"],
        "maxSteps": steps,
        "optimizer": {"lr": lr},
        "schedule": dpo.get("schedule", {}),
        "precision": dpo.get("precision", "fp32"),
        "seed": dpo.get("seed", 0),
        "checkpoint": dpo.get("checkpoint", {}),
        "resources": dpo["resources"],
        **margin_field,
    }
    doc["spec"]["stages"] = [*kept, stage]
    return doc


def score_pairs(final_uri: str, heldout: list[str]) -> dict[str, Any]:
    from vlm_quickstart.shapes import read_shards
    from vlm_trainer.reward_model import RewardModel

    rm = RewardModel.load(final_uri)
    rows = read_shards(heldout)
    chosen, rejected, kinds = [], [], []
    for start in range(0, len(rows), 32):
        chunk = rows[start:start + 32]
        items = [rm.encode(r["prompt"], r["chosen"], img) for _k, img, r in chunk]
        items += [rm.encode(r["prompt"], r["rejected"], img) for _k, img, r in chunk]
        scores = rm.score(rm.collate(items))
        chosen += scores[: len(chunk)].tolist()
        rejected += scores[len(chunk):].tolist()
        for _k, _img, r in chunk:
            kinds.append("caption" if r["chosen"].count(" ") > 0 else
                         "colour" if r["chosen"] == r["colour"] else "shape")
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    by_kind: dict[str, dict[str, float]] = {}
    for k in sorted(set(kinds)):
        m = [x for x, kk in zip(margins, kinds, strict=True) if kk == k]
        by_kind[k] = {"pairs": len(m), "accuracy": sum(x > 0 for x in m) / len(m)}
    return {
        "pairs": len(margins),
        "pairwise_accuracy": sum(x > 0 for x in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "mean_chosen_reward": sum(chosen) / len(chosen),
        "mean_rejected_reward": sum(rejected) / len(rejected),
        "by_question_kind": by_kind,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="quickstart working folder (prepared here when missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="reward stage optimizer steps (global batch 64 pairs)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--variants", nargs="+", default=["full"], choices=sorted(VARIANTS))
    p.add_argument("--out", required=True, help="JSON result file")
    args = p.parse_args(argv)

    from vlm_core import storage
    from vlm_core.spec import parse_job
    from vlm_operator.planner import resolve_stage

    workdir = os.path.abspath(args.dir)
    info = prepare(workdir, args.seed)
    with open(info["job"]) as f:
        base = yaml.safe_load(f)
    results: dict[str, Any] = {}
    for variant in args.variants:
        doc = reward_job(base, variant, args.steps, args.lr, VARIANTS[variant])
        path = os.path.join(workdir, f"reward-job-{variant}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vlm_operator.cli", "run", path], check=True)
        wall = time.perf_counter() - started
        job = parse_job(doc)
        config = resolve_stage(job, len(doc["spec"]["stages"]) - 1)
        report = storage.read_json(storage.join(config.output, "eval.json"))
        scored = score_pairs(storage.join(config.output, "final"), info["heldout_shards"]["preference"])
        results[variant] = {
            "stage": {k: report.get(k) for k in ("steps", "train_loss_first", "train_loss_last", "eval_loss",
                                                  "reward_accuracy", "reward_margin", "chosen_reward",
                                                  "rejected_reward", "wall_seconds")},
            "spec": doc["spec"]["stages"][-1] | {"data": "quickstart preference shards"},
            "loaded_final": scored,
            "run_wall_seconds": round(wall, 1),
        }
        print(json.dumps({variant: results[variant]["loaded_final"]}, indent=2))
    out = {
        "what": "reward stage after the quickstart's instruct stage; held-out pairwise accuracy of final/ loaded "
                "with vlm_trainer.reward_model.RewardModel",
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "seed": args.seed,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "target": {"pairwise_accuracy": ">= 0.9 (issue 22)"},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
