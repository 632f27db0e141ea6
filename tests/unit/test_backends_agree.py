"""The local backend and the operator surface the same failure reason for the same situation: both ask
the one planner, which counts restarts and runs preflight (no torch, no cluster: the API and the stage
runs are stand-ins)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
from job_fixtures import GOOD
from vlm_core.spec import parse_job
from vlm_core.storage import Verification
from vlm_operator import builders, kube, local, planner, reconcile

NS = "team-a"


def job_doc(tmp_path: Path, max_restarts: int) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["metadata"] = {"name": "demo", "namespace": NS, "generation": 1}
    doc["spec"]["model"].update(visionEncoder=str(tmp_path / "no-vision"), languageModel=str(tmp_path / "no-lm"))
    doc["spec"]["storage"]["uri"] = f"file://{tmp_path}/store"
    doc["spec"]["runPolicy"] = {"maxRestarts": max_restarts}
    return doc


def run_locally(doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch, stage_error: str | None) -> local.RunResult:
    runner = local.LocalRunner(parse_job(doc))
    runs: list[int] = []

    def run_stage(cfg: Any) -> tuple[bool, str, bool]:  # every launch fails the same way
        runs.append(cfg.stage_index)
        return False, stage_error or "", True

    monkeypatch.setattr(runner, "_run_stage", run_stage)
    if stage_error:  # the inputs are stand-ins: let the first launch pass its preflight
        monkeypatch.setattr(local.preflight, "check_stage", lambda job, index, options=None: [])
    try:
        return runner._plan_and_run()
    finally:
        shutil.rmtree(runner.log_dir, ignore_errors=True)


class FakeApi:
    """The few kube calls one reconcile makes, recorded."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc, self.status, self.created = doc, None, []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(kube, "get_training_job", lambda ns, name: copy.deepcopy(self.doc))
        monkeypatch.setattr(kube, "patch_status", lambda ns, name, status: setattr(self, "status", status))
        monkeypatch.setattr(kube, "post_event", lambda *a: None)
        monkeypatch.setattr(kube, "create", lambda obj: self.created.append(obj) or True)
        monkeypatch.setattr(kube, "apply_configmap", lambda obj: None)
        monkeypatch.setattr(kube, "delete_stage_job", lambda ns, name: None)
        monkeypatch.setattr(kube, "list_job_pods", lambda ns, name: [])
        monkeypatch.setattr(kube, "now", lambda: "2026-12-07T10:00:00Z")


def reconcile_once(doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch, jobs: list[dict[str, Any]],
                   ) -> dict[str, Any]:
    api = FakeApi(doc)
    api.install(monkeypatch)
    reconcile.forget(NS, "demo")
    reconcile.reconcile(NS, "demo", verify=lambda uri: Verification(False, "no manifest.json"), jobs=jobs)
    reconcile.forget(NS, "demo")
    assert api.status is not None
    return api.status


def failed_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Failed")


def test_a_failing_preflight_reads_the_same_on_both_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = job_doc(tmp_path, max_restarts=2)  # the model is missing: the real preflight fails
    result = run_locally(doc, monkeypatch, None)
    status = reconcile_once(doc, monkeypatch, [])
    expected = result.message
    assert expected.startswith("stage 'align' failed with a configuration error (not retried): preflight failed: ")
    assert f"spec.model.visionEncoder: no Hugging Face checkpoint at {tmp_path / 'no-vision'}" in expected
    assert not result.succeeded
    assert status["phase"] == "Failed" and status["message"] == expected
    assert failed_condition(status)["reason"] == planner.FAIL_PREFLIGHT
    assert result.stages[0].attempts == 0  # nothing was launched


def test_exhausted_restarts_read_the_same_on_both_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = job_doc(tmp_path, max_restarts=1)
    result = run_locally(doc, monkeypatch, "pod exited with code 1")
    # On Kubernetes: the stage's second Job (restart 1, stamped by the planner's count) failed.
    failed_job = builders.build_stage_job(parse_job(doc), 0, NS, launch=1, restarts=1)
    failed_job["status"] = {"conditions": [{"type": "Failed", "status": "True", "message": "pod exited with code 1"}]}
    status = reconcile_once(doc, monkeypatch, [failed_job])
    expected = "stage 'align' failed after 1 restart(s) (maxRestarts 1): pod exited with code 1"
    assert not result.succeeded and result.message == expected and result.stages[0].attempts == 2
    assert status["phase"] == "Failed" and status["message"] == expected
    assert failed_condition(status)["reason"] == planner.FAIL_MAX_RESTARTS
