"""The Helm chart, rendered with real Helm (helm-python-sdk bundles Helm's Go SDK; no cluster).

For several values combinations: strict lint is clean, every manifest passes kubernetes-validate in
strict mode (ServiceMonitor/PodMonitor are prometheus-operator CRDs that kubernetes-validate does not
know: they are checked against a structural schema of the fields below), and the objects do what the
values ask. The values schema rejects bad values, and the chart's CRD copy equals the generated one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from vlm_core import contract
from vlm_operator import builders, rbac

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "vlm-operator"
CRD_NAME = "training.vlm.dev_vlmtrainingjobs.yaml"
GENERATED_CRD = ROOT / "crds" / CRD_NAME
CHART_CRD = CHART_DIR / "files" / "crds" / CRD_NAME
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "vlm", "vlm-system"

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "single-namespace-monitoring": {
        "operator": {"singleNamespace": True, "watchNamespace": "team-a"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
        "trainerMetrics": {"podMonitor": {"enabled": True, "interval": "10s"}},
        "dashboards": {
            "label": "grafana_dashboard",
            "labelValue": "vlm",
            "annotations": {"grafana_folder": "ML"},
        },
    },
    "no-crds-custom-image": {
        "crds": {"install": False},
        "image": {"registry": "registry.example.com", "repository": "ml/vlm-operator", "tag": "1.2.3"},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"name": "vlm-bot"},
        "dashboards": {"enabled": False},
    },
}

# prometheus-operator's monitoring.coreos.com/v1 fields this chart uses; unknown fields are rejected.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "regex": {"type": "string"},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod"]},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABELING},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _monitor_schema(kind: str, endpoints_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


MONITOR_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints"),
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints"),
}


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART_DIR)


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_account(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's ServiceAccount (the chart also creates the trainer pods' one)."""
    found = [d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] != builders.TRAINER_SERVICE_ACCOUNT]
    assert len(found) == 1, f"expected one operator ServiceAccount, got {len(found)}"
    return found[0]


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_clean_in_strict_mode(case: str) -> None:
    report = helm_python.lint(
        CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == [], report
    assert report["messages"] == [], report


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_manifest_validates(chart: helm_python.Chart, case: str) -> None:
    docs = render(chart, CASES[case])
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD kubernetes-validate does not ship: checked against the structural schema above.
            jsonschema.validate(doc, MONITOR_SCHEMAS[doc["kind"]])
        elif doc["apiVersion"].startswith("kopf.dev/"):  # the peering object: against the chart's peering CRDs
            jsonschema.validate(doc, PEERING_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_defaults_run_a_hardened_cluster_wide_operator_with_a_standby(chart: helm_python.Chart) -> None:
    docs = render(chart, {})
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2  # one active, one standby (Kopf peering)
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "vlmctl", "operator", "--all-namespaces", "--peering", "vlm-operator", "--peering-lifetime", "15"
    ]
    pod_id = next(e for e in container["env"] if e["name"] == "POD_ID")  # each replica's name among the peers
    assert pod_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    peering = one(docs, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1" and peering["metadata"]["name"] == "vlm-operator"
    assert by_kind(docs, "KopfPeering") == []
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The image tag defaults to the chart's appVersion.
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    assert container["image"] == f"ghcr.io/vlm-training-operator/operator:{app_version}"

    assert by_kind(docs, "Role") == [] and by_kind(docs, "RoleBinding") == []
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": operator_account(docs)["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]
    assert pod["serviceAccountName"] == operator_account(docs)["metadata"]["name"]

    service = one(docs, "Service")
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "vlmtrainingjobs.training.vlm.dev"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert by_kind(docs, "ServiceMonitor") == [] and by_kind(docs, "PodMonitor") == []


PEERING_CRDS = {d["spec"]["names"]["kind"]: d
                for d in yaml.safe_load_all((CHART_DIR / "crds" / "kopf-peering.yaml").read_text())}
PEERING_SCHEMAS = {
    kind: {**crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "required": ["apiVersion", "kind", "metadata"]}
    for kind, crd in PEERING_CRDS.items()
}


def test_peering_crds_are_valid_crds_for_the_kinds_the_operator_uses() -> None:
    assert set(PEERING_CRDS) == {"ClusterKopfPeering", "KopfPeering"}
    for crd in PEERING_CRDS.values():
        kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
        assert crd["spec"]["group"] == "kopf.dev"
    assert PEERING_CRDS["ClusterKopfPeering"]["spec"]["scope"] == "Cluster"
    assert PEERING_CRDS["KopfPeering"]["spec"]["scope"] == "Namespaced"


def test_single_namespace_replicas_share_a_kopfpeering_and_one_replica_runs_standalone(
    chart: helm_python.Chart,
) -> None:
    docs = render(chart, {"operator": {"singleNamespace": True, "watchNamespace": "team-a",
                                       "peering": {"name": "team-a-ops", "lifetime": 20}}})
    peering = one(docs, "KopfPeering")
    assert peering["metadata"] == {**peering["metadata"], "name": "team-a-ops", "namespace": "team-a"}
    assert by_kind(docs, "ClusterKopfPeering") == []
    command = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-4:] == ["--peering", "team-a-ops", "--peering-lifetime", "20"]

    single = render(chart, {"operator": {"replicas": 1}})
    deployment = one(single, "Deployment")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    assert deployment["template"]["spec"]["containers"][0]["command"] == ["vlmctl", "operator", "--all-namespaces"]
    assert by_kind(single, "ClusterKopfPeering") == [] and by_kind(single, "KopfPeering") == []


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("case", ["defaults", "single-namespace-monitoring"])
def test_rbac_grants_exactly_the_operators_list(chart: helm_python.Chart, case: str) -> None:
    """The role is rendered from vlm_operator.rbac (what the operator's code uses), nothing more or less;
    the integration tests check every request the operator sends against the same list."""
    cluster = case == "defaults"
    docs = render(chart, CASES[case])
    granted = _rules(one(docs, "ClusterRole" if cluster else "Role"))
    wanted: dict[tuple[str, str], set[str]] = {}
    for r in rbac.rules(cluster):
        wanted.setdefault((r.group, r.resource), set()).update(r.verbs)
    assert granted == wanted


def test_trainer_service_account_without_token_in_each_namespace(chart: helm_python.Chart) -> None:
    for values, namespaces in (
        ({}, [NAMESPACE]),
        ({"operator": {"singleNamespace": True, "watchNamespace": "team-a"}}, ["team-a"]),
        ({"trainer": {"serviceAccount": {"namespaces": ["ml-a", "ml-b"]}}}, ["ml-a", "ml-b"]),
    ):
        accounts = [
            d for d in render(chart, values)
            if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == builders.TRAINER_SERVICE_ACCOUNT
        ]
        assert [a["metadata"]["namespace"] for a in accounts] == namespaces
        assert all(a["automountServiceAccountToken"] is False for a in accounts)
    docs = render(chart, {"trainer": {"serviceAccount": {"create": False}}, "networkPolicy": {"enabled": False}})
    assert builders.TRAINER_SERVICE_ACCOUNT not in [d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")]
    assert by_kind(docs, "NetworkPolicy") == []


def test_single_namespace_mode_and_monitoring(chart: helm_python.Chart) -> None:
    docs = render(chart, CASES["single-namespace-monitoring"])
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["vlmctl", "operator", "--namespace", "team-a"]
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    assert one(docs, "Role")["metadata"]["namespace"] == "team-a"
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["subjects"][0]["namespace"] == NAMESPACE

    service_monitor = one(docs, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(docs, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]

    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchExpressions"] == [
        {"key": contract.LABEL_JOB, "operator": "Exists"}
    ]
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["interval"] == "10s"
    # The trainer's own `job` label (the VLMTrainingJob) must win over Prometheus' scrape job.
    assert endpoint["honorLabels"] is True
    keep = next(r for r in endpoint["relabelings"] if r["action"] == "keep")
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    pattern = re.compile(keep["regex"])  # Prometheus anchors relabel regexes
    assert all(pattern.fullmatch(name) for name in ("metrics", "metrics-1", "metrics-7"))
    assert not any(pattern.fullmatch(name) for name in ("health", "rdzv", "metrics-x", "xmetrics"))

    dashboards = one(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "vlm"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_crds_off_custom_image(chart: helm_python.Chart) -> None:
    docs = render(chart, CASES["no-crds-custom-image"])
    assert by_kind(docs, "CustomResourceDefinition") == []
    assert by_kind(docs, "ConfigMap") == []
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/ml/vlm-operator:1.2.3"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "vlm-bot"
    assert operator_account(docs)["metadata"]["name"] == "vlm-bot"
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "vlm-bot"


def test_dashboard_configmap_ships_the_dashboard_file(chart: helm_python.Chart) -> None:
    docs = render(chart, {})
    configmap = one(docs, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard_file = CHART_DIR / "dashboards" / "vlm-training.json"
    assert json.loads(configmap["data"]["vlm-training.json"]) == json.loads(dashboard_file.read_text())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"operator": {"healthPort": 70000}}, "/operator/healthPort"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
        (
            {"trainerMetrics": {"podMonitor": {"interval": "15 seconds"}}},
            "/trainerMetrics/podMonitor/interval",
        ),
        ({"crds": {"instal": False}}, "instal"),
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"operator": {"peering": {"name": "vlm-operator", "lifetime": 1}}}, "/operator/peering/lifetime"),
    ],
)
def test_values_schema_rejects_bad_values(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_every_value_is_documented() -> None:
    """Each leaf of values.yaml, or a block above it, carries a `# --` comment (helm-docs style)."""
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    comment: list[str] = []
    for line in (CHART_DIR / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            comment = [] if not stripped else comment
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment) or any(d for _, d in stack)
        if rest and not rest.startswith("#") and not documented:
            undocumented.append(key)
        stack.append((indent, documented))
        comment = []
    assert undocumented == []


def test_rendered_crd_is_the_shipped_crd_plus_release_metadata(chart: helm_python.Chart) -> None:
    """Helm's YAML round trip (fromYaml/toYaml) must not change the schema."""
    rendered = one(render(chart, {}), "CustomResourceDefinition")
    shipped = yaml.safe_load(CHART_CRD.read_text())
    labels = rendered["metadata"].pop("labels")
    annotations = rendered["metadata"].pop("annotations")
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert annotations == {**shipped["metadata"].pop("annotations", {}), "helm.sh/resource-policy": "keep"}
    shipped["metadata"].pop("labels", None)
    assert rendered == shipped
    kept_off = one(render(chart, {"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in kept_off["metadata"].get("annotations", {})


def test_chart_crd_is_a_byte_copy_of_the_generated_crd() -> None:
    assert GENERATED_CRD.is_file(), f"{GENERATED_CRD.relative_to(ROOT)} is missing: generate the CRD first"
    assert CHART_CRD.is_file(), f"copy {GENERATED_CRD.relative_to(ROOT)} to {CHART_CRD.relative_to(ROOT)}"
    assert CHART_CRD.read_bytes() == GENERATED_CRD.read_bytes(), (
        f"{CHART_CRD.relative_to(ROOT)} drifted from {GENERATED_CRD.relative_to(ROOT)}: copy it again"
    )
