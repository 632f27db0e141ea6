"""Strategies by name (`stage.strategy`): the loop asks the registry, never checks which one it has."""

from __future__ import annotations

from vlm_core.spec import StageSpec

from vlm_trainer.parallel import DistEnv
from vlm_trainer.strategies.base import Strategy
from vlm_trainer.strategies.ddp import DDPStrategy
from vlm_trainer.strategies.deepspeed_zero import Zero2Strategy, Zero3Strategy
from vlm_trainer.strategies.fsdp import FSDPStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DDPStrategy, FSDPStrategy, Zero2Strategy, Zero3Strategy)
}


def build_strategy(stage: StageSpec, env: DistEnv) -> Strategy:
    try:
        cls = STRATEGIES[stage.strategy]
    except KeyError:
        raise ValueError(f"stage.strategy: unknown strategy {stage.strategy!r}; known: {sorted(STRATEGIES)}") from None
    return cls(stage, env)


__all__ = ["STRATEGIES", "Strategy", "build_strategy"]
