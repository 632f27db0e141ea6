"""Throughput of `vlmctl data import` (issue 21), CPU.

    python bench/import_bench.py [--records 4000] [--images 400] [--size 336] [--workers 1 2]
                                 [--parquet-rows 2000] [--out bench/results/issue21/import.json]

LLaVA JSON: `--records` LLaVA-style records over `--images` distinct JPEG files of `--size` x `--size` pixels
(photo-like noise, ~quality 90: decoding them is the work, as in real data), planted faults as in the tests
(3 missing, 1 corrupt, 1 text-only), local image root, local output, 256 MiB shards. Parquet: `--parquet-rows`
HF-style rows with the same JPEGs embedded. Each is imported once per `--workers` entry per round
(`--repeats` rounds, worker counts alternating; the median is reported) into a fresh output; records/s = records / wall seconds of `run_import` (reading, decoding every image once with PIL,
writing the shards and their commit), on this machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))


def _jpeg(rng: random.Random, size: int) -> bytes:
    from PIL import Image

    small = Image.frombytes("RGB", (size // 8, size // 8), rng.randbytes(3 * (size // 8) ** 2))
    buf = io.BytesIO()
    small.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(root: Path, records: int, images: int, size: int, parquet_rows: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    datas = [_jpeg(rng, size) for _ in range(images)]
    for i, d in enumerate(datas):
        (root / "images" / f"{i:06d}.jpg").write_bytes(d)
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    recs: list[dict[str, Any]] = [{
        "id": f"r{i}", "image": f"{i % images:06d}.jpg",
        "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                          {"from": "gpt", "value": "A noisy picture of colours " * 4}],
    } for i in range(records)]
    for i in (5, 17, 300):
        recs[i]["image"] = f"missing-{i}.jpg"
    recs[42]["image"] = "corrupt.jpg"
    del recs[99]["image"]
    (root / "llava.json").write_text(json.dumps(recs))
    rows = [{"images": [{"bytes": datas[i % images], "path": None}],
             "messages": [{"role": "user", "content": "<image>\nWhat is shown?"},
                          {"role": "assistant", "content": "Colours."}]} for i in range(parquet_rows)]
    pq.write_table(pa.Table.from_pylist(rows), root / "hf.parquet", row_group_size=256)
    return {"image_bytes_mean": sum(map(len, datas)) // len(datas)}


def main() -> None:
    from vlm_core.dataimport import ImportSettings, run_import

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--parquet-rows", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the worker counts alternate within a round")
    ap.add_argument("--out", default="bench/results/issue21/import.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="import-bench-"))
    try:
        facts = build(root, args.records, args.images, args.size, args.parquet_rows)
        runs = []
        for rnd in range(args.repeats):
            for name, inputs, image_root in (("llava-json", [str(root / "llava.json")], str(root / "images")),
                                             ("hf-parquet", [str(root / "hf.parquet")], None)):
                for w in args.workers:
                    out = root / f"out-{name}-{w}"
                    load = os.getloadavg()[0]
                    started = time.perf_counter()
                    s = run_import(ImportSettings(inputs, str(out), image_root=image_root, workers=w))
                    wall = time.perf_counter() - started
                    runs.append({"round": rnd, "input": name, "workers": w, "records": s.records, "samples": s.samples,
                                 "skipped": s.skipped, "seconds": round(wall, 2),
                                 "records_per_s": round(s.records / wall, 1), "mb_written": round(s.bytes / 1e6, 1),
                                 "load_avg_1m_before": round(load, 2)})
                    print(json.dumps(runs[-1]), flush=True)
                    shutil.rmtree(out)
        medians = {}
        for name in ("llava-json", "hf-parquet"):
            for w in args.workers:
                rates = sorted(r["records_per_s"] for r in runs if r["input"] == name and r["workers"] == w)
                medians[f"{name} workers={w}"] = rates[len(rates) // 2]
        print(json.dumps({"median_records_per_s": medians}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "settings": {**vars(args), **facts}, "median_records_per_s": medians, "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
