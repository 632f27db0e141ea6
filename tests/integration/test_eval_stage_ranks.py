"""The eval stage for real: greedy generation with a tiny VLM (transformers' own Llava, built from quickstart parts)
on held-out shards that carry every metric's samples; 1 rank (in this process) and 2 ranks (torchrun through the
local backend) give the same answers and the same numbers, committed as eval.json + predictions.jsonl."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_parts import build_parts
from vlm_core import contract, storage
from vlm_core.spec import load_job
from vlm_operator.local import LocalRunner
from vlm_operator.planner import resolve_stage
from vlm_quickstart.shapes import make_samples, write_eval_shard

CONV = [{"role": "user", "content": "<image>\nwhat colour is it ?"}, {"role": "assistant", "content": "red"}]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_metric_shard(path: Path) -> str:
    """Samples for the metrics the shapes eval set lacks: VQAv2 (ten answers), multiple choice, relaxed, caption,
    and a POPE yes/no pair."""
    samples = make_samples("heldout", 6, seed=1)
    docs = [
        {"conversations": CONV, "task": "vqa", "answers": [{"answer": "red"}] * 4 + [{"answer": "blue"}] * 6},
        {"conversations": [{"role": "user", "content": "<image>\nwhich colour ?\nA. red\nB. blue"},
                           {"role": "assistant", "content": "A"}], "task": "multiple_choice"},
        {"conversations": CONV, "task": "relaxed"},
        {"conversations": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a red circle"}],
         "task": "caption", "answers": ["a red circle", "a red shape"]},
        {"conversations": [{"role": "user", "content": f"<image>\nis there a {samples[4].colour} {samples[4].shape} ?"},
                           {"role": "assistant", "content": "yes"}], "task": "pope"},
        {"conversations": [{"role": "user", "content": "<image>\nis there a purple hexagon ?"},
                           {"role": "assistant", "content": "no"}], "task": "pope"},
    ]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s, doc in zip(samples, docs, strict=True):
            _add(tar, f"{s.key}.png", s.png)
            _add(tar, f"{s.key}.json", json.dumps(doc).encode())
    return f"file://{path}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    parts = build_parts(root)
    probe = write_eval_shard(str(root), make_samples("heldout", 5, seed=0))  # 10 prompts: colour and shape
    return {**parts, "heldout": [f"file://{probe}", write_metric_shard(root / "metrics.tar")]}


def job_yaml(path: Path, name: str, assets: dict[str, Any], procs: int) -> str:
    doc = {
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": name},
        "spec": {
            "model": {"visionEncoder": assets["vision"], "languageModel": assets["lm"], "imageSize": 32},
            "storage": {"uri": f"file://{path.parent / 'store'}"},
            "stages": [{
                "name": "eval", "type": "eval", "precision": "fp32", "seed": 3,
                "data": {"shards": assets["heldout"], "format": "conversation", "maxLength": 64},
                # batches of 5 over 24 prompts: 5 batches, rank 1 of 2 gets the 2nd and 4th
                "eval": {"metrics": ["exact_match"], "maxNewTokens": 3, "batchSize": 5},
                "resources": {"procsPerNode": procs},
            }],
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _numbers(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("wall_seconds", "world_size", "model")}


def test_two_ranks_give_the_numbers_of_one(assets, tmp_path, monkeypatch):
    from vlm_trainer.parallel import DistEnv
    from vlm_trainer.stages import run_stage

    monkeypatch.setenv(contract.METRICS_PORT_ENV, "0")
    (tmp_path / "one").mkdir()
    one = load_job(job_yaml(tmp_path / "one" / "job.yaml", "one", assets, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 ranks runs (one thread per rank on 2 cores)
    try:
        run_stage(resolve_stage(one, 0), DistEnv(0, 1, 0, 1, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)

    (tmp_path / "two").mkdir()
    two = load_job(job_yaml(tmp_path / "two" / "job.yaml", "two", assets, 2))
    result = LocalRunner(two, log_dir=str(tmp_path / "logs")).run()
    assert result.succeeded, result.message

    reports, lines = [], []
    for job in (one, two):
        final = storage.join(resolve_stage(job, 0).output, contract.FINAL_DIR)
        v = storage.verify_committed(final, check_sha256=True)
        assert v.ok, v.reason
        report = storage.read_json(storage.join(final, contract.EVAL_FILE))
        assert report == storage.read_json(storage.join(resolve_stage(job, 0).output, contract.EVAL_FILE))
        assert v.manifest["eval"]["exact_match"] == report["exact_match"]  # what the operator copies to the status
        reports.append(report)
        lines.append(storage.read_text(storage.join(final, contract.PREDICTIONS_FILE)).splitlines())
    assert reports[0]["world_size"] == 1 and reports[1]["world_size"] == 2
    assert _numbers(reports[0]) == _numbers(reports[1])
    assert lines[0] == lines[1]
    report = reports[0]
    # every metric ran, on the samples it applies to
    assert report["samples"] == 16 and report["samples_exact_match"] == 10 and report["samples_pope"] == 2
    for key in ("vqa_accuracy", "multiple_choice_accuracy", "relaxed_accuracy", "caption_cider", "caption_bleu4",
                "pope_f1", "pope_yes_ratio"):
        assert key in report, key
    first = json.loads(lines[0][0])
    assert first["prompt"] == "what colour is the shape ?" and first["metrics"] == ["exact_match"]
    assert isinstance(first["prediction"], str) and "exact_match" in first["scores"]
    assert os.path.basename(first["key"]).startswith("heldout-")
