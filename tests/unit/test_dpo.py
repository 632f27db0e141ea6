"""The DPO loss and its sequence log-probabilities, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from vlm_trainer.samples import IGNORE_INDEX
from vlm_trainer.stages.dpo import dpo_loss, sequence_logps


def test_dpo_loss_matches_the_hand_computed_value():
    # Policy: chosen -1.0, rejected -2.0; reference: both -1.5; beta 0.1.
    # Implicit rewards: 0.1 * (-1.0 + 1.5) = 0.05 and 0.1 * (-2.0 + 1.5) = -0.05, margin 0.1,
    # loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443966600735709.
    terms = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
    assert terms.losses.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-7)
    assert terms.losses.item() == pytest.approx(0.6443966600735709, abs=1e-7)
    assert terms.chosen_rewards.item() == pytest.approx(0.05)
    assert terms.rejected_rewards.item() == pytest.approx(-0.05)
    assert terms.margins.item() == pytest.approx(0.1)


def test_dpo_loss_is_log2_when_policy_equals_reference_and_falls_as_the_margin_grows():
    logps = torch.tensor([-3.0, -0.5])
    same = dpo_loss(logps, logps.flip(0), logps, logps.flip(0), beta=0.5)
    assert torch.allclose(same.losses, torch.full((2,), math.log(2.0)))
    better = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert better.losses.item() < math.log(2.0) and better.margins.item() == pytest.approx(2.0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1).losses.sum().backward()
    # d/dx -log sigmoid(beta (c - r)) at margin 0 = -beta/2 for c, +beta/2 for r.
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


def test_sequence_logps_sum_only_the_answer_tokens():
    # Vocabulary of 4 with uniform logits: every token has log-prob -log 4.
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2, 3],  # 2 answer tokens (predicted from positions 2, 3)
        [IGNORE_INDEX, 1, 1, 1, IGNORE_INDEX],  # 3 answer tokens
    ])
    out = sequence_logps(logits, labels)
    assert torch.allclose(out, torch.tensor([-2 * math.log(4), -3 * math.log(4)]))
    # A confident prediction of the labelled token at the predicting position raises that row only.
    logits[0, 2, 2] = 20.0
    out2 = sequence_logps(logits, labels)
    assert out2[0] > out[0] and out2[1] == out[1]
    assert out2[0].item() == pytest.approx(-math.log(4) + torch.log_softmax(torch.tensor([0.0, 0.0, 20.0, 0.0]), 0)[2].item(), abs=1e-5)
