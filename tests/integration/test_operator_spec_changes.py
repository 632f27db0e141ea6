"""What ran is what the spec says, on Kubernetes (issue 26): the operator against the API emulator, pods run
as local torchrun processes of tests/integration/fake_trainer.py (which stamps the fingerprint the operator
passes and refuses a checkpoint stamped with another), storage on a real S3 server.

- an edit of a finished stage's spec sets the SpecChanged condition and one Warning Event, and starts nothing;
- spec.runPolicy.rerunFrom reruns that stage and those after it (outputs kept aside), earlier ones untouched;
- an edit while a stage runs sets the condition and Event, and the running Job is not restarted.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from k8s_harness import Cluster, wait_for
from test_operator_k8s import JOBS, job_doc
from vlm_core import contract, storage


def condition(c: Cluster, name: str, type_: str = "SpecChanged") -> dict[str, Any]:
    return next((x for x in c.status(name).get("conditions", []) if x["type"] == type_), {})


def with_max_steps(doc: dict[str, Any], stage: int, max_steps: int) -> list[dict[str, Any]]:
    stages = copy.deepcopy(doc["spec"]["stages"])
    stages[stage]["maxSteps"] = max_steps
    return stages


async def test_an_edited_finished_stage_runs_nothing_until_rerun_from_it(cluster: Cluster) -> None:
    c = cluster
    doc = job_doc(c, "edited", [("align", "align"), ("instruct", "instruct")], max_steps=4, every=2)
    await c.create(doc)
    await c.wait_phase("edited", "Succeeded", timeout=60)
    align_final = f"{c.storage_uri}/edited/align/final"
    align_manifest = storage.read_manifest(align_final)

    # (a) instruct's maxSteps edited after it finished: the condition and one Warning Event, nothing starts
    await c.patch_spec("edited", {"stages": with_max_steps(doc, 1, 6)})
    await wait_for(lambda: condition(c, "edited").get("status") == "True", 30, message="SpecChanged True")
    cond = condition(c, "edited")
    assert cond["reason"] == "StageDiffers:instruct"
    assert "stage 'instruct' was committed by other settings" in cond["message"]
    assert "stage.maxSteps: 4 -> 6" in cond["message"]
    assert "spec.runPolicy.rerunFrom: instruct" in cond["message"]
    status = c.status("edited")
    assert status["phase"] == "Pending" and status["message"].startswith("stage 'instruct' was committed")
    assert "Succeeded" not in {x["type"] for x in status["conditions"]}
    await wait_for(lambda: "SpecChanged" in c.events("edited"), 10, message="the SpecChanged Event")
    # a field that cannot change any stage's output (the restart budget) changes nothing, and another
    # reconcile posts no second Event
    await c.patch_spec("edited", {"runPolicy": {"maxRestarts": 3}})
    await wait_for(lambda: c.status("edited").get("observedGeneration") == c.job("edited")["metadata"]["generation"],
                   30, message="the cosmetic edit reconciled")
    assert condition(c, "edited")["message"] == cond["message"]
    assert c.events("edited").count("SpecChanged") == 1
    assert c.jobs_ever_created("edited") == {"edited-align-0", "edited-instruct-0"}

    # (b) rerun from instruct: instruct reruns with the spec's settings, align is untouched, the old output kept
    await c.patch_spec("edited", {"runPolicy": {"maxRestarts": 3, "rerunFrom": "instruct"}})
    status = await c.wait_phase("edited", "Succeeded", timeout=60)
    assert c.jobs_ever_created("edited") == {"edited-align-0", "edited-instruct-0", "edited-instruct-1"}
    assert [j["metadata"]["name"] for j in c.owned(JOBS, "edited") if "instruct" in j["metadata"]["name"]] == [
        "edited-instruct-1"]
    rerun = status["rerun"]
    assert rerun["from"] == "instruct" and rerun["completed"] is True
    aside = contract.replaced_output(c.storage_uri, "edited", "instruct", rerun["at"])
    assert rerun["setAside"] == [aside]
    assert storage.read_manifest(f"{aside}/final")["step"] == 4  # the previous output, kept
    assert storage.read_manifest(f"{c.storage_uri}/edited/instruct/final")["step"] == 6
    assert storage.read_manifest(align_final)["committed_at"] == align_manifest["committed_at"]
    cond = condition(c, "edited")
    assert cond["status"] == "False" and cond["reason"] == "SpecMatches"
    await wait_for(lambda: "RerunFrom" in c.events("edited"), 10, message="the RerunFrom Event")

    # clearing rerunFrom clears status.rerun and reruns nothing
    await c.patch_spec("edited", {"runPolicy": {"maxRestarts": 3, "rerunFrom": None}})
    await wait_for(lambda: "rerun" not in c.status("edited"), 30, message="status.rerun cleared")
    assert c.status("edited")["phase"] == "Succeeded"
    assert len(c.jobs_ever_created("edited")) == 3


async def test_an_edit_while_a_stage_runs_does_not_restart_it(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    release = tmp_path / "release"  # the stage holds after step 2 until the edit was seen
    c.kubelet.extra_env.update(FAKE_HOLD_AFTER_STEP="2", FAKE_HOLD_UNTIL=str(release))
    doc = job_doc(c, "hot", [("align", "align")], max_steps=6, every=2)
    await c.create(doc)
    output = f"{c.storage_uri}/hot/align"
    await wait_for(lambda: (storage.latest_checkpoint(output) or (0,))[0] >= 2, 60, message="checkpoint-2")

    await c.patch_spec("hot", {"stages": with_max_steps(doc, 0, 8)})
    await wait_for(lambda: condition(c, "hot").get("status") == "True", 30, message="SpecChanged True")
    cond = condition(c, "hot")
    assert cond["reason"] == "StageDiffers:align"
    assert "stage 'align' is running with other settings" in cond["message"]
    assert "stage.maxSteps: 6 -> 8" in cond["message"]
    assert "continues with the settings it started with" in cond["message"]
    await wait_for(lambda: "SpecChanged" in c.events("hot"), 10, message="the SpecChanged Event")
    assert c.status("hot")["phase"] == "Running"
    assert len(c.kubelet.running()) == 2 and c.jobs_ever_created("hot") == {"hot-align-0"}

    # released, the stage finishes with the settings it started with; its output differs from the spec: not done
    release.touch()
    await wait_for(lambda: c.status("hot").get("phase") == "Pending"
                   and "was committed by other settings" in condition(c, "hot").get("message", ""), 60,
                   message="the committed stage differs")
    assert storage.read_manifest(f"{output}/final")["step"] == 6
    assert c.jobs_ever_created("hot") == {"hot-align-0"}
    assert c.events("hot").count("SpecChanged") == 2  # the running stage, then its committed output
