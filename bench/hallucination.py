"""The hallucination variant end to end: does preference alignment cut hallucination?

    python bench/hallucination.py [--dir DIR] [--seed 0] [--out bench/results]

Runs `vlmctl quickstart --variant hallucination` (data with a language prior, stage 0, align -> instruct,
on-policy pairs from the instruct model, the alignment stages, the held-out evaluation), times it and writes
`<out>/hallucination.json` (the variant's report.json plus the command, wall time and machine) and
`<out>/hallucination.md` (the table, beside the seed's 58% from LLaVA-RLHF). Not part of `make run`.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="working folder (default: a fresh temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    qdir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="halluc-"))
    cmd = [sys.executable, "-m", "vlm_operator.cli", "quickstart", "--variant", "hallucination", "--dir", qdir,
           "--seed", str(args.seed)]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    report_path = os.path.join(qdir, "storage", "hallucination", "report.json")
    if not os.path.exists(report_path):
        print(f"bench: no report at {report_path} (exit {rc})", file=sys.stderr)
        return rc or 2
    with open(report_path) as f:
        report = json.load(f)
    from vlm_quickstart.hallucination import report_markdown

    shown = f"vlmctl quickstart --variant hallucination --dir {qdir} --seed {args.seed}"
    meta = {
        "command": f"python bench/hallucination.py --seed {args.seed}",
        "runs": shown,
        "exit_code": rc,
        "wall_seconds": wall,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hallucination.json"), "w") as f:
        json.dump({"bench": meta, **report}, f, indent=2)
    md = [
        "# Does preference alignment cut hallucination? (the quickstart's hallucination variant)",
        "",
        f"Command: `{meta['command']}` (runs `{shown}`), {meta['when']}, {meta['cpus']} CPUs, "
        f"wall time {wall / 60:.1f} min (exit {rc}; load average at the end {meta['load_average_at_end'][0]:.1f}: "
        "the machine was shared).",
        "",
        report_markdown(report),
        "",
    ]
    with open(os.path.join(args.out, "hallucination.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return rc


if __name__ == "__main__":
    sys.exit(main())
