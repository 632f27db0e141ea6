"""The one ETA and the one progress record: what the trainer writes is what the operator reads."""

from __future__ import annotations

import json

import pytest
from vlm_core import contract, storage
from vlm_trainer.progress import EtaClock, ProgressReporter


def test_eta_is_remaining_steps_times_the_smoothed_step_time() -> None:
    clock = EtaClock(total_steps=10, smoothing=0.1)
    assert clock.eta_seconds(0) is None  # nothing observed yet
    clock.observe(2.0)
    clock.observe(1.0)  # 2.0 + 0.1 * (1.0 - 2.0) = 1.9 s per step
    assert clock.eta_seconds(2) == pytest.approx(8 * 1.9)
    assert clock.eta_seconds(10) == 0.0


def test_progress_json_is_the_contract_record_and_the_operator_reads_it_back(tmp_path, capsys) -> None:
    reporter = ProgressReporter(str(tmp_path), total_steps=4, is_main=True, start_step=0, interval_seconds=0)
    eta = reporter.step(1, loss=2.5, lr=1e-3, tokens_per_second=100.0, samples_per_second=2.0, step_seconds=0.5)
    assert eta == pytest.approx(3 * 0.5)
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (line["event"], line["step"], line["total"], line["eta_seconds"]) == ("step", 1, 4, 1.5)
    doc = storage.read_json(storage.join(str(tmp_path), contract.PROGRESS_FILE))
    record = contract.ProgressRecord.from_doc(doc)
    assert (record.step, record.total, record.tokens_per_second, record.eta_seconds) == (1, 4, 100.0, 1.5)


@pytest.mark.parametrize(
    "doc",
    [None, [], {"step": "3"}, {"step": True, "total": None}, {"step": float("nan")}, {"total_steps": 5}],
)
def test_a_malformed_record_reads_as_unknown(doc) -> None:
    record = contract.ProgressRecord.from_doc(doc)
    assert record.step is None and record.total is None


def test_non_finite_values_are_written_as_null() -> None:
    doc = contract.ProgressRecord(step=1, total=2, loss=float("inf")).to_doc()
    assert doc["loss"] is None and json.loads(json.dumps(doc, allow_nan=False))["step"] == 1


def test_stage_layout_is_spelled_once() -> None:
    assert contract.stage_output("s3://b/runs/", "demo", "align") == "s3://b/runs/demo/align"
    assert contract.stage_final("s3://b/runs", "demo", "align") == "s3://b/runs/demo/align/final"
    assert contract.job_output("file:///x", "demo") == "file:///x/demo"
