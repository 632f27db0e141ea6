"""GPU-memory admission: a stage that does not fit its declared GPU memory is held back with computed
alternatives (each one fits when applied), through the planner and into the status and Events."""

from __future__ import annotations

import copy
import json

import pytest
from job_fixtures import GOOD
from vlm_core import accounting
from vlm_core.spec import parse_job
from vlm_operator import admission, observe, planner
from vlm_operator.status_model import JobStatus

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336}


@pytest.fixture
def model_dirs(tmp_path):
    """config.json files only: the estimator never reads weights."""
    out = {}
    for name, cfg in (("vision", CLIP_L_336), ("lm", LLAMA_7B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        out[name] = f"file://{tmp_path / name}"
    return out


def seven_b_job(model_dirs, gpu_gib=79.6, admission_policy=None, **instruct):
    doc = copy.deepcopy(GOOD)
    doc["spec"]["model"].update(visionEncoder=model_dirs["vision"], languageModel=model_dirs["lm"], imageSize=336)
    stage = doc["spec"]["stages"][1]
    stage.update({"batch": {"globalSize": 128, "microSize": 4}, "resources": {"nodes": 1, "procsPerNode": 8,
                  "gpusPerNode": 8, "gpuMemoryGiB": gpu_gib}}, **instruct)
    stage["data"]["maxLength"] = 2048
    if admission_policy:
        doc["spec"]["runPolicy"] = {"admission": admission_policy}
    return parse_job(doc)


def test_a_7b_instruct_stage_with_ddp_is_refused_with_alternatives_that_fit(model_dirs):
    job = seven_b_job(model_dirs)
    decision = admission.checker(job)(1)
    assert decision is not None and not decision.admitted
    assert decision.reason == "InsufficientGPUMemory"
    assert "stage 'instruct' needs an estimated" in decision.message and "gpuMemoryGiB is 79.6" in decision.message
    assert decision.alternatives, decision.message
    shape = admission.load_shape(job.spec.model)
    for alt in decision.alternatives:
        assert alt.text in decision.message
        patched = admission.patched_stage(job.spec.stages[1], alt.patch)
        assert admission.estimate_stage(shape, patched).total_bytes <= 79.6 * accounting.GIB
        assert alt.gpus == patched.world_size
    # the cheapest first: no alternative needs more GPUs than a listed one before it
    assert [a.gpus for a in decision.alternatives] == sorted(a.gpus for a in decision.alternatives)


def test_fits_warn_off_and_no_declared_memory(model_dirs):
    big = seven_b_job(model_dirs, gpu_gib=2000)
    assert admission.checker(big)(1).reason == "Fits"
    warned = admission.checker(seven_b_job(model_dirs, admission_policy="warn"))(1)
    assert warned.admitted and warned.reason == "InsufficientGPUMemoryWarned"
    assert admission.checker(seven_b_job(model_dirs, admission_policy="off"))(1) is None
    assert admission.checker(big)(0) is None  # the align stage declares no GPU memory


def test_unreadable_config_does_not_block_the_stage(tmp_path):
    job = seven_b_job({"vision": f"file://{tmp_path}/nope", "lm": f"file://{tmp_path}/nope"})
    decision = admission.checker(job)(1)
    assert decision.admitted and decision.reason == "EstimateUnavailable"


def test_planner_holds_a_refused_stage_and_status_says_why(model_dirs):
    job = seven_b_job(model_dirs)
    observed = [planner.StageObservation("Succeeded", committed=True), planner.StageObservation()]
    action = planner.plan(job, observed, admit=admission.checker(job))
    assert isinstance(action, planner.Wait) and action.index == 1
    assert action.admission is not None and not action.admission.admitted
    status = observe.compute_status(job, 1, JobStatus(), observed, action, [[], [], []], "2026-01-01T00:00:00Z")
    cond = next(c for c in status.conditions if c.type == "Admitted")
    assert (cond.status, cond.reason) == ("False", "InsufficientGPUMemory")
    assert status.message == action.admission.message
    assert all(s.phase == "Pending" for s in status.stages[1:])
    events = observe.stage_events(JobStatus(), status)
    assert ("Warning", "InsufficientGPUMemory", cond.message) in events
    assert observe.stage_events(status, status) == []  # no repeat while nothing changes

    # patching the spec to the first alternative starts the stage
    alt = action.admission.alternatives[0]
    fixed = seven_b_job(model_dirs, **_unflatten(alt.patch))
    action = planner.plan(fixed, observed, admit=admission.checker(fixed))
    assert isinstance(action, planner.StartStage) and action.admission.reason == "Fits"


def _unflatten(patch):
    out: dict = {}
    for path, value in patch.items():
        admission._set_path(out, path, value)
    if "resources" in out:
        out["resources"] = {"nodes": 1, "procsPerNode": 8, "gpusPerNode": 8, "gpuMemoryGiB": 79.6, **out["resources"]}
    if "batch" in out:
        out["batch"] = {"globalSize": 128, **out["batch"]}
    return out
