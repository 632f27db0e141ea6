"""Loader and packing benchmarks (issue 10), CPU.

    python bench/loader_bench.py packing [--samples 256] [--out bench/results/issue10/packing.json]
        Real tokens/s of training steps (forward, backward, AdamW) on a quickstart-sized tiny Llava over the
        SAME mixed-length samples, padded micro-batches (microSize 8, padded to the longest) vs packed rows
        (tokensPerMicroBatch 1024, block-diagonal 4D mask), alternating in one process, 1 thread.

    python bench/loader_bench.py wait --dir /tmp/qs [--job job.yaml] [--stage align] [--steps 60] [--procs 2]
                                      [--workers 0 1:256 ...] [--out ...]
        A stage of a quickstart folder (prepared with `python -m vlm_quickstart prepare --dir DIR` if
        missing; a `fromStage` stage needs that curate stage committed, e.g. by an earlier `vlmctl quickstart`
        in DIR), run through the planner and torchrun (`--procs` ranks; the global batch of 64 kept by
        gradient accumulation) once per `W` or `W:MiB` entry (data.workers, data.cacheMiB); the stage report's
        data_wait_share (data-wait seconds / step seconds over all steps and ranks), wall time and median
        samples/s of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch


def packing_bench(samples: int, out: str) -> dict[str, Any]:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
    from vlm_trainer.objective import CausalLMObjective
    from vlm_trainer.packing import pack_row
    from vlm_trainer.samples import IGNORE_INDEX, Encoded, collate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, image_token, n_image, max_length = 64, 63, 16, 256
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_length),
        image_token_index=image_token, vision_feature_select_strategy="full", vision_feature_layer=-1,
        pad_token_id=0,
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    # Mixed lengths: text tokens log-normal (median ~40), clipped so image + text <= maxLength.
    gen = torch.Generator().manual_seed(1)
    items = []
    for _ in range(samples):
        n_text = int(min(max_length - n_image, max(8, torch.empty(1).log_normal_(3.7, 0.8, generator=gen).item())))
        text = torch.randint(1, vocab - 1, (n_text,), generator=gen).tolist()
        prompt = n_text // 3
        ids = [image_token] * n_image + text
        labels = [IGNORE_INDEX] * (n_image + prompt) + text[prompt:]
        items.append(Encoded(ids, labels, [torch.randn(3, 32, 32, generator=gen)]))
    lengths = [len(e.input_ids) for e in items]
    micro, capacity = 8, 1024
    padded = [collate(items[i : i + micro], 0) for i in range(0, len(items), micro)]
    rows, row, used = [], [], 0
    for e in items:  # the loader's rule: in order, a sample that does not fit opens the next row
        if row and used + len(e.input_ids) > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(e)
        used += len(e.input_ids)
    rows.append(row)
    packed = [pack_row(r, mode="mask") for r in rows]
    objective = CausalLMObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def epoch(batches: list[dict[str, torch.Tensor]]) -> float:
        started = time.perf_counter()
        for batch in batches:
            loss, _ = objective(model, batch)
            (loss / max(objective.count(batch), 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    epoch(padded[:2])
    epoch(packed[:2])  # warm-up
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(3):  # alternate, so machine load hits both alike
        times["padded"].append(epoch(padded))
        times["packed"].append(epoch(packed))
    real = sum(lengths)
    padded_slots = sum(int(b["input_ids"].numel()) for b in padded)
    packed_slots = len(packed) * capacity
    best = {k: min(v) for k, v in times.items()}
    result = {
        "command": f"python bench/loader_bench.py packing --samples {samples}",
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}, 1 thread",
        "samples": samples,
        "sample_tokens": {"min": min(lengths), "median": sorted(lengths)[len(lengths) // 2], "max": max(lengths),
                          "total": real},
        "padded": {"micro_batches": len(padded), "micro_size": micro, "efficiency": round(real / padded_slots, 4),
                   "seconds": [round(t, 3) for t in times["padded"]], "tokens_per_second": round(real / best["padded"], 1)},
        "packed": {"rows": len(packed), "tokens_per_micro_batch": capacity,
                   "efficiency": round(real / packed_slots, 4),
                   "seconds": [round(t, 3) for t in times["packed"]], "tokens_per_second": round(real / best["packed"], 1)},
        "speedup_packed_over_padded": round(best["padded"] / best["packed"], 3),
    }
    _write(out, result)
    return result


def wait_bench(
    work_dir: str, steps: int, procs: int, runs: list[str], out: str, job_file: str = "job.yaml", stage_name: str = "align"
) -> dict[str, Any]:
    import yaml
    from vlm_core.spec import parse_job
    from vlm_operator.planner import resolve_stage

    if not os.path.exists(os.path.join(work_dir, "job.yaml")):
        subprocess.run([sys.executable, "-m", "vlm_quickstart", "prepare", "--dir", work_dir], check=True)
    doc = yaml.safe_load(open(os.path.join(work_dir, job_file)))
    result: dict[str, Any] = {
        "command": f"python bench/loader_bench.py wait --dir {work_dir} --job {job_file} --stage {stage_name} "
                   f"--steps {steps} --procs {procs} --workers {' '.join(runs)} --out {out}",
        "stage": f"quickstart {job_file} {stage_name} ({procs} torchrun rank(s), 1 thread each, global batch 64)",
        "steps": steps,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, shared with other sessions' processes",
        "runs": {},
    }
    index = [s["name"] for s in doc["spec"]["stages"]].index(stage_name)
    for run in runs:
        workers, _, cache = run.partition(":")
        run_doc = json.loads(json.dumps(doc))
        run_doc["metadata"]["name"] = f"waitbench-w{workers}-c{cache or 0}-{int(time.time())}"
        stage = run_doc["spec"]["stages"][index]
        stage["maxSteps"] = steps
        stage["data"]["workers"] = int(workers)
        stage["data"]["cacheMiB"] = int(cache or 0)
        stage["data"]["evalShards"] = []
        stage["checkpoint"]["everySteps"] = steps + 1
        stage["resources"]["procsPerNode"] = procs
        job = parse_job(run_doc)
        resolved = resolve_stage(job, index)
        # Inputs (curated shards, the previous stage's final/) are the quickstart job's own, already in DIR;
        # only the output is this run's.
        dumped = json.loads(json.dumps(resolved.dump()).replace(
            f"/{run_doc['metadata']['name']}/", f"/{doc['metadata']['name']}/"))
        dumped["output"] = resolved.output
        config_path = os.path.join(work_dir, f"waitbench-{run.replace(':', '-')}.json")
        with open(config_path, "w") as f:
            json.dump(dumped, f)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VLM_METRICS_PORT": "0"}
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "vlm_trainer",
             "--config", config_path], env=env, capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        output = resolved.output.removeprefix("file://")
        report = json.load(open(output + "/eval.json"))
        data, startup = report["data"], report["startup"]
        # steps 2..N (no eval runs): from the first step's end to the report (build start + wall seconds)
        train_seconds = startup["build_start"] + report["wall_seconds"] - startup["first_step_done"]
        name = f"workers={workers}" + (f",cacheMiB={cache}" if cache else "")
        result["runs"][name] = {"data_wait_share": data["data_wait_share"],
                                "stage_wall_seconds": round(time.perf_counter() - started, 1),
                                "train_loss_last": report["train_loss_last"],
                                "samples_per_second_after_step_1": round((steps - 1) * 64 / train_seconds, 1),
                                "load_average_1min_after": round(os.getloadavg()[0], 2)}
        print(name, result["runs"][name], flush=True)
    _write(out, result)
    return result


def _write(path: str, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("packing")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--out", default="bench/results/issue10/packing.json")
    w = sub.add_parser("wait")
    w.add_argument("--dir", required=True)
    w.add_argument("--steps", type=int, default=60)
    w.add_argument("--procs", type=int, default=2)
    w.add_argument("--workers", nargs="+", default=["0", "1:256"], help="W or W:cacheMiB per run")
    w.add_argument("--job", default="job.yaml")
    w.add_argument("--stage", default="align")
    w.add_argument("--out", default="bench/results/issue10/data_wait.json")
    args = parser.parse_args()
    if args.command == "packing":
        packing_bench(args.samples, args.out)
    else:
        wait_bench(args.dir, args.steps, args.procs, args.workers, args.out, args.job, args.stage)


if __name__ == "__main__":
    main()
