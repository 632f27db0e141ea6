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


def test_the_step_event_the_trainer_prints_is_the_one_the_local_runner_reads(tmp_path, capsys) -> None:
    from vlm_operator.local import parse_log_line

    reporter = ProgressReporter(str(tmp_path), total_steps=4, is_main=True, start_step=0, interval_seconds=60)
    reporter.step(1, loss=float("nan"), lr=1e-3, tokens_per_second=100.0, samples_per_second=2.0, step_seconds=0.5)
    printed = capsys.readouterr().out.splitlines()[-1]
    rank, event = parse_log_line(f"[0]:{printed}\n")  # as torchrun prefixes it
    assert rank == 0 and event is not None and event[contract.EVENT_KEY] == contract.EVENT_STEP
    assert set(contract.STEP_EVENT_KEYS) <= set(event)
    assert (event[contract.KEY_STEP], event[contract.KEY_TOTAL], event[contract.KEY_LOSS]) == (1, 4, None)
    assert parse_log_line("[1]:plain text\n") == (1, None)
    assert contract.parse_event('{"event": "step", "step": ') is None  # a torn line is not an event


def test_the_skip_event_parses_with_the_contract_keys(capsys) -> None:
    from vlm_trainer.progress import emit

    emit(contract.EVENT_SKIP, stage="align", reason="s3://b/final is already committed")
    event = contract.parse_event(capsys.readouterr().out)
    assert event == {contract.EVENT_KEY: contract.EVENT_SKIP, contract.KEY_STAGE: "align",
                     contract.KEY_REASON: "s3://b/final is already committed"}


def test_every_event_the_trainer_emits_is_named_in_the_contract() -> None:
    """Producers name events by the contract's constants, never by a string literal: the local runner and the
    operator read only the contract's names, so an event is added to contract.EVENTS first."""
    import re
    from pathlib import Path

    import vlm_trainer

    root = Path(vlm_trainer.__file__).parent
    calls = [(path.name, m.group(1)) for path in root.rglob("*.py")
             for m in re.finditer(r"(?<!def )(?<!\w)_?emit\(\s*([^,)\s]+)", path.read_text())]
    assert len(calls) >= 10, calls  # the scan sees the producers
    literal = [(f, arg) for f, arg in calls if arg[:1] in "\"'"]
    assert literal == [], literal
    named = {arg.removeprefix("contract.") for _, arg in calls if arg.startswith("contract.EVENT_")}
    assert {getattr(contract, n) for n in named} <= contract.EVENTS


def test_contract_names_are_spelled_only_in_the_contract() -> None:
    """Env names, the launch label and the metrics-port cap are the contract's: no other module of the
    operator or the trainer spells them."""
    import re
    from pathlib import Path

    import vlm_operator
    import vlm_trainer

    spelled = re.compile(r"""["'](AWS_ENDPOINT_URL|PYTHONUNBUFFERED|training\.vlm\.dev/launch)["']|procs_per_node, 8\)""")
    offenders = [
        f"{path.name}: {m.group(0)}"
        for pkg in (vlm_operator, vlm_trainer)
        for path in Path(pkg.__file__).parent.rglob("*.py")
        for m in spelled.finditer(path.read_text())
    ]
    assert offenders == []
