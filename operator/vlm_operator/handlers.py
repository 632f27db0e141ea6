"""Thin Kopf handlers: every trigger runs the same `reconcile.reconcile(namespace, name)`.

Triggers: create/resume/update of a VLMTrainingJob, a periodic timer (progress, storage handoff
checks), and events of the stage Jobs it owns. Delete removes the children explicitly. Handlers are
plain `def` (Kopf runs them in threads) because `kube` uses the synchronous client.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from vlm_trainer import contract
from vlm_trainer.spec import API_GROUP, API_VERSION, PLURAL

from vlm_operator import kube, metrics, reconcile

log = logging.getLogger(__name__)

RESYNC_SECONDS = float(os.environ.get("VLM_OPERATOR_RESYNC_SECONDS", "10"))
RETRY_SECONDS = float(os.environ.get("VLM_OPERATOR_RETRY_SECONDS", "5"))
_RESOURCE = (API_GROUP, API_VERSION, PLURAL)
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
    settings.execution.max_workers = int(os.environ.get("VLM_OPERATOR_WORKERS", "8"))
    # The resync timer is a sync handler (a thread Kopf cannot cancel): on deletion, give a running
    # reconcile a moment to finish and then re-check every second, not every 60 s (Kopf's default).
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 1.0
    kube.load_config()


def _reconcile(namespace: str, name: str, retry: bool) -> str | None:
    try:
        return reconcile.reconcile(namespace, name)
    except Exception as err:
        metrics.RECONCILE_ERRORS.inc()
        log.exception("reconcile of %s/%s failed", namespace, name)
        if retry:
            raise kopf.TemporaryError(f"reconcile failed: {err}", delay=RETRY_SECONDS) from err
        return None


@kopf.on.create(*_RESOURCE)
@kopf.on.resume(*_RESOURCE)
@kopf.on.update(*_RESOURCE, field="spec")
def on_change(namespace: str | None, name: str, **_: Any) -> None:
    _reconcile(namespace or "", name, retry=True)


@kopf.timer(*_RESOURCE, interval=RESYNC_SECONDS, idle=0)
def resync(namespace: str | None, name: str, **_: Any) -> None:
    """Level-triggered safety net and progress/handoff polling (storage changes send no events)."""
    _reconcile(namespace or "", name, retry=False)


@kopf.on.event("batch", "v1", "jobs", labels={contract.LABEL_MANAGED_BY: contract.MANAGED_BY})
def on_stage_job(body: kopf.Body, type: str | None, **_: Any) -> None:
    """A stage Job changed (pods failed, completed): reconcile its VLMTrainingJob now, not at the next timer."""
    labels = body.get("metadata", {}).get("labels") or {}
    owner = labels.get(contract.LABEL_JOB)
    if owner and type != "DELETED":
        _reconcile(body["metadata"]["namespace"], owner, retry=False)


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
