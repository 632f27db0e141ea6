"""The one module that talks to the Kubernetes API (the synchronous `kubernetes` client).

Objects travel as plain wire dicts (camelCase), the same shape the pure builders produce and the
observers read. Creation is idempotent (409 = already there); children are found by labels and the
labels are re-checked here, so a server that ignores label selectors cannot mix jobs up. Children are
deleted explicitly rather than left to garbage collection.

Client-side rate limit, as client-go's clients have it (the Python client has none): a token bucket of
`VLM_OPERATOR_API_QPS` requests per second (default 100) with bursts of `VLM_OPERATOR_API_BURST` (default
200), shared by every thread. A request for a job with a handoff pending (`priority(key)`, whichever
thread makes it: a reconcile of that job already holding its lock inherits the priority) is served
before waiting ordinary ones, and half the bucket is kept for such requests, so a burst of new jobs
cannot hold a finished stage's successor back. Kopf's own requests
(watches, finalizers, Events) go through Kopf's client and are not limited by it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import kubernetes
from kubernetes.client.rest import ApiException
from vlm_core import contract
from vlm_core.redact import redact, redact_obj
from vlm_core.spec import API_GROUP, API_VERSION, PLURAL

from vlm_operator import builders

log = logging.getLogger(__name__)
_lock = threading.Lock()
_api: kubernetes.client.ApiClient | None = None
COMPONENT = "vlm-operator"
API_QPS = float(os.environ.get("VLM_OPERATOR_API_QPS", "100"))
API_BURST = int(os.environ.get("VLM_OPERATOR_API_BURST", "200"))
# Connections kept open to the API server: at least one per reconcile thread (urllib3's default is 10).
API_CONNECTIONS = int(os.environ.get("VLM_OPERATOR_API_CONNECTIONS", "32"))


class RateLimiter:
    """A token bucket (`qps` per second, up to `burst` at once) with two lanes: a waiting priority request
    takes the next token before any ordinary one, and ordinary requests leave `reserve` tokens (default
    half the burst) for priority ones. qps <= 0: no limit."""

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        reserve: int | None = None,
    ) -> None:
        self.qps, self.burst = qps, max(1, burst)
        self.reserve = self.burst // 2 if reserve is None else min(reserve, self.burst - 1)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._cond = threading.Condition()
        self._priority_waiting = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now

    def try_acquire(self, priority: bool = False) -> float:
        """Take a token now (0.0), or the seconds to wait before trying again."""
        with self._cond:
            if self.qps <= 0:
                return 0.0
            self._refill()
            need = 1.0 if priority else 1.0 + self.reserve
            if self._tokens >= need and (priority or self._priority_waiting == 0):
                self._tokens -= 1.0
                return 0.0
            return max((need - self._tokens) / self.qps, 0.001)

    def acquire(self, priority: bool | Callable[[], bool] = False) -> float:
        """Block until a token is taken; returns the seconds waited. `priority` may be a callable, asked
        again while waiting (a request can become urgent while it waits)."""
        urgent = priority if callable(priority) else (lambda: priority)
        waited, counted = 0.0, False
        try:
            while True:
                now_urgent = urgent()
                if now_urgent != counted:
                    with self._cond:
                        self._priority_waiting += 1 if now_urgent else -1
                    counted = now_urgent
                delay = self.try_acquire(now_urgent)
                if delay <= 0:
                    return waited
                self._sleep(min(delay, 0.05) if not now_urgent else delay)
                waited += min(delay, 0.05) if not now_urgent else delay
        finally:
            if counted:
                with self._cond:
                    self._priority_waiting -= 1


limiter = RateLimiter(API_QPS, API_BURST)
_lane = threading.local()
_boosted: dict[Any, int] = {}
_boost_lock = threading.Lock()


@contextlib.contextmanager
def working_for(key: Any) -> Iterator[None]:
    """API requests this thread makes inside the block are for `key` (a job)."""
    before = getattr(_lane, "key", None)
    _lane.key = key
    try:
        yield
    finally:
        _lane.key = before


@contextlib.contextmanager
def priority(key: Any) -> Iterator[None]:
    """While inside, every request for `key` goes first (a stage handoff of that job is pending)."""
    with _boost_lock:
        _boosted[key] = _boosted.get(key, 0) + 1
    try:
        yield
    finally:
        with _boost_lock:
            if _boosted[key] <= 1:
                del _boosted[key]
            else:
                _boosted[key] -= 1


def _urgent() -> bool:
    key = getattr(_lane, "key", None)
    return key is not None and key in _boosted


class _LimitedApiClient(kubernetes.client.ApiClient):
    def request(self, *args: Any, **kwargs: Any) -> Any:
        limiter.acquire(_urgent)
        return super().request(*args, **kwargs)


def load_config() -> None:
    """In-cluster config when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    global _api
    with _lock:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        _api = None


def api_client() -> kubernetes.client.ApiClient:
    global _api
    with _lock:
        if _api is None:
            config = kubernetes.client.Configuration.get_default_copy()
            config.connection_pool_maxsize = max(config.connection_pool_maxsize or 0, API_CONNECTIONS)
            _api = _LimitedApiClient(config)
        return _api


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def _batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def _networking() -> kubernetes.client.NetworkingV1Api:
    return kubernetes.client.NetworkingV1Api(api_client())


def _custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def _raw(resp: Any) -> Any:
    """The response body as wire JSON (calls use _preload_content=False to keep camelCase keys)."""
    return json.loads(resp.data or b"null")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create(obj: Mapping[str, Any]) -> bool:
    """Create a namespaced ConfigMap, Service, NetworkPolicy or Job. False when it already exists."""
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    try:
        if kind == "ConfigMap":
            _core().create_namespaced_config_map(ns, obj, _preload_content=False)
        elif kind == "Service":
            _core().create_namespaced_service(ns, obj, _preload_content=False)
        elif kind == "NetworkPolicy":
            _networking().create_namespaced_network_policy(ns, obj, _preload_content=False)
        elif kind == "Job":
            _batch().create_namespaced_job(ns, obj, _preload_content=False)
        else:
            raise ValueError(f"kube.create: unsupported kind {kind!r}")
    except ApiException as e:
        if e.status == 409:
            return False
        raise
    return True


def apply_configmap(obj: Mapping[str, Any]) -> None:
    """Create the ConfigMap, or bring its data up to date (the spec may have changed)."""
    if not create(obj):
        meta = obj["metadata"]
        _core().patch_namespaced_config_map(
            meta["name"], meta["namespace"], {"data": obj["data"]}, _preload_content=False
        )


def _matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _owned(job_name: str) -> dict[str, str]:
    return {contract.LABEL_JOB: job_name, contract.LABEL_MANAGED_BY: contract.MANAGED_BY}


def list_stage_jobs(namespace: str, job_name: str) -> list[dict[str, Any]]:
    """All batch/v1 Jobs of a VLMTrainingJob (every stage, every launch)."""
    labels = _owned(job_name)
    resp = _batch().list_namespaced_job(namespace, label_selector=_selector(labels), _preload_content=False)
    return [j for j in _raw(resp).get("items", []) if _matches(j, labels)]


def _list_pods(namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    resp = _core().list_namespaced_pod(namespace, label_selector=_selector(labels), _preload_content=False)
    return [p for p in _raw(resp).get("items", []) if _matches(p, labels)]


def list_job_pods(namespace: str, job_name: str) -> list[dict[str, Any]]:
    """The pods of one stage Job (asked only about a failed one: its containers' termination messages)."""
    return _list_pods(namespace, {builders.JOB_NAME_LABEL: job_name})


def _ignore_404(fn: Any, *args: Any, **kwargs: Any) -> bool:
    try:
        fn(*args, **kwargs)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def delete_stage_job(namespace: str, name: str) -> None:
    """Delete a stage Job and its pods now (the whole gang goes; nothing waits for garbage collection)."""
    _ignore_404(
        _batch().delete_namespaced_job,
        name,
        namespace,
        propagation_policy="Background",
        _preload_content=False,
    )
    for pod in _list_pods(namespace, {builders.JOB_NAME_LABEL: name}):
        _ignore_404(
            _core().delete_namespaced_pod,
            pod["metadata"]["name"],
            namespace,
            grace_period_seconds=0,
            _preload_content=False,
        )


def delete_children(namespace: str, job_name: str) -> int:
    """Delete every Job, pod, Service, NetworkPolicy and ConfigMap the operator created for a job."""
    labels = _owned(job_name)
    count = 0
    for j in list_stage_jobs(namespace, job_name):
        delete_stage_job(namespace, j["metadata"]["name"])
        count += 1
    for pod in _list_pods(namespace, {contract.LABEL_JOB: job_name}):
        count += _ignore_404(
            _core().delete_namespaced_pod,
            pod["metadata"]["name"],
            namespace,
            grace_period_seconds=0,
            _preload_content=False,
        )
    sel = _selector(labels)
    for lister, deleter in (
        (_core().list_namespaced_service, _core().delete_namespaced_service),
        (_core().list_namespaced_config_map, _core().delete_namespaced_config_map),
        (_networking().list_namespaced_network_policy, _networking().delete_namespaced_network_policy),
    ):
        for obj in _raw(lister(namespace, label_selector=sel, _preload_content=False)).get("items", []):
            if _matches(obj, labels):
                count += _ignore_404(deleter, obj["metadata"]["name"], namespace, _preload_content=False)
    return count


def read_configmap(namespace: str, name: str) -> dict[str, str] | None:
    """A ConfigMap's data (None if it does not exist)."""
    try:
        resp = _core().read_namespaced_config_map(name, namespace, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return _raw(resp).get("data") or {}


def read_secret(namespace: str, name: str) -> dict[str, str]:
    """A Secret's data, decoded (a job's storage credentials); empty if it does not exist."""
    try:
        resp = _core().read_namespaced_secret(name, namespace, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return {}
        raise
    data = _raw(resp).get("data") or {}
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def get_training_job(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        resp = _custom().get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, _preload_content=False
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return _raw(resp)


def delete_training_job(namespace: str, name: str) -> None:
    _ignore_404(
        _custom().delete_namespaced_custom_object,
        API_GROUP,
        API_VERSION,
        namespace,
        PLURAL,
        name,
        _preload_content=False,
    )


def patch_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """Merge-patch the status subresource. Lists (stages, conditions) are replaced whole."""
    _custom().patch_namespaced_custom_object_status(
        API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": redact_obj(dict(status))}, _preload_content=False
    )


def post_event(owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """A core/v1 Event about a VLMTrainingJob (what `kubectl describe vlmjob` shows), posted by Kopf's
    own event poster (batched, truncated, retried; best effort). Call from a Kopf handler's context."""
    kopf.event(cast(kopf.Body, owner), type=type_, reason=reason, message=redact(message))
