"""The `rl` stage for real: `torchrun --nproc_per_node 2 -m vlm_trainer` (gloo, CPU) on tiny quickstart parts.

GRPO and PPO each run 4 steps on 2 ranks with a regex verifier (the response names a colour) and
publish a final/ that transformers loads; the per-step statistics (reward, KL, entropy, response length,
clip fraction) come out in the step events. PPO's run is then resumed from its step-2 checkpoint (final/
removed): steps 3 and 4 give the same losses and rewards as the uninterrupted run (the rollouts' RNG and
the value head travel with the checkpoint). That the mean reward rises over a longer stage is measured by
bench/rl_bench.py (results in bench/results/issue22/).
"""

from __future__ import annotations

import pytest
from test_trainer import make_job, run_stage, stage_doc  # the shared torchrun helpers
from transformers import LlavaForConditionalGeneration
from vlm_core import contract, storage

COLOUR = r"\b(red|green|blue|yellow)\b"  # a colour word anywhere: ~1 in 3 random 4-token responses


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
    from vlm_quickstart.shapes import shard_paths, write_shards

    root = tmp_path_factory.mktemp("rl-parts")
    tokenizer = build_tokenizer()
    lm = build_language_model(str(root / "lm"), tokenizer, hidden=32, layers=1, heads=2, mlp=64)
    vision = build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=1)
    train = write_shards(str(root / "data"), "train", 32, seed=0, per_shard=16)
    heldout = write_shards(str(root / "data"), "heldout", 4, seed=0, per_shard=4)
    return {"lm": lm, "vision": vision,
            "train": {"conversation": [f"file://{p}" for p in shard_paths(train, "conversation")]},
            "heldout": {"conversation": [f"file://{p}" for p in shard_paths(heldout, "conversation")]}}


def rl_stage(parts: dict, algorithm: str, **extra) -> dict:
    return stage_doc(
        "rl", "rl", "conversation", parts, steps=4, optimizer={"lr": 1e-2},
        batch={"globalSize": 4, "microSize": 1},  # 2 ranks x 1 prompt x 2 accumulation steps
        checkpoint={"everySteps": 2, "keepLast": 2},
        rl={"algorithm": algorithm, "groupSize": 4, "maxNewTokens": 4, "iterations": 2,
            "reward": {"verifier": "regex", "pattern": COLOUR}},
        **extra,
    )


def step_events(events: list[dict]) -> dict[int, dict]:
    return {e["step"]: e for e in events if e["event"] == contract.EVENT_STEP}


def check_statistics(steps: dict[int, dict]) -> None:
    assert sorted(steps) == [1, 2, 3, 4]
    for e in steps.values():
        assert 0.0 <= e["reward_mean"] <= 1.0 and e["reward_std"] >= 0.0
        assert 1.0 <= e["response_length"] <= 4.0
        assert 0.0 <= e["clip_fraction"] <= 1.0 and e["entropy"] > 0.0
        assert 0.0 <= e["kl"] < 5.0  # per-token k3 to the reference, small after 4 steps
    assert steps[1]["kl"] < 1e-6  # the first rollout's policy IS the reference
    assert steps[1]["clip_fraction"] == 0.0  # ratio 1 on the rollouts' first step
    assert max(steps[i]["clip_fraction"] for i in (2, 4)) > 0.0  # the second step on the same rollouts clips


def test_grpo_runs_on_two_ranks_and_publishes_a_loadable_policy(parts, tmp_path):
    job = make_job("grpo", f"file://{tmp_path}/storage", parts, [rl_stage(parts, "grpo")])
    events, _ = run_stage(job, 0, tmp_path)
    check_statistics(step_events(events))
    replicas = next(e for e in events if e["event"] == contract.EVENT_REPLICAS)
    assert replicas["equal"] is True
    evaluation = next(e for e in events if e["event"] == contract.EVENT_EVAL)
    assert 0.0 <= evaluation["reward_mean"] <= 1.0 and evaluation["eval_units"] == 4
    final = storage.local_path(f"{tmp_path}/storage/grpo/rl/{contract.FINAL_DIR}")
    LlavaForConditionalGeneration.from_pretrained(final)


def test_ppo_runs_and_a_resume_gives_the_same_next_steps(parts, tmp_path):
    job = make_job("ppo", f"file://{tmp_path}/storage", parts, [rl_stage(parts, "ppo")])
    events, _ = run_stage(job, 0, tmp_path)
    first = step_events(events)
    check_statistics(first)
    assert all(e["value_loss"] >= 0.0 for e in first.values())
    out = f"file://{tmp_path}/storage/ppo/rl"
    assert [s for s, _ in storage.list_checkpoints(out)] == [2]
    storage.remove(f"{out}/{contract.FINAL_DIR}")  # as if the gang died after the step-2 checkpoint

    events, _ = run_stage(job, 0, tmp_path)
    assert next(e for e in events if e["event"] == contract.EVENT_RESUME)["step"] == 2
    again = step_events(events)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "reward_mean", "kl", "value_loss", "clip_fraction"):
            assert again[step][key] == pytest.approx(first[step][key], abs=1e-6), (step, key)


async def test_instruct_then_grpo_on_the_kubernetes_emulator(cluster, parts) -> None:
    """One job, two stages, run by the operator on the API emulator with the real trainer: instruct (1 pod) hands its
    final/ to a GRPO stage (2 pods x 1 process, exact-match verifier) through S3."""
    import json

    from k8s_harness import NS, torchrun_as_python

    c = cluster
    c.kubelet.command_mapper = torchrun_as_python

    def stage(name: str, type_: str, nodes: int, **extra) -> dict:
        return {"name": name, "type": type_, "precision": "fp32", "maxSteps": 2,
                "data": {"shards": parts["train"]["conversation"], "format": "conversation", "maxLength": 64},
                "batch": {"globalSize": 2, "microSize": 1}, "checkpoint": {"everySteps": 10},
                "resources": {"nodes": nodes, "procsPerNode": 1}, **extra}

    await c.create({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "rlk", "namespace": NS},
        "spec": {
            "model": {"visionEncoder": f"file://{parts['vision']}", "languageModel": f"file://{parts['lm']}",
                      "imageSize": 32, "visionFeatureSelectStrategy": "full"},
            "storage": {"uri": c.storage_uri, "secretRef": "s3-creds", "endpointUrl": c.s3.endpoint},
            "stages": [stage("instruct", "instruct", 1, optimizer={"lr": 1e-3}),
                       stage("rl", "rl", 2, optimizer={"lr": 1e-3},
                             rl={"algorithm": "grpo", "groupSize": 2, "maxNewTokens": 4})],
            "runPolicy": {"maxRestarts": 0},
        },
    })
    status = await c.wait_phase("rlk", "Succeeded", timeout=180)
    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Succeeded"]
    config = next(json.loads(m["data"]["config.json"]) for m in c.owned("v1/configmaps", "rlk")
                  if m["metadata"]["labels"]["training.vlm.dev/stage"] == "rl")
    assert config["initFrom"] == f"{c.storage_uri}/rlk/instruct/final"  # the reference = instruct's weights
    committed = storage.verify_committed(f"{c.storage_uri}/rlk/rl/final", check_sha256=True)
    assert committed.ok, committed.reason
    assert c.kubelet.log_contains("rlk-rl-0", '"reward_mean"'), c.kubelet.logs()
