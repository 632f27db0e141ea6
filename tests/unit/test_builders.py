"""Table tests of the pure stage builders: torchrun wiring, env, resources, scheduling, ownership."""

from __future__ import annotations

import copy
import json
from typing import Any

import kopf
import kubernetes_validate
import pytest
import vlm_trainer
from vlm_core import contract
from vlm_core.spec import parse_job
from vlm_operator import builders, planner

NS = "team-a"
UID = "6f1c1a52-1111-4222-8333-944455556666"


def job_doc(nodes: int = 1, procs: int = 1, gpus: int = 0, **policy: Any) -> dict[str, Any]:
    stage_resources = {"nodes": nodes, "procsPerNode": procs, "gpusPerNode": gpus}
    return {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": "demo", "namespace": NS},
        "spec": {
            "model": {"visionEncoder": "s3://m/vision", "languageModel": "s3://m/lm"},
            "storage": {
                "uri": "s3://ckpt/runs",
                "secretRef": "s3-creds",
                "endpointUrl": "http://s3.local:9000",
            },
            "stages": [
                {
                    "name": "align",
                    "type": "align",
                    "data": {"shards": ["d/cap-{0..3}.tar"], "format": "caption"},
                    "maxSteps": 10,
                    "batch": {"globalSize": 8 * nodes * procs, "microSize": 8},
                    "resources": stage_resources,
                },
                {
                    "name": "instruct",
                    "type": "instruct",
                    "data": {"shards": ["s3://other/inst.tar"], "format": "conversation"},
                    "maxSteps": 10,
                    "batch": {"globalSize": 8 * nodes * procs, "microSize": 8},
                    "resources": {**stage_resources, "cpu": "8", "memory": "64Gi"},
                },
            ],
            "runPolicy": {"maxRestarts": 2, **policy},
        },
    }


def job(**kw: Any):
    return parse_job(job_doc(**kw))


def owner() -> dict[str, Any]:
    return {
        "apiVersion": "training.vlm.dev/v1alpha1",
        "kind": "VLMTrainingJob",
        "metadata": {"name": "demo", "namespace": NS, "uid": UID},
    }


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "nodes,procs,expect",
    [
        (1, 1, ["--nnodes=1", "--nproc_per_node=1"]),
        (2, 1, ["--nnodes=2", "--nproc_per_node=1"]),
        (4, 8, ["--nnodes=4", "--nproc_per_node=8"]),
    ],
)
def test_torchrun_wiring_for_one_and_many_nodes(nodes: int, procs: int, expect: list[str]) -> None:
    j = builders.build_stage_job(job(nodes=nodes, procs=procs), 0, NS, launch=3)
    cmd = container(j)["command"]
    # torchrun runs under the launcher, which maps the first failing rank's exception to the exit code
    assert cmd[:5] == ["python", "-m", contract.LAUNCHER_MODULE, "--", "torchrun"]
    for arg in expect:
        assert arg in cmd
    assert "--node_rank=$(JOB_COMPLETION_INDEX)" in cmd
    assert "--rdzv_backend=c10d" in cmd
    assert "--rdzv_endpoint=demo-align-3-0.demo-align:29400" in cmd
    assert cmd[cmd.index("-m", 4) + 1] == contract.TRAINER_MODULE
    assert cmd[-2:] == ["--config", f"{contract.CONFIG_MOUNT_DIR}/{contract.CONFIG_FILE}"]
    spec = j["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"], spec["backoffLimit"]) == (
        nodes,
        nodes,
        "Indexed",
        0,
    )
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "demo-align" and pod["restartPolicy"] == "Never"


def test_env_has_the_completion_index_and_config_and_secrets_only_by_reference() -> None:
    j = builders.build_stage_job(job(), 0, NS)
    env = {e["name"]: e for e in container(j)["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env[contract.CONFIG_ENV]["value"] == "/etc/vlm-trainer/config.json"
    assert env[contract.ENDPOINT_URL_ENV]["value"] == "http://s3.local:9000"
    assert container(j)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    cm = builders.build_stage_configmap(job(), 0, NS, planner.resolve_stage(job(), 0))
    text = cm["data"][contract.CONFIG_FILE]
    assert "AWS_SECRET" not in text and "secretKey" not in text


def test_no_secret_ref_means_no_env_from() -> None:
    doc = job_doc()
    del doc["spec"]["storage"]["secretRef"]
    j = builders.build_stage_job(parse_job(doc), 0, NS)
    assert "envFrom" not in container(j)


@pytest.mark.parametrize(
    "index,procs,gpus,expect_requests,expect_limits",
    [
        # no resources.memory: the documented default memory limit, always (never unbounded); no
        # resources.cpu: the documented default, a core per process and per DataLoader worker (none here)
        (0, 1, 0, {"cpu": "1", "memory": builders.DEFAULT_MEMORY}, {"cpu": "1", "memory": builders.DEFAULT_MEMORY}),
        (0, 8, 8, {"cpu": "8", "memory": builders.DEFAULT_MEMORY},
         {"cpu": "8", "memory": builders.DEFAULT_MEMORY, "nvidia.com/gpu": "8"}),
        (1, 1, 0, {"cpu": "8", "memory": "64Gi"}, {"cpu": "8", "memory": "64Gi"}),
        (1, 4, 4, {"cpu": "8", "memory": "64Gi"}, {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}),
    ],
)
def test_resources(index: int, procs: int, gpus: int, expect_requests: Any, expect_limits: Any) -> None:
    c = container(builders.build_stage_job(job(procs=procs, gpus=gpus), index, NS))
    res = c.get("resources", {})
    assert res.get("requests") == expect_requests
    assert res.get("limits") == expect_limits


def test_default_cpu_counts_each_process_and_its_data_loader_workers() -> None:
    doc = job_doc(procs=4)
    doc["spec"]["stages"][0]["data"]["workers"] = 3
    assert container(builders.build_stage_job(parse_job(doc), 0, NS))["resources"]["limits"]["cpu"] == "16"


def test_scheduling_hints_image_and_queue() -> None:
    j = builders.build_stage_job(
        job(
            priorityClassName="training-high",
            queueName="gpu-queue",
            nodeSelector={"nvidia.com/gpu.product": "H100"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
        0,
        NS,
    )
    pod = j["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training-high"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert j["metadata"]["labels"][builders.KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert container(j)["image"] == f"ghcr.io/vlm-training-operator/trainer:{vlm_trainer.__version__}"
    assert container(j)["imagePullPolicy"] == "IfNotPresent"


def test_pods_run_as_non_root() -> None:
    j = builders.build_stage_job(job(), 0, NS)
    pod = j["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container(j)["securityContext"]["allowPrivilegeEscalation"] is False


def test_labels_and_owner_references_match_kopf_adopt() -> None:
    objs = builders.build_stage_objects(job(), 1, NS, planner.resolve_stage(job(), 1), launch=2, restarts=1, owner=owner())
    for obj in objs:
        labels = obj["metadata"]["labels"]
        assert labels[contract.LABEL_JOB] == "demo" and labels[contract.LABEL_STAGE] == "instruct"
        assert (
            labels[contract.LABEL_STAGE_INDEX] == "1"
            and labels[contract.LABEL_MANAGED_BY] == contract.MANAGED_BY
        )
        assert obj["metadata"]["namespace"] == NS
        bare = copy.deepcopy(obj)
        del bare["metadata"]["ownerReferences"]
        kopf.adopt(bare, owner=owner())
        assert obj["metadata"]["ownerReferences"] == bare["metadata"]["ownerReferences"]
    j = objs[3]
    assert j["kind"] == "Job" and j["metadata"]["name"] == "demo-instruct-2"
    assert j["metadata"]["annotations"][builders.ANNOTATION_RESTARTS] == "1"
    assert j["spec"]["template"]["metadata"]["labels"][contract.LABEL_LAUNCH] == "2"


def test_service_is_headless_and_selects_the_stage_pods() -> None:
    svc = builders.build_stage_service(job(), 0, NS)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = builders.build_stage_job(job(), 0, NS)["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["port"] == contract.RDZV_PORT


def test_configmap_holds_the_resolved_config_with_handoff() -> None:
    j = job()
    first = json.loads(builders.build_stage_configmap(j, 0, NS, planner.resolve_stage(j, 0))["data"][contract.CONFIG_FILE])
    second = json.loads(builders.build_stage_configmap(j, 1, NS, planner.resolve_stage(j, 1))["data"][contract.CONFIG_FILE])
    assert first["initFrom"] is None
    assert second["initFrom"] == planner.final_uri(j, 0) == "s3://ckpt/runs/demo/align/final"
    assert second["output"] == "s3://ckpt/runs/demo/instruct"
    assert first["stage"]["data"]["shards"] == ["s3://ckpt/runs/d/cap-{0..3}.tar"]
    assert second["stage"]["data"]["shards"] == ["s3://other/inst.tar"]


@pytest.mark.parametrize("job_name,stage_name", [("a" * 40, "b" * 40), ("1job", "s"), ("demo", "x" * 40)])
def test_names_fit_dns_limits_and_stay_distinct(job_name: str, stage_name: str) -> None:
    base = builders.stage_base_name(job_name, stage_name)
    assert base[0].isalpha() and len(base) <= 50
    job_name_full = builders.stage_job_name(job_name, stage_name, 999)
    assert len(f"{job_name_full}-9999") <= 63
    assert builders.stage_base_name(job_name, stage_name) == base  # deterministic
    assert builders.stage_base_name(job_name, stage_name[:-1] + "z") != base


def test_render_job_returns_every_object_of_every_stage() -> None:
    objs = builders.render_job(job(nodes=2), NS, planner.resolve_stages(job(nodes=2)))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"] * 2
    assert all("ownerReferences" not in o["metadata"] for o in objs)
    owned = builders.render_job(job(nodes=2), NS, planner.resolve_stages(job(nodes=2)), uid=UID)
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == UID for o in owned)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "nodes": 4,
            "procs": 8,
            "gpus": 8,
            "queueName": "q",
            "priorityClassName": "p",
            "nodeSelector": {"a": "b"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
        },
    ],
)
def test_every_built_object_passes_kubernetes_validate_strict(kw: dict[str, Any]) -> None:
    for obj in builders.render_job(job(**kw), NS, planner.resolve_stages(job(**kw)), uid=UID):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)


def test_the_configmap_holds_the_config_it_is_given_not_one_resolved_again() -> None:
    """The planner resolves a stage's config once (`StartStage.config`); the builder only serialises it."""
    j = job()
    config = planner.resolve_stage(j, 1).model_copy(update={"init_from": "s3://elsewhere/final"})
    objs = builders.build_stage_objects(j, 1, NS, config, launch=0)
    doc = json.loads(objs[0]["data"][contract.CONFIG_FILE])
    assert doc == config.dump() and doc["initFrom"] == "s3://elsewhere/final"


@pytest.mark.parametrize("procs, declared", [(1, 1), (8, 8), (16, contract.METRICS_PORTS_MAX)])
def test_metrics_ports_are_one_per_local_rank_up_to_the_contract_cap(procs: int, declared: int) -> None:
    j = job(procs=procs)
    ports = [p["containerPort"] for p in container(builders.build_stage_job(j, 0, NS))["ports"] if p["name"] != "rdzv"]
    policy = builders.build_stage_network_policy(j, 0, NS)
    opened = [p["port"] for p in policy["spec"]["ingress"][1]["ports"]]
    assert ports == opened == contract.metrics_ports(procs) == list(range(contract.METRICS_PORT,
                                                                          contract.METRICS_PORT + declared))


def test_env_names_are_the_contract_ones() -> None:
    env = {e["name"]: e.get("value") for e in container(builders.build_stage_job(job(), 0, NS))["env"]}
    assert env[contract.UNBUFFERED_ENV] == "1" and env[contract.ENDPOINT_URL_ENV] == "http://s3.local:9000"
    assert env[contract.METRICS_PORT_ENV] == str(contract.METRICS_PORT)


def test_stage_job_fails_at_once_on_the_tables_deterministic_codes_and_ignores_evictions() -> None:
    spec = builders.build_stage_job(job(), 0, NS)["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail = rules[1]
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["operator"] == "In"
    assert fail["onExitCodes"]["containerName"] == container(builders.build_stage_job(job(), 0, NS))["name"]
    # every deterministic row of the contract's table, none of the retryable ones, never 0
    assert fail["onExitCodes"]["values"] == sorted(f.exit_code for f in contract.FAILURES if not f.retryable)
    assert contract.TRANSIENT.exit_code not in fail["onExitCodes"]["values"] and 0 not in fail["onExitCodes"]["values"]
    # podFailurePolicy is only valid with restartPolicy Never
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_trainer_container_reports_its_error_in_the_termination_message() -> None:
    c = container(builders.build_stage_job(job(), 0, NS))
    assert c["terminationMessagePath"] == contract.TERMINATION_LOG
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env[contract.TERMINATION_LOG_ENV] == contract.TERMINATION_LOG
