"""A `stages[]` entry as its schema class, decided by the table of stage kinds (vlm_core.kinds).

`spec.stages` holds a union (a `StageSpec` for the kinds that train weights, a `CurateStage` for data
curation). Code that reads one class's fields asks here instead of testing the type string or the class
itself, so the kinds table stays the one place that says what a kind is, and mypy still sees the narrowed
class. The class check below is a guard that the table and the schema agree, not a second rule.
"""

from __future__ import annotations

from vlm_core.kinds import kind
from vlm_core.spec import CurateStage, StageSpec


def training_stage(stage: StageSpec | CurateStage) -> StageSpec | None:
    """`stage` when its kind trains weights (the `StageSpec` fields apply), else None."""
    if not kind(stage.type).trains:
        return None
    if not isinstance(stage, StageSpec):
        raise TypeError(f"stage {stage.name!r}: kind {stage.type!r} trains weights but is a {type(stage).__name__}")
    return stage


def curate_stage(stage: StageSpec | CurateStage) -> CurateStage | None:
    """`stage` when it is a data-curation stage (the `CurateStage` fields apply), else None."""
    if kind(stage.type).trains:
        return None
    return stage if isinstance(stage, CurateStage) else None


def eval_stage(stage: StageSpec | CurateStage) -> StageSpec | None:
    """`stage` when its kind reads a model and reports on it (eval: the `StageSpec` fields and `eval` apply)."""
    if kind(stage.type).output != "report":
        return None
    if not isinstance(stage, StageSpec):
        raise TypeError(f"stage {stage.name!r}: kind {stage.type!r} reads a model but is a {type(stage).__name__}")
    return stage
