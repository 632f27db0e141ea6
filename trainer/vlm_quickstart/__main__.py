"""`python -m vlm_quickstart {prepare,pairs,evaluate} --dir DIR`: the quickstart's steps.

`vlmctl quickstart` runs `prepare`, then the job files through the local backend, then `evaluate`.
`--variant hallucination` (`vlm_quickstart.hallucination`) runs `pairs` between two of its job files.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_quickstart", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write data shards (clean + raw with planted noise), stage-0 checkpoints, job.yaml, raw.yaml and naive.yaml")
    prep.add_argument("--dir", required=True, help="working folder")
    prep.add_argument("--seed", type=int, default=0, help="seed of the data and stage-0 training")
    prep.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for stage-0 training (1 is robust on a shared machine)",
    )
    prep.add_argument(
        "--instruct",
        choices=["full", "zero2", "lora"],
        default="full",
        help="how the instruct stage trains: full (ddp), zero2 (DeepSpeed ZeRO-2) or lora (PEFT adapters)",
    )
    prep.add_argument(
        "--variant",
        choices=["default", "hallucination"],
        default="default",
        help="hallucination: data with a language prior the image must overpower, and on-policy preference pairs",
    )
    pairs = sub.add_parser("pairs", help="hallucination variant: on-policy preference pairs from the instruct model")
    pairs.add_argument("--dir", required=True, help="the folder `prepare --variant hallucination` wrote")
    pairs.add_argument("--threads", type=int, default=1, help="torch threads")
    ev = sub.add_parser("evaluate", help="measure every stage on the held-out split; write report.json; exit 1 when a gating check is missed")
    ev.add_argument("--dir", required=True, help="the folder `prepare` wrote")
    ev.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars, per tiny file
    if args.command == "prepare" and args.variant == "hallucination":
        from vlm_quickstart import hallucination

        hallucination.prepare(args.dir, seed=args.seed)
        return 0
    if args.command == "prepare":
        from vlm_quickstart.prepare import Recipe, prepare

        prepare(args.dir, seed=args.seed, recipe=Recipe(instruct_variant=args.instruct))
        return 0
    if args.command == "pairs" or _variant(args.dir) == "hallucination":
        from vlm_quickstart import hallucination

        if args.command == "pairs":
            hallucination.build_pairs(args.dir)
            return 0
        return hallucination.evaluate(args.dir)
    from vlm_quickstart.evaluate import evaluate

    return evaluate(args.dir)


def _variant(qdir: str) -> str:
    """The variant `prepare` wrote into `qdir` (quickstart.json), "default" when it names none."""
    import json
    import os

    try:
        with open(os.path.join(qdir, "quickstart.json")) as f:
            return str(json.load(f).get("variant", "default"))
    except (OSError, ValueError):
        return "default"


if __name__ == "__main__":
    sys.exit(main())
