"""Secure by default: the trainer pods' privileges, the one uid, the generated RBAC, the gang's NetworkPolicy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from vlm_core import contract
from vlm_core.spec import parse_job
from vlm_operator import builders, rbac

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "vlm-operator"


def job(**policy: Any) -> Any:
    return parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": {
            "model": {"visionEncoder": "s3://m/v", "languageModel": "s3://m/l"},
            "storage": {"uri": "s3://ckpt/runs", "secretRef": "creds"},
            "stages": [{"name": "align", "type": "align", "data": {"shards": ["d.tar"], "format": "caption"},
                        "maxSteps": 5, "resources": {"procsPerNode": 2}}],
            "runPolicy": policy,
        },
    })


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def test_one_uid_in_the_dockerfile_the_chart_and_the_builders() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (uid,) = re.findall(r"^ARG APP_UID=(\d+)$", dockerfile, flags=re.M)
    # every user the images create and switch to is that ARG, never a literal
    assert re.findall(r"useradd --uid (\S+)", dockerfile) == ['"${APP_UID}"'] * 2
    assert re.findall(r"^USER (\S+)$", dockerfile, flags=re.M) == ["${APP_UID}:${APP_UID}"] * 2
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    sc = values["operator"]["podSecurityContext"]
    assert int(uid) == builders.RUN_AS_USER == sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"]
    trainer_sc = pod(builders.build_stage_job(job(), 0, "team-a"))["securityContext"]
    assert trainer_sc["runAsUser"] == trainer_sc["runAsGroup"] == trainer_sc["fsGroup"] == int(uid)
    # the image's HOME is the directory the pods mount writable
    assert f"HOME={builders.HOME_DIR}" in dockerfile


def test_trainer_pods_are_least_privilege() -> None:
    j = builders.build_stage_job(job(), 0, "team-a")
    p = pod(j)
    c = p["containers"][0]
    assert p["serviceAccountName"] == builders.TRAINER_SERVICE_ACCOUNT
    assert p["automountServiceAccountToken"] is False
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert p["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    # the only writable places: /tmp, HOME and a memory-backed /dev/shm, all sized
    volumes = {v["name"]: v for v in p["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts) == {contract.CONFIG_MOUNT_DIR, "/tmp", builders.HOME_DIR, "/dev/shm"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": builders.SHM_SIZE}
    for path in ("/tmp", builders.HOME_DIR):
        assert volumes[mounts[path]]["emptyDir"]["sizeLimit"]
    assert next(m for m in c["volumeMounts"] if m["mountPath"] == contract.CONFIG_MOUNT_DIR)["readOnly"] is True
    assert c["resources"]["limits"]["memory"] == builders.DEFAULT_MEMORY  # a limit even when the spec has none


def test_the_spec_may_name_the_service_account_but_never_gets_a_token() -> None:
    p = pod(builders.build_stage_job(job(serviceAccountName="s3-reader"), 0, "team-a"))
    assert p["serviceAccountName"] == "s3-reader" and p["automountServiceAccountToken"] is False


def test_the_chart_creates_the_trainer_service_account_the_builders_use() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["trainer"]["serviceAccount"]["name"] == builders.TRAINER_SERVICE_ACCOUNT


def test_network_policy_admits_the_gang_and_metrics_only() -> None:
    j = job()
    policy = builders.build_stage_network_policy(j, 0, "team-a")
    pod_labels = builders.build_stage_job(j, 0, "team-a")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open (storage, data)
    gang, metrics = policy["spec"]["ingress"]
    assert gang == {"from": [{"podSelector": {"matchLabels": selector}}]} and "ports" not in gang
    assert [p["port"] for p in metrics["ports"]] == [contract.METRICS_PORT, contract.METRICS_PORT + 1]
    assert "from" not in metrics


def test_the_charts_rbac_file_is_generated_from_the_operators_list() -> None:
    assert (ROOT / rbac.CHART_FILE).read_text() == rbac.chart_file(), (
        "regenerate: python -m vlm_operator.rbac > " + rbac.CHART_FILE
    )


@pytest.mark.parametrize("cluster", [True, False])
def test_rbac_is_least_privilege(cluster: bool) -> None:
    for r in rbac.rules(cluster):
        assert "*" not in r.verbs and "*" not in (r.group, r.resource)
        assert r.why
    assert rbac.allows("", "secrets", "get") and not rbac.allows("", "secrets", "list")
    assert not rbac.allows("", "secrets", "watch")
    # ttlSecondsAfterFinished deletes the finished VLMTrainingJob: the role must allow it
    assert rbac.allows("training.vlm.dev", "vlmtrainingjobs", "delete", cluster)
    assert not rbac.allows("", "pods", "create", cluster) and not rbac.allows("", "pods", "patch", cluster)
    assert rbac.allows("kopf.dev", "clusterkopfpeerings" if cluster else "kopfpeerings", "patch", cluster)
