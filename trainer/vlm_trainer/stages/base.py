"""The protocol every stage kind implements in the trainer, and the base of the kinds that train weights.

A kind's module (`align`, `instruct`, `dpo`, `curate`) owns what differs between kinds: its row of the
torch-free table (vlm_core.kinds: output, accepted data formats, defaults, own fields), its runner and,
for the kinds that train, the objective, the collate (sequences or preference pairs) and the eval
statistics. The kinds that train share one loop (vlm_trainer.trainer); `TrainingKind.run` builds it with
the kind as its hooks.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from vlm_core.kinds import StageKind, kind
from vlm_core.spec import TrainerConfig

from vlm_trainer.objective import CausalLMObjective, Objective
from vlm_trainer.parallel import DistEnv
from vlm_trainer.samples import collate
from vlm_trainer.trainer import Trainer


class StageKindImpl(Protocol):
    """One stage kind in the trainer: its table row and how a stage of it runs on every rank of its launch."""

    @property
    def row(self) -> StageKind: ...

    def run(self, config: TrainerConfig, env: DistEnv) -> dict[str, Any]:
        """Run the stage to its committed final/ and return its report (collective: every rank calls it)."""
        ...


class TrainingKind:
    """A kind that trains weights in the shared loop. The defaults are the supervised next-token kinds'
    (align, instruct): answer-token cross-entropy on padded sequences; a kind overrides what differs."""

    def __init__(self, stage_type: str):
        self.row = kind(stage_type)
        if not self.row.trains:
            raise ValueError(f"stage kind {stage_type!r} trains no weights; it cannot run in the training loop")

    @property
    def formats(self) -> tuple[str, ...]:
        """The data formats a stage of this kind reads (the table's; the schema validates `data.format`)."""
        return self.row.formats

    @property
    def sequences_per_sample(self) -> int:
        return self.row.sequences_per_sample

    def objective(self, trainer: Trainer, *, reads_weights: bool) -> Objective:
        return CausalLMObjective(chunked=trainer.config.stage.cross_entropy == "chunked")

    def collate(self, items: list[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate(items, pad_token_id)

    def eval_statistics(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        """The objective's statistics as means per held-out sample (none for the cross-entropy objective)."""
        return {name: value / max(samples, 1.0) for name, value in sums.items()}

    def adapt_model(self, trainer: Trainer, module: nn.Module) -> None:
        """Change the built model in place before freezing, LoRA and the strategy (none here; reward: a scalar head)."""

    def always_trained(self, module: nn.Module) -> tuple[str, ...]:
        """Module paths (in the family's model) that train whatever stage.trainable says (none here)."""
        return ()

    def final_weights(self, trainer: Trainer, folder: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of final/'s Hugging Face folder (the full model here); a kind may write files of its own."""
        return weights

    def step_batches(self, trainer: Trainer) -> list[dict[str, torch.Tensor]]:
        """One step's micro-batches: grad-accumulation steps of them from the loader (an RL kind turns them into
        rollouts)."""
        return [trainer._next_batch() for _ in range(trainer.config.stage.grad_accum_steps)]

    def build_trainer(self, config: TrainerConfig, env: DistEnv) -> Trainer:
        """The stage's Trainer, built (benchmarks and tests drive its steps themselves)."""
        return Trainer.build(config, env, self)

    def run(self, config: TrainerConfig, env: DistEnv) -> dict[str, Any]:
        return self.build_trainer(config, env).run()
