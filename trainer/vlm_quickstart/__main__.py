"""`python -m vlm_quickstart {prepare,evaluate} --dir DIR`: the quickstart's two halves.

`vlmctl quickstart` runs `prepare`, then the job files through the local backend, then `evaluate`.
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
    ev = sub.add_parser("evaluate", help="measure every stage on the held-out split; write report.json; exit 1 when a gating check is missed")
    ev.add_argument("--dir", required=True, help="the folder `prepare` wrote")
    ev.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars, per tiny file
    if args.command == "prepare":
        from vlm_quickstart.prepare import Recipe, prepare

        prepare(args.dir, seed=args.seed, recipe=Recipe(instruct_variant=args.instruct))
        return 0
    from vlm_quickstart.evaluate import evaluate

    return evaluate(args.dir)


if __name__ == "__main__":
    sys.exit(main())
