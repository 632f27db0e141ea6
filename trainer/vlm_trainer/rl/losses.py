"""The RL losses and advantage estimators, as pure tensor functions (checked against TRL's in a unit test).

Shapes: per-token tensors are (sequences, response tokens); `mask` is 1.0 on response tokens (up to and
including the first end-of-sequence token), 0.0 on padding after it.

GRPO (Shao et al. 2024; TRL's `GRPOTrainer` with `loss_type="grpo"`, token-level importance sampling):
    ratio_t = exp(logp_t - old_logp_t);  per-token loss = -min(ratio_t A, clip(ratio_t, 1-eps, 1+eps) A)
              + beta * k3_t,  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss = mean over sequences of (masked mean over the sequence's tokens)
with A the group-normalised advantage of the sequence: (r - mean of its group) / (std of its group + 1e-4)
(unbiased std, TRL's `scale_rewards="group"`).

PPO (Schulman et al. 2017; TRL's `PPOTrainer`): the KL to the reference enters the REWARD as a per-token
penalty (-beta * (old_logp_t - ref_t)), the scalar reward is added at the last response token (as LLaVA-RLHF
and TRL do); advantages by GAE(gamma, lambda) over the rollout's values, whitened over the batch; then
    policy loss = masked mean of max(-A ratio, -A clip(ratio, 1-eps, 1+eps))
    value loss  = 0.5 * masked mean of max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRPO_STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def token_logps_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and the entropy of the distribution at each position; logits (N, T, V) predict tokens (N, T)."""
    logp = logits.float().log_softmax(-1)
    chosen = torch.gather(logp, 2, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference), Schulman's k3 estimator (TRL's GRPO term): exp(d) - d - 1, d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, unbiased variance (TRL's `masked_whiten`)."""
    mean = masked_mean(x, mask)
    centered = x - mean
    var = masked_mean(centered**2, mask)
    count = mask.sum()
    if count > 1:
        var = var * count / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, over the group's (unbiased) std + 1e-4; rewards (N*G,) ordered
    by prompt (a prompt's G responses adjacent)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + GRPO_STD_EPS)).reshape(-1)


@dataclass
class PolicyTerms:
    """Per-sequence loss of a batch and the per-token pieces the statistics read."""

    per_sequence: torch.Tensor  # (N,) GRPO: token mean per sequence; PPO: token SUM per sequence
    clipped: torch.Tensor  # (N, T) 1.0 where the ratio was clipped (the clipped term was the one taken)
    kl: torch.Tensor  # (N, T) k3 to the reference (0 without one)


def grpo_loss_terms(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, *, beta: float, epsilon: float) -> PolicyTerms:
    """GRPO's per-sequence losses (the loss is their mean); advantages (N,)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    loss1, loss2 = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a
    per_token = -torch.min(loss1, loss2)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if beta != 0.0 and ref_logps is not None:
        per_token = per_token + beta * kl
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    clipped = ((loss2 < loss1) & (ratio != ratio.clamp(1 - epsilon, 1 + epsilon))).float()
    return PolicyTerms(per_sequence, clipped, kl)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float, epsilon: float) -> torch.Tensor:
    return grpo_loss_terms(logps, old_logps, ref_logps, advantages, mask, beta=beta, epsilon=epsilon).per_sequence.mean()


def ppo_policy_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     *, epsilon: float) -> PolicyTerms:
    """PPO's clipped surrogate per token, summed per sequence (the loss is the masked mean over all tokens);
    advantages (N, T)."""
    ratio = torch.exp(logps - old_logps)
    loss1, loss2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = torch.max(loss1, loss2)
    clipped = (loss2 > loss1).float()
    return PolicyTerms((per_token * mask).sum(-1), clipped, torch.zeros_like(logps))


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    *, epsilon: float) -> torch.Tensor:
    return ppo_policy_terms(logps, old_logps, advantages, mask, epsilon=epsilon).per_sequence.sum() / mask.sum()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   *, clip: float) -> torch.Tensor:
    """0.5 * masked mean of the larger of the plain and the clipped squared error (TRL's vf_loss)."""
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_token_rewards(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      *, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta * (old_logp - ref_logp) on every response token, plus the sequence's score at its
    last response token (KL in the reward, as LLaVA-RLHF and TRL's PPO do)."""
    rewards = -beta * (old_logps - ref_logps) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over each response (values 0 past its end)."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    returns = advantages + values
    return advantages * mask, returns
