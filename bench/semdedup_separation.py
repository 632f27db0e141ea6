"""What separates a planted semantic duplicate from clean data: cosines measured on held-out scenes.

The scenes, the re-renders (semantic duplicates: each object moved <= 2 px, resized <= 6%, re-coloured,
background re-lit; more than 6 perceptual-hash bits from the original, so near dedup misses them) and the
SLIP encoder are those of the curate integration test (tests/integration/curate_noise.py). For each
embedding, the cosine of every duplicate to its original vs every clean image's nearest clean neighbour:

- `pixels`: the 32x32 normalised pixels the encoders see (no model);
- `caption-only ViT`: the quickstart's dual encoder (`quickstart.dual_encoder.train_dual_encoder`: a patch-8
  SigLIP trained on the colour-shape captions), same scenes, same 150 steps;
- `SLIP one-patch`: the encoder the curate test trains (CLIP loss + SimCLR loss, one 32x32 patch).

Then the curate stage on the test's planted set with the SLIP encoder and the measured SemDeDup threshold:
removed per planted kind and clean kept.

    PYTHONPATH=operator:trainer:tests/integration python bench/semdedup_separation.py --out bench/results/issue11
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))


def separation(emb_clean, emb_copies, groups: int) -> dict[str, float]:
    sims = emb_clean @ emb_clean.T
    sims.fill_diagonal_(-2.0)
    nearest = sims.max(1).values
    dup = (emb_clean[:groups] * emb_copies).sum(1)
    q = lambda t, p: round(float(t.quantile(p)), 4)  # noqa: E731
    return {"duplicate_min": round(float(dup.min()), 4), "duplicate_p01": q(dup, 0.01), "duplicate_median": q(dup, 0.5),
            "clean_nearest_median": q(nearest, 0.5), "clean_nearest_p99": q(nearest, 0.99),
            "clean_nearest_max": round(float(nearest.max()), 4),
            "clean_at_or_above_duplicate_p01": round(float((nearest >= dup.quantile(0.01)).float().mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from curate_noise import (
        CLEAN_PAIRS,
        COLOURS,
        SHAPES,
        caption_of,
        random_scene,
        read_decisions,
        render,
        semantic_group,
        train_curation_encoder,
        write_noisy_set,
    )
    from test_curate_stage import KINDS, _config
    from vlm_core import contract, storage
    from vlm_quickstart.dual_encoder import train_dual_encoder
    from vlm_quickstart.pretrain import pixel_tensor
    from vlm_trainer.curate.embed import load_dual_encoder
    from vlm_trainer.curate.runner import run_curate
    from vlm_trainer.parallel import dist_env

    torch.set_num_threads(1)
    os.environ[contract.METRICS_PORT_ENV] = "off"
    tmp = tempfile.mkdtemp(prefix="semdedup-bench-")
    t0 = time.perf_counter()
    slip = train_curation_encoder(os.path.join(tmp, "slip"), seed=args.seed)
    slip_seconds = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed + 100)
    groups, clean = 60, 300
    made = [semantic_group(rng, 1) for _ in range(groups)]
    scenes = [random_scene(rng, *CLEAN_PAIRS[int(rng.integers(len(CLEAN_PAIRS)))]) for _ in range(clean - groups)]
    images = [im for _, im, _ in made] + [render(rng, sc) for sc in scenes]
    copies = [c[0] for _, _, c in made]
    rows = {}
    px, pc = pixel_tensor(images).flatten(1), pixel_tensor(copies).flatten(1)
    rows["pixels"] = separation(F.normalize(px, dim=-1), F.normalize(pc, dim=-1), groups)
    every = [(c, s) for c in COLOURS for s in SHAPES]
    train = [random_scene(rng, *every[int(rng.integers(len(every)))]) for _ in range(2000)]
    vit_dir = os.path.join(tmp, "caption-vit")
    train_dual_encoder(vit_dir, [render(rng, sc) for sc in train], [caption_of(sc.colour, sc.shape) for sc in train],
                       seed=args.seed, steps=150)
    for name, path in (("caption-only ViT (quickstart)", vit_dir), ("SLIP one-patch (curate test)", slip["encoder"])):
        enc = load_dual_encoder(path)
        rows[name] = separation(enc.embed_images(images), enc.embed_images(copies), groups)

    noisy = write_noisy_set(os.path.join(tmp, "raw"), seed=args.seed)
    cfg = _config(noisy.shards, f"file://{tmp}/store", "bench", slip)
    doc = run_curate(cfg, dist_env())
    dec = {d["key"]: d for d in read_decisions(storage.read_text(storage.join(cfg.output, "final", contract.DECISIONS_FILE)))}
    recall = {}
    for kind in KINDS:
        planted = [k for k, t in noisy.truth.items() if t == kind]
        recall[kind] = {"planted": len(planted), "removed_with_reason": sum(dec[k]["reason"] == kind for k in planted),
                        "reasons": dict(collections.Counter(str(dec[k]["reason"]) for k in planted))}
    clean_keys = [k for k, t in noisy.truth.items() if t is None]
    result = {
        "command": "PYTHONPATH=operator:trainer:tests/integration python bench/semdedup_separation.py --out " + args.out,
        "seed": args.seed, "machine": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "slip_encoder_seconds": round(slip_seconds, 1), "slip_clip": {k: slip[k] for k in ("threshold", "matched_kept",
                                                                                            "mismatched_removed")},
        "semdedup_threshold": slip["semdedup_threshold"], "slip_heldout_separation": slip["separation"],
        "separation": rows, "curate": {"input": doc["input"], "kept": doc["kept"], "recall": recall,
                                       "clean": len(clean_keys), "clean_kept": sum(dec[k]["kept"] for k in clean_keys),
                                       "groups": len(noisy.groups),
                                       "groups_with_one_kept": sum(sum(dec[k]["kept"] for k in g) == 1
                                                                   for g in noisy.groups)},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "semdedup_separation.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    lines = ["# What separates a planted semantic duplicate from clean data (cosine, held-out scenes)", "",
             f"Command: `{result['command']}`; seed {args.seed}; {os.cpu_count()} CPUs, load average at the end "
             f"{os.getloadavg()[0]:.1f}.", "",
             f"{groups} duplicate pairs (re-renders > 6 phash bits from the original), {clean} clean scenes.", "",
             "| embedding | duplicate cos: min / p01 / median | clean nearest-neighbour cos: median / p99 / max "
             "| clean at or above the duplicates' p01 |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['duplicate_min']} / {r['duplicate_p01']} / {r['duplicate_median']} | "
                     f"{r['clean_nearest_median']} / {r['clean_nearest_p99']} / {r['clean_nearest_max']} | "
                     f"{r['clean_at_or_above_duplicate_p01']:.3f} |")
    c = result["curate"]
    lines += ["", f"SemDeDup threshold picked by the test (halfway between its own held-out duplicate p01 and clean "
              f"p99): {slip['semdedup_threshold']}; SLIP encoder trained in {slip_seconds:.1f} s.", "",
              f"Curate stage on the test's planted set ({c['input']} samples -> {c['kept']} kept): clean kept "
              f"{c['clean_kept']}/{c['clean']}, duplicate groups with exactly one kept {c['groups_with_one_kept']}/"
              f"{c['groups']}.", "", "| planted kind | removed with its reason | all reasons |", "|---|---|---|"]
    for kind, r in recall.items():
        lines.append(f"| {kind} | {r['removed_with_reason']}/{r['planted']} | {r['reasons']} |")
    with open(os.path.join(args.out, "semdedup_separation.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
