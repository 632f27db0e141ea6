"""Benchmark (not a test): operator handoff latency and reconcile throughput with many jobs.

Runs the real operator (Kopf, in-process) against the Kubernetes API emulator used by the integration
tests. An instant kubelet stands in for training: for each stage Job it commits the stage's final/
(through vlm_trainer.storage, on file://) and marks the Job Complete, so what is measured is the
operator's own overhead:

- handoff latency: stage k Job complete (its completionTime) -> stage k+1 Job created
  (its creationTimestamp), per handoff;
- makespan and throughput: N jobs x S stages from creation to all Succeeded; reconciles per second.

    .venv/bin/python bench/handoff_bench.py --jobs 50 --stages 3

Writes bench/results/operator.json and bench/results/operator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("VLM_OPERATOR_RESYNC_SECONDS", "5")

import aiohttp  # noqa: E402
from k8s_harness import CRD_RESOURCE, KubeAPI, OperatorRunner, use_kubeconfig, write_kubeconfig  # noqa: E402
from kmock import Server  # noqa: E402
from vlm_operator import reconcile  # noqa: E402
from vlm_trainer import contract, storage  # noqa: E402

NS = "bench"


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def job_doc(name: str, stages: int, uri: str) -> dict[str, Any]:
    kinds = [("align", "caption"), ("instruct", "conversation"), ("dpo", "preference")]
    return {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"visionEncoder": "v", "languageModel": "l"},
            "storage": {"uri": uri},
            "stages": [
                {
                    "name": f"s{i}-{kinds[i % 3][0]}",
                    "type": kinds[i % 3][0],
                    "data": {"shards": ["d.tar"], "format": kinds[i % 3][1]},
                    "maxSteps": 1,
                    "batch": {"globalSize": 8, "microSize": 8},
                }
                for i in range(stages)
            ],
        },
    }


async def instant_kubelet(http: aiohttp.ClientSession, stop: asyncio.Event, done_dir: str) -> None:
    """Completes every new stage Job at once, after committing the stage's final/ like a trainer."""
    seen: set[str] = set()
    payload = os.path.join(done_dir, "payload")
    os.makedirs(payload, exist_ok=True)
    with open(os.path.join(payload, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 1024)
    while not stop.is_set():
        async with http.get("apis/batch/v1/jobs") as r:
            jobs = (await r.json()).get("items", [])
        for j in jobs:
            uid = j["metadata"]["uid"]
            if uid in seen or (j.get("status") or {}).get("conditions"):
                continue
            seen.add(uid)
            cm_name = j["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
            async with http.get(f"api/v1/namespaces/{NS}/configmaps/{cm_name}") as r:
                config = json.loads((await r.json())["data"][contract.CONFIG_FILE])
            await asyncio.to_thread(
                storage.commit_dir,
                payload,
                storage.join(config["output"], contract.FINAL_DIR),
                step=1,
                stage=config["stage"]["name"],
            )
            now = datetime.now().astimezone().isoformat().replace("+00:00", "Z")
            status = {
                "status": {
                    "startTime": now,
                    "completionTime": now,
                    "succeeded": j["spec"]["completions"],
                    "conditions": [{"type": "Complete", "status": "True"}],
                }
            }
            async with http.patch(
                f"apis/batch/v1/namespaces/{NS}/jobs/{j['metadata']['name']}/status",
                data=json.dumps(status),
                headers={"Content-Type": "application/merge-patch+json"},
            ) as r:
                await r.read()
        await asyncio.sleep(0.02)


async def run(n_jobs: int, n_stages: int, timeout: float) -> dict[str, Any]:
    calls = {"n": 0}
    original = reconcile.reconcile

    def counting(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return original(*a, **kw)

    reconcile.reconcile = counting  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        async with KubeAPI() as api, Server(api) as server:
            with use_kubeconfig(write_kubeconfig(str(server.url), os.path.join(tmp, "kubeconfig"))):
                async with aiohttp.ClientSession(str(server.url)) as http:
                    operator = OperatorRunner()
                    await operator.start()
                    stop = asyncio.Event()
                    kubelet = asyncio.create_task(instant_kubelet(http, stop, tmp))
                    t0 = time.perf_counter()
                    for i in range(n_jobs):
                        doc = job_doc(f"job-{i:04d}", n_stages, f"file://{tmp}/store")
                        async with http.post(
                            f"apis/training.vlm.dev/v1alpha1/namespaces/{NS}/vlmtrainingjobs", json=doc
                        ) as r:
                            assert r.status in (200, 201), await r.text()
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        phases = [
                            ((o.get("status") or {}).get("phase")) for o in api.list_objects(CRD_RESOURCE, NS)
                        ]
                        if phases.count("Succeeded") == n_jobs:
                            break
                        await asyncio.sleep(0.05)
                    makespan = time.perf_counter() - t0
                    stop.set()
                    await kubelet
                    await operator.stop()
                    jobs = api.list_objects("batch/v1/jobs", NS)
                    succeeded = sum(
                        1
                        for o in api.list_objects(CRD_RESOURCE, NS)
                        if (o.get("status") or {}).get("phase") == "Succeeded"
                    )
    reconcile.reconcile = original  # type: ignore[assignment]

    by_key = {
        (
            j["metadata"]["labels"][contract.LABEL_JOB],
            int(j["metadata"]["labels"][contract.LABEL_STAGE_INDEX]),
        ): j
        for j in jobs
    }
    handoffs = []
    for (name, idx), j in by_key.items():
        prev = by_key.get((name, idx - 1))
        if prev is not None and (prev.get("status") or {}).get("completionTime"):
            handoffs.append(_ts(j["metadata"]["creationTimestamp"]) - _ts(prev["status"]["completionTime"]))
    handoffs.sort()

    def pct(p: float) -> float:
        return (
            round(handoffs[min(len(handoffs) - 1, int(p * len(handoffs)))], 4) if handoffs else float("nan")
        )

    return {
        "jobs": n_jobs,
        "stages_per_job": n_stages,
        "succeeded": succeeded,
        "stage_jobs_created": len(jobs),
        "duplicate_jobs": len(jobs) - n_jobs * n_stages,
        "makespan_seconds": round(makespan, 3),
        "stages_per_second": round(n_jobs * n_stages / makespan, 2),
        "reconciles": calls["n"],
        "reconciles_per_second": round(calls["n"] / makespan, 1),
        "handoffs": len(handoffs),
        "handoff_latency_seconds": {
            "p50": pct(0.5),
            "p90": pct(0.9),
            "p99": pct(0.99),
            "max": round(max(handoffs), 4) if handoffs else None,
            "mean": round(statistics.fmean(handoffs), 4) if handoffs else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kopf").setLevel(logging.ERROR)
    runs = [asyncio.run(run(n, args.stages, args.timeout)) for n in args.jobs]
    result = {
        "benchmark": "operator handoff latency and reconcile throughput (Kubernetes API emulator, instant kubelet)",
        "command": "python bench/handoff_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "resync_seconds": float(os.environ["VLM_OPERATOR_RESYNC_SECONDS"]),
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "operator.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Operator benchmark: handoff latency and reconcile throughput",
        "",
        f"`{result['command']}` on {result['machine']['cpus']} CPUs, Python {result['machine']['python']}; "
        "real Kopf operator against the kmock-based API emulator; an instant kubelet commits each stage's "
        "final/ (file://) and completes its Job, so the numbers are operator overhead only.",
        "",
        "| jobs | stages | succeeded | stage Jobs (dup) | makespan s | stages/s | reconciles/s | "
        "handoff p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        h = r["handoff_latency_seconds"]
        lines.append(
            f"| {r['jobs']} | {r['stages_per_job']} | {r['succeeded']} | {r['stage_jobs_created']} "
            f"({r['duplicate_jobs']}) | {r['makespan_seconds']} | {r['stages_per_second']} | "
            f"{r['reconciles_per_second']} | {h['p50']} | {h['p90']} | {h['p99']} | {h['max']} |"
        )
    with open(os.path.join(args.out, "operator.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
