"""Integration harness: a Kubernetes API emulator, the operator in-process, and a kubelet stand-in.

- `KubeAPI`: kmock's `KubernetesEmulator` with the gaps listed in shared/TESTING.md filled: uid,
  resourceVersion, creationTimestamp and generation stamped; generateName; failed JSON-patch tests
  answered 422; watches served from `resourceVersion` out of a per-resource event log (snapshot and
  subscription under one lock), `sendInitialEvents` closed with a BOOKMARK; lists with a real
  resourceVersion; equality label selectors honoured; a bounded request history (kmock's request matching
  scans it on every request, which made long runs quadratic); optionally a per-request latency
  (`latency=(low, high)` seconds, uniform; every request but a watch's stream, as a real API server's
  round trip; off by default).
- `use_kubeconfig`: a kubeconfig pointing at the emulator, made the `kubernetes` client's default.
- `OperatorRunner`: `kopf.spawn_tasks` + `kopf.run_tasks` with a stop flag in the test's loop.
- `Kubelet`: watches Jobs and runs each pod's container command as local processes with the pod's
  env (JOB_COMPLETION_INDEX, Secret `envFrom`, ConfigMap mounts materialised as temp files, the
  rendezvous host mapped to 127.0.0.1 on a free port), and writes pod and Job status back from exit
  codes like the Job controller (backoffLimit 0: one failed pod fails the Job and kills the rest).
  Like a kubelet it gives each container a file at its `terminationMessagePath` (a local file; the path
  in env values is remapped to it) and puts what the container wrote there, else with
  `FallbackToLogsOnError` the log's tail, in `state.terminated.message`. Like the Job controller it
  applies the Job's `podFailurePolicy`: a pod failing with a listed condition (`drain_pod` sets
  DisruptionTarget, as an eviction does) is ignored and replaced, a listed exit code fails the Job with
  reason PodFailurePolicy.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import json
import logging
import os
import random
import re
import signal
import string
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import attrs
import jsonpatch
import jsonpointer
import kopf
import kubernetes
from kmock import KubernetesEmulator, ResourceInfo, action, resource
from kmock._internal.k8s import KubernetesError, KubernetesObjectConflictError, KubernetesObjectNotFoundError
from ports import free_port
from vlm_core import contract
from vlm_core.spec import API_GROUP, API_VERSION, KIND, PLURAL

if TYPE_CHECKING:
    from s3_server import SeaweedS3

log = logging.getLogger("k8s_harness")
VENV_PYTHON = "/work/main/.venv/bin/python"
CRD_RESOURCE = f"{API_GROUP}/{API_VERSION}/{PLURAL}"
PEERING_RESOURCE = "kopf.dev/v1/clusterkopfpeerings"  # Kopf peering (operator replicas with --peering)
NS = "default"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _match_selector(obj: Mapping[str, Any], selector: str | None) -> bool:
    """Equality-based label selectors (`a=b,c!=d,e`), as the API server applies them."""
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v:
                return False
        elif term and term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class KubeAPI(KubernetesEmulator):
    """The emulator with real resourceVersions, an event log for watches, and the gaps filled."""

    _rv: int = attrs.field(default=0, init=False)
    _log: dict[Any, list[tuple[int, dict[str, Any]]]] = attrs.field(
        factory=lambda: collections.defaultdict(list), init=False
    )
    _watchers: dict[Any, set[asyncio.Queue]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False
    )
    # (group, resource[/subresource], verb) -> count of the requests the operator sent (its clients:
    # Kopf and the `kubernetes` client), checked against vlm_operator.rbac and counted by the bench.
    operator_requests: collections.Counter = attrs.field(factory=collections.Counter, init=False)
    # The requests being served now (by identity): the only history kmock's matching needs.
    _in_flight: dict[int, Any] = attrs.field(factory=dict, init=False)
    # (low, high) seconds added to each request before it is served (None: answer at once).
    latency: tuple[float, float] | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.resources[CRD_RESOURCE] = ResourceInfo(
            kind=KIND,
            singular=KIND.lower(),
            namespaced=True,
            subresources={"status"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
        self.resources[PEERING_RESOURCE] = ResourceInfo(
            kind="ClusterKopfPeering",
            singular="clusterkopfpeering",
            namespaced=False,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )

    # -- state changes -------------------------------------------------------------------------
    def _publish(self, res: Any, type_: str, raw: dict[str, Any]) -> None:
        event = {"type": type_, "object": copy.deepcopy(raw)}
        self._log[res].append((self._rv, event))
        for q in list(self._watchers[res]):
            q.put_nowait(event)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _audit(self, request: Any) -> None:
        agent = str((getattr(request, "headers", None) or {}).get("User-Agent", ""))
        if request.resource is None or not request.resource.plural:
            return  # discovery (/api, /apis/<group>/<version>): open to every authenticated client
        if not agent.startswith(("kopf", "OpenAPI-Generator")):
            return
        verb = {
            action.LIST: "list",
            action.WATCH: "watch",
            action.FETCH: "get",
            action.CREATE: "create",
            action.DELETE: "delete",
        }.get(request.action)
        if request.action == action.UPDATE:
            verb = "update" if str(getattr(request, "method", "")).upper() == "PUT" else "patch"
        sub = getattr(request, "subresource", None)
        resource = f"{request.resource.plural}/{sub}" if sub else request.resource.plural
        self.operator_requests[(request.resource.group or "", resource, verb)] += 1

    async def _handle(self, request: Any) -> Any:
        self._audit(request)
        # kmock matches each request against views over its whole request history (O(history) per
        # request: at 100 jobs that was ~14 ms of the emulator's CPU per request). Nothing here asserts
        # on old requests, so the history is only the requests being served now (kmock appends a request
        # and calls this at once, so the one being matched is always among them).
        self._in_flight[id(request)] = request
        self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        for payload in self._payloads:
            payload._requests[:] = [r for r in payload._requests if id(r) in self._in_flight]
        try:
            if self.latency is not None and request.action != action.WATCH:
                await asyncio.sleep(random.uniform(*self.latency))
            return await self._handle_in_flight(request)
        finally:
            self._in_flight.pop(id(request), None)

    async def _handle_in_flight(self, request: Any) -> Any:  # noqa: C901 (one switch over the verbs)
        if request.resource is None or request.action not in (action.CREATE, action.UPDATE, action.DELETE):
            return await super()._handle(request)
        res = request.resource
        delete_key = None
        async with self._lock:
            if request.action == action.CREATE:
                obj = request.data
                meta = obj.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + "".join(
                        random.choices(string.ascii_lowercase + string.digits, k=5)
                    )
                ns = request.namespace or meta.get("namespace")
                if ns:
                    meta["namespace"] = ns
                key = (res, ns, meta.get("name"))
                if key in self._objects and not self._objects[key].deleted:
                    raise KubernetesObjectConflictError()
                meta.update(
                    uid=str(uuid.uuid4()),
                    resourceVersion=self._next_rv(),
                    creationTimestamp=_now(),
                    generation=1,
                )
                meta.pop("deletionTimestamp", None)
                if key in self._objects:
                    self._objects[key].create(obj)
                else:
                    self._objects[key] = obj
                self._publish(res, "ADDED", self._objects[key].raw)
            elif request.action == action.UPDATE and request.name is not None:
                key = (res, request.namespace, request.name)
                if key not in self._objects or self._objects[key].deleted:
                    raise KubernetesObjectNotFoundError()
                stored = self._objects[key]
                old = copy.deepcopy(stored.raw)
                try:
                    stored.patch(request.data)
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                    raise KubernetesError(
                        status=422, reason="Invalid", message=f"patch rejected: {e}"
                    ) from None
                new_meta = dict(stored.last.raw.get("metadata") or {})
                for k in ("uid", "creationTimestamp", "name", "namespace"):
                    if k in old["metadata"]:
                        new_meta[k] = old["metadata"][k]
                new_meta["resourceVersion"] = self._next_rv()
                gen = old["metadata"].get("generation", 1)
                new_meta["generation"] = gen + 1 if stored.last.raw.get("spec") != old.get("spec") else gen
                stored.last["metadata"] = new_meta
                self._publish(res, "MODIFIED", stored.raw)
                if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
                    delete_key = key
            elif request.action == action.DELETE and request.name is not None:
                key = (res, request.namespace, request.name)
                if key not in self._objects or self._objects[key].deleted:
                    raise KubernetesObjectNotFoundError()
                stored = self._objects[key]
                meta = stored.raw.get("metadata") or {}
                if meta.get("deletionTimestamp"):
                    pass
                elif meta.get("finalizers"):
                    stored.patch(
                        {"metadata": {"deletionTimestamp": _now(), "resourceVersion": self._next_rv()}}
                    )
                    self._publish(res, "MODIFIED", stored.raw)
                else:
                    delete_key = key
        try:
            return await super(KubernetesEmulator, self)._handle(request)
        finally:
            if delete_key is not None:
                async with self._lock:
                    stored = self._objects[delete_key]
                    if not stored.deleted:
                        raw = copy.deepcopy(stored.raw)
                        raw["metadata"]["resourceVersion"] = self._next_rv()
                        stored.delete()
                        self._publish(res, "DELETED", raw)

    # -- reads ----------------------------------------------------------------------------------
    def _KubernetesEmulator__get_obj(self, request: Any, strict: bool) -> Any:  # noqa: N802 (kmock's private name)
        """kmock scans every object for a GET/PATCH/DELETE of one (O(objects) per request: the
        emulator's CPU at 1,000 jobs); the objects are keyed by (resource, namespace, name)."""
        key = (request.resource, request.namespace, request.name)
        return self._objects[key] if key in self._objects else None

    def _live(self, request: Any) -> list[dict[str, Any]]:
        out = []
        for (res, ns, _name), obj in self._objects.items():
            if res != request.resource or obj.deleted:
                continue
            if request.namespace is not None and ns != request.namespace:
                continue
            raw = obj.raw
            if _match_selector(raw, request.params.get("labelSelector")):
                out.append(copy.deepcopy(raw))
        return out

    async def _serve_list(self, request: Any) -> Any:
        if request.resource not in self._get_resources():
            return await super()._serve_list(request)  # raises the 404 the parent raises
        async with self._lock:
            items = self._live(request)
            rv = str(self._rv)
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        yield b""
        res = request.resource
        since = request.params.get("resourceVersion")
        initial = request.params.get("sendInitialEvents") == "true"
        queue: asyncio.Queue = asyncio.Queue()
        async with self._lock:
            if initial or not since or since == "0":
                events = [{"type": "ADDED", "object": o} for o in self._live(request)]
                if initial:
                    events.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": KIND if res.plural == PLURAL else "Object",
                                "apiVersion": f"{res.group}/{res.version}".lstrip("/"),
                                "metadata": {
                                    "resourceVersion": str(self._rv),
                                    "annotations": {"k8s.io/initial-events-end": "true"},
                                },
                            },
                        }
                    )
            else:
                events = [e for v, e in self._log[res] if v > int(since)]
            self._watchers[res].add(queue)
        try:
            for e in events:
                if self._watch_match(request, e):
                    yield e
            while True:
                e = await queue.get()
                if self._watch_match(request, e):
                    yield e
        finally:
            self._watchers[res].discard(queue)

    def _watch_match(self, request: Any, event: Mapping[str, Any]) -> bool:
        if event["type"] == "BOOKMARK":
            return True
        meta = event["object"].get("metadata") or {}
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        return _match_selector(event["object"], request.params.get("labelSelector"))

    # -- test helpers ---------------------------------------------------------------------------
    def list_objects(self, res: str, namespace: str | None = None) -> list[dict[str, Any]]:
        r = resource(res)
        return [
            copy.deepcopy(o.raw)
            for (rr, ns, _), o in self._objects.items()
            if rr == r and not o.deleted and (namespace is None or ns == namespace)
        ]

    def get_object(self, res: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (resource(res), namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None


def write_kubeconfig(url: str, path: str) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url.rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    }
    with open(path, "w") as f:
        json.dump(config, f)
    return path


@contextlib.contextmanager
def use_kubeconfig(path: str) -> Iterator[None]:
    """Point the `kubernetes` client (which read $KUBECONFIG at import) and Kopf at this kubeconfig."""
    from kubernetes.config import kube_config

    old_env, old_default = os.environ.get("KUBECONFIG"), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = path
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path
    try:
        yield
    finally:
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default
        if old_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old_env


class _NotKopfTasks(Collection):
    """A live 'ignored' set for `kopf.run_tasks`: every task whose coroutine is not Kopf's own
    (the emulator's request handlers, the kubelet, pytest-asyncio) survives the operator's stop."""

    def __contains__(self, task: object) -> bool:
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        return code is None or f"{os.sep}kopf{os.sep}" not in code.co_filename

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0


class OperatorRunner:
    """The operator (handlers from `vlm_operator.handlers`) running in the current event loop."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float = 10.0) -> None:
        from vlm_operator import handlers  # noqa: F401 (registers the handlers)

        settings = kopf.OperatorSettings()
        settings.watching.connect_timeout = 5
        settings.watching.server_timeout = 60
        self._stop = asyncio.Event()
        ready = asyncio.Event()
        kwargs: dict[str, Any] = {"namespaces": [self.namespace]} if self.namespace else {"clusterwide": True}
        tasks = await kopf.spawn_tasks(
            settings=settings, standalone=True, stop_flag=self._stop, ready_flag=ready, **kwargs
        )
        self._task = asyncio.create_task(kopf.run_tasks(tasks, ignored=_NotKopfTasks()))
        await asyncio.wait_for(ready.wait(), timeout)

    async def stop(self, timeout: float = 20.0) -> None:
        if self._stop is None or self._task is None:
            return
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)
        self._stop = self._task = None

    async def __aenter__(self) -> OperatorRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class PodProcess:
    namespace: str
    name: str
    job: str
    index: int
    proc: asyncio.subprocess.Process
    log_path: str
    killed: bool = False
    termination_path: str = ""
    ignored: bool = False  # failed, but the Job's podFailurePolicy ignores it (evicted): replaced


CommandMapper = Callable[[list[str], dict[str, str]], list[str]]


def torchrun_as_python(argv: list[str], env: dict[str, str]) -> list[str]:
    """`torchrun ...` as the venv's `python -m torch.distributed.run ...` (the default mapping), also
    under the launcher (`python -m vlm_trainer.launch -- torchrun ...`: `python` is the venv's)."""
    if argv[:3] == ["python", "-m", contract.LAUNCHER_MODULE]:
        argv = [python_executable(), *argv[1:]]
    if "torchrun" in argv:
        i = argv.index("torchrun")
        return [*argv[:i], python_executable(), "-m", "torch.distributed.run", *argv[i + 1 :]]
    return argv


TERMINATION_MESSAGE_MAX = 4096  # bytes of the container's file the kubelet keeps
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # FallbackToLogsOnError: the log's tail, whichever is smaller


def termination_message(container: Mapping[str, Any], termination_path: str, log_path: str, code: int) -> str:
    """What a kubelet puts in `state.terminated.message`: the container's termination file, else (policy
    FallbackToLogsOnError, a failed container) the last 80 lines / 2048 bytes of its log."""
    with contextlib.suppress(OSError), open(termination_path, "rb") as f:
        text = f.read(TERMINATION_MESSAGE_MAX).decode(errors="replace")
        if text:
            return text
    if code == 0 or container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
        return ""
    with contextlib.suppress(OSError), open(log_path, "rb") as f:
        tail = b"\n".join(f.read().splitlines()[-FALLBACK_LOG_LINES:])[-FALLBACK_LOG_BYTES:]
        return tail.decode(errors="replace")
    return ""


def policy_rule(job: Mapping[str, Any], pod: Mapping[str, Any], container: str, code: int) -> tuple[int, str] | None:
    """(index, action) of the first podFailurePolicy rule a failed pod matches, like the Job controller."""
    conditions = {(c.get("type"), c.get("status")) for c in (pod.get("status") or {}).get("conditions") or []}
    for i, rule in enumerate(((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []):
        on_codes = rule.get("onExitCodes")
        if on_codes and on_codes.get("containerName", container) == container:
            listed = code in on_codes.get("values", [])
            if listed == (on_codes.get("operator") == "In"):
                return i, rule["action"]
        for pattern in rule.get("onPodConditions") or []:
            if (pattern.get("type"), pattern.get("status", "True")) in conditions:
                return i, rule["action"]
    return None


@dataclass
class Kubelet:
    """Runs the pods of every Job in the emulator as local processes and reports their status."""

    base_url: str
    workdir: str
    command_mapper: CommandMapper = torchrun_as_python
    extra_env: dict[str, str] = field(default_factory=dict)
    poll_seconds: float = 0.2
    pods: dict[tuple[str, str], PodProcess] = field(default_factory=dict)
    started_jobs: set[str] = field(default_factory=set)  # Job uids
    rdzv_ports: dict[str, int] = field(default_factory=dict)  # per Job uid
    # When set (and not yet released), a Job whose pods all succeeded is reported Complete only once
    # this event is set: a test can fault storage between a stage's commit and its handoff.
    completion_gate: asyncio.Event | None = None
    _task: asyncio.Task | None = None
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kubelet:
        self._session = aiohttp.ClientSession(self.base_url.rstrip("/") + "/")
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for p in list(self.pods.values()):
            self._kill(p)
        for p in list(self.pods.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.proc.wait(), 10)
        if self._session:
            await self._session.close()

    # -- API helpers ----------------------------------------------------------------------------
    async def _get(self, path: str) -> Any:
        assert self._session is not None
        async with self._session.get(path.lstrip("/")) as r:
            return await r.json() if r.status == 200 else None

    async def _post(self, path: str, body: Any) -> Any:
        assert self._session is not None
        async with self._session.post(path.lstrip("/"), json=body) as r:
            return await r.json()

    async def _patch(self, path: str, body: Any) -> None:
        assert self._session is not None
        async with self._session.patch(
            path.lstrip("/"), data=json.dumps(body), headers={"Content-Type": "application/merge-patch+json"}
        ) as r:
            await r.read()

    async def _delete(self, path: str) -> None:
        assert self._session is not None
        async with self._session.delete(path.lstrip("/")) as r:
            await r.read()

    # -- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kubelet tick failed")
            await asyncio.sleep(self.poll_seconds)

    async def _tick(self) -> None:
        jobs = (await self._get("/apis/batch/v1/jobs") or {}).get("items", [])
        live = {j["metadata"]["uid"]: j for j in jobs if not j["metadata"].get("deletionTimestamp")}
        for uid, j in live.items():
            if uid not in self.started_jobs and not (j.get("status") or {}).get("conditions"):
                self.started_jobs.add(uid)
                await self._start_job(j)
        pods = (await self._get("/api/v1/pods") or {}).get("items", [])
        existing = {
            (p["metadata"]["namespace"], p["metadata"]["name"])
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
        }
        live_names = {(j["metadata"]["namespace"], j["metadata"]["name"]) for j in live.values()}
        for key, p in list(self.pods.items()):
            if key not in existing or (p.namespace, p.job) not in live_names:
                self._kill(p)  # pod or its Job deleted: the container is stopped
                if key in existing:
                    await self._delete(f"/api/v1/namespaces/{p.namespace}/pods/{p.name}")

    async def _materialise_volumes(
        self, ns: str, spec: Mapping[str, Any], container: Mapping[str, Any], pod_dir: str
    ) -> dict[str, str]:
        """ConfigMap volumes as local folders: {mountPath: local dir}."""
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            v = volumes.get(m["name"]) or {}
            if "configMap" not in v:
                continue
            cm = await self._get(f"/api/v1/namespaces/{ns}/configmaps/{v['configMap']['name']}")
            local = os.path.join(pod_dir, m["name"])
            os.makedirs(local, exist_ok=True)
            for fname, text in ((cm or {}).get("data") or {}).items():
                with open(os.path.join(local, fname), "w") as f:
                    f.write(text)
            mounts[m["mountPath"]] = local
        return mounts

    async def _pod_env(self, ns: str, container: Mapping[str, Any], pod: Mapping[str, Any]) -> dict[str, str]:
        # The pod sees what its spec gives it: storage credentials only through the Secret.
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("AWS_")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **self.extra_env)
        for src in container.get("envFrom") or []:
            if "secretRef" in src:
                secret = await self._get(f"/api/v1/namespaces/{ns}/secrets/{src['secretRef']['name']}")
                if secret is None:
                    raise RuntimeError(
                        f"pod {pod['metadata']['name']}: Secret {src['secretRef']['name']} not found"
                    )
                for k, v in (secret.get("data") or {}).items():
                    env[k] = base64.b64decode(v).decode()
                env.update(secret.get("stringData") or {})
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = _expand(e["value"], env)
            elif "fieldRef" in (e.get("valueFrom") or {}):
                env[e["name"]] = _field_ref(pod, e["valueFrom"]["fieldRef"]["fieldPath"])
        return env

    async def _start_job(self, job: Mapping[str, Any]) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        self.rdzv_ports[job["metadata"]["uid"]] = free_port()
        await self._patch(
            f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status",
            {"status": {"startTime": _now(), "active": job["spec"]["parallelism"]}},
        )
        for index in range(job["spec"]["completions"]):
            await self._start_pod(job, index)

    async def _start_pod(self, job: Mapping[str, Any], index: int) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        spec = job["spec"]["template"]["spec"]
        container = spec["containers"][0]
        rdzv_port = self.rdzv_ports[job["metadata"]["uid"]]
        pod_name = f"{name}-{index}-{''.join(random.choices(string.ascii_lowercase, k=5))}"
        labels = {
            **(job["spec"]["template"]["metadata"].get("labels") or {}),
            "batch.kubernetes.io/job-name": name,
            "job-name": name,
            "batch.kubernetes.io/job-completion-index": str(index),
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": ns,
                "labels": labels,
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {**spec, "hostname": f"{name}-{index}"},
            "status": {"phase": "Pending"},
        }
        pod = await self._post(f"/api/v1/namespaces/{ns}/pods", pod)
        pod_dir = os.path.join(self.workdir, ns, pod_name)
        os.makedirs(pod_dir, exist_ok=True)
        mounts = await self._materialise_volumes(ns, spec, container, pod_dir)
        # the container's termination message file, as the kubelet mounts it (empty at start)
        termination_path = os.path.join(pod_dir, "termination-log")
        open(termination_path, "w").close()
        mounts[container.get("terminationMessagePath") or "/dev/termination-log"] = termination_path
        env = await self._pod_env(ns, container, pod)
        env = {k: _remap_paths(v, mounts) for k, v in env.items()}
        if contract.METRICS_PORT_ENV in env:  # every pod has its own network namespace on a cluster
            env[contract.METRICS_PORT_ENV] = str(free_port())
        argv = [
            _remap_paths(_expand(a, env), mounts)
            for a in [*container.get("command", []), *container.get("args", [])]
        ]
        argv = [_remap_rdzv(a, rdzv_port) for a in argv]
        argv = self.command_mapper(argv, env)
        log_path = os.path.join(pod_dir, "log.txt")
        with open(log_path, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=pod_dir,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        p = PodProcess(ns, pod_name, name, index, proc, log_path, termination_path=termination_path)
        self.pods[(ns, pod_name)] = p
        await self._patch(
            f"/api/v1/namespaces/{ns}/pods/{pod_name}/status",
            {"status": {"phase": "Running", "startTime": _now()}},
        )
        asyncio.create_task(self._watch_pod(p, job))

    async def _watch_pod(self, p: PodProcess, job: Mapping[str, Any]) -> None:
        code = await p.proc.wait()
        phase = "Succeeded" if code == 0 else "Failed"
        container = job["spec"]["template"]["spec"]["containers"][0]
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": ("Completed" if code == 0 else "Error"),
            "finishedAt": _now(),
        }
        message = termination_message(container, p.termination_path, p.log_path, code)
        if message:
            terminated["message"] = message
        await self._patch(
            f"/api/v1/namespaces/{p.namespace}/pods/{p.name}/status",
            {
                "status": {
                    "phase": phase,
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "ready": False,
                            "restartCount": 0,
                            "image": "local",
                            "imageID": "local",
                            "state": {"terminated": terminated},
                        }
                    ],
                }
            },
        )
        await self._update_job(p.namespace, p.job, job, failed_pod=None if code == 0 else (p, code))

    async def _update_job(
        self, ns: str, name: str, job: Mapping[str, Any], failed_pod: tuple[PodProcess, int] | None
    ) -> None:
        current = await self._get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")
        if current is None or current["metadata"]["uid"] != job["metadata"]["uid"]:
            return
        status = current.get("status") or {}
        if status.get("conditions"):
            return  # already finished
        rule = None
        if failed_pod is not None:
            pod = await self._get(f"/api/v1/namespaces/{ns}/pods/{failed_pod[0].name}") or {}
            container = job["spec"]["template"]["spec"]["containers"][0]["name"]
            rule = policy_rule(job, pod, container, failed_pod[1])
        if rule is not None and rule[1] == "Ignore":  # not counted; the Job controller replaces the pod
            failed_pod[0].ignored = True  # type: ignore[index]
            await self._start_pod(job, failed_pod[0].index)  # type: ignore[index]
            return
        mine = [p for p in self.pods.values() if p.job == name and p.namespace == ns and not p.ignored]
        done = [p for p in mine if p.proc.returncode is not None]
        succeeded = sum(1 for p in done if p.proc.returncode == 0)
        failed = len(done) - succeeded
        patch: dict[str, Any] = {"active": len(mine) - len(done), "succeeded": succeeded, "failed": failed}
        if failed_pod is not None:
            for p in mine:  # backoffLimit 0: the Job fails and its other pods are terminated
                self._kill(p)
            reason, message = "BackoffLimitExceeded", f"pod {failed_pod[0].name} exited with code {failed_pod[1]}"
            if rule is not None and rule[1] == "FailJob":
                reason = "PodFailurePolicy"
                message = (f"Container {job['spec']['template']['spec']['containers'][0]['name']} for pod "
                           f"{ns}/{failed_pod[0].name} failed with exit code {failed_pod[1]} matching FailJob rule "
                           f"at index {rule[0]}")
            patch["conditions"] = [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": _now(),
                }
            ]
        elif succeeded == job["spec"]["completions"]:
            if self.completion_gate is not None:
                await self.completion_gate.wait()
            patch["conditions"] = [{"type": "Complete", "status": "True", "lastTransitionTime": _now()}]
            patch["completionTime"] = _now()
        else:
            await self._patch(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status", {"status": patch})
            return
        await self._patch(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status", {"status": patch})

    def _kill(self, p: PodProcess) -> None:
        """Stop the whole container: torchrun starts its workers in sessions of their own, so killing
        the process group would leave them training; kill every descendant, as a cgroup kill would."""
        if p.proc.returncode is None:
            p.killed = True
            for pid in [*_descendants(p.proc.pid), p.proc.pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    async def drain_pod(self, job_name_prefix: str, index: int = 0) -> PodProcess:
        """Evict a running pod as `kubectl drain` does: the pod gets the DisruptionTarget condition, then its
        container is stopped (the Job's podFailurePolicy decides what that failure means)."""
        for p in self.pods.values():
            if p.job.startswith(job_name_prefix) and p.index == index and p.proc.returncode is None:
                condition = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                             "message": "Eviction API: evicting", "lastTransitionTime": _now()}
                await self._patch(f"/api/v1/namespaces/{p.namespace}/pods/{p.name}/status",
                                  {"status": {"conditions": [condition]}})
                self._kill(p)
                return p
        raise LookupError(f"no running pod {index} of a Job named {job_name_prefix}*")

    def kill_pod(self, job_name_prefix: str, index: int = 1) -> PodProcess:
        """Crash a running pod (SIGKILL), as a node failure would."""
        for p in self.pods.values():
            if p.job.startswith(job_name_prefix) and p.index == index and p.proc.returncode is None:
                self._kill(p)
                return p
        raise LookupError(f"no running pod {index} of a Job named {job_name_prefix}*")

    def log_contains(self, job_name: str, text: str) -> bool:
        """Whether any pod of the Job printed `text` (like `kubectl logs -f` on each pod)."""
        for p in self.pods.values():
            if p.job == job_name:
                with contextlib.suppress(OSError), open(p.log_path, errors="replace") as f:
                    if text in f.read():
                        return True
        return False

    def running(self) -> list[PodProcess]:
        return [p for p in self.pods.values() if p.proc.returncode is None]

    def logs(self) -> str:
        out = []
        for p in self.pods.values():
            with contextlib.suppress(OSError), open(p.log_path, errors="replace") as f:
                out.append(f"==== {p.name} (exit {p.proc.returncode}) ====\n{f.read()[-4000:]}")
        return "\n".join(out)


def _descendants(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc), children first collected before any is killed."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[ppid].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def _field_ref(pod: Mapping[str, Any], path: str) -> str:
    m = re.match(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
    if m:
        return str((pod["metadata"].get(m.group(1)) or {}).get(m.group(2), ""))
    if path == "metadata.name":
        return pod["metadata"]["name"]
    if path == "metadata.namespace":
        return pod["metadata"]["namespace"]
    raise ValueError(f"fieldRef {path!r} is not supported by the kubelet stand-in")


def _remap_paths(value: str, mounts: Mapping[str, str]) -> str:
    for mount, local in mounts.items():
        value = value.replace(mount, local)
    return value


def _remap_rdzv(arg: str, port: int) -> str:
    """The rendezvous host (pod 0 through the headless Service) is this machine, on a free port."""
    if arg.startswith("--rdzv_endpoint=") or arg.startswith("--rdzv-endpoint="):
        return f"{arg.split('=', 1)[0]}=127.0.0.1:{port}"
    return arg


async def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.2, message: str = "condition"
) -> Any:
    """Poll `predicate` (sync or async) until truthy; fail with `message` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}")
        await asyncio.sleep(interval)


@dataclass
class Cluster:
    api: KubeAPI
    http: aiohttp.ClientSession
    kubelet: Kubelet
    operator: OperatorRunner
    s3: SeaweedS3
    run: str

    @property
    def storage_uri(self) -> str:
        return f"s3://{self.s3.bucket}/{self.run}"

    async def create(self, doc: dict[str, Any]) -> None:
        async with self.http.post(
            f"apis/training.vlm.dev/v1alpha1/namespaces/{NS}/vlmtrainingjobs", json=doc
        ) as r:
            assert r.status in (200, 201), await r.text()

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        async with self.http.patch(
            f"apis/training.vlm.dev/v1alpha1/namespaces/{NS}/vlmtrainingjobs/{name}",
            json={"spec": spec},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            assert r.status == 200, await r.text()

    async def delete(self, name: str) -> None:
        async with self.http.delete(
            f"apis/training.vlm.dev/v1alpha1/namespaces/{NS}/vlmtrainingjobs/{name}"
        ) as r:
            assert r.status == 200, await r.text()

    def job(self, name: str) -> dict[str, Any] | None:
        return self.api.get_object(CRD_RESOURCE, NS, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.job(name) or {}).get("status") or {}

    def owned(self, res: str, name: str) -> list[dict[str, Any]]:
        return [
            o
            for o in self.api.list_objects(res, NS)
            if (o["metadata"].get("labels") or {}).get("training.vlm.dev/job") == name
        ]

    def jobs_ever_created(self, name: str) -> set[str]:
        """Names of every stage Job ever created for `name` (deleted ones included)."""
        out = set()
        for (res, _ns, obj_name), obj in self.api.objects.items():
            if str(res.group) == "batch" and res.plural == "jobs":
                first = next(v for v in obj.history if v is not None)
                if (first.raw["metadata"].get("labels") or {}).get("training.vlm.dev/job") == name:
                    out.add(obj_name)
        return out

    def events(self, name: str) -> list[str]:
        return [
            e["reason"]
            for e in self.api.list_objects("v1/events", NS)
            if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == "VLMTrainingJob"
        ]

    async def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        try:
            await wait_for(
                lambda: self.status(name).get("phase") == phase, timeout, message=f"{name} {phase}"
            )
        except TimeoutError:
            raise AssertionError(
                f"{name} never reached {phase}: status={self.status(name)}\n{self.kubelet.logs()}"
            ) from None
        return self.status(name)


def python_executable() -> str:
    return VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable


def replace_trainer_module(script: str) -> CommandMapper:
    """A command mapper running `script` where the pod runs `-m vlm_trainer` (torchrun kept)."""

    def mapper(argv: list[str], env: dict[str, str]) -> list[str]:
        argv = torchrun_as_python(argv, env)
        for i in range(len(argv) - 1):
            if argv[i] == "-m" and argv[i + 1] == contract.TRAINER_MODULE:
                return [*argv[:i], script, *argv[i + 2 :]]
        raise ValueError(f"no `-m {contract.TRAINER_MODULE}` in the pod command {argv}")

    return mapper


__all__ = [
    "KubeAPI",
    "Kubelet",
    "OperatorRunner",
    "use_kubeconfig",
    "write_kubeconfig",
    "wait_for",
    "free_port",
    "torchrun_as_python",
    "kubernetes",
]
