"""`vlmctl estimate` as a user calls it, and the local backend refusing a stage that cannot fit."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import pytest
import yaml
from job_fixtures import GOOD
from vlm_core import accounting as A
from vlm_core.spec import load_job, parse_job
from vlm_operator import admission
from vlm_operator.local import LocalRunner

ROOT = pathlib.Path(__file__).resolve().parents[2]
VLMCTL = [sys.executable, "-m", "vlm_operator.cli", "estimate"]
GPU_JOB = ROOT / "crds/examples/align-instruct-dpo-gpu.yaml"
CONFIGS = ROOT / "bench/model_configs"


def vlmctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VLMCTL, *args], capture_output=True, text=True, timeout=60)


def test_json_has_the_same_numbers_as_the_accounting_in_bytes():
    out = vlmctl(str(GPU_JOB), "--model-configs", str(CONFIGS), "-o", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    job = load_job(str(GPU_JOB))
    shape = admission.load_shape(job.spec.model.model_copy(update={
        "vision_encoder": str(CONFIGS / "clip-vit-large-patch14-336"), "language_model": str(CONFIGS / "vicuna-7b-v1.5")}))
    assert report["model"]["params"] == shape.params and report["model"]["image_tokens"] == 576
    assert [s["name"] for s in report["stages"]] == ["align", "instruct", "dpo"]
    for stage, s in zip(job.spec.stages, report["stages"], strict=True):
        mem = s["memory"]
        assert mem["total_bytes"] == sum(mem["components_bytes"].values())
        assert mem["total_bytes"] == A.estimate_memory(shape, A.stage_input(stage, on_gpu=True)).total_bytes
        assert mem["limit_bytes"] == int(79.6 * A.GIB) and mem["fits"] is True
    instruct = report["stages"][1]["compute"]
    assert instruct["steps"] == -(-665298 // 128) and instruct["gpus"] == 32
    assert instruct["seconds"] == pytest.approx(instruct["flops"] / (32 * 989e12 * 0.4))


def test_table_says_whether_each_stage_fits_and_offers_alternatives(tmp_path):
    doc = yaml.safe_load(GPU_JOB.read_text())
    doc["spec"]["stages"][1]["strategy"] = "ddp"  # a 7B full fine-tune replicated on 80 GiB GPUs cannot fit
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = vlmctl(str(path), "--model-configs", str(CONFIGS), "--gpu", "A100-80GB", "--mfu", "0.5", "--budget", "1000")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "time at MFU 0.50 on A100-80GB" in text
    assert text.count("fits? yes") == 2 and text.count("fits? NO") == 1
    assert "alternative: strategy: zero3 (32 GPUs)" in text  # sharding everything: the cheapest change
    assert "budget 1000 GPU-hours on A100-80GB" in text and "compute-optimal LM" in text


def test_bad_input_is_a_clear_error(tmp_path):
    out = vlmctl(str(GPU_JOB))  # gs:// checkpoints are not reachable here
    assert out.returncode == 2 and out.stderr.startswith("error:") and "vlm-models" in out.stderr
    out = vlmctl(str(GPU_JOB), "--model-configs", str(CONFIGS), "--gpu", "B9000")
    assert out.returncode == 2 and "unknown GPU 'B9000'; known: H200" in out.stderr
    out = vlmctl(str(GPU_JOB), "--model-configs", str(CONFIGS), "--mfu", "1.5")
    assert out.returncode == 2 and "--mfu" in out.stderr


def test_local_backend_refuses_a_stage_that_cannot_fit(tmp_path):
    for name, sub in (("vision", "clip-vit-large-patch14-336"), ("lm", "vicuna-7b-v1.5")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((CONFIGS / sub / "config.json").read_text())
    doc = copy.deepcopy(GOOD)
    doc["spec"]["model"].update(visionEncoder=str(tmp_path / "vision"), languageModel=str(tmp_path / "lm"),
                                imageSize=336)
    doc["spec"]["storage"]["uri"] = f"file://{tmp_path}/store"
    doc["spec"]["stages"][0]["resources"] = {"gpusPerNode": 1, "gpuMemoryGiB": 8}
    result = LocalRunner(parse_job(doc), log_dir=str(tmp_path / "logs")).run()
    assert not result.succeeded and result.stages == []  # nothing was started
    assert "stage 'align' needs an estimated" in result.message and "gpuMemoryGiB is 8" in result.message
