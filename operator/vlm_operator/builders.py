"""Pure builders of the Kubernetes objects one stage needs (dicts in, dicts out; no API calls).

Per stage: a ConfigMap with the resolved trainer config, a headless Service for the torchrun
rendezvous, and an Indexed batch/v1 Job whose `nodes` pods run

    python -m <contract.LAUNCHER_MODULE> -- \
    torchrun --nnodes=N --node_rank=$(JOB_COMPLETION_INDEX) --nproc_per_node=G --rdzv_backend=c10d
             --rdzv_endpoint=<job>-0.<service>:29400 -m <contract.TRAINER_MODULE> --config /etc/vlm-trainer/config.json

(the launcher turns the first failing rank's exception into the pod's exit code and termination message,
per `contract.FAILURES`, which also gives the Job's podFailurePolicy).

Every Job of a stage gets a fresh name ending in its launch number, so a gang restart never waits for
the deletion of the failed Job. `render_job` returns every object of every stage (a dry run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf
from vlm_core import contract
from vlm_core.spec import API_GROUP, API_VERSION, KIND, TrainerConfig, VLMTrainingJob

ANNOTATION_RESTARTS = "training.vlm.dev/restarts"  # gang restarts of the stage before this Job
# The digest of the fingerprint the stage was launched with (vlm_core.fingerprint; the full record is in the
# stage's ConfigMap): the operator compares it with the spec's while the stage runs (spec_changes).
ANNOTATION_FINGERPRINT = "training.vlm.dev/fingerprint"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on pods by the Job controller
CONTAINER_NAME = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
# The image's non-root user: the Dockerfile's `ARG APP_UID` and the chart's `securityContext` use the
# same number (tests/unit/test_security.py reads all three), so HOME in the image is writable by it.
RUN_AS_USER = 10001
SHM_SIZE = "8Gi"  # NCCL and DataLoader workers use /dev/shm; the container default (64 MiB) is too small
# Trainer pods run under their own ServiceAccount (created by the chart in every watched namespace;
# spec.runPolicy.serviceAccountName overrides it) with no API token mounted: the trainer never calls
# the Kubernetes API.
TRAINER_SERVICE_ACCOUNT = "vlm-trainer"
# A pod always gets a memory limit: a stage without resources.memory gets this one (documented in
# the README and the field's description). Memory-backed /dev/shm counts against it.
DEFAULT_MEMORY = "32Gi"
# A pod always gets a CPU request and limit: a stage without resources.cpu gets one core per torchrun
# process and one per DataLoader worker of each (procsPerNode x (1 + data.workers)), as if it had said so
# (documented in the README and the field's description).
HOME_DIR = "/home/vlm"  # the image's HOME (Dockerfile); an emptyDir, since the root filesystem is read-only
TMP_DIR = "/tmp"
TMP_SIZE = "16Gi"  # torch.compile/Triton caches and fsspec temp files
HOME_SIZE = "8Gi"  # ~/.cache (HF, Triton), ~/.triton
_BASE_MAX = 50  # <base>-<launch>-<pod index> stays a 63-character DNS label (pod hostnames)


def _short(name: str, limit: int) -> str:
    """`name` if it fits, else a prefix plus a stable hash (names stay unique and deterministic)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def stage_base_name(job_name: str, stage_name: str) -> str:
    """`<job>-<stage>`, shortened with a hash when long; starts with a letter (Service names must)."""
    base = f"{job_name}-{stage_name}"
    if not base[0].isalpha():
        base = f"v{base}"
    return _short(base, _BASE_MAX)


def service_name(job_name: str, stage_name: str) -> str:
    return stage_base_name(job_name, stage_name)


def configmap_name(job_name: str, stage_name: str) -> str:
    return f"{stage_base_name(job_name, stage_name)}-config"


def stage_job_name(job_name: str, stage_name: str, launch: int) -> str:
    return f"{stage_base_name(job_name, stage_name)}-{launch}"


def rdzv_endpoint(job_name: str, stage_name: str, launch: int) -> str:
    """Pod 0 of the Indexed Job, through the headless Service: `<job>-0.<service>:29400`."""
    return f"{stage_job_name(job_name, stage_name, launch)}-0.{service_name(job_name, stage_name)}:{contract.RDZV_PORT}"


def stage_labels(job: VLMTrainingJob, index: int) -> dict[str, str]:
    """Labels on every object of a stage (contract names): which job, which stage, who manages it."""
    return {
        contract.LABEL_JOB: job.name,
        contract.LABEL_STAGE: job.spec.stages[index].name,
        contract.LABEL_STAGE_INDEX: str(index),
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
    }


def _metadata(
    name: str, namespace: str, labels: dict[str, str], owner: Mapping[str, Any] | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:  # Kopf's own builder (pure: it only edits the dict)
        kopf.append_owner_reference({"metadata": meta}, owner=cast(kopf.Body, owner))
    return meta


def build_stage_configmap(
    job: VLMTrainingJob, index: int, namespace: str, config: TrainerConfig, owner: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The stage's resolved TrainerConfig (the planner's: init_from, output) as config.json. Never holds
    credentials."""
    stage = job.spec.stages[index]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            configmap_name(job.name, stage.name), namespace, stage_labels(job, index), owner
        ),
        "data": {contract.CONFIG_FILE: json.dumps(config.dump(), indent=2, sort_keys=True)},
    }


def build_stage_service(
    job: VLMTrainingJob, index: int, namespace: str, owner: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Headless Service giving the gang's pods DNS names before they are ready (rendezvous needs it)."""
    stage = job.spec.stages[index]
    labels = stage_labels(job, index)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name(job.name, stage.name), namespace, labels, owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {contract.LABEL_JOB: job.name, contract.LABEL_STAGE: stage.name},
            "ports": [
                {
                    "name": "rdzv",
                    "port": contract.RDZV_PORT,
                    "targetPort": contract.RDZV_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def networkpolicy_name(job_name: str, stage_name: str) -> str:
    return f"{stage_base_name(job_name, stage_name)}-gang"


def build_stage_network_policy(
    job: VLMTrainingJob, index: int, namespace: str, owner: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Ingress to a stage's pods: from the pods of the same gang on any port (rendezvous, NCCL/gloo pick
    their own ports) and to the metrics ports from anywhere (Prometheus). Egress stays open: storage and
    the data live at addresses only the job knows."""
    stage = job.spec.stages[index]
    gang = {contract.LABEL_JOB: job.name, contract.LABEL_STAGE: stage.name}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(networkpolicy_name(job.name, stage.name), namespace, stage_labels(job, index), owner),
        "spec": {
            "podSelector": {"matchLabels": dict(gang)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(gang)}}]},
                {
                    "ports": [
                        {"port": port, "protocol": "TCP"}
                        for port in contract.metrics_ports(stage.resources.procs_per_node)
                    ]
                },
            ],
        },
    }


def torchrun_command(job: VLMTrainingJob, index: int, launch: int) -> list[str]:
    """The container command; `$(JOB_COMPLETION_INDEX)` is expanded by the kubelet from the pod env."""
    stage = job.spec.stages[index]
    name = stage_job_name(job.name, stage.name, launch)
    return [
        "torchrun",
        f"--nnodes={stage.resources.nodes}",
        f"--node_rank=$({COMPLETION_INDEX_ENV})",
        f"--nproc_per_node={stage.resources.procs_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rdzv_endpoint(job.name, stage.name, launch)}",
        f"--rdzv_id={name}",
        "--max_restarts=0",  # the operator restarts the whole gang
        "-m",
        contract.TRAINER_MODULE,
        "--config",
        f"{contract.CONFIG_MOUNT_DIR}/{contract.CONFIG_FILE}",
    ]


def launch_command(job: VLMTrainingJob, index: int, launch: int) -> list[str]:
    """The container command: torchrun under the launcher, which exits with the code `contract.FAILURES`
    gives the first failing rank's exception (torchrun alone exits 1 for any failure) and writes its record
    to the termination message."""
    return ["python", "-m", contract.LAUNCHER_MODULE, "--", *torchrun_command(job, index, launch)]


def pod_failure_policy() -> dict[str, Any]:
    """The stage Job's podFailurePolicy, from the contract's one table: a pod evicted (drain, preemption)
    is ignored (not counted; the Job replaces it), an exit code no restart can fix fails the Job at once.
    Needs restartPolicy Never on the pod template (it is)."""
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": contract.DISRUPTION_CONDITION, "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": sorted(f.exit_code for f in contract.FAILURES if not f.retryable),
                },
            },
        ]
    }


def default_cpu(stage: Any) -> str:
    """CPU of a stage's pod when resources.cpu is unset: a core per process and per DataLoader worker."""
    data = getattr(stage, "data", None)
    workers = getattr(data, "workers", 0) or 0
    return str(stage.resources.procs_per_node * (1 + workers))


def _resources(job: VLMTrainingJob, index: int) -> dict[str, Any]:
    stage = job.spec.stages[index]
    r = stage.resources
    amounts: dict[str, str] = {}
    amounts["cpu"] = r.cpu or default_cpu(stage)
    amounts["memory"] = r.memory or DEFAULT_MEMORY
    limits = dict(amounts)
    if r.gpus_per_node:
        limits[GPU_RESOURCE] = str(r.gpus_per_node)  # extended resources: requests default to limits
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def _env(job: VLMTrainingJob) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": COMPLETION_INDEX_ENV,
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": contract.CONFIG_ENV, "value": f"{contract.CONFIG_MOUNT_DIR}/{contract.CONFIG_FILE}"},
        {"name": contract.METRICS_PORT_ENV, "value": str(contract.METRICS_PORT)},
        {"name": contract.UNBUFFERED_ENV, "value": "1"},
        {"name": contract.TERMINATION_LOG_ENV, "value": contract.TERMINATION_LOG},
    ]
    if job.spec.storage.endpoint_url:
        env.append({"name": contract.ENDPOINT_URL_ENV, "value": job.spec.storage.endpoint_url})
    return env


def build_stage_job(
    job: VLMTrainingJob,
    index: int,
    namespace: str,
    launch: int = 0,
    restarts: int = 0,
    owner: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Indexed batch/v1 Job: `nodes` pods, one torchrun agent each; any failed pod fails the Job
    (backoffLimit 0) so the operator can restart the gang as a whole, except an evicted one, which the
    Job replaces (`pod_failure_policy`)."""
    stage = job.spec.stages[index]
    policy = job.spec.run_policy
    nodes = stage.resources.nodes
    name = stage_job_name(job.name, stage.name, launch)
    labels = {**stage_labels(job, index), contract.LABEL_LAUNCH: str(launch)}
    job_labels = dict(labels)
    if policy.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = policy.queue_name
    metrics_ports = [
        {"name": f"metrics-{r}", "containerPort": port, "protocol": "TCP"}
        for r, port in enumerate(contract.metrics_ports(stage.resources.procs_per_node))
    ]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": job.spec.image.ref,
        "imagePullPolicy": job.spec.image.pull_policy,
        "command": launch_command(job, index, launch),
        "env": _env(job),
        # The launcher writes the first failing rank's error there; without it, the log's tail stands in.
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [{"name": "rdzv", "containerPort": contract.RDZV_PORT, "protocol": "TCP"}, *metrics_ports],
        "volumeMounts": [
            {"name": "config", "mountPath": contract.CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": TMP_DIR},
            {"name": "home", "mountPath": HOME_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if job.spec.storage.secret_ref:
        container["envFrom"] = [{"secretRef": {"name": job.spec.storage.secret_ref}}]
    resources = _resources(job, index)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name(job.name, stage.name),
        "serviceAccountName": policy.service_account_name or TRAINER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(job.name, stage.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
            {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
            {"name": "home", "emptyDir": {"sizeLimit": HOME_SIZE}},
        ],
    }
    if policy.node_selector:
        pod_spec["nodeSelector"] = dict(policy.node_selector)
    if policy.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in policy.tolerations]
    if policy.priority_class_name:
        pod_spec["priorityClassName"] = policy.priority_class_name
    meta = _metadata(name, namespace, job_labels, owner)
    meta["annotations"] = {ANNOTATION_RESTARTS: str(restarts)}
    if fingerprint:
        meta["annotations"][ANNOTATION_FINGERPRINT] = fingerprint
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            "podFailurePolicy": pod_failure_policy(),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def build_stage_objects(
    job: VLMTrainingJob,
    index: int,
    namespace: str,
    config: TrainerConfig,
    launch: int = 0,
    restarts: int = 0,
    owner: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """ConfigMap, Service, NetworkPolicy and Job of one stage, in the order they must be created
    (the Job last). `config` is the stage's config as the planner resolved it (`StartStage.config`)."""
    return [
        build_stage_configmap(job, index, namespace, config, owner),
        build_stage_service(job, index, namespace, owner),
        build_stage_network_policy(job, index, namespace, owner),
        build_stage_job(job, index, namespace, launch, restarts, owner,
                        fingerprint=(config.fingerprint or {}).get("digest")),
    ]


def render_job(job: VLMTrainingJob, namespace: str, configs: Sequence[TrainerConfig],
               uid: str | None = None) -> list[dict[str, Any]]:
    """Every object the operator would create for every stage (first launch), like `helm template`:
    `configs` are the planner's resolved stages (`planner.resolve_stages(job)`), one per stage.

    With `uid` (the VLMTrainingJob's metadata.uid) the objects carry their ownerReferences too.
    """
    owner = None
    if uid is not None:
        owner = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": job.name, "uid": uid},
        }
    out: list[dict[str, Any]] = []
    for i, config in enumerate(configs):
        out.extend(build_stage_objects(job, i, namespace, config, owner=owner))
    return out
