"""Thin Kopf handlers: every trigger runs the same `reconcile.reconcile(namespace, name)`.

Triggers: create/resume/update of a VLMTrainingJob, events of the stage Jobs it owns, and an adaptive
resync (progress of a running stage, a pending handoff's storage backoff, a waiting job's admission or
preflight, a TTL): one event-loop timer per job that has such a reason, set after each reconcile, and
none for a job whose state only an API event can change (a finished job; no per-job periodic tick).
The VLMTrainingJobs and their stage Jobs come from Kopf indexes (in-memory caches fed by the watches),
so no reconcile reads or lists them. Delete removes the children explicitly.

Two lanes: `kube` uses the synchronous client, so reconciles run in threads, but not in one FIFO pool.
A stage Job's event (a handoff: stage k finished, start k+1) runs in its own pool, so it never waits
behind a burst of new jobs' first reconciles or resync ticks; everything else shares the other pool. The
handlers themselves are `async` and cheap (the resync tick checks whether the job is due before it
takes a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from vlm_core import contract
from vlm_core.spec import API_GROUP, API_VERSION, PLURAL

from vlm_operator import kube, metrics, reconcile

log = logging.getLogger(__name__)

RESYNC_SECONDS = float(os.environ.get("VLM_OPERATOR_RESYNC_SECONDS", "10"))
RETRY_SECONDS = float(os.environ.get("VLM_OPERATOR_RETRY_SECONDS", "5"))
# How often a running stage's progress.json is read into status (storage sends no events).
PROGRESS_SECONDS = float(os.environ.get("VLM_OPERATOR_PROGRESS_SECONDS", str(3 * RESYNC_SECONDS)))
WORKERS = int(os.environ.get("VLM_OPERATOR_WORKERS", "8"))
HANDOFF_WORKERS = int(os.environ.get("VLM_OPERATOR_HANDOFF_WORKERS", "8"))
_RESOURCE = (API_GROUP, API_VERSION, PLURAL)
_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="reconcile")
_handoff_pool = ThreadPoolExecutor(max_workers=HANDOFF_WORKERS, thread_name_prefix="handoff")
_PREFIX = API_GROUP


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep Kopf's own bookkeeping in annotations: the status schema is structural and owned by us."""
    settings.persistence.finalizer = f"{_PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own Events say what happened; Kopf's would repeat it
    # A reconcile runs in a thread Kopf cannot cancel: on deletion, give a running one a moment to finish
    # and then re-check every second, not every 60 s (Kopf's default).
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 1.0
    kube.load_config()


_JOB_LABELS = {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}


@kopf.index("batch", "v1", "jobs", labels=_JOB_LABELS)
def stage_jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    """Every stage Job by (namespace, VLMTrainingJob name): what reconciles read instead of a LIST."""
    owner = labels.get(contract.LABEL_JOB)
    if not owner:
        return None
    return {(namespace, owner): copy.deepcopy(dict(body))}


@kopf.index(*_RESOURCE)
def training_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    """Every VLMTrainingJob by (namespace, name), as its watch last delivered it: what reconciles read
    instead of a GET."""
    return {(namespace, name): copy.deepcopy(dict(body))}


def _indexed(index: kopf.Index | None, namespace: str, name: str) -> list[Any] | None:
    if index is None:
        return None
    return list(index.get((namespace, name), []))


def _body(index: kopf.Index | None, namespace: str, name: str) -> Any:
    """The job's watched body (None: not indexed; the reconcile reads it from the API)."""
    bodies = _indexed(index, namespace, name)
    return bodies[-1] if bodies else None


def _reconcile(
    namespace: str, name: str, retry: bool, indexes: tuple[kopf.Index | None, kopf.Index | None], handoff: bool
) -> str | None:
    stage_index, job_index = indexes
    try:
        key = (namespace, name)
        with kube.priority(key) if handoff else contextlib.nullcontext(), kube.working_for(key):
            return reconcile.reconcile(
                namespace,
                name,
                jobs=_indexed(stage_index, namespace, name),
                resync_seconds=RESYNC_SECONDS,
                progress_seconds=PROGRESS_SECONDS,
                body=_body(job_index, namespace, name),
            )
    except Exception as err:
        metrics.RECONCILE_ERRORS.inc()
        log.exception("reconcile of %s/%s failed", namespace, name)
        if retry:
            raise kopf.TemporaryError(f"reconcile failed: {err}", delay=RETRY_SECONDS) from err
        return None


_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}


def _indexes(kw: dict[str, Any]) -> tuple[kopf.Index | None, kopf.Index | None]:
    """Kopf's indexes are live views: the resync keeps them for later."""
    return kw.get("stage_jobs"), kw.get("training_jobs")


async def _in(
    pool: ThreadPoolExecutor,
    namespace: str,
    name: str,
    retry: bool,
    indexes: tuple[kopf.Index | None, kopf.Index | None],
) -> None:
    # The handler's context (Kopf's settings and event poster, which kube.post_event uses) goes along.
    context = contextvars.copy_context()
    call = functools.partial(context.run, _reconcile, namespace, name, retry, indexes, pool is _handoff_pool)
    try:
        await asyncio.get_running_loop().run_in_executor(pool, call)
    finally:
        _arm(namespace, name, indexes)


def _arm(namespace: str, name: str, indexes: tuple[kopf.Index | None, kopf.Index | None]) -> None:
    """(Re)set this job's resync timer to when the last reconcile said it is due (none: no timer). The
    loop's timer keeps the current context (the handler's), so a resync posts Events like a handler."""
    key = (namespace, name)
    old = _timers.pop(key, None)
    if old is not None:
        old.cancel()
    delay = reconcile.resync_in(namespace, name)
    if delay is not None:
        if delay <= 0:  # the reconcile failed before it could reschedule: try again later, not at once
            delay = RETRY_SECONDS
        _timers[key] = asyncio.get_running_loop().call_later(delay, _fire, namespace, name, indexes)


def _fire(namespace: str, name: str, indexes: tuple[kopf.Index | None, kopf.Index | None]) -> None:
    _timers.pop((namespace, name), None)
    if indexes[1] is not None and not _indexed(indexes[1], namespace, name):
        return  # deleted since
    if reconcile.resync_due(namespace, name):  # else a reconcile of it runs now and re-arms the timer
        task = asyncio.get_running_loop().create_task(_in(_pool, namespace, name, False, indexes))
        _resyncs.add(task)
        task.add_done_callback(_resyncs.discard)


_resyncs: set[asyncio.Task] = set()


@kopf.on.cleanup()
def stop_resyncs(**_: Any) -> None:
    """The operator stops: no resync fires after it (a test's next operator may share this process)."""
    for timer in _timers.values():
        timer.cancel()
    _timers.clear()
    for task in list(_resyncs):
        task.cancel()


@kopf.on.create(*_RESOURCE)
@kopf.on.resume(*_RESOURCE)
@kopf.on.update(*_RESOURCE, field="spec")
async def on_change(namespace: str | None, name: str, **kw: Any) -> None:
    await _in(_pool, namespace or "", name, True, _indexes(kw))


@kopf.on.event("batch", "v1", "jobs", labels=_JOB_LABELS)
async def on_stage_job(body: kopf.Body, type: str | None, **kw: Any) -> None:
    """A stage Job changed (completed, failed, suspended or resumed by Kueue, deleted by hand): reconcile
    its VLMTrainingJob now. The creation of a Job (our own write) needs no reconcile, nor does the
    initial listing (type None): the resume handler reconciles every VLMTrainingJob at start-up."""
    labels = body.get("metadata", {}).get("labels") or {}
    owner = labels.get(contract.LABEL_JOB)
    if not owner or type in (None, "ADDED"):
        return
    await _in(_handoff_pool, body["metadata"]["namespace"], owner, False, _indexes(kw))


@kopf.on.delete(*_RESOURCE)
def on_delete(namespace: str | None, name: str, **_: Any) -> None:
    """Remove every child now; ownerReferences would do it too, but only where a garbage collector runs."""
    namespace = namespace or ""  # the resource is namespaced: Kopf always passes one
    removed = kube.delete_children(namespace, name)
    reconcile.forget(namespace, name)
    log.info("deleted %s/%s and %d child object(s)", namespace, name, removed)


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    return reconcile.known_jobs()
