"""Benchmark (not a test): operator handoff latency, throughput and cost with many concurrent jobs.

Two processes: this one runs only the real operator (Kopf, the handlers of vlm_operator); a child
(`--serve`) runs the Kubernetes API emulator of the integration tests and an instant kubelet, which for
each stage Job commits the stage's final/ (vlm_core.storage, file://) and marks the Job Complete.
The emulator answers each request after a latency drawn uniformly from `--latency-ms` (default 5-10 ms,
a real API server's round trip; 0 turns it off), and the operator's API client runs with its deployed
rate limit (`VLM_OPERATOR_API_QPS`/`_BURST`, defaults 100/200). So what is measured is the operator's own
overhead at a realistic API round trip:

- handoff latency: stage k Job complete (its completionTime) -> stage k+1 Job created
  (its creationTimestamp), per handoff;
- makespan: N jobs x S stages, all created at once, until all Succeeded; reconciles per second
  (counted in the operator process);
- API requests per job, by verb and resource (the emulator counts what the operator's clients send);
- the operator process' CPU seconds and peak RSS.

    .venv/bin/python bench/handoff_bench.py --jobs 100 1000 5000 --stages 3

Writes bench/results/operator.json and bench/results/operator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("VLM_OPERATOR_RESYNC_SECONDS", "5")

import aiohttp  # noqa: E402
from k8s_harness import KubeAPI, OperatorRunner, use_kubeconfig, write_kubeconfig  # noqa: E402
from kmock import Server  # noqa: E402
from vlm_core import contract, storage  # noqa: E402

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
            "model": {"visionEncoder": f"{uri}/models/vision", "languageModel": f"{uri}/models/lm"},
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


def write_inputs(uri: str) -> None:
    """What the operator's preflight reads before a stage starts: the models' config.json and a tar shard
    (the instant kubelet's stages read none of it)."""
    vision = {"model_type": "siglip_vision_model", "image_size": 336, "patch_size": 42, "num_hidden_layers": 2}
    storage.write_json(f"{uri}/models/vision/config.json", vision)
    storage.write_json(f"{uri}/models/lm/config.json", {"model_type": "llama", "num_hidden_layers": 2})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("000000.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    fs, path = storage.filesystem(f"{uri}/d.tar")
    fs.pipe(path, buf.getvalue())


async def instant_kubelet(api: KubeAPI, http: aiohttp.ClientSession, stop: asyncio.Event, done_dir: str) -> None:
    """Completes every new stage Job at once, after committing the stage's final/ like a trainer. It
    follows the emulator's Job event log (like a watch), so its own cost does not grow with the number
    of Jobs and does not crowd out the API server it shares a process with."""
    seen: set[str] = set()
    payload = os.path.join(done_dir, "payload")
    os.makedirs(payload, exist_ok=True)
    with open(os.path.join(payload, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 1024)
    position = 0
    while not stop.is_set():
        logs = [events for res, events in api._log.items() if res.group == "batch" and res.plural == "jobs"]
        new = logs[0][position:] if logs else []
        position += len(new)
        for _rv, event in new:
            j = event["object"]
            uid = j["metadata"]["uid"]
            if event["type"] != "ADDED" or uid in seen or (j.get("status") or {}).get("conditions"):
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
                # like a trainer: stamp the fingerprint it was launched with (else the next stage sees a final/
                # of unknown provenance and the operator refuses to build on it)
                extra={"fingerprint": config["fingerprint"]} if config.get("fingerprint") else None,
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


class Succeeded:
    """VLMTrainingJobs whose status says Succeeded, followed on the emulator's event log (like a watch:
    its cost does not grow with the number of objects)."""

    def __init__(self, api: KubeAPI) -> None:
        self.api, self.position, self.names = api, 0, set()

    def __call__(self) -> int:
        logs = [events for res, events in self.api._log.items() if res.plural == "vlmtrainingjobs"]
        new = logs[0][self.position:] if logs else []
        self.position += len(new)
        for _rv, event in new:
            obj = event["object"]
            if event["type"] != "DELETED" and (obj.get("status") or {}).get("phase") == "Succeeded":
                self.names.add(obj["metadata"]["name"])
            else:
                self.names.discard(obj["metadata"]["name"])
        return len(self.names)


async def _create_all(http: aiohttp.ClientSession, docs: list[dict[str, Any]], parallel: int = 64) -> None:
    """POST every job at once (a burst; `parallel` requests in flight, as many clients would send)."""
    gate = asyncio.Semaphore(parallel)

    async def one(doc: dict[str, Any]) -> None:
        async with gate, http.post(f"apis/training.vlm.dev/v1alpha1/namespaces/{NS}/vlmtrainingjobs", json=doc) as r:
            assert r.status in (200, 201), await r.text()

    await asyncio.gather(*(one(d) for d in docs))


async def serve(n_jobs: int, n_stages: int, tmp: str, latency: tuple[float, float] | None) -> None:
    """The child: emulator + instant kubelet. Prints its URL, creates the jobs when the parent says
    `go`, prints `done` when all succeeded (or on `stop`), then one JSON line of measurements."""
    async with KubeAPI(latency=latency) as api, Server(api) as server:
        async with aiohttp.ClientSession(str(server.url)) as http:
            print(json.dumps({"url": str(server.url)}), flush=True)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            assert (await reader.readline()).strip() == b"go"
            api.operator_requests.clear()  # the operator's start-up (lists, watches) is counted apart
            stop = asyncio.Event()
            kubelet = asyncio.create_task(instant_kubelet(api, http, stop, tmp))
            write_inputs(f"file://{tmp}/store")
            profiler = None
            if os.environ.get("BENCH_PROFILE_EMULATOR"):  # a path: cProfile stats of this process' busy part
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            t0 = time.perf_counter()
            await _create_all(http, [job_doc(f"job-{i:04d}", n_stages, f"file://{tmp}/store") for i in range(n_jobs)])
            succeeded = Succeeded(api)
            stopper = asyncio.create_task(reader.readline())
            while not stopper.done():
                if succeeded() == n_jobs:
                    break
                await asyncio.sleep(0.2)
            makespan = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(os.environ["BENCH_PROFILE_EMULATOR"])
            print("done", flush=True)
            stop.set()
            await kubelet
            await asyncio.sleep(2.0)  # what the operator still sends once everything finished
            requests = dict(api.operator_requests)
            jobs = api.list_objects("batch/v1/jobs", NS)
            print(json.dumps({
                "makespan": makespan,
                "requests": [[*k, v] for k, v in requests.items()],
                "jobs": [
                    {
                        "name": j["metadata"]["name"],
                        "owner": j["metadata"]["labels"][contract.LABEL_JOB],
                        "index": int(j["metadata"]["labels"][contract.LABEL_STAGE_INDEX]),
                        "created": j["metadata"]["creationTimestamp"],
                        "completed": (j.get("status") or {}).get("completionTime"),
                    }
                    for j in jobs
                ],
                "succeeded": succeeded(),
            }), flush=True)
            stopper.cancel()


_reconciles = collections.Counter()


def count_reconciles() -> None:
    """Count the operator's reconciles (it no longer GETs the job per reconcile, so the API cannot)."""
    from vlm_operator import reconcile

    if getattr(reconcile.reconcile, "counted", False):
        return
    original = reconcile.reconcile

    def counted(*args: Any, **kwargs: Any) -> Any:
        _reconciles["n"] += 1
        return original(*args, **kwargs)

    counted.counted = True  # type: ignore[attr-defined]
    reconcile.reconcile = counted  # type: ignore[assignment]


async def run(n_jobs: int, n_stages: int, timeout: float, latency_ms: str) -> dict[str, Any]:
    """The parent: the operator alone in this process, against the child's emulator."""
    count_reconciles()
    _reconciles.clear()
    with tempfile.TemporaryDirectory() as tmp:
        child = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--serve", str(n_jobs), str(n_stages), tmp, latency_ms,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=256 * 1024 * 1024,
        )
        assert child.stdin is not None and child.stdout is not None
        timed_out = False
        try:
            url = json.loads(await child.stdout.readline())["url"]
            with use_kubeconfig(write_kubeconfig(url, os.path.join(tmp, "kubeconfig"))):
                operator = OperatorRunner()
                await operator.start(timeout=60)
                before = resource.getrusage(resource.RUSAGE_SELF)
                child.stdin.write(b"go\n")
                await child.stdin.drain()
                try:
                    line = await asyncio.wait_for(child.stdout.readline(), timeout)
                except TimeoutError:  # report what finished by then
                    timed_out = True
                    child.stdin.write(b"stop\n")
                    await child.stdin.drain()
                    line = await child.stdout.readline()
                assert line.strip() == b"done", line
                stats = json.loads(await child.stdout.readline())
                after = resource.getrusage(resource.RUSAGE_SELF)
                await operator.stop()
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    makespan = stats["makespan"]
    jobs = stats["jobs"]
    by_key = {(j["owner"], j["index"]): j for j in jobs}
    handoffs = sorted(
        _ts(j["created"]) - _ts(by_key[(j["owner"], j["index"] - 1)]["completed"])
        for j in jobs
        if j["index"] > 0 and (by_key.get((j["owner"], j["index"] - 1)) or {}).get("completed")
    )
    requests: collections.Counter = collections.Counter()
    for group, res, verb, count in stats["requests"]:
        requests[f"{verb} {group + '/' if group else ''}{res}"] += count
    reconciles = _reconciles["n"]

    def pct(p: float) -> float:
        return round(handoffs[min(len(handoffs) - 1, int(p * len(handoffs)))], 4) if handoffs else float("nan")

    if os.environ.get("BENCH_DETAIL"):  # every stage Job's owner, index, created and completed (for tracing)
        with open(os.environ["BENCH_DETAIL"], "w") as f:
            json.dump(jobs, f)
    from vlm_operator import kube

    return {
        "jobs": n_jobs,
        "stages_per_job": n_stages,
        "api_latency_ms": latency_ms,
        "operator_api_qps": kube.API_QPS,
        "operator_api_burst": kube.API_BURST,
        "timed_out_after_seconds": timeout if timed_out else None,
        "succeeded": stats["succeeded"],
        "stage_jobs_created": len(jobs),
        "duplicate_jobs": len(jobs) - n_jobs * n_stages,
        "makespan_seconds": round(makespan, 3),
        "stages_per_second": round(sum(1 for j in jobs if j["completed"]) / makespan, 2),
        "reconciles": reconciles,
        "reconciles_per_second": round(reconciles / makespan, 1),
        "api_requests": sum(requests.values()),
        "api_requests_per_job": round(sum(requests.values()) / n_jobs, 2),
        "api_requests_by_kind": dict(sorted(requests.items(), key=lambda kv: -kv[1])),
        "operator_cpu_seconds": round(cpu, 2),
        "operator_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        asyncio.run(serve(int(argv[1]), int(argv[2]), argv[3], parse_latency(argv[4])))
        return 0
    if argv[:1] == ["--report"]:  # --report LOG COMMAND NOTE: the runs a killed invocation printed
        with open(argv[1]) as f:
            runs = [json.loads(line) for line in f if line.startswith("{")]
        write_report(runs, argv[2], os.path.join(ROOT, "bench", "results"), argv[3] if len(argv) > 3 else "")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--latency-ms",
        default="5-10",
        help="Per-request API latency, uniform in LOW-HIGH milliseconds (or one value; 0: none). Default 5-10.",
    )
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kopf").setLevel(logging.ERROR)
    parse_latency(args.latency_ms)  # a bad value fails here, not in the child
    runs = []
    for n in args.jobs:
        runs.append(asyncio.run(run(n, args.stages, args.timeout, args.latency_ms)))
        print(json.dumps(runs[-1]), flush=True)
    write_report(runs, "python bench/handoff_bench.py " + " ".join(argv), args.out)
    return 0


def parse_latency(text: str) -> tuple[float, float] | None:
    """`5-10` -> (0.005, 0.010) seconds; `7` -> (0.007, 0.007); `0` -> None."""
    try:
        low, _, high = text.partition("-")
        lo, hi = float(low), float(high or low)
    except ValueError:
        raise SystemExit(f"--latency-ms: {text!r} is not LOW-HIGH milliseconds (e.g. 5-10) or one number") from None
    if lo < 0 or hi < lo:
        raise SystemExit(f"--latency-ms: {text!r}: need 0 <= LOW <= HIGH")
    return None if hi == 0 else (lo / 1000, hi / 1000)


def _latency_text(runs: list[dict[str, Any]]) -> str:
    return "/".join(sorted({str(r.get("api_latency_ms", "0")) for r in runs}))


def _limit_text(runs: list[dict[str, Any]]) -> str:
    return "/".join(
        sorted({f"{r.get('operator_api_qps')} QPS, burst {r.get('operator_api_burst')}" for r in runs})
    )


def write_report(runs: list[dict[str, Any]], command: str, out: str, note: str = "") -> None:
    """operator.json and operator.md under `out` (also used by --report on a run's printed lines)."""
    result = {
        "benchmark": "operator handoff latency, throughput and cost (Kubernetes API emulator, instant kubelet)",
        "command": command,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "resync_seconds": float(os.environ["VLM_OPERATOR_RESYNC_SECONDS"]),
        "note": note,
        "runs": runs,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "operator.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Operator benchmark: handoff latency, throughput and cost",
        "",
        f"`{result['command']}` on {result['machine']['cpus']} shared CPUs (load average at the end "
        f"{result['machine']['load_average_at_end'][0]:.1f}), Python {result['machine']['python']}; the real "
        "Kopf operator alone in one process, against the kmock-based API emulator and an instant kubelet in "
        "another (each stage's final/ committed on file://, its Job completed at once), so the numbers are "
        "operator overhead only. Every API request is answered after "
        f"{_latency_text(runs)} ms (uniform), and the operator's API client is rate-limited to "
        f"{_limit_text(runs)} (`VLM_OPERATOR_API_QPS`/`VLM_OPERATOR_API_BURST`; Kopf's own requests are not). "
        "All jobs are created at once. Peak RSS is the operator process' high-water mark since it started; "
        "reconciles are counted in the operator process.",
        "",
        "| jobs | stages | succeeded | stage Jobs (dup) | makespan s | reconciles/s | API req/job | "
        "operator CPU s | peak RSS MiB | handoff p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        h = r["handoff_latency_seconds"]
        lines.append(
            f"| {r['jobs']} | {r['stages_per_job']} | {r['succeeded']} | {r['stage_jobs_created']} "
            f"({r['duplicate_jobs']}) | {r['makespan_seconds']} | {r['reconciles_per_second']} | "
            f"{r['api_requests_per_job']} | {r['operator_cpu_seconds']} | {r['operator_peak_rss_mib']} | "
            f"{h['p50']} | {h['p90']} | {h['p99']} | {h['max']} |"
        )
    lines += ["", "API requests by kind (largest run):", ""]
    for kind, n in runs[-1]["api_requests_by_kind"].items():
        lines.append(f"- `{kind}`: {n} ({n / runs[-1]['jobs']:.2f} per job)")
    if note:
        lines += ["", note]
    with open(os.path.join(out, "operator.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
