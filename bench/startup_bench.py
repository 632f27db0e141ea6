"""Stage start-up, measured: time from `vlmctl run` launching a stage to the stage's first step, per phase.

A tiny two-stage job (align, instruct; 1 step each, one process) runs through `vlmctl run` (TorchX ->
torchrun -> `python -m vlm_trainer`). Per stage, from wall-clock stamps:
- launch: vlmctl writes the stage's config.json;
- process_start: the trainer process starts (TorchX + torchrun agent start-up before it);
- build_start: the trainer's imports are done (`Trainer.build` begins);
- built: model, strategy, optimizer, data stream ready;
- first_step_done; committed: final/manifest.json written (eval + final/); then the next stage's launch
  (or vlmctl's exit): teardown.
Also the bare import costs (`import torch`, `import vlm_trainer.trainer`) in fresh interpreters.

    PYTHONPATH=operator:trainer python bench/startup_bench.py [--label before|after] [--repeats 2]

Appends to bench/results/issue14/startup.json (one record per run) and prints the table. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "issue14"
PY = sys.executable


def tiny_job(root: Path) -> str:
    sys.path.insert(0, str(ROOT.parent / "tests" / "integration"))
    from tiny_parts import build_parts, job_file

    parts = build_parts(root)
    path = Path(job_file(root / "job.yaml", "startup", parts, root / "store", steps=1, every=1))
    doc = yaml.safe_load(path.read_text())
    align = doc["spec"]["stages"][0]
    align.update(resources={"procsPerNode": 1}, batch={"globalSize": 2, "microSize": 2})
    instruct = copy.deepcopy(align)
    instruct.update(name="instruct", type="instruct")
    doc["spec"]["stages"].append(instruct)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def import_seconds(code: str) -> float:
    started = time.time()
    subprocess.run([PY, "-c", code], check=True, env=os.environ.copy())
    return time.time() - started


def one_run(job: str, store: Path) -> dict[str, Any]:
    started = time.time()
    subprocess.run([PY, "-m", "vlm_operator.cli", "run", job], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "VLM_METRICS_PORT": "off"})
    ended = time.time()
    stages = []
    for name in ("align", "instruct"):
        out = store / "startup" / name
        report = json.loads((out / "eval.json").read_text())
        stamps = report["startup"]
        stages.append({
            "stage": name,
            "launch": (out / "config.json").stat().st_mtime,
            **stamps,
            "committed": (out / "final" / "manifest.json").stat().st_mtime,
        })
    rows = []
    for i, s in enumerate(stages):
        next_launch = stages[i + 1]["launch"] if i + 1 < len(stages) else ended
        rows.append({
            "stage": s["stage"],
            "launcher_seconds": s["process_start"] - s["launch"],  # TorchX + torchrun agent until the trainer starts
            "imports_seconds": s["build_start"] - s["process_start"],  # interpreter + imports of the trainer
            "build_seconds": s["built"] - s["build_start"],
            "first_step_seconds": s["first_step_done"] - s["built"],
            "launch_to_first_step_seconds": s["first_step_done"] - s["launch"],
            "eval_and_final_seconds": s["committed"] - s["first_step_done"],
            "teardown_seconds": next_launch - s["committed"],  # process exit, torchrun/TorchX noticing, next plan
            "stage_wall_seconds": next_launch - s["launch"],
        })
    first_launch = stages[0]["launch"]
    return {"total_seconds": ended - started, "before_first_launch_seconds": first_launch - started, "stages": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    record: dict[str, Any] = {"label": args.label, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "command": "python bench/startup_bench.py " + " ".join(sys.argv[1:]),
                              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    record["import_torch_seconds"] = statistics.median(import_seconds("import torch") for _ in range(args.repeats))
    record["import_trainer_seconds"] = statistics.median(
        import_seconds("import vlm_trainer.trainer") for _ in range(args.repeats))
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="vlm-startup-") as tmp:
            root = Path(tmp)
            runs.append(one_run(tiny_job(root), root / "store"))
    record["runs"] = runs
    keys = [k for k in runs[0]["stages"][0] if k != "stage"]
    record["median"] = {
        name: {k: round(statistics.median(r["stages"][i][k] for r in runs), 2) for k in keys}
        for i, name in enumerate(("align", "instruct"))
    }
    record["median_total_seconds"] = round(statistics.median(r["total_seconds"] for r in runs), 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "startup.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(record)
    path.write_text(json.dumps(history, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("label", "import_torch_seconds", "import_trainer_seconds",
                                             "median", "median_total_seconds", "load_average")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
