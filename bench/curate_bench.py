"""Curation throughput on CPU: samples/s per rank of the curate stage, without and with the CLIP filter.

Writes a raw set of shapes pairs (64 px PNG + caption, 4 shards), a tiny SigLIP dual encoder (the
quickstart's, briefly trained: throughput does not depend on its quality), then runs the curate stage
for real (`python -m vlm_trainer` under torchrun, 1 and 2 ranks) with the default filters (text, image,
exact and near dedup) and again with clipScore (+ SemDeDup) on the encoder. Reports the samples/s per rank
the stage itself measured (funnel.json's throughput: whole stage, and the per-shard analysis alone).

    PYTHONPATH=operator:trainer python bench/curate_bench.py --samples 2000 --out bench/results/issue11
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np


def write_raw(out_dir: str, samples: int, shards: int, seed: int = 0) -> list[str]:
    from PIL import Image
    from vlm_quickstart.shapes import draw_shape
    from vlm_quickstart.vocab import COLOURS, SHAPES, caption_of

    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    per = (samples + shards - 1) // shards
    for s in range(shards):
        path = os.path.join(out_dir, f"raw-{s:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(samples, (s + 1) * per)):
                colour, shape = COLOURS[int(rng.integers(4))], SHAPES[int(rng.integers(3))]
                im = draw_shape(rng, colour, shape, size=64)
                grid = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((64, 64))
                im = Image.fromarray(np.clip(np.asarray(im, np.float32) + (np.asarray(grid, np.float32)[..., None] - 128) * 0.6,
                                             0, 255).astype(np.uint8))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                for name, data in ((f"k{i:07d}.png", buf.getvalue()), (f"k{i:07d}.txt", caption_of(colour, shape).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def run(tmp: str, name: str, shards: list[str], ranks: int, encoder: str | None) -> dict:
    from vlm_core import contract, storage
    from vlm_core.spec import parse_job
    from vlm_operator import planner

    stage: dict = {"name": "curate", "type": "curate", "input": {"shards": shards}}
    if encoder is not None:
        stage["encoder"] = encoder
        stage["filters"] = {"clipScore": {"threshold": 0.2}, "semanticDedup": {"clusters": 8, "threshold": 0.99}}
    job = parse_job({"apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": name},
                     "spec": {"model": {"visionEncoder": "unused", "languageModel": "unused"},
                              "storage": {"uri": f"file://{tmp}/store"}, "stages": [stage]}})
    cfg = planner.resolve_stage(job, 0)
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg.dump(), f)
    env = {**os.environ, contract.METRICS_PORT_ENV: "off", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    "-m", "vlm_trainer", "--config", path], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    doc = storage.read_json(storage.join(cfg.output, contract.FINAL_DIR, contract.FUNNEL_FILE))
    return {"name": name, "ranks": ranks, "clip_filter": encoder is not None, "input": doc["input"], "kept": doc["kept"],
            "launch_wall_seconds": round(wall, 1), "per_rank": doc["throughput"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="bench/results/issue11")
    args = parser.parse_args()
    from vlm_quickstart.dual_encoder import train_dual_encoder
    from vlm_quickstart.shapes import make_samples

    results = []
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        shards = write_raw(os.path.join(tmp, "raw"), args.samples, args.shards)
        train = make_samples("train", 64, seed=0)
        encoder = os.path.join(tmp, "dual-encoder")
        train_dual_encoder(encoder, [s.image() for s in train], [s.caption for s in train], seed=0, steps=20)
        for ranks in args.ranks:
            for enc in (None, encoder):
                r = run(tmp, f"r{ranks}-{'clip' if enc else 'noclip'}", shards, ranks, enc)
                print(json.dumps(r), flush=True)
                results.append(r)
    os.makedirs(args.out, exist_ok=True)
    doc = {"command": " ".join(["python", *sys.argv]), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                                   "load_average_at_end": os.getloadavg()},
           "samples": args.samples, "shards": args.shards, "results": results}
    with open(os.path.join(args.out, "curate_bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    lines = [f"# Curation throughput on CPU ({args.samples} samples, {args.shards} shards, 64 px PNG)", "",
             f"Command: `PYTHONPATH=operator:trainer {doc['command']}`; {os.cpu_count()} CPUs, load average at the end "
             f"{doc['machine']['load_average_at_end'][0]:.1f} (a shared machine).", "",
             "| ranks | CLIP filter (+SemDeDup) | kept | samples/s per rank (whole stage) | samples/s per rank (analysis) | torchrun wall s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        whole = ", ".join(str(t["samples_per_second"]) for t in r["per_rank"])
        analysis = ", ".join(str(t["analyse_samples_per_second"]) for t in r["per_rank"])
        lines.append(f"| {r['ranks']} | {'yes' if r['clip_filter'] else 'no'} | {r['kept']}/{r['input']} | {whole} | "
                     f"{analysis} | {r['launch_wall_seconds']} |")
    with open(os.path.join(args.out, "curate_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
