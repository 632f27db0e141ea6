"""dpo: Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model.

The kind's module: the loss (a short function, checked against TRL's on the same inputs), the objective,
the reference policy (a sharded frozen copy, or for LoRA the policy with its adapter disabled) and the
collate of preference pairs. Its defaults, formats (`preference`) and accounting facts (two sequences per
sample, a reference model) are its row in vlm_core.kinds.

For a prompt x with chosen answer y_w and rejected answer y_l, with sequence log-probabilities over the
answer tokens only (pc, pr under the policy; rc, rr under the reference):

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

The implicit rewards are beta * (pc - rc) and beta * (pr - rr); the logged reward margin is their
difference and the reward accuracy the share of pairs whose margin is positive.

Policy and reference run the LM head at the labelled positions only (`objective.labelled_logits`); the
sequence log-probabilities equal those from the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vlm_core.spec import StageSpec

from vlm_trainer.model import build_vlm
from vlm_trainer.objective import labelled_logits, model_inputs
from vlm_trainer.samples import IGNORE_INDEX, collate_pairs
from vlm_trainer.stages.base import TrainingKind
from vlm_trainer.trainer import Trainer


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target) where the target is set; logits[:, t] predicts targets[:, t]."""
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the labelled (answer) tokens of each row; logits predict the next token."""
    return target_logps(logits[:, :-1], labels[:, 1:])


@dataclass
class DPOTerms:
    """Per-pair DPO loss and implicit rewards."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DPOTerms:
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return DPOTerms(losses, chosen_rewards.detach(), rejected_rewards.detach())


class DPOObjective:
    """Sum of per-pair DPO losses of a batch laid out as [chosen_1..chosen_B, rejected_1..rejected_B].

    The reference is either a frozen module (`reference`, placed by the strategy like the policy) or,
    for LoRA, the policy's own PEFT model with its adapter disabled (`adapter_host`): same base weights,
    no second copy.
    """

    stat_names = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")

    def __init__(self, reference: nn.Module | None, beta: float, *, adapter_host: nn.Module | None = None):
        if (reference is None) == (adapter_host is None):
            raise ValueError("DPOObjective: give exactly one of reference or adapter_host")
        self.reference = reference
        self.adapter_host = adapter_host
        self.beta = beta
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)

    def reference_logps(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return target_logps(*labelled_logits(self.reference, inputs, labels))
        assert self.adapter_host is not None
        with self.adapter_host.disable_adapter():  # type: ignore[operator]
            return target_logps(*labelled_logits(self.adapter_host, inputs, labels))

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    @staticmethod
    def count_tensor(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`count` as a device tensor: pairs are known from the shape, no sync either way."""
        return torch.tensor(DPOObjective.count(batch), device=batch["input_ids"].device)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = model_inputs(batch)
        policy = target_logps(*labelled_logits(model, inputs, batch["labels"]))
        with torch.no_grad():
            reference = self.reference_logps(inputs, batch["labels"])
        n = self.count(batch)
        terms = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
        stats = {
            "reward_margin": terms.margins.sum(),
            "reward_accuracy": (terms.margins > 0).float().sum(),
            "chosen_reward": terms.chosen_rewards.sum(),
            "rejected_reward": terms.rejected_rewards.sum(),
        }
        return terms.losses.sum(), stats


def dpo_reference_mode(stage: StageSpec) -> str:
    """stage.dpo.reference with `auto` resolved: the adapter-disabled policy for LoRA, else a sharded copy."""
    assert stage.dpo is not None
    return stage.dpo.resolved_reference(lora=stage.lora is not None)


class DPOKind(TrainingKind):
    """Preference pairs in, the DPO objective against a frozen reference; eval reports the mean implicit rewards,
    margin and accuracy per pair (the base's means of the objective's statistics)."""

    def objective(self, trainer: Trainer, *, reads_weights: bool) -> DPOObjective:
        stage = trainer.config.stage
        assert stage.dpo is not None
        if dpo_reference_mode(stage) == "adapter_disabled":
            return DPOObjective(None, beta=stage.dpo.beta, adapter_host=trainer.hf_model)
        reference = build_vlm(trainer.config.model, trainer.config.init_from, seed=stage.seed,
                              materialize=reads_weights, resolution_policy=stage.data.resolution).model
        reference.requires_grad_(False)
        return DPOObjective(trainer.strategy.prepare_frozen(reference), beta=stage.dpo.beta)

    def collate(self, items: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Pairs laid out as [chosen_1..chosen_B, rejected_1..rejected_B] (what `DPOObjective` reads)."""
        return collate_pairs(items, pad_token_id)


KIND = DPOKind("dpo")
