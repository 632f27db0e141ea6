"""Curate thresholds calibrated on the data hold on a raw set built by another generator than the quickstart's
(tests/integration/curate_web.py: img2dataset-style jpg/txt/json, other drawing, backgrounds, perturbations and
captions): `vlmctl curate calibrate` on the job's own shards writes the nearDedup snippet, the stage runs with it
(the real `run_curate`, 1 rank), and every planted kind is removed (>= 0.95), clean pairs are kept (>= 0.97) and
duplicate groups keep exactly one member (>= 0.97). The report lists the groups and shows removed pairs."""

from __future__ import annotations

import json
import os

import yaml
from curate_web import score, write_web_set
from vlm_core import contract, storage
from vlm_core.spec import parse_job
from vlm_operator import cli, planner
from vlm_trainer.curate.runner import run_curate
from vlm_trainer.parallel import dist_env


def _job(tmp, shards: list[str], filters: dict) -> dict:
    return {"apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "web"},
            "spec": {"model": {"visionEncoder": "unused", "languageModel": "unused"},
                     "storage": {"uri": f"file://{tmp}/store"},
                     "stages": [{"name": "curate", "type": "curate", "input": {"shards": shards}, "filters": filters}]}}


def test_calibrated_near_dedup_holds_on_a_raw_set_it_was_not_tuned_on(tmp_path, capsys):
    web = write_web_set(str(tmp_path / "raw"), clean=360, groups=60, per_kind=20, seed=7)
    shards = [f"file://{p}" for p in web.shards]
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(_job(tmp_path, shards, {})))
    snippet, measured = tmp_path / "near.yaml", tmp_path / "calibration.json"
    # every usable image is both an original and a neighbour (a few hundred: a stabler radius than a sample)
    assert cli.main(["curate", "calibrate", str(job_file), "--sample", "1000", "--write", str(snippet),
                     "--json", str(measured)]) == 0
    result = json.loads(measured.read_text())
    rec = result["recommended"]
    assert 0 <= rec["maxDistance"] <= 20 and 0.5 <= rec["minSimilarity"] < 1 and rec["blur"] == 1.2  # the web suite
    assert result["recall"] >= 0.95, result["per_perturbation"]  # the synthetic copies the recommendation finds
    # the job takes the snippet as written
    filters = yaml.safe_load(snippet.read_text())["filters"]
    assert filters["nearDedup"] == {"hashes": ["phash", "dhash"], "maxDistance": rec["maxDistance"],
                                    "verify": {"signal": "thumbnail", "minSimilarity": rec["minSimilarity"],
                                               "blur": rec["blur"]}}
    cfg = planner.resolve_stage(parse_job(_job(tmp_path, shards, filters)), 0)
    os.environ.setdefault(contract.METRICS_PORT_ENV, "off")
    doc = run_curate(cfg, dist_env())
    final = storage.join(cfg.output, contract.FINAL_DIR)
    decisions = [json.loads(x) for x in storage.read_text(storage.join(final, contract.DECISIONS_FILE)).splitlines() if x]
    s = score(decisions, web)
    assert all(r >= 0.95 for r in s["removed"].values()), (s["removed"], s)
    assert s["clean_kept"] >= 0.97, s
    assert s["groups_exactly_one"] >= 0.97, s
    # the report: groups per dedup filter, and removed pairs side by side
    near = next(f for f in doc["filters"] if f["filter"] == "near_dedup")
    assert near["groups"]["count"] >= 0.95 * 60 and near["groups"]["kept"] >= near["groups"]["count"]
    assert sum(int(k) * v for k, v in near["groups"]["sizes"].items()) == near["groups"]["members"]
    exact = next(f for f in doc["filters"] if f["filter"] == "exact_dedup")
    assert exact["groups"] == {"count": 20, "members": 40, "kept": 20, "sizes": {"2": 20}}
    assert all("similarity" in e and "duplicate_of" in e for e in near["examples"]["near_duplicate"])
    listed = {f["path"] for f in storage.verify_committed(final, check_sha256=True).manifest["files"]}
    assert {contract.DUPLICATES_CHART, contract.DUPLICATES_PAGE} <= listed
    page = storage.read_text(storage.join(final, contract.DUPLICATES_PAGE))
    assert page.count("data:image/png;base64,") == 2 * 10  # 5 exact + 5 near pairs, two images each
    assert storage.read_head(storage.join(final, contract.DUPLICATES_CHART), 8) == b"\x89PNG\r\n\x1a\n"
