"""reward: a reward model trained on preference pairs (Bradley-Terry), as InstructGPT and LLaVA-RLHF train theirs.

The kind's module: the loss, the objective, and what the kind changes in the shared loop (the scalar head in place of
the LM head, which always trains; final/ written as the VLM folder plus the head). The model, its pooling and the
loader of final/ live in `vlm_trainer.reward_model` (the `rl` kind scores with it). Its defaults, formats
(`preference`, DPO's pairs and collate) and accounting facts (two sequences per sample, no reference model, a scalar
head) are its row in vlm_core.kinds.

For a prompt x with chosen answer y_w and rejected answer y_l, with r = the head's value at the last non-padding
token of the rendered conversation:

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - margin)

(`stage.reward.margin`, default 0: the plain Bradley-Terry loss; a positive margin asks for a gap, as Llama 2's
margin loss does). The logged reward margin is r(x, y_w) - r(x, y_l), the reward accuracy the share of pairs whose
margin is positive (held-out: the pairwise accuracy), chosen/rejected reward the mean rewards.

Trainable parts: the stage's `trainable` (default projector + language model) plus the head, which always trains
(with LoRA it is a PEFT `modules_to_save` module, fully trained, next to the adapters). Every strategy runs it: the
head is used inside the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_trainer import reward_model
from vlm_trainer.objective import model_inputs
from vlm_trainer.samples import collate_pairs
from vlm_trainer.stages.base import TrainingKind
from vlm_trainer.trainer import Trainer


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair loss -log sigmoid(chosen - rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


class RewardObjective:
    """Sum of per-pair Bradley-Terry losses of a batch laid out as [chosen_1..chosen_B, rejected_1..rejected_B]."""

    stat_names = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")

    def __init__(self, margin: float = 0.0):
        self.margin = margin

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    @staticmethod
    def count_tensor(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`count` as a device tensor: pairs are known from the shape, no sync either way."""
        return torch.tensor(RewardObjective.count(batch), device=batch["input_ids"].device)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = reward_model.sequence_rewards(model, model_inputs(batch))
        n = self.count(batch)
        chosen, rejected = rewards[:n], rewards[n:]
        losses = bradley_terry_loss(chosen, rejected, self.margin)
        margins = (chosen - rejected).detach()
        stats = {
            "reward_margin": margins.sum(),
            "reward_accuracy": (margins > 0).float().sum(),
            "chosen_reward": chosen.detach().sum(),
            "rejected_reward": rejected.detach().sum(),
        }
        return losses.sum(), stats


class RewardKind(TrainingKind):
    """Preference pairs in, the Bradley-Terry objective on a scalar head; eval reports the mean rewards, margin and
    pairwise accuracy per held-out pair (the base's means of the objective's statistics)."""

    def objective(self, trainer: Trainer, *, reads_weights: bool) -> RewardObjective:
        stage = trainer.config.stage
        assert stage.reward is not None
        return RewardObjective(margin=stage.reward.margin)

    def collate(self, items: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Pairs laid out as [chosen_1..chosen_B, rejected_1..rejected_B] (what `RewardObjective` reads)."""
        return collate_pairs(items, pad_token_id)

    def adapt_model(self, trainer: Trainer, module: nn.Module) -> None:
        """The scalar head in place of the LM head: zero-initialised, or the head of a reward final/ it starts from
        (read where the weights are read)."""
        init_from = trainer.config.init_from
        materialized = next(module.parameters()).device.type != "meta"
        weight = reward_model.read_head(init_from) if init_from is not None and materialized else None
        reward_model.install_scalar_head(module, weight)

    def always_trained(self, module: nn.Module) -> tuple[str, ...]:
        """The head trains whatever stage.trainable says."""
        return (reward_model.head_key(module).removesuffix(".weight"),)

    def final_weights(self, trainer: Trainer, folder: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head goes to reward_head.safetensors; the VLM folder keeps the starting model's LM head."""
        stage = trainer.config.stage
        assert stage.reward is not None
        key = reward_model.head_key(trainer.hf_model)
        weights = dict(weights)
        reward_model.write_head(folder, weights.pop(key), margin=stage.reward.margin)
        original = reward_model.original_lm_head(trainer.hf_model)
        if original is not None:
            weights[key] = original
        return weights


KIND = RewardKind("reward")
