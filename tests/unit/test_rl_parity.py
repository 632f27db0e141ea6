"""Parity with TRL 1.16 (pinned in the `test` extra): on the same log-probs, advantages, rewards and masks, our GRPO
loss, our group-normalised advantages and our PPO policy loss equal TRL's within 1e-6.

TRL's loss lives in a trainer method, `GRPOTrainer._compute_loss(self, model, inputs)`; it is called here on a
minimal object that has only the attributes the method reads, with `_get_per_token_logps_and_entropies`
answering the given log-probs (what the model would return). TRL 1.16 has no PPO trainer any more; its
`_compute_loss` takes per-token advantages (shape (B, T), "to support subclasses") and with `loss_type="bnpo"`
and `beta=0` it computes exactly PPO's clipped surrogate, -min(A r, A clip(r, 1-eps, 1+eps)), as a masked mean
over all tokens (the policy loss of TRL's former PPOTrainer): that is the PPO reference here.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd
from vlm_trainer.rl import losses


class _Accelerator:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_loss(logps, old_logps, ref_logps, advantages, mask, *, beta, epsilon, loss_type):
    """TRL's `GRPOTrainer._compute_loss` on these tensors (the model's forward replaced by the given log-probs)."""
    n, t = logps.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.ones_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=_Accelerator(),
    )
    inputs = {
        "prompt_ids": torch.zeros(n, 3, dtype=torch.long), "prompt_mask": torch.ones(n, 3, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


def batch(seed: int, n: int = 8, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3  # ratios well outside 1 +- eps
    ref = logps + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.2
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    return logps, old, ref, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(seed, beta):
    logps, old, ref, mask = batch(seed)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9], dtype=torch.float64)
    advantages = losses.group_advantages(rewards, 4)
    ours = losses.grpo_loss(logps, old, ref, advantages, mask.double(), beta=beta, epsilon=0.2)
    theirs, metrics = trl_loss(logps, old, ref, advantages, mask, beta=beta, epsilon=0.2, loss_type="grpo")
    assert abs(float(ours) - float(theirs)) < 1e-6, (float(ours), float(theirs))
    # our clip fraction is TRL's clip_ratio/region_mean, our KL its kl (per-token k3, masked mean)
    terms = losses.grpo_loss_terms(logps, old, ref, advantages, mask.double(), beta=beta, epsilon=0.2)
    assert abs(float(losses.masked_mean(terms.clipped, mask)) - metrics["clip_ratio/region_mean"][0]) < 1e-6
    if beta:
        assert abs(float(losses.masked_mean(terms.kl, mask)) - metrics["kl"][0]) < 1e-6


def test_group_advantages_equal_trls_group_scaling():
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(12, generator=g)
    mean = rewards.view(-1, 4).mean(1).repeat_interleave(4)
    std = nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)  # TRL's scale_rewards="group"
    assert torch.allclose(losses.group_advantages(rewards, 4), (rewards - mean) / (std + 1e-4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_policy_loss_equals_trls_clipped_surrogate(seed):
    logps, old, _, mask = batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    advantages = torch.randn(logps.shape, generator=g, dtype=torch.float64) * mask
    ours = losses.ppo_policy_loss(logps, old, advantages, mask.double(), epsilon=0.2)
    theirs, metrics = trl_loss(logps, old, None, advantages, mask, beta=0.0, epsilon=0.2, loss_type="bnpo")
    assert abs(float(ours) - float(theirs)) < 1e-6, (float(ours), float(theirs))
    terms = losses.ppo_policy_terms(logps, old, advantages, mask.double(), epsilon=0.2)
    assert abs(float(losses.masked_mean(terms.clipped, mask)) - metrics["clip_ratio/region_mean"][0]) < 1e-6


def test_the_parity_check_can_fail():
    logps, old, ref, mask = batch(0)
    advantages = torch.linspace(-1, 1, 8, dtype=torch.float64)
    ours = losses.grpo_loss(logps, old, ref, advantages, mask.double(), beta=0.04, epsilon=0.3)  # another epsilon
    theirs, _ = trl_loss(logps, old, ref, advantages, mask, beta=0.04, epsilon=0.2, loss_type="grpo")
    assert abs(float(ours) - float(theirs)) > 1e-6
