"""The stage kinds in the trainer: one module per kind, one registry, and `run_stage`, the entry they share.

`STAGES` maps `stages[].type` to the kind's implementation (`base.StageKindImpl`): every module of this
package that defines `KIND` is one, found when the package is imported. It has exactly the types of the
torch-free table vlm_core.kinds (a test holds them equal; an import here refuses a module without a row).
Adding a stage kind = one row in that table + one module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from vlm_core import contract, kinds, storage
from vlm_core.spec import TrainerConfig

from vlm_trainer.lease import Lease, LeaseHeldError
from vlm_trainer.parallel import DistEnv, all_reduce_sum
from vlm_trainer.progress import emit
from vlm_trainer.stages.base import StageKindImpl, TrainingKind


def _discover() -> dict[str, StageKindImpl]:
    """Each module's `KIND`, in the kinds table's order."""
    found: dict[str, StageKindImpl] = {}
    for info in pkgutil.iter_modules(__path__):
        impl = getattr(importlib.import_module(f"{__name__}.{info.name}"), "KIND", None)
        if impl is None:
            continue
        if impl.row.type in found:
            raise ImportError(f"vlm_trainer.stages.{info.name}: a second module for kind {impl.row.type!r}")
        found[impl.row.type] = impl
    return {t: found[t] for t in kinds.STAGE_TYPES if t in found}


STAGES: dict[str, StageKindImpl] = _discover()


def stage_kind(stage_type: str) -> StageKindImpl:
    """The implementation of kind `stage_type`; a KeyError names the accepted types."""
    try:
        return STAGES[stage_type]
    except KeyError:
        raise KeyError(f"unknown stage type {stage_type!r}; accepted: {', '.join(STAGES)}") from None


def training_kind(stage_type: str) -> TrainingKind:
    """The implementation of kind `stage_type`, which must train weights (benchmarks build its Trainer)."""
    impl = stage_kind(stage_type)
    if not isinstance(impl, TrainingKind):
        trains = [t for t, k in STAGES.items() if isinstance(k, TrainingKind)]
        raise ValueError(f"stage type {stage_type!r} trains no weights; the training kinds: {', '.join(trains)}")
    return impl


def run_stage(config: TrainerConfig, env: DistEnv) -> dict[str, Any] | None:
    """Run one stage of any kind to its final/ and return its report (`__main__` skips a stage already done).

    Rank 0 holds the stage's lease (one writer per stage output) from before anything is built until
    final/ is committed, or the stage fails: a gang restart takes it over at once. Every kind runs in the
    same launch, under the same lease and handoff; its module decides what the stage does."""
    impl = stage_kind(config.stage.type)
    held: Lease | None = None
    refusal: LeaseHeldError | None = None
    final = storage.join(config.output, contract.FINAL_DIR)
    verdict = 0.0  # rank 0 decides for all: 0 run, 1 already done, 2 refused (another writer)
    if env.is_main:
        try:
            held = Lease.acquire(config.output, job=config.job, stage=config.stage.name)
            held.keep_alive()
            # a run that waited for the lease may find the stage finished by the holder
            verdict = 1.0 if storage.verify_committed(final).ok else 0.0
        except LeaseHeldError as err:
            refusal, verdict = err, 2.0
    try:
        (verdict,) = all_reduce_sum([verdict], env)  # every rank learns it (a bare exit would hang them)
        if verdict >= 2:
            if refusal is not None:
                raise refusal  # rank 0 reports; the others stop quietly
            return None
        if verdict >= 1:
            if env.is_main:
                emit(contract.EVENT_SKIP, stage=config.stage.name, reason=f"{final} was committed by the previous holder")
            return None
        return impl.run(config, env)
    finally:
        if held is not None:
            held.release()
