"""A real Prometheus server scrapes two trainer processes (ranks 0 and 1) and the operator's metrics
endpoint; every trainer metric arrives with its job/stage/rank labels and every query of the Grafana
dashboard returns data (Grafana's macros substituted as Grafana would).

Needs Debian's Prometheus: `apt-get install -y --no-install-recommends prometheus`.
The trainer processes run tests/integration/synthetic_trainer.py (TrainerMetrics fed realistic
numbers); they are to be replaced by a real 2-process training stage.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from vlm_trainer import contract

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "vlm-operator" / "dashboards" / "vlm-training.json"
SYNTHETIC_TRAINER = Path(__file__).with_name("synthetic_trainer.py")
JOB, STAGE = "quickstart", "align"
SCRAPE_INTERVAL_SECONDS = 1
# What Grafana would send with a 1 s scrape interval: $__rate_interval = max(4 x scrape, interval + scrape).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "10s",
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
DEADLINE_SECONDS = 45


@dataclass
class Scraped:
    url: str  # Prometheus base URL
    trainer_ports: list[int]
    operator_port: int | None  # None while vlm_operator.metrics does not exist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_trainers(ranks: int) -> tuple[list[subprocess.Popen[str]], list[int]]:
    procs, ports = [], []
    for rank in range(ranks):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(ranks),
            OMP_NUM_THREADS="1",
            **{contract.METRICS_PORT_ENV: "0"},
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SYNTHETIC_TRAINER), "--job", JOB, "--stage", STAGE],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("PORT "), f"trainer did not report its port: {line!r} (exit {proc.poll()})"
        ports.append(int(line.split()[1]))
    return procs, ports


OPERATOR_METRICS_PROCESS = Path(__file__).with_name("operator_metrics_process.py")


def operator_metrics_available() -> bool:
    return importlib.util.find_spec("vlm_operator.metrics") is not None and OPERATOR_METRICS_PROCESS.is_file()


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


def query(url: str, expr: str) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: apt-get install -y --no-install-recommends prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    procs: list[subprocess.Popen[str]] = []
    try:
        trainers, trainer_ports = start_trainers(ranks=2)
        procs += trainers
        operator_port = None
        if operator_metrics_available():
            operator, operator_port = start_operator_metrics()
            procs.append(operator)
        targets = [
            {
                # As the chart's PodMonitor: keep the trainer's `job` label (the VLMTrainingJob).
                "job_name": "vlm-trainers",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in trainer_ports]}],
            }
        ]
        if operator_port is not None:
            targets.append(
                {"job_name": "vlm-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]}
            )
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": "1s"},
            "scrape_configs": targets,
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        server = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp / 'data'}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
            text=True,
        )
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield Scraped(url, trainer_ports, operator_port)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


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


def wait_for(url: str, exprs: list[str], min_series: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Poll until every expression returns at least `min_series` finite series, or the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        results = {expr: query(url, expr) for expr in exprs}
        ready = all(sum(math.isfinite(float(x["value"][1])) for x in r) >= min_series for r in results.values())
        if ready or time.monotonic() > deadline:
            return results
        time.sleep(1)


@pytest.mark.integration
def test_targets_are_up(prometheus: Scraped) -> None:
    operator = {"vlm-operator"} if prometheus.operator_port is not None else set()
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:  # targets come up one scrape at a time; a loaded machine delays the later ones
        up = {(s["metric"]["instance"], s["metric"]["job"]) for s in query(prometheus.url, "up == 1")}
        if len(up) >= 2 + len(operator) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(up) == 2 + len(operator), up
    assert {job for _, job in up} == {"vlm-trainers", *operator}


@pytest.mark.integration
def test_every_trainer_metric_arrives_with_job_stage_rank(prometheus: Scraped) -> None:
    exprs = [f'{name}{{job="{JOB}", stage="{STAGE}"}}' for name in TRAINER_SERIES]
    results = wait_for(prometheus.url, exprs, min_series=2)
    for name, expr in zip(TRAINER_SERIES, exprs, strict=True):
        ranks = {series["metric"].get("rank") for series in results[expr]}
        assert ranks == {"0", "1"}, f"{name}: ranks {ranks}"
    # honor_labels kept the trainer's own `job` label (the VLMTrainingJob), not the scrape job's name.
    assert query(prometheus.url, 'vlm_trainer_step{job="vlm-trainers"}') == []


@pytest.mark.integration
def test_trainer_values_are_plausible(prometheus: Scraped) -> None:
    rate = f'sum(rate(vlm_trainer_tokens_total{{job="{JOB}"}}[10s]))'
    wait = (
        f'sum(rate(vlm_trainer_data_wait_seconds_total{{job="{JOB}"}}[10s])) / '
        f'sum(rate(vlm_trainer_step_seconds_sum{{job="{JOB}"}}[10s]))'
    )
    # rate() underestimates until the window is full of samples: wait for 10 s of them first.
    full_window = f'min(count_over_time(vlm_trainer_tokens_total{{job="{JOB}"}}[10s])) >= 9'
    wait_for(prometheus.url, [full_window])
    results = wait_for(prometheus.url, [rate, wait])
    # 2 ranks x 2048 tokens per ~0.2 s step: about 20k tokens/s in total.
    assert 10_000 < float(results[rate][0]["value"][1]) < 25_000
    # Each rank sleeps 0.02-0.03 s of a 0.2 s step waiting for "data".
    assert 0.05 < float(results[wait][0]["value"][1]) < 0.25


def assert_dashboard_queries_return_data(url: str, metric_prefix: str) -> None:
    queries = [(title, expr) for title, expr in dashboard_queries() if metric_prefix in expr]
    assert queries, f"no dashboard query uses {metric_prefix}*"
    exprs = [substitute(expr) for _, expr in queries]
    results = wait_for(url, exprs)
    empty = [
        f"{title}: {expr}"
        for (title, _), expr in zip(queries, exprs, strict=True)
        if not has_data(results[expr])
    ]
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)


@pytest.mark.integration
def test_every_dashboard_query_reads_trainer_or_operator_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        assert "vlm_trainer_" in expr or "vlm_operator_" in expr, f"{title}: {expr}"


@pytest.mark.integration
def test_every_trainer_dashboard_query_returns_data(prometheus: Scraped) -> None:
    assert_dashboard_queries_return_data(prometheus.url, "vlm_trainer_")


@pytest.mark.integration
def test_every_operator_dashboard_query_returns_data(prometheus: Scraped) -> None:
    if prometheus.operator_port is None:
        pytest.fail(
            f"vlm_operator.metrics or {OPERATOR_METRICS_PROCESS.name} is missing: no operator endpoint"
        )
    assert_dashboard_queries_return_data(prometheus.url, "vlm_operator_")
    phases = {s["metric"]["phase"]: float(s["value"][1]) for s in query(prometheus.url, "vlm_operator_jobs")}
    assert phases["Running"] == phases["Succeeded"] == phases["Failed"] == 1
