"""rl: PPO or GRPO on answers the policy samples inside the stage (issue 22), against a frozen reference.

Data: `conversation` samples; the last assistant turn is the reference answer and is dropped from the prompt
(vlm_trainer.rl.rollout). Each optimizer step, every rank takes its micro-batches of prompts, samples
`rl.groupSize` responses per prompt with the stage's sampling settings (`model.generate`, the policy without
its DDP wrapper, in eval mode), scores them (vlm_trainer.rl.rewards: a verifier or a reward stage's model),
computes the rollout's log-probabilities under the policy (old) and the reference, and the advantages:
- grpo: group-normalised rewards (vlm_trainer.rl.losses.group_advantages); the loss is TRL's GRPO loss
  (clipped ratio + beta * k3 KL to the reference, token mean per sequence, mean over sequences);
- ppo: a value head on the last hidden state (vlm_trainer.rl.value), per-token rewards with the KL penalty
  in the reward (LLaVA-RLHF's choice), GAE, whitened advantages; the loss is the clipped surrogate (token mean
  over the global batch); the value head takes its own clipped value-loss step each optimizer step.
The same rollouts serve `rl.iterations` optimizer steps (the ratio departs from 1 from the second on).

The reference is the stage's starting weights: for LoRA the policy with its adapter disabled, else a frozen
copy placed by the strategy (as DPO). Sampling uses the global torch RNG, which every checkpoint saves per
rank, so a resumed stage samples the same rollouts and gives the same next-step loss.

Per-step statistics (progress lines, Prometheus `vlm_trainer_rl_*`, eval on the held-out prompts):
reward_mean, reward_std, kl (per-token k3 of the policy to the reference), entropy, response_length,
clip_fraction, and for ppo value_loss; each a mean over the step's prompts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vlm_core.spec import StageSpec
from vlm_core.spec.rl import RLSpec

from vlm_trainer import family
from vlm_trainer.model import build_vlm, set_train_modes
from vlm_trainer.rl import rewards
from vlm_trainer.rl.losses import (
    gae,
    group_advantages,
    grpo_loss_terms,
    k3_kl,
    masked_mean,
    masked_whiten,
    ppo_policy_terms,
    ppo_token_rewards,
    ppo_value_loss,
)
from vlm_trainer.rl.rollout import (
    collate_prompts,
    repeat_prompts,
    response_logps,
    sample_responses,
    stop_token_ids,
)
from vlm_trainer.rl.value import ValueHead
from vlm_trainer.stages.base import TrainingKind
from vlm_trainer.trainer import Trainer

VALUE_STATE = "rl_value_head"  # the key of the value head's state in the checkpoint's stats


def rl_spec(stage: StageSpec) -> RLSpec:
    assert stage.rl is not None
    return stage.rl


def reward_function(spec: RLSpec) -> rewards.RewardFn:
    if spec.reward.verifier is not None:
        return rewards.verifier(spec.reward)
    raise ValueError(
        "rl.reward.fromStage: rewards from a reward stage's model need the reward stage kind "
        "(vlm_trainer.reward_model), which this build does not have; use rl.reward.verifier (exact, regex or python)"
    )


class RLObjective:
    """The RL loss on rollout batches (`rollout` makes them from prompt batches; `__call__` makes them itself for a
    prompt batch, as evaluation passes)."""

    def __init__(self, trainer: Trainer, reference: nn.Module | None, *, adapter_host: nn.Module | None = None):
        stage = trainer.config.stage
        self.trainer, self.spec = trainer, rl_spec(stage)
        self.reference, self.adapter_host = reference, adapter_host
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)
        self.ppo = self.spec.algorithm == "ppo"
        self.tokenizer = trainer.vlm.processor.tokenizer
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.stop_ids = stop_token_ids(trainer.hf_model, self.tokenizer)
        self.reward = reward_function(self.spec)
        self.value_head: ValueHead | None = None
        if self.ppo:
            hidden = family.base_model(trainer.hf_model).config.get_text_config().hidden_size
            self.value_head = ValueHead(hidden, self.spec.value_lr, trainer.env.device)
        self.value_loaded = False
        self.cached: list[dict[str, torch.Tensor]] | None = None
        self.cached_counts = (0, 0)
        self.stat_names: tuple[str, ...] = ("reward_mean", "reward_std", "kl", "entropy", "response_length",
                                            "clip_fraction") + (("value_loss",) if self.ppo else ())

    # --- units -------------------------------------------------------------------------------------

    def count_tensor(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units the loss sums over: GRPO sequences, PPO response tokens (a prompt batch: its prompts)."""
        if "old_logps" not in batch:
            return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        if self.ppo:
            return batch["response_mask"].sum()
        return torch.tensor(batch["old_logps"].shape[0], device=batch["old_logps"].device)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(self.count_tensor(batch))

    # --- rollouts ----------------------------------------------------------------------------------

    def _reference_logps(self, rollout: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference is not None:
            return response_logps(self.reference, rollout)[0]
        assert self.adapter_host is not None
        with self.adapter_host.disable_adapter():  # type: ignore[operator]
            return response_logps(self.adapter_host, rollout)[0]

    def _texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode([t for t, m in zip(row, keep, strict=True) if m], skip_special_tokens=True)
                for row, keep in zip(ids.tolist(), mask.tolist(), strict=True)]

    @torch.no_grad()
    def rollout(self, prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A prompt batch -> its rollout batch: groupSize sampled responses per prompt, rewards, log-probabilities
        (policy and reference), advantages (and PPO's values and returns)."""
        spec, trainer = self.spec, self.trainer
        model = trainer.hf_model
        was_training = model.training
        model.eval()
        group = spec.group_size
        try:
            rows = repeat_prompts(prompts, group)
            with trainer.strategy.autocast():
                r = sample_responses(model, rows, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                     top_p=spec.top_p, pad_token_id=self.pad_token_id, stop_ids=self.stop_ids,
                                     image_token_id=trainer.encoder.image_token_id)
                old, _, states = response_logps(model, r, hidden=self.ppo)
                ref = self._reference_logps(r)
        finally:
            if was_training:
                set_train_modes(model, list(trainer.config.stage.trainable))
        mask = r["response_mask"]
        width = int(r["prompt_width"])
        responses = self._texts(r["input_ids"][:, width:], mask.long())
        references = self._texts(rows["reference_ids"], rows["reference_mask"])
        prompt_texts = self._texts(rows["input_ids"], rows["attention_mask"])
        scores = rewards.checked(self.reward, responses, references, prompt_texts, mask.device)
        r.update(old_logps=old, ref_logps=ref, scores=scores)
        if self.ppo:
            assert states is not None and self.value_head is not None
            values = self.value_head(states) * mask
            token_rewards = ppo_token_rewards(scores, old, ref, mask, beta=spec.beta)
            advantages, returns = gae(token_rewards, values, mask, gamma=spec.gamma, lam=spec.lam)
            r.update(advantages=masked_whiten(advantages, mask) * mask, returns=returns, old_values=values,
                     states=states.detach().float())
        else:
            r["advantages"] = group_advantages(scores, group)
        return r

    # --- PPO's value head ----------------------------------------------------------------------------

    def value_step(self, rollouts: list[dict[str, torch.Tensor]]) -> None:
        """One value-head step on the rollouts (each micro-batch's clipped value loss, averaged)."""
        head = self.value_head
        assert head is not None
        for r in rollouts:
            with torch.enable_grad():
                values = head(r["states"])
                loss = ppo_value_loss(values, r["old_values"], r["returns"], r["response_mask"],
                                      clip=self.spec.value_clip_range)
                (self.spec.value_coef * loss / len(rollouts)).backward()
            r["value_loss"] = loss.detach()
        head.step(self.trainer.env)
        self.trainer.stats[VALUE_STATE] = head.state()

    def restore_value_head(self) -> None:
        """On the first step of a resumed stage: the value head as the checkpoint saved it."""
        if self.value_head is not None and not self.value_loaded and VALUE_STATE in self.trainer.stats:
            self.value_head.load(self.trainer.stats[VALUE_STATE])
        self.value_loaded = True

    # --- the loss ------------------------------------------------------------------------------------

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompts = None
        if "old_logps" not in batch:  # evaluation: a prompt batch
            prompts = batch["input_ids"].shape[0]
            batch = self.rollout(batch)
            if self.ppo:
                batch["value_loss"] = ppo_value_loss(self.value_head(batch["states"]), batch["old_values"],  # type: ignore[misc]
                                                     batch["returns"], batch["response_mask"],
                                                     clip=self.spec.value_clip_range)
        spec, mask = self.spec, batch["response_mask"]
        logps, entropy, _ = response_logps(model, batch)
        if self.ppo:
            terms = ppo_policy_terms(logps, batch["old_logps"], batch["advantages"], mask, epsilon=spec.clip_range)
            kl = k3_kl(logps.detach(), batch["ref_logps"])
        else:
            terms = grpo_loss_terms(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], mask,
                                    beta=spec.beta, epsilon=spec.clip_range)
            kl = terms.kl.detach()
        loss = terms.per_sequence.sum()
        n = batch["old_logps"].shape[0] / spec.group_size  # prompts: statistics are means weighted by prompts
        scores = batch["scores"]
        stats = {
            "reward_mean": scores.mean() * n,
            "reward_std": (scores.std() if len(scores) > 1 else torch.zeros_like(scores.sum())) * n,
            "kl": masked_mean(kl, mask) * n,
            "entropy": masked_mean(entropy.detach(), mask) * n,
            "response_length": mask.sum(1).mean() * n,
            "clip_fraction": masked_mean(terms.clipped, mask) * n,
        }
        if self.ppo:
            stats["value_loss"] = batch.get("value_loss", torch.zeros(())).to(mask.device) * n
        if prompts is not None:  # evaluation sums per prompt: the batch's mean loss per unit times its prompts
            loss = loss / self.count_tensor(batch).clamp(min=1) * prompts
        return loss, {k: v.detach() for k, v in stats.items()}


class RLKind(TrainingKind):
    """Prompts in (conversations), rollouts and the PPO/GRPO loss; eval samples answers to the held-out prompts and
    reports the same statistics (mean reward etc.) per prompt."""

    def objective(self, trainer: Trainer, *, reads_weights: bool) -> RLObjective:
        stage = trainer.config.stage
        if stage.lora is not None:  # the reference is the base without adapters (no second copy)
            return RLObjective(trainer, None, adapter_host=trainer.hf_model)
        reference = build_vlm(trainer.config.model, trainer.config.init_from, seed=stage.seed,
                              materialize=reads_weights, resolution_policy=stage.data.resolution).model
        reference.requires_grad_(False)
        return RLObjective(trainer, trainer.strategy.prepare_frozen(reference))

    def collate(self, items: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate_prompts(items, pad_token_id)

    def step_batches(self, trainer: Trainer) -> list[dict[str, torch.Tensor]]:
        """New rollouts every rl.iterations steps (the same ones in between); PPO's value head takes its step."""
        objective = trainer.objective
        assert isinstance(objective, RLObjective)
        objective.restore_value_head()
        if objective.cached is None or trainer.step % objective.spec.iterations == 0:
            prompts = super().step_batches(trainer)
            objective.cached = [objective.rollout(b) for b in prompts]
            objective.cached_counts = (trainer._step_data["samples"], trainer._step_data["tokens"])
        else:  # the same rollouts: count their prompts for the step's statistics (means per prompt)
            trainer._step_data["samples"], trainer._step_data["tokens"] = objective.cached_counts
        if objective.ppo:
            objective.value_step(objective.cached)
        return objective.cached


KIND = RLKind("rl")
