"""Near-duplicate thresholds from the data (`vlmctl curate calibrate`) vs the old hash-only rule, on two raw sets.

For each raw set: calibrate on the set itself (synthetic copies of a sample of its images vs their nearest
distinct neighbours), then run the curate stage in-process (the real `run_curate`, 1 rank, no encoder: the
CLIP-score filter is off, so shuffled-caption images stay in the pool and can only add look-alikes) twice:
- old: the quickstart's previous rule (dHash within 3 bits, first of each pair-chain kept, hash only);
- calibrated: pHash + dHash candidates within the recommended radius, confirmed by thumbnail cosine >= the
  recommended threshold, groups keep their first member.
Raw sets: the quickstart's (3000 clean training pairs + planted noise, `vlm_quickstart.noise`, seed 0) and the
web-style set of tests/integration/curate_web.py (another generator: jpg/txt/json, other drawing, perturbations
and captions) at several seeds.

    PYTHONPATH=operator:trainer:tests/integration python bench/curate_calibration.py --out bench/results/issue23
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any


def run_stage(tmp: str, name: str, shards: list[str], filters: dict[str, Any]) -> tuple[list[dict], dict, float]:
    from vlm_core import contract, storage
    from vlm_core.spec import parse_job
    from vlm_operator import planner
    from vlm_trainer.curate.runner import run_curate
    from vlm_trainer.parallel import dist_env

    stage = {"name": "curate", "type": "curate", "input": {"shards": shards}, "filters": filters}
    job = parse_job({"apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": name},
                     "spec": {"model": {"visionEncoder": "unused", "languageModel": "unused"},
                              "storage": {"uri": f"file://{tmp}/store"}, "stages": [stage]}})
    cfg = planner.resolve_stage(job, 0)
    os.environ.setdefault(contract.METRICS_PORT_ENV, "off")
    t0 = time.perf_counter()
    doc = run_curate(cfg, dist_env())
    seconds = time.perf_counter() - t0
    final = storage.join(cfg.output, contract.FINAL_DIR)
    decisions = [json.loads(x) for x in storage.read_text(storage.join(final, contract.DECISIONS_FILE)).splitlines() if x]
    return decisions, doc, seconds


def score_quickstart(decisions: list[dict], truth: dict[str, dict]) -> dict[str, Any]:
    by_key = {d["key"]: d for d in decisions}
    out: dict[str, Any] = {}
    for kind in ("exact_duplicate", "near_duplicate"):
        keys = [k for k, t in truth.items() if t["kind"] == kind]
        out[kind] = {"planted": len(keys), "removed_as_such": sum(by_key[k]["reason"] == kind for k in keys)}
    clean = [k for k, t in truth.items() if t["kind"] is None]
    out["clean"] = len(clean)
    out["clean_removed_as_near_duplicate"] = sum(by_key[k]["reason"] == "near_duplicate" for k in clean)
    out["clean_kept"] = sum(by_key[k]["kept"] for k in clean)
    groups: dict[str, list[str]] = {}
    for k, t in truth.items():
        if t["kind"] in ("exact_duplicate", "near_duplicate"):
            groups.setdefault(str(t["of"]), [str(t["of"])]).append(k)
    out["groups"] = len(groups)
    out["groups_exactly_one"] = sum(sum(by_key[k]["kept"] for k in g) == 1 for g in groups.values())
    return out


OLD = {"nearDedup": {"hashes": ["dhash"], "maxDistance": 3, "verify": None}}


def calibrated_filters(result: dict[str, Any]) -> dict[str, Any]:
    rec = result["recommended"]
    return {"nearDedup": {"hashes": result["hashes"], "maxDistance": rec["maxDistance"],
                          "verify": {"signal": "thumbnail", "minSimilarity": rec["minSimilarity"], "blur": rec["blur"]}}}


def recipe_filters() -> dict[str, Any]:
    from vlm_quickstart.prepare import Recipe

    r = Recipe()
    return {"nearDedup": {"hashes": list(r.near_dedup_hashes), "maxDistance": r.near_dedup_max_distance,
                          "verify": {"signal": "thumbnail", "minSimilarity": r.near_dedup_min_similarity,
                                     "blur": r.near_dedup_blur}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--web-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--web-clean", type=int, default=600)
    parser.add_argument("--web-groups", type=int, default=100)
    parser.add_argument("--quickstart-seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--web-sample", type=int, default=5000, help="web sets: every usable image (as the test)")
    parser.add_argument("--out", default="bench/results/issue23")
    args = parser.parse_args()
    from curate_web import score, write_web_set
    from vlm_quickstart.noise import write_raw_shards
    from vlm_quickstart.prepare import TRAIN_SAMPLES
    from vlm_quickstart.shapes import make_samples
    from vlm_trainer.curate import calibrate

    results: dict[str, Any] = {"quickstart": {}, "web": []}
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="curate-calibration-") as tmp:
        seed = args.quickstart_seed
        raw = write_raw_shards(os.path.join(tmp, "qs-raw"), make_samples("train", TRAIN_SAMPLES, seed=seed), seed)
        shards = [f"file://{p}" for p in raw.shards]
        t0 = time.perf_counter()
        pool = calibrate.read_pool(shards, 5000, ["phash", "dhash"])
        cal = calibrate.calibrate(pool, sample=args.sample, seed=0, suite="light")
        cal_seconds = time.perf_counter() - t0
        text = calibrate.report(cal)
        print(text, flush=True)
        with open(os.path.join(args.out, "calibrate-quickstart.txt"), "w") as f:
            f.write(f"$ vlmctl curate calibrate --suite light (quickstart raw set, seed {seed}; pool 5000, sample "
                    f"{args.sample})\n" + text)
        qs: dict[str, Any] = {"calibration": {k: cal[k] for k in ("pool", "sample", "recommended", "recall",
                                                                  "false_positive_rate")},
                              "calibrate_seconds": round(cal_seconds, 1)}
        for name, filters in (("old", OLD), ("calibrated", calibrated_filters(cal)), ("recipe", recipe_filters())):
            decisions, doc, seconds = run_stage(tmp, f"qs-{name}", shards, filters)
            qs[name] = {"filters": filters, **score_quickstart(decisions, raw.truth), "stage_seconds": round(seconds, 1),
                        "near_dedup_groups": doc["filters"][5].get("groups")}
            print(name, json.dumps(qs[name]), flush=True)
        results["quickstart"] = qs
        for s in args.web_seeds:
            web = write_web_set(os.path.join(tmp, f"web-{s}"), clean=args.web_clean, groups=args.web_groups, seed=s)
            shards = [f"file://{p}" for p in web.shards]
            pool = calibrate.read_pool(shards, 5000, ["phash", "dhash"])
            cal = calibrate.calibrate(pool, sample=args.web_sample, seed=s)
            if s == args.web_seeds[0]:
                with open(os.path.join(args.out, "calibrate-web.txt"), "w") as f:
                    f.write(f"$ vlmctl curate calibrate (curate_web set, seed {s}; pool 5000, sample {args.web_sample})\n"
                            + calibrate.report(cal))
            row: dict[str, Any] = {"seed": s, "samples": len(web.order), "calibration": cal["recommended"]}
            for name, filters in (("old", OLD), ("calibrated", calibrated_filters(cal))):
                decisions, doc, seconds = run_stage(tmp, f"web{s}-{name}", shards, filters)
                row[name] = {**score(decisions, web), "stage_seconds": round(seconds, 1),
                             "near_dedup_groups": doc["filters"][5].get("groups")}
            print(json.dumps(row), flush=True)
            results["web"].append(row)
    results["command"] = " ".join(["python", *sys.argv])
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_end": os.getloadavg()}
    with open(os.path.join(args.out, "curate_calibration.json"), "w") as f:
        json.dump(results, f, indent=2)
    qs = results["quickstart"]
    lines = ["# Near-duplicate thresholds from the data vs the old hash-only rule", "",
             f"Command: `PYTHONPATH=operator:trainer:tests/integration {results['command']}` ({os.cpu_count()} CPUs). "
             "The curate stage runs in-process without an encoder (CLIP-score filter off, so the shuffled-caption "
             "images stay in the pool).", "",
             f"## Quickstart raw set (seed {args.quickstart_seed}: {qs['old']['clean']} clean pairs, "
             f"{qs['old']['near_duplicate']['planted']} near and {qs['old']['exact_duplicate']['planted']} exact copies)", "",
             f"Calibration (`--suite light`) recommends maxDistance {qs['calibration']['recommended']['maxDistance']}, minSimilarity "
             f"{qs['calibration']['recommended']['minSimilarity']} (synthetic copies found {qs['calibration']['recall']:.3f}, "
             f"distinct neighbours confirmed {qs['calibration']['false_positive_rate']:.3f}); table: "
             "[calibrate-quickstart.txt](calibrate-quickstart.txt). `recipe` is what the quickstart runs: the "
             "calibrated radius and blur, the threshold measured on its planted copies (see prepare.Recipe).", "",
             "| rule | near copies removed | exact copies removed | clean removed as near duplicate | clean kept | "
             "groups with exactly one kept |", "|---|---|---|---|---|---|"]
    for name in ("old", "calibrated", "recipe"):
        r = qs[name]
        lines.append(f"| {name} | {r['near_duplicate']['removed_as_such']}/{r['near_duplicate']['planted']} | "
                     f"{r['exact_duplicate']['removed_as_such']}/{r['exact_duplicate']['planted']} | "
                     f"{r['clean_removed_as_near_duplicate']} | {r['clean_kept']}/{r['clean']} | "
                     f"{r['groups_exactly_one']}/{r['groups']} |")
    lines += ["", "## Web-style raw set (tests/integration/curate_web.py; jpg/txt/json, another generator)", "",
              "| seed | samples | calibrated (radius, min cosine) | rule | near copies removed | exact removed | "
              "junk/decode/size/aspect removed | clean kept | groups with exactly one kept |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in results["web"]:
        for name in ("old", "calibrated"):
            r = row[name]
            other = "/".join(f"{r['removed'][k]:.2f}" for k in ("text", "image_decode", "image_size", "aspect_ratio"))
            lines.append(f"| {row['seed']} | {row['samples']} | {row['calibration']['maxDistance']}, "
                         f"{row['calibration']['minSimilarity']} | {name} | {r['removed']['near_duplicate']:.3f} | "
                         f"{r['removed']['exact_duplicate']:.3f} | {other} | {r['clean_kept']:.3f} | "
                         f"{r['groups_exactly_one']:.3f} |")
    with open(os.path.join(args.out, "curate_calibration.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
