"""The Grafana dashboard shipped in the chart: Grafana's own schema types accept it, its PromQL parses,
and its queries use only metric names the trainer and the operator export.

Type check: `@grafana/schema` + `tsc --noEmit --strict` (install once with
`npm ci --prefix tests/dashboard_check`). The JSON is written out as TypeScript object literals, one
constant per panel typed with that panel plugin's own `Options`, so unknown keys, wrong types and
missing required options all fail. PromQL: `promtool` (Debian `prometheus` package) parses each
expression after Grafana's macros are substituted.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "vlm-operator" / "dashboards" / "vlm-training.json"
CHECK_DIR = ROOT / "tests" / "dashboard_check"

# Grafana macros and template variables, replaced the way Grafana would before sending a query.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$job": ".*",
    "$stage": ".*",
}

# Panel types and the @grafana/schema module that types their options (and custom field config).
PANEL_OPTION_TYPES = {
    "timeseries": ("timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen", "Options", "FieldConfig"),
    "stat": ("stat/panelcfg/x/StatPanelCfg_types.gen", "Options", None),
    "bargauge": ("bargauge/panelcfg/x/BarGaugePanelCfg_types.gen", "Options", None),
}

TS_PRELUDE = """\
import type { Dashboard, DataQuery, Panel, RowPanel } from '@grafana/schema';
@@IMPORTS@@

// Grafana's TypeScript types use string enums where the JSON holds plain strings; `${E}` turns an
// enum into the union of its values, so the JSON's strings are checked against the allowed values.
type Wire<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Wire<U>[]
    : T extends object
      ? { [K in keyof T]: Wire<T[K]> }
      : T;

// A Prometheus query as Grafana stores it (the Prometheus plugin's own fields over DataQuery).
interface PromQuery extends DataQuery {
  datasource?: { type: 'prometheus'; uid: string };
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
}

type TypedPanel<Type extends string, O, F = Record<string, unknown>> = Wire<
  Omit<Panel<O, F>, 'type' | 'options' | 'targets'>
> & { type: Type; options: Wire<O>; targets: Wire<PromQuery>[] };
"""


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in every panel."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def substitute_grafana_macros(expr: str) -> str:
    for macro in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(macro, GRAFANA_SUBSTITUTIONS[macro])
    if "$" in expr:
        raise AssertionError(f"unsubstituted Grafana variable left in query: {expr}")
    return expr


def dashboard_as_typescript(dashboard: dict[str, Any]) -> str:
    """The dashboard as TypeScript: one typed constant per panel, then the typed Dashboard."""
    imports = []
    for panel_type, (module, options, field_config) in PANEL_OPTION_TYPES.items():
        names = [f"{options} as {panel_type}Options"]
        if field_config:
            names.append(f"{field_config} as {panel_type}FieldConfig")
        imports.append(
            f"import type {{ {', '.join(names)} }} from '@grafana/schema/dist/esm/raw/composable/{module}';"
        )
    lines = [TS_PRELUDE.replace("@@IMPORTS@@", "\n".join(imports))]

    def typed_panel(name: str, panel: dict[str, Any]) -> str:
        kind = panel.get("type")
        if kind == "row":
            children = [typed_panel(f"{name}_{i}", child) for i, child in enumerate(panel.get("panels", []))]
            row = dict(panel, panels=[f"@@{c}@@" for c in children])
            lines.append(f"const {name}: Wire<RowPanel> = {_literal(row)};")
            return name
        if kind not in PANEL_OPTION_TYPES:
            raise AssertionError(
                f"panel {panel.get('title')!r}: type {kind!r} has no options type mapped here"
            )
        field_config = f"{kind}FieldConfig" if PANEL_OPTION_TYPES[kind][2] else "Record<string, unknown>"
        lines.append(
            f"const {name}: TypedPanel<'{kind}', {kind}Options, {field_config}> = {_literal(panel)};"
        )
        return name

    names = [typed_panel(f"panel_{i}", panel) for i, panel in enumerate(dashboard.get("panels", []))]
    body = dict(dashboard, panels=[f"@@{n}@@" for n in names])
    lines.append(f"export const dashboard: Wire<Dashboard> = {_literal(body)};")
    return "\n\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    """JSON as a TypeScript literal; "@@name@@" strings become references to typed constants."""
    return re.sub(r'"@@(\w+)@@"', r"\1", json.dumps(value, indent=2))


def run_tsc(dashboard: dict[str, Any], work: Path) -> subprocess.CompletedProcess[str]:
    """`tsc --noEmit --strict` on the dashboard as TypeScript, in `work` (linked to the npm project)."""
    if not (CHECK_DIR / "node_modules" / "@grafana" / "schema").is_dir():
        pytest.fail("Grafana schema types missing: run `npm ci --prefix tests/dashboard_check` first")
    (work / "node_modules").symlink_to(CHECK_DIR / "node_modules", target_is_directory=True)
    (work / "dashboard.ts").write_text(dashboard_as_typescript(dashboard))
    config = {"extends": str(CHECK_DIR / "tsconfig.json"), "files": ["dashboard.ts"]}
    (work / "tsconfig.json").write_text(json.dumps(config))
    return subprocess.run(
        ["npx", "--no-install", "tsc", "--noEmit", "--strict", "--project", str(work / "tsconfig.json")],
        cwd=CHECK_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dashboard_type_checks_against_grafana_schema(tmp_path: Path) -> None:
    result = run_tsc(load_dashboard(), tmp_path)
    assert result.returncode == 0, f"tsc rejected the dashboard:\n{result.stdout}{result.stderr}"


def test_type_check_rejects_a_bad_value_and_an_unknown_key(tmp_path: Path) -> None:
    """The check is not vacuous: a wrong option value and an unknown key both fail it."""
    dashboard = load_dashboard()
    timeseries = next(p for p in all_panels(dashboard) if p["type"] == "timeseries")
    timeseries["options"]["tooltip"]["mode"] = "sometimes"
    timeseries["gridPos"]["height"] = 8
    result = run_tsc(dashboard, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert '"sometimes"' in output
    assert "height" in output


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    """Each query, macros substituted, as a recording rule: `promtool check rules` parses them all."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: apt-get install -y --no-install-recommends prometheus")
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 15
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute_grafana_macros(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    rules_file = tmp_path / "queries.rules.json"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool rejected a dashboard query:\n{result.stdout}{result.stderr}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def exported_series_names() -> set[str]:
    """Every sample name the trainer and the operator export (histograms as _bucket/_sum/_count)."""
    from prometheus_client import REGISTRY
    from vlm_operator import metrics as operator_metrics
    from vlm_trainer.metrics import TrainerMetrics

    trainer = TrainerMetrics("job", "stage", 0, port=None)
    trainer.observe_step(1, 1, 1, 1.0, 1e-3, 1.0, 1.0, flops=1.0)
    trainer.observe_checkpoint(1.0)
    trainer.observe_eval({"vqa_accuracy": 0.5})  # the eval stage's gauge (labelled by metric)
    operator_metrics.STAGE_RESTARTS.labels(stage_type="align")  # labelled children appear once used
    operator_metrics.STAGE_DURATION.labels(stage_type="align")
    operator_metrics.JOBS.labels(phase="Running")
    names = set()
    for registry in (trainer.registry, REGISTRY):
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
    return names


def test_queries_use_only_metric_names_that_are_exported() -> None:
    exported = exported_series_names()
    used = {
        name
        for _, expr in dashboard_queries(load_dashboard())
        for name in re.findall(r"\b(vlm_(?:trainer|operator)_\w+)", expr)
    }
    assert used, "the dashboard queries no vlm_ metric"
    assert used - exported == set(), f"dashboard queries metrics nobody exports: {sorted(used - exported)}"
    # Every metric the issue lists has a panel.
    for needed in (
        "vlm_trainer_tokens_total",
        "vlm_trainer_samples_total",
        "vlm_trainer_mfu_ratio",
        "vlm_trainer_loss",
        "vlm_trainer_device_memory_allocated_bytes",
        "vlm_trainer_device_memory_peak_bytes",
        "vlm_trainer_device_memory_capacity_bytes",
        "vlm_trainer_data_wait_seconds_total",
        "vlm_trainer_step_seconds_bucket",
        "vlm_trainer_step",
        "vlm_trainer_total_steps",
        "vlm_trainer_eta_seconds",
        "vlm_operator_stage_restarts_total",
        "vlm_operator_jobs",
        "vlm_trainer_eval_metric",
    ):
        assert needed in used, f"no panel shows {needed}"


def test_template_variables_job_and_stage() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert {"datasource", "job", "stage"} <= variables.keys()
    assert "label_values(vlm_trainer_step, job)" in variables["job"]["query"]["query"]
    assert "$job" in variables["stage"]["query"]["query"]
    for title, expr in dashboard_queries(load_dashboard()):
        if "vlm_trainer_" in expr:
            assert 'job=~"$job"' in expr and 'stage=~"$stage"' in expr, (
                f"{title}: not filtered by $job/$stage"
            )
