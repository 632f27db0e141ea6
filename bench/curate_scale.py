"""The curate stage's decision step at scale: synthetic records, 1 and 2 ranks (torchrun, gloo).

No images: each rank generates its own rows of a synthetic analysed set (vlm_trainer/curate/synthetic.py: 64-bit
phash, 128-bit pixel hash, CLIP score, a `--dim`-d float16 image embedding, planted exact / near / semantic
duplicate groups), then runs the stage's own global decisions (`curate.scale.decide_columns`, the code the
stage runs after its per-shard analysis) over torch.distributed: CLIP keepTopFraction (distributed
selection), exact dedup, near dedup (banded candidates, embedding-cosine confirmation, groups), and SemDeDup
(distributed k-means, clusters to ranks) up to `--semantic-max` samples. Per rank it records the decision's
wall time, the resident memory before it and the peak during it (sampled every 5 ms from /proc), and a
digest of the decisions (equal for 1 and 2 ranks: the decisions do not depend on the number of ranks).

    flock /tmp/vlm-it.lock env PYTHONPATH=operator:trainer python bench/curate_scale.py \\
        --sizes 100000 1000000 10000000 --ranks 1 2 --out bench/results/curate_scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

NEAR_MIN_COSINE = 0.9
CLIP_KEEP = 0.9
SEM_THRESHOLD, SEM_PER_CLUSTER, KMEANS_ITERATIONS = 0.95, 2000, 10
BLOCK = 10_000  # samples per synthetic input shard (dealt round-robin to ranks)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The largest resident set size seen while running (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from vlm_core.spec import CurateFiltersSpec
    from vlm_trainer.curate import synthetic
    from vlm_trainer.curate.exchange import Solo, TorchExchange
    from vlm_trainer.curate.scale import CODE, NearParams, decide_columns, splitmix
    from vlm_trainer.parallel import barrier, dist_env, init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    env = dist_env()
    init_distributed(env)
    ex = TorchExchange(env.rank, env.world_size) if env.distributed else Solo()
    t0 = time.perf_counter()
    gids = synthetic.rank_gids(args.samples, env.rank, env.world_size, BLOCK)
    cols = synthetic.columns(gids, seed=args.seed, dim=args.dim, dtype=np.float16)
    generate_s = time.perf_counter() - t0
    held = sum(a.nbytes for a in (cols.gid, cols.reason, cols.pixel, cols.hashes, cols.clip, cols.nsfw, cols.emb,
                                  cols.dup_of) if a is not None)
    semantic = args.samples <= args.semantic_max
    spec: dict = {"clipScore": {"keepTopFraction": CLIP_KEEP}, "nearDedup": {"maxDistance": args.radius}}
    if semantic:
        spec["semanticDedup"] = {"clusters": max(1, args.samples // SEM_PER_CLUSTER), "threshold": SEM_THRESHOLD}
    filters = CurateFiltersSpec.model_validate(spec)
    barrier(env)
    before = _rss()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        stats = decide_columns(cols, filters, ex, seed=args.seed, kmeans_iterations=KMEANS_ITERATIONS,
                               near=NearParams(args.radius, NEAR_MIN_COSINE, "embedding", keep_by_score=True))
        decide_s = time.perf_counter() - t0
        barrier(env)
        wall_s = time.perf_counter() - t0
    removed = {r: int(np.count_nonzero(cols.reason == c)) for r, c in CODE.items()}
    tag = splitmix(cols.gid * 16 + cols.reason.astype(np.int64), 7) ^ splitmix(cols.dup_of + 1, 8)
    local = [*removed.values(), int((tag >> np.uint64(40)).astype(np.int64).sum())]
    total = ex.all_sum(np.array(local, dtype=np.int64)).tolist()
    kind, root = synthetic.truth(cols.gid, args.seed)
    planted = {k: int(np.count_nonzero(kind == v)) for k, v in synthetic.KINDS.items()}
    out = {"n": args.samples, "world": env.world_size, "radius": args.radius, "rank": env.rank, "rows": int(gids.shape[0]),
           "dim": args.dim,
           "semantic_dedup": semantic, "generate_s": round(generate_s, 2), "decide_s": round(decide_s, 3),
           "wall_s": round(wall_s, 3), "held_bytes": held, "rss_before_bytes": before, "peak_rss_bytes": peak.peak,
           "stats": {k: v for k, v in stats.items() if k in ("near_dedup", "semantic_dedup", "seconds")},
           "removed_global": dict(zip(removed, total[:-1], strict=True)), "digest": total[-1],
           "planted_local": planted}
    with open(os.path.join(args.result_dir, f"rank{env.rank}.json"), "w") as fh:
        json.dump(out, fh)
    shutdown_distributed()


def run_one(n: int, ranks: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="curate-scale-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               os.path.abspath(__file__), "worker", "--samples", str(n), "--dim", str(args.dim), "--seed", str(args.seed),
               "--semantic-max", str(args.semantic_max), "--radius", str(args.radius), "--result-dir", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"n={n} ranks={ranks} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(ranks)]
        for r in rows:
            r["process_s"] = round(time.perf_counter() - t0, 1)
        return rows


def report(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| samples | ranks | near radius | decide wall (s) | per-rank decide (s) | held columns / rank (MiB) | "
             "RSS before / rank (MiB) | peak RSS during / rank (MiB) | semdedup | removed (exact/near/semantic/clip) | "
             "near candidates / confirmed / groups | rank 0 seconds per step | digest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, radius, world), group in _groups(rows):
        r0 = group[0]
        rem = r0["removed_global"]
        near = r0["stats"].get("near_dedup", {})
        lines.append(
            f"| {n:,} | {world} | {radius} | {max(g['wall_s'] for g in group):.1f} | "
            f"{_per(group, 'decide_s', 1, '.1f')} | "
            f"{_per(group, 'held_bytes', mib, '.0f')} | {_per(group, 'rss_before_bytes', mib, '.0f')} | "
            f"{_per(group, 'peak_rss_bytes', mib, '.0f')} | {'yes' if r0['semantic_dedup'] else 'no'} | "
            f"{rem['exact_duplicate']:,} / {rem['near_duplicate']:,} / {rem['semantic_duplicate']:,} / "
            f"{rem['clip_score']:,} | {near.get('candidates', 0):,} / {near.get('confirmed', 0):,} / "
            f"{near.get('groups', 0):,} | {_steps(r0)} | {r0['digest']} |")
    return "\n".join(lines) + "\n"


def _steps(row: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in row["stats"].get("seconds", {}).items()) or "-"


def _per(group: list[dict], key: str, scale: float, fmt: str) -> str:
    return " / ".join(format(g[key] / scale, fmt) for g in group)


def _groups(rows: list[dict]) -> list[tuple[tuple[int, int, int], list[dict]]]:
    keys = sorted({(r["semantic_dedup"], r["n"], r["radius"], r["world"]) for r in rows})
    return [(k[1:], sorted([r for r in rows if (r["semantic_dedup"], r["n"], r["radius"], r["world"]) == k],
                           key=lambda r: r["rank"])) for k in keys]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="driver", choices=["driver", "worker"])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--radius", type=int, default=2, help="near dedup candidate radius (radius + 1 bands of 64 bits)")
    p.add_argument("--semantic-max", type=int, default=1_000_000, help="run SemDeDup only up to this many samples")
    p.add_argument("--result-dir", default="")
    p.add_argument("--out", default="bench/results/curate_scale")
    args = p.parse_args()
    if args.mode == "worker":
        worker(args)
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    rows: list[dict] = json.load(open(path)) if os.path.exists(path) else []
    for n in args.sizes:
        for ranks in args.ranks:
            got = run_one(n, ranks, args)
            sem = n <= args.semantic_max
            rows = [r for r in rows if (r["n"], r["world"], r["radius"], r["semantic_dedup"]) != (n, ranks, args.radius, sem)]
            rows += got
            print(json.dumps([{k: g[k] for k in ("n", "world", "rank", "wall_s", "peak_rss_bytes", "digest")}
                              for g in got]), flush=True)
            with open(path, "w") as fh:
                json.dump(rows, fh, indent=1)
    meta = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other work), "
            f"python {platform.python_version()}; one thread per rank; embeddings {args.dim}-d float16; "
            f"near dedup: radius + 1 bands of the 64-bit hash, candidates confirmed by embedding cosine >= "
            f"{NEAR_MIN_COSINE}, groups keep the best CLIP score; "
            f"clip keepTopFraction {CLIP_KEEP}; SemDeDup {SEM_PER_CLUSTER} samples per cluster, threshold "
            f"{SEM_THRESHOLD}, <= {KMEANS_ITERATIONS} k-means iterations\n\n")
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(meta + report(rows))
    print(meta + report(rows))


if __name__ == "__main__":
    main()
