"""Bring your data, for real: `vlmctl data import` of a LLaVA JSON whose images lie on S3 (SeaweedFS) into shards
on S3, then ONE 2-rank stage (torchrun, 2 loader workers per rank) that trains on a mix of those imported shards
and a Parquet dataset read in place (images embedded, bad rows planted): the stage succeeds and its report
counts the Parquet bad rows by reason and shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_trainer import make_job, parts, run_stage, stage_doc  # noqa: F401  (parts: the module fixture)
from vlm_core import storage
from vlm_operator.planner import resolve_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from import_fixtures import llava_dataset, parquet_rows, preference_file, write_images, write_parquet  # noqa: E402


def test_import_from_s3_then_train_on_imported_shards_and_parquet_rows(parts, s3_server, tmp_path):  # noqa: F811
    base = f"s3://{s3_server.bucket}/bring-your-data"
    fs, _ = storage.filesystem(base)
    json_path, images, expected = llava_dataset(tmp_path, n=200)
    fs.put(str(images).rstrip("/") + "/", f"{s3_server.bucket}/bring-your-data/images/", recursive=True)
    fs.put_file(str(json_path), f"{s3_server.bucket}/bring-your-data/llava.json")

    cmd = [sys.executable, "-m", "vlm_operator.cli", "data", "import", f"{base}/llava.json", "--image-root",
           f"{base}/images", "--output", f"{base}/shards", "--shard-size", "64KiB", "--workers", "2", "--summary", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["records"], summary["samples"], summary["skipped"], summary["markers_added"]) == (
        200, expected["samples"], expected["skipped"], 1)
    assert storage.verify_committed(f"{base}/shards", check_sha256=True).ok
    shards = [f"{base}/shards/{f['path']}" for f in storage.read_manifest(f"{base}/shards")["files"]]
    assert len(shards) == summary["shards"] > 1

    rows, facts = parquet_rows()
    pq_files = [f"file://{write_parquet(tmp_path / 'hf-00000.parquet', rows[:25], 6)}",
                f"file://{write_parquet(tmp_path / 'hf-00001.parquet', rows[25:], 7)}"]
    data = {"sources": [{"shards": shards, "format": "conversation", "weight": 1},
                        {"shards": pq_files, "format": "conversation", "weight": 1}],
            "evalShards": pq_files, "maxLength": 64, "workers": 2, "maxBadSampleShare": 0.2}
    job = make_job("byd", f"file://{tmp_path}/storage", parts, [
        stage_doc("instruct", "instruct", "conversation", parts, steps=16, data=data, optimizer={"lr": 1e-3}),
    ])
    run_stage(job, 0, tmp_path)
    report = storage.read_json(resolve_stage(job, 0).output + "/eval.json")
    data_report = report["data"]
    # Each rank read its whole share of the Parquet epoch (64 draws from a source of 60 rows over 2 ranks).
    assert set(data_report["bad_samples_by_reason"]) == set(facts["source_bad"])
    assert set(data_report["bad_samples_by_shard"]) <= set(pq_files)
    assert report["eval_loss"] > 0


def test_a_dpo_stage_trains_on_an_imported_preference_json(parts, tmp_path):  # noqa: F811
    """The other imported layout a stage reads differently: preference pairs (prompt / question / conversations +
    chosen / rejected), imported locally, then a 2-rank dpo stage on them whose loss is the DPO loss at step 1."""
    images = tmp_path / "images"
    write_images(images)
    path, expected = preference_file(tmp_path, images)
    out = f"file://{tmp_path}/pref-shards"
    cmd = [sys.executable, "-m", "vlm_operator.cli", "data", "import", str(path), "--image-root", str(images),
           "--output", out, "--format", "preference", "--workers", "0", "--summary", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["samples"], summary["skipped"]) == (expected["samples"], expected["skipped"])
    shards = [f"{out}/{f['path']}" for f in storage.read_manifest(out)["files"]]
    job = make_job("byd-dpo", f"file://{tmp_path}/storage", parts, [
        stage_doc("dpo", "dpo", "preference", parts, steps=4, optimizer={"lr": 1e-3}, dpo={"beta": 0.1},
                  data={"shards": shards, "evalShards": shards, "format": "preference", "maxLength": 64}),
    ])
    events, _ = run_stage(job, 0, tmp_path)
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 4 and abs(steps[0]["loss"] - 0.6931) < 0.01  # policy == reference at step 1: ln 2
    report = storage.read_json(resolve_stage(job, 0).output + "/eval.json")
    assert 0.0 <= report["reward_accuracy"] <= 1.0 and report["data"]["bad_samples"] == 0
