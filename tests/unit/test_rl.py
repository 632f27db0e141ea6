"""The `rl` stage kind (issue 22): its spec and rules, the losses and estimators, prompts and rollouts,
verifiers, and the value head's checkpointed state. TRL parity is in test_rl_parity.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from job_fixtures import GOOD
from vlm_core import fingerprint
from vlm_core.spec import SpecError, content_of, no_effect, parse_job
from vlm_core.spec.rules import STAGE_RULES
from vlm_operator import planner
from vlm_trainer.parallel import DistEnv
from vlm_trainer.rl import losses, rewards, rollout
from vlm_trainer.rl.value import ValueHead
from vlm_trainer.samples import IGNORE_INDEX, Encoded


def rl_job(**rl_stage) -> dict:
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][2] = {"name": "rl", "type": "rl", "data": {"shards": ["c.tar"], "format": "conversation"},
                                "maxSteps": 4, **rl_stage}
    return doc


def problems(doc: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    return str(err.value)


# --- spec ---------------------------------------------------------------------------------------------

def test_an_rl_stage_gets_its_defaults_from_the_kinds_row():
    stage = parse_job(rl_job()).spec.stages[2]
    assert stage.rl is not None and stage.rl.algorithm == "grpo" and stage.rl.reward.verifier == "exact"
    assert stage.optimizer.lr == 1e-6 and stage.trainable == ["projector", "language_model"]


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_strategies_that_shard_parameters_are_refused_naming_the_field(strategy):
    msg = problems(rl_job(strategy=strategy))
    assert "strategy:" in msg and "generate" in msg and "ddp" in msg, msg


def test_the_strategy_rule_is_one_of_the_table_rules_so_cel_follows():
    rule = next(r for r in STAGE_RULES if r.field == "strategy")
    assert "'rl'" in rule.cel() and "'fsdp'" not in rule.cel()


@pytest.mark.parametrize("rl, needle", [
    ({"algorithm": "grpo", "groupSize": 1}, "rl.groupSize: grpo needs at least 2"),
    ({"reward": {"verifier": "regex"}}, "rl.reward.pattern: verifier 'regex' needs a pattern"),
    ({"reward": {"verifier": "regex", "pattern": "("}}, "rl.reward.pattern: not a regular expression"),
    ({"reward": {"verifier": "python", "entryPoint": "not a name"}}, "entryPoint"),
    ({"reward": {"verifier": "exact", "fromStage": "instruct"}}, "set exactly one of fromStage"),
    ({"reward": {}}, "set exactly one of fromStage"),
    ({"algorithm": "trpo"}, "algorithm"),
])
def test_bad_rl_settings_are_refused_in_one_line_naming_the_field(rl, needle):
    assert needle in problems(rl_job(rl=rl))


def test_reward_from_stage_must_name_an_earlier_reward_stage():
    msg = problems(rl_job(rl={"reward": {"fromStage": "instruct"}}))
    assert "stages[2].rl.reward.fromStage: 'instruct' is not an earlier reward stage" in msg


def test_rl_settings_belong_to_rl_stages_only():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][1]["rl"] = {"algorithm": "ppo"}
    assert "stages[1].rl: only valid for type rl, this stage is 'instruct'" in problems(doc)


def test_checkpoints_fall_between_batches_of_rollouts():
    msg = problems(rl_job(rl={"iterations": 3}, checkpoint={"everySteps": 4}))
    assert "checkpoint.everySteps: 4 must be a multiple of rl.iterations (3)" in msg
    parse_job(rl_job(rl={"iterations": 2}, checkpoint={"everySteps": 4}))


def test_every_rl_field_counts_in_the_fingerprint(tmp_path):
    doc = rl_job(rl={"algorithm": "ppo", "reward": {"verifier": "regex", "pattern": "red"}})
    doc["spec"]["storage"]["uri"] = f"file://{tmp_path}/store"
    config = planner.resolve_stage(parse_job(doc), 2)
    rl_spec = config.stage.rl
    assert rl_spec is not None
    checked = 0
    for owner in (rl_spec, rl_spec.reward):
        for name, info in type(owner).model_fields.items():
            value = getattr(owner, name)
            if value is None and content_of(info) is not None or not isinstance(value, (int, float, str)):
                continue
            mutated = config.model_copy(deep=True)
            target = mutated.stage.rl if owner is rl_spec else mutated.stage.rl.reward  # type: ignore[union-attr]
            object.__setattr__(target, name, value + "-x" if isinstance(value, str) else value * 2 + 1)
            differs = fingerprint.compute(config).digest != fingerprint.compute(mutated).digest
            assert differs == (no_effect(info) is None), name
            checked += 1
    assert checked >= 14


# --- losses and estimators ------------------------------------------------------------------------

def test_group_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = losses.group_advantages(r, 4)
    g = r[:4]
    assert torch.allclose(a[:4], (g - g.mean()) / (g.std() + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # a group that agrees teaches nothing


def test_gae_matches_the_textbook_recursion():
    torch.manual_seed(0)
    rewards_, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv, ret = losses.gae(rewards_, values, mask, gamma=0.9, lam=0.8)
    for i in range(3):
        n = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(n)):
            nxt = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards_[i, t]) + 0.9 * nxt - float(values[i, t])
            last = delta + 0.9 * 0.8 * last
            assert abs(float(adv[i, t]) - last) < 1e-5
            assert abs(float(ret[i, t]) - (last + float(values[i, t]))) < 1e-5
        assert torch.equal(adv[i, n:], torch.zeros(5 - n))


def test_ppo_rewards_carry_the_kl_penalty_per_token_and_the_score_at_the_end():
    old, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = losses.ppo_token_rewards(torch.tensor([2.0]), old, ref, mask, beta=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 2.0, 0.0]]))


def test_clipping_counts_only_where_the_clipped_term_is_taken():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    up = losses.grpo_loss_terms(logps, old, None, torch.tensor([1.0]), mask, beta=0.0, epsilon=0.2)
    assert up.clipped.tolist() == [[1.0, 0.0, 0.0]]  # ratio 1.5 with A > 0 is clipped; 0.5 with A > 0 is not
    down = losses.ppo_policy_terms(logps, old, -torch.ones(1, 3), mask, epsilon=0.2)
    assert down.clipped.tolist() == [[0.0, 1.0, 0.0]]


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    x = torch.tensor([-1.0, -2.0])
    assert torch.equal(losses.k3_kl(x, x), torch.zeros(2))
    assert (losses.k3_kl(x, x + 0.3) > 0).all()


# --- prompts and rollouts -------------------------------------------------------------------------

def encoded(ids: list[int], labels: list[int]) -> Encoded:
    return Encoded(ids, labels, [torch.zeros(3, 4, 4)])


def test_the_last_assistant_turn_is_the_reference_and_leaves_the_prompt():
    e = encoded([1, 2, 3, 4, 5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, 6, 7,
                                             IGNORE_INDEX])
    assert rollout.split_prompt(e) == ([1, 2, 3, 4, 5], [6, 7])
    with pytest.raises(ValueError, match="assistant turn"):
        rollout.split_prompt(encoded([1, 2], [IGNORE_INDEX, IGNORE_INDEX]))


def test_prompts_are_left_padded_and_repeated_per_group():
    a = encoded([1, 2, 3, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9])
    b = encoded([4, 5, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9])
    b.pixel_values = [torch.ones(3, 4, 4)]
    batch = rollout.collate_prompts([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["reference_ids"].tolist() == [[9, 0], [8, 9]]
    rows = rollout.repeat_prompts(batch, 3)
    assert rows["input_ids"][:, -1].tolist() == [3, 3, 3, 5, 5, 5]
    assert rows["pixel_values"].shape[0] == 6 and rows["pixel_values"][3:].eq(1).all() and rows["pixel_values"][:3].eq(0).all()


def test_a_response_ends_at_its_first_stop_token():
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 7, 2, 7, 7]])
    assert rollout.response_mask(responses, {2}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# --- rewards ----------------------------------------------------------------------------------------

def test_exact_match_normalises_case_punctuation_and_spaces():
    got = rewards.exact_match(["Red.", " a  RED circle!", "blue"], ["red", "a red circle", "red"], ["", "", ""])
    assert got == [1.0, 1.0, 0.0]


def test_regex_and_python_verifiers(tmp_path, monkeypatch):
    from vlm_core.spec.rl import RLRewardSpec

    fn = rewards.verifier(RLRewardSpec(verifier="regex", pattern=r"\b(red|blue)\b"))
    assert fn(["a red one", "green"], ["", ""], ["", ""]) == [1.0, 0.0]
    (tmp_path / "my_rewards.py").write_text("def score(responses, references, prompts):\n"
                                            "    return [len(r) / 10 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.verifier(RLRewardSpec(verifier="python", entryPoint="my_rewards:score"))
    assert fn(["abcde"], ["x"], ["p"]) == [0.5]
    with pytest.raises(ValueError, match=r"rl.reward.entryPoint: cannot load 'my_rewards:nope'"):
        rewards.verifier(RLRewardSpec(verifier="python", entryPoint="my_rewards:nope"))
    with pytest.raises(ValueError, match="returned 1 rewards for 2 responses"):
        rewards.checked(lambda r, f, p: [1.0], ["a", "b"], ["", ""], ["", ""], torch.device("cpu"))


# --- value head -----------------------------------------------------------------------------------

def test_the_value_head_state_round_trips_through_the_checkpoint_json():
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    head = ValueHead(8, lr=1e-2, device=torch.device("cpu"))
    torch.manual_seed(0)
    states = torch.randn(2, 3, 8)
    for _ in range(3):
        head(states).pow(2).mean().backward()
        head.step(env)
    saved = json.loads(json.dumps(head.state()))
    other = ValueHead(8, lr=1e-2, device=torch.device("cpu"))
    other.load(saved)
    assert torch.equal(other(states), head(states))
    for h in (head, other):
        (h(states) - 1).pow(2).mean().backward()
        h.step(env)
    assert torch.equal(other(states), head(states))  # the AdamW moments came back too


# --- metrics ----------------------------------------------------------------------------------------

def test_rl_statistics_are_exported_and_on_the_dashboard():
    from pathlib import Path

    from vlm_trainer.metrics import RL_STATS, TrainerMetrics

    metrics = TrainerMetrics("job", "rl", 0, port=None)
    metrics.observe_stats({"reward_mean": 0.75, "kl": 0.01, "loss_scale": 3.0})
    values = {s.name: s.value for f in metrics.registry.collect() for s in f.samples}
    assert values["vlm_trainer_rl_reward_mean"] == 0.75 and values["vlm_trainer_rl_kl"] == 0.01
    dashboard = (Path(__file__).resolve().parents[2] / "charts/vlm-operator/dashboards/vlm-training.json").read_text()
    for name in RL_STATS:
        if name != "value_loss":
            assert f"vlm_trainer_rl_{name}" in dashboard, name
