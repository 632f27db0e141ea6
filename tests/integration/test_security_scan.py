"""checkov (framework kubernetes, its own venv: scripts/checkov-venv.sh) over everything a user deploys:
`vlmctl render` of every example and the chart with every flag on, in both RBAC modes. One checkov run
over one folder (~10-60 s). A deliberately weakened stage Job rides along to prove the scan bites.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
ALL_ON: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True}},
    "trainerMetrics": {"podMonitor": {"enabled": True}},
    "dashboards": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "trainer": {"serviceAccount": {"create": True, "namespaces": ["ml-training", "team-a"]}},
}
# Checks that do not apply to a training operator, each with the reason. Everything else must pass.
SKIPPED = {
    # Images are pinned to release tags (the chart's appVersion, spec.image.tag); pinning by digest is
    # the deployer's registry policy and both fields accept "tag@sha256:..." references.
    "CKV_K8S_43": "image by digest",
    # Release tags are immutable; IfNotPresent keeps a gang restart from re-pulling a multi-GB CUDA image
    # on every node. spec.image.pullPolicy / image.pullPolicy can say Always.
    "CKV_K8S_15": "imagePullPolicy Always",
    # Object-storage credentials reach botocore/s3fs through their standard AWS_* variables (envFrom the
    # job's own Secret); they are never in the spec, the ConfigMap or the operator's environment.
    "CKV_K8S_35": "secrets as environment variables",
}


def _docs_of_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = helm_python.Chart.load(ROOT / "charts" / "vlm-operator").render(
        values, name="vlm", namespace="vlm-system"
    )
    return [d for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def _render_example(path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "vlm_operator.cli", "render", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_checkov_finds_nothing_but_the_documented_skips(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.fail("checkov missing: run `bash scripts/checkov-venv.sh` (make test does)")
    scan = tmp_path / "scan"
    scan.mkdir()
    for ex in EXAMPLES:
        (scan / f"example-{ex.stem}.yaml").write_text(_render_example(ex))
    # A job that asks for no CPU and no memory: the operator's documented defaults must satisfy the scan.
    bare = yaml.safe_load(EXAMPLES[0].read_text())
    for stage in bare["spec"]["stages"]:
        for key in ("cpu", "memory"):
            stage.get("resources", {}).pop(key, None)
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
    (scan / "example-no-cpu-no-memory.yaml").write_text(_render_example(tmp_path / "bare.yaml"))
    (scan / "chart-cluster.yaml").write_text(yaml.safe_dump_all(_docs_of_chart(ALL_ON)))
    single = {**ALL_ON, "operator": {"singleNamespace": True, "watchNamespace": "team-a"}}
    (scan / "chart-single-namespace.yaml").write_text(yaml.safe_dump_all(_docs_of_chart(single)))
    # The control: a stage Job with the old defaults (default ServiceAccount and its token, writable root).
    stage_job = next(d for d in yaml.safe_load_all(_render_example(EXAMPLES[0])) if d["kind"] == "Job")
    weak = copy.deepcopy(stage_job)
    weak["metadata"]["name"] = "weakened"
    spec = weak["spec"]["template"]["spec"]
    del spec["serviceAccountName"], spec["automountServiceAccountToken"]
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    (scan / "control-weakened.yaml").write_text(yaml.safe_dump(weak))

    out = subprocess.run(
        [str(CHECKOV), "--framework", "kubernetes", "--directory", str(scan), "--skip-download",
         "--output", "json", "--skip-check", ",".join(SKIPPED), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]
    reports = json.loads(out.stdout) if out.stdout.strip() else []
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        (Path(c["file_path"]).name, c["check_id"], c["resource"])
        for r in reports if isinstance(r, dict)
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    control = {check for name, check, _ in failed if name == "control-weakened.yaml"}
    assert {"CKV_K8S_38", "CKV_K8S_22"} <= control, f"the scan did not flag the weakened Job: {failed}"
    real = [f for f in failed if f[0] != "control-weakened.yaml"]
    assert real == [], "checkov findings:\n" + "\n".join(map(str, real))
