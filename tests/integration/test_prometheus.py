"""A real Prometheus server scrapes a real 2-process training stage (`torchrun -m vlm_trainer`, gloo,
fp32, tiny untrained parts) and the operator's metrics endpoint; every trainer metric arrives with its
job/stage/rank labels and plausible values, and every query of the Grafana dashboard returns data
(Grafana's macros substituted as Grafana would).

Prometheus is configured with the trainer targets (`$VLM_METRICS_PORT` base and base + 1, one per
local rank) before the stage starts, so it scrapes while the stage trains. The trainer closes its
endpoint when the stage ends, after which Prometheus marks its series stale: so the checks are
evaluated at one moment `at` in the middle of training, found from Prometheus' own data (both ranks
stepping, a full rate window of samples, a checkpoint saved on each rank), not from wall-clock sleeps.

Nothing here depends on how long the stage takes (a quiet machine trained it in 8 s, a busy one in 25 s):
the stage runs under `paced_trainer.py`, which lets the ranks step only up to a number this test raises
as Prometheus scrapes them (the lowest step scraped on any rank + AHEAD_STEPS), and holds the last step
back until the moment `at` is found. So Prometheus sees the whole stage, a scrape every few steps.

Needs Debian's Prometheus: `apt-get install -y --no-install-recommends prometheus`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from ports import free_base_port, free_port
from vlm_core import contract
from vlm_core.spec import parse_job
from vlm_operator.planner import resolve_stage
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_quickstart.shapes import shard_paths, write_shards
from vlm_trainer.metrics import CPU_PEAK_FLOPS_PER_SECOND

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "vlm-operator" / "dashboards" / "vlm-training.json"
OPERATOR_METRICS_PROCESS = Path(__file__).with_name("operator_metrics_process.py")
PACED_TRAINER = Path(__file__).with_name("paced_trainer.py")
JOB, STAGE = "metrics-demo", "align"
# The stage: 2 ranks x 2 micro-batches of 4 samples, a checkpoint every CHECKPOINT_EVERY steps. It runs
# at most AHEAD_STEPS past what Prometheus has scraped, so Prometheus scrapes it at least
# MAX_STEPS / AHEAD_STEPS times however fast it trains (more than the rate window needs).
RANKS = 2
MAX_STEPS = 240
AHEAD_STEPS = 15
PACER_SECONDS = 0.25  # how often the pacer reads Prometheus and rewrites the gate (its heartbeat)
GLOBAL_BATCH, MICRO_BATCH = 16, 4
SAMPLES_PER_RANK_STEP = GLOBAL_BATCH // RANKS
CHECKPOINT_EVERY = 15
MAX_LENGTH = 64
LR = 1e-3
SCRAPE_INTERVAL_SECONDS = 1
RATE_WINDOW = "10s"
# What Grafana would send with a 1 s scrape interval: $__rate_interval = max(4 x scrape, interval + scrape).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": RATE_WINDOW,
    "$__interval": "1s",
    "$__range": "5m",
    "$job": ".*",
    "$stage": ".*",
}
# Every trainer series and the sample name to query it by.
TRAINER_SERIES = [
    "vlm_trainer_tokens_per_second",
    "vlm_trainer_samples_per_second",
    "vlm_trainer_tokens_total",
    "vlm_trainer_samples_total",
    "vlm_trainer_mfu_ratio",
    "vlm_trainer_device_peak_flops_per_second",
    "vlm_trainer_loss",
    "vlm_trainer_learning_rate",
    "vlm_trainer_grad_norm",
    "vlm_trainer_step_seconds_bucket",
    "vlm_trainer_step_seconds_count",
    "vlm_trainer_data_wait_ratio",
    "vlm_trainer_data_wait_seconds_total",
    "vlm_trainer_device_memory_allocated_bytes",
    "vlm_trainer_device_memory_reserved_bytes",
    "vlm_trainer_device_memory_peak_bytes",
    "vlm_trainer_device_memory_capacity_bytes",
    "vlm_trainer_checkpoint_save_seconds_bucket",
    "vlm_trainer_checkpoint_save_seconds_count",
    "vlm_trainer_step",
    "vlm_trainer_total_steps",
    "vlm_trainer_eta_seconds",
]
SELECTOR = f'job="{JOB}", stage="{STAGE}"'
# The moment the checks read: both ranks stepped within the rate window, the window holds a sample
# for every scrape, and each rank has saved a checkpoint. Each expression counts ranks.
MOMENT_CONDITIONS = [
    f"count(increase(vlm_trainer_step_seconds_count{{{SELECTOR}}}[{RATE_WINDOW}]) > 0)",
    f"count(count_over_time(vlm_trainer_step{{{SELECTOR}}}[{RATE_WINDOW}]) >= 8)",
    f"count(vlm_trainer_checkpoint_save_seconds_count{{{SELECTOR}}} > 0)",
]
STAGE_TIMEOUT_SECONDS = 150
READY_SECONDS = 20


@dataclass
class Scraped:
    url: str  # Prometheus base URL
    trainer_ports: list[int]
    operator_port: int
    stage: subprocess.Popen[bytes]
    stage_log: Path
    started: float  # unix time the stage was launched
    pacer: Pacer
    at: float | None = None  # the moment the checks read (unix seconds), once found


class Pacer(threading.Thread):
    """Writes the step the paced ranks may take up to: the lowest step Prometheus has scraped on any rank
    plus AHEAD_STEPS, at most MAX_STEPS - 1 until the moment `at` is found. Rewrites the gate every
    PACER_SECONDS (paced_trainer.py reads a gate left stale as "the test is gone")."""

    def __init__(self, gate: Path, url: str) -> None:
        super().__init__(name="prometheus-pacer", daemon=True)
        self.gate, self.url = gate, url
        self.allowed = AHEAD_STEPS
        self.moment_found = threading.Event()
        self.stopped = threading.Event()
        self.write()

    def write(self) -> None:
        tmp = self.gate.with_suffix(".tmp")
        tmp.write_text(str(self.allowed))
        os.replace(tmp, self.gate)

    def scraped_step(self) -> int | None:
        """The lowest step scraped on the ranks, once Prometheus has scraped them all."""
        try:
            steps = by_rank(query(self.url, f"vlm_trainer_step{{{SELECTOR}}}"))
        except (OSError, AssertionError, KeyError, ValueError):
            return None
        return int(min(steps.values())) if len(steps) == RANKS else None

    def run(self) -> None:
        while not self.stopped.wait(PACER_SECONDS):
            seen = self.scraped_step()
            cap = MAX_STEPS if self.moment_found.is_set() else MAX_STEPS - 1
            if seen is not None:
                self.allowed = max(self.allowed, min(seen + AHEAD_STEPS, cap))
            self.write()


def write_stage_config(root: Path) -> Path:
    """Tiny untrained parts and shards; the align stage resolved by the planner, as the operator does."""
    tokenizer = build_tokenizer()
    lm = build_language_model(str(root / "lm"), tokenizer, hidden=64, layers=2, heads=4, mlp=128)
    vision = build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=2)
    train = write_shards(str(root / "data"), "train", 64, seed=0, per_shard=16)
    heldout = write_shards(str(root / "data"), "heldout", 16, seed=0, per_shard=16)
    job = parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": JOB},
        "spec": {
            "model": {"visionEncoder": vision, "languageModel": lm, "imageSize": 32,
                      "visionFeatureSelectStrategy": "full"},
            "storage": {"uri": f"file://{root}/storage"},
            "stages": [{
                "name": STAGE,
                "type": "align",
                "data": {
                    "shards": [f"file://{p}" for p in shard_paths(train, "caption")],
                    "evalShards": [f"file://{p}" for p in shard_paths(heldout, "caption")],
                    "format": "caption",
                    "maxLength": MAX_LENGTH,
                },
                "batch": {"globalSize": GLOBAL_BATCH, "microSize": MICRO_BATCH},
                "maxSteps": MAX_STEPS,
                "precision": "fp32",
                "optimizer": {"lr": LR},
                "checkpoint": {"everySteps": CHECKPOINT_EVERY, "keepLast": 1},
                "resources": {"procsPerNode": RANKS},
                # evaluation by generation (the dashboard's "Eval metrics" panel), early and small
                "evaluation": {"shards": [f"file://{p}" for p in shard_paths(heldout, "caption")], "format": "caption",
                               "everySteps": CHECKPOINT_EVERY, "maxSamples": 4, "maxNewTokens": 2, "batchSize": 4,
                               "metrics": ["exact_match"]},
            }],
        },
    })
    path = root / "stage.json"
    path.write_text(json.dumps(resolve_stage(job, 0).dump()))
    return path


def start_stage(config: Path, metrics_base_port: int, log: Path, gate: Path) -> subprocess.Popen[bytes]:
    """`torchrun --nproc_per_node 2` of `python -m vlm_trainer` paced by `gate` (paced_trainer.py) in a
    session of its own (so teardown stops it all); stdout (rank 0's JSON events) to `log`, stderr beside it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", contract.METRICS_PORT_ENV: str(metrics_base_port),
           "PACED_TRAINER_GATE": str(gate)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(PACED_TRAINER), "--config", str(config)]
    with open(log, "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)


def start_operator_metrics() -> tuple[subprocess.Popen[str], int]:
    """The operator's own metrics endpoint (vlm_operator.metrics), in a process of its own."""
    proc = subprocess.Popen(
        [sys.executable, str(OPERATOR_METRICS_PROCESS), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.startswith("PORT "), f"operator metrics did not report a port: {line!r} (exit {proc.poll()})"
    return proc, int(line.split()[1])


def start_prometheus(tmp: Path, trainer_ports: list[int], operator_port: int) -> tuple[subprocess.Popen[str], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: apt-get install -y --no-install-recommends prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                # As the chart's PodMonitor: keep the trainer's `job` label (the VLMTrainingJob).
                "job_name": "vlm-trainers",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in trainer_ports]}],
            },
            {"job_name": "vlm-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp / 'data'}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"prometheus did not become ready:\n{log.read_text()}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[Any], group: bool = False) -> None:
    if proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(timeout=5)


def api(url: str, path: str, **params: Any) -> Any:
    query_string = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query_string}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]["result"]


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query, at `at` (unix seconds) when given."""
    return api(url, "query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def by_rank(result: list[dict[str, Any]]) -> dict[str, float]:
    return {series["metric"]["rank"]: float(series["value"][1]) for series in result}


def stage_tail(scraped: Scraped, chars: int = 3000) -> str:
    out = scraped.stage_log.read_text(errors="replace")[-chars:]
    err = scraped.stage_log.with_suffix(".err").read_text(errors="replace")[-chars:]
    return f"stdout:\n{out}\nstderr:\n{err}"


def find_moment(scraped: Scraped) -> float | None:
    """The latest moment (unix seconds, on the scrape grid) at which every MOMENT_CONDITION held for
    both ranks, from Prometheus' own data since the stage started; None if there is none yet."""
    end = time.time()
    held: set[float] | None = None
    for expr in MOMENT_CONDITIONS:
        series = api(scraped.url, "query_range", query=expr, start=f"{scraped.started:.3f}",
                     end=f"{end:.3f}", step="1s")
        times = {float(t) for s in series for t, v in s["values"] if float(v) == RANKS}
        held = times if held is None else held & times
    return max(held) if held else None


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = write_stage_config(tmp)
    procs: list[subprocess.Popen[Any]] = []
    stage = pacer = None
    try:
        operator, operator_port = start_operator_metrics()
        procs.append(operator)
        base = free_base_port(RANKS)
        trainer_ports = [base + rank for rank in range(RANKS)]
        server, url = start_prometheus(tmp, trainer_ports, operator_port)
        procs.append(server)
        pacer = Pacer(tmp / "gate", url)
        pacer.start()
        started = time.time()
        stage = start_stage(config, base, tmp / "stage.log", pacer.gate)
        yield Scraped(url, trainer_ports, operator_port, stage, tmp / "stage.log", started, pacer)
    finally:
        if stage is not None:
            stop(stage, group=True)
        if pacer is not None:
            pacer.stopped.set()
            pacer.join(5)
        for proc in reversed(procs):
            stop(proc)


@pytest.fixture(scope="module")
def at(prometheus: Scraped) -> float:
    """Poll Prometheus (not the clock) until it holds a moment of training that every check can read; then
    let the stage take its last step (the pacer held it back until now)."""
    deadline = time.monotonic() + STAGE_TIMEOUT_SECONDS
    while True:
        moment = find_moment(prometheus)
        if moment is not None:
            prometheus.at = moment
            prometheus.pacer.moment_found.set()
            return moment
        if prometheus.stage.poll() is not None:
            pytest.fail(f"stage exited ({prometheus.stage.returncode}) with no moment where "
                        f"{MOMENT_CONDITIONS} all held:\n{stage_tail(prometheus)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no moment where {MOMENT_CONDITIONS} all held in {STAGE_TIMEOUT_SECONDS} s:\n"
                        f"{stage_tail(prometheus)}")
        time.sleep(1)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for macro in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(macro, GRAFANA_SUBSTITUTIONS[macro])
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def assert_dashboard_queries_return_data(url: str, metric_prefix: str, at: float) -> None:
    queries = [(title, expr) for title, expr in dashboard_queries() if metric_prefix in expr]
    assert queries, f"no dashboard query uses {metric_prefix}*"
    empty = [
        f"{title}: {expr} -> {result}"
        for title, expr in queries
        if not has_data(result := query(url, substitute(expr), at))
    ]
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)


def test_targets_are_up_while_the_stage_trains(prometheus: Scraped, at: float) -> None:
    up = {(s["metric"]["instance"], s["metric"]["job"]) for s in query(prometheus.url, "up == 1", at)}
    assert up == {
        *((f"127.0.0.1:{p}", "vlm-trainers") for p in prometheus.trainer_ports),
        (f"127.0.0.1:{prometheus.operator_port}", "vlm-operator"),
    }


def test_every_trainer_metric_arrives_with_job_stage_rank(prometheus: Scraped, at: float) -> None:
    for name in TRAINER_SERIES:
        result = query(prometheus.url, f"{name}{{{SELECTOR}}}", at)
        ranks = {series["metric"].get("rank") for series in result}
        assert ranks == {"0", "1"}, f"{name}: ranks {ranks}"
        assert has_data(result), f"{name}: {result}"
    # honor_labels kept the trainer's own `job` label (the VLMTrainingJob), not the scrape job's name.
    assert query(prometheus.url, 'vlm_trainer_step{job="vlm-trainers"}', at) == []


def test_trainer_values_are_plausible(prometheus: Scraped, at: float) -> None:
    def ranks(expr: str) -> dict[str, float]:
        values = by_rank(query(prometheus.url, expr, at))
        assert values.keys() == {"0", "1"}, f"{expr}: {values}"
        return values

    def series(name: str) -> dict[str, float]:
        return ranks(f"{name}{{{SELECTOR}}}")

    step, total = series("vlm_trainer_step"), series("vlm_trainer_total_steps")
    samples, tokens = series("vlm_trainer_samples_total"), series("vlm_trainer_tokens_total")
    checkpoints = series("vlm_trainer_checkpoint_save_seconds_count")
    for rank in ("0", "1"):
        assert total[rank] == MAX_STEPS
        assert 1 <= step[rank] < MAX_STEPS, f"rank {rank}: the moment is not during training: step {step[rank]}"
        # Counters and gauges are read one after another while the step may finish: allow one step.
        assert abs(samples[rank] - SAMPLES_PER_RANK_STEP * step[rank]) <= SAMPLES_PER_RANK_STEP, (samples, step)
        assert samples[rank] <= tokens[rank] <= MAX_LENGTH * (samples[rank] + SAMPLES_PER_RANK_STEP), tokens
        # A checkpoint every CHECKPOINT_EVERY steps, each one observed on every rank (save is collective).
        assert abs(checkpoints[rank] - step[rank] // CHECKPOINT_EVERY) <= 1, (checkpoints, step)
        assert checkpoints[rank] >= 1

    saved = ranks(f"vlm_trainer_checkpoint_save_seconds_sum{{{SELECTOR}}}")
    assert all(0 < v < 60 for v in saved.values()), saved
    loss, lr = series("vlm_trainer_loss"), series("vlm_trainer_learning_rate")
    grad_norm, mfu = series("vlm_trainer_grad_norm"), series("vlm_trainer_mfu_ratio")
    assert all(0 < v < 20 for v in loss.values()), loss
    assert all(0 < v <= LR for v in lr.values()), lr
    assert all(0 < v < 1e4 for v in grad_norm.values()), grad_norm
    assert all(0 < v < 1 for v in mfu.values()), mfu
    assert all(v == CPU_PEAK_FLOPS_PER_SECOND for v in series("vlm_trainer_device_peak_flops_per_second").values())
    wait_ratio = series("vlm_trainer_data_wait_ratio")
    assert all(0 < v < 1 for v in wait_ratio.values()), wait_ratio
    eta = series("vlm_trainer_eta_seconds")
    assert all(0 < eta[r] < 60 * (MAX_STEPS - step[r]) for r in eta), (eta, step)

    allocated, reserved = series("vlm_trainer_device_memory_allocated_bytes"), series("vlm_trainer_device_memory_reserved_bytes")
    peak, capacity = series("vlm_trainer_device_memory_peak_bytes"), series("vlm_trainer_device_memory_capacity_bytes")
    for rank in ("0", "1"):
        # On CPU: the resident set of a process holding torch and a model, at most its peak, within the limit.
        assert 50e6 < allocated[rank] == reserved[rank] <= peak[rank] <= capacity[rank], (allocated, peak, capacity)

    # Throughput from the counters (tokens per wall second) is at most what the step-time gauges say
    # (tokens per step second; wall time also holds checkpoints), with slack for rate()'s extrapolation.
    rate = ranks(f"rate(vlm_trainer_tokens_total{{{SELECTOR}}}[{RATE_WINDOW}])")
    fastest = ranks(f"max_over_time(vlm_trainer_tokens_per_second{{{SELECTOR}}}[{RATE_WINDOW}])")
    for rank in ("0", "1"):
        assert 0 < rate[rank] <= 1.5 * fastest[rank], (rate, fastest)
    wait = ranks(
        f"rate(vlm_trainer_data_wait_seconds_total{{{SELECTOR}}}[{RATE_WINDOW}]) / "
        f"rate(vlm_trainer_step_seconds_sum{{{SELECTOR}}}[{RATE_WINDOW}])"
    )
    assert all(0 < v < 1 for v in wait.values()), wait


def test_every_dashboard_query_reads_trainer_or_operator_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        assert "vlm_trainer_" in expr or "vlm_operator_" in expr, f"{title}: {expr}"


def test_every_trainer_dashboard_query_returns_data(prometheus: Scraped, at: float) -> None:
    assert_dashboard_queries_return_data(prometheus.url, "vlm_trainer_", at)


def test_every_operator_dashboard_query_returns_data(prometheus: Scraped, at: float) -> None:
    assert_dashboard_queries_return_data(prometheus.url, "vlm_operator_", at)
    phases = {s["metric"]["phase"]: float(s["value"][1]) for s in query(prometheus.url, "vlm_operator_jobs", at)}
    assert phases["Running"] == phases["Succeeded"] == phases["Failed"] == 1


def test_the_scraped_stage_completes(prometheus: Scraped, at: float) -> None:
    """The stage Prometheus watched trained to the end; its endpoints served until then."""
    try:
        code = prometheus.stage.wait(timeout=STAGE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"stage still running after {STAGE_TIMEOUT_SECONDS} s:\n{stage_tail(prometheus)}")
    assert code == 0, stage_tail(prometheus)
    events = [json.loads(line) for line in prometheus.stage_log.read_text().splitlines()
              if line.startswith("{") and '"event"' in line]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == list(
        range(CHECKPOINT_EVERY, MAX_STEPS, CHECKPOINT_EVERY)
    )
    assert any(e["event"] == "done" for e in events)
    # Prometheus scraped both ranks from early in the stage until late in it.
    seen = by_rank(query(prometheus.url, f"max_over_time(vlm_trainer_step{{{SELECTOR}}}[5m])"))
    assert seen.keys() == {"0", "1"} and all(v >= MAX_STEPS - 2 * CHECKPOINT_EVERY for v in seen.values()), seen
