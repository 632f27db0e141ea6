"""Thin Kopf handlers: every trigger runs the same `reconcile.reconcile(namespace, name)`.

Triggers: create/resume/update of a VLMTrainingJob, events of the stage Jobs it owns, and an adaptive
resync timer (progress of a running stage, a pending handoff's storage backoff, a TTL; idle and
finished jobs cost nothing). The stage Jobs come from a Kopf index (an in-memory cache fed by the
Job watch), so no reconcile lists them. Delete removes the children explicitly.

Two lanes: `kube` uses the synchronous client, so reconciles run in threads, but not in one FIFO pool.
A stage Job's event (a handoff: stage k finished, start k+1) runs in its own pool, so it never waits
behind a burst of new jobs' first reconciles or resync ticks; everything else shares the other pool. The
handlers themselves are `async` and cheap (the resync tick checks whether the job is due before it
takes a thread).
"""

from __future__ import annotations

import asyncio
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


def _indexed(index: kopf.Index | None, namespace: str, name: str) -> list[Any] | None:
    if index is None:
        return None
    return list(index.get((namespace, name), []))


def _reconcile(namespace: str, name: str, retry: bool, index: kopf.Index | None = None) -> str | None:
    try:
        return reconcile.reconcile(
            namespace,
            name,
            jobs=_indexed(index, namespace, name),
            resync_seconds=RESYNC_SECONDS,
            progress_seconds=PROGRESS_SECONDS,
        )
    except Exception as err:
        metrics.RECONCILE_ERRORS.inc()
        log.exception("reconcile of %s/%s failed", namespace, name)
        if retry:
            raise kopf.TemporaryError(f"reconcile failed: {err}", delay=RETRY_SECONDS) from err
        return None


async def _in(pool: ThreadPoolExecutor, namespace: str, name: str, retry: bool, index: kopf.Index | None) -> None:
    # The handler's context (Kopf's settings and event poster, which kube.post_event uses) goes along.
    context = contextvars.copy_context()
    call = functools.partial(context.run, _reconcile, namespace, name, retry, index)
    await asyncio.get_running_loop().run_in_executor(pool, call)


@kopf.on.create(*_RESOURCE)
@kopf.on.resume(*_RESOURCE)
@kopf.on.update(*_RESOURCE, field="spec")
async def on_change(namespace: str | None, name: str, **kw: Any) -> None:
    await _in(_pool, namespace or "", name, True, kw.get("stage_jobs"))


# The timer ticks at the resync period but reconciles only when the job is due (reconcile schedules
# it): running stages for progress, pending handoffs at their backoff, waiting jobs 6x slower,
# finished jobs never (or at their TTL). Storage changes send no events; this is the only poller.
@kopf.timer(*_RESOURCE, interval=RESYNC_SECONDS, idle=0)
async def resync(namespace: str | None, name: str, **kw: Any) -> None:
    if reconcile.resync_due(namespace or "", name):
        await _in(_pool, namespace or "", name, False, kw.get("stage_jobs"))


@kopf.on.event("batch", "v1", "jobs", labels=_JOB_LABELS)
async def on_stage_job(body: kopf.Body, type: str | None, **kw: Any) -> None:
    """A stage Job changed (completed, failed, suspended or resumed by Kueue, deleted by hand): reconcile
    its VLMTrainingJob now. The creation of a Job (our own write) needs no reconcile, nor does the
    initial listing (type None): the resume handler reconciles every VLMTrainingJob at start-up."""
    labels = body.get("metadata", {}).get("labels") or {}
    owner = labels.get(contract.LABEL_JOB)
    if not owner or type in (None, "ADDED"):
        return
    await _in(_handoff_pool, body["metadata"]["namespace"], owner, False, kw.get("stage_jobs"))


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
