"""The one planner, shared by the local backend and the Kubernetes operator. Pure functions only.

`plan(job, observed)` looks at what is true now (each stage's observed phase, restarts, and whether its
`final/` is verified committed in storage) and returns the single next action. It never remembers
anything between calls: both backends recompute the observation each time (level-triggered).

The planner alone decides whether a stage may (re)start: it counts restarts (`StartStage.restarts`;
each backend stamps that number on the launch and reports it back in the observation), spends the
restart budget (`failure_after`; a failure the contract's table calls deterministic ends the stage at once, an
eviction restarts it for free), and turns a failing preflight into a failure (`preflight_failure`),
with the same reason and code whichever backend runs the job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from vlm_core import contract, storage
from vlm_core.fingerprint import Fingerprint, differences
from vlm_core.kinds import kind
from vlm_core.redact import redact
from vlm_core.spec import TrainerConfig, VLMTrainingJob
from vlm_core.stage_classes import curate_stage, training_stage

if TYPE_CHECKING:
    from vlm_operator.admission import Admission

StagePhase = Literal["Pending", "Running", "Succeeded", "Failed"]

# The reason of the Failed condition (and of `vlmctl run`'s failure): why no restart follows.
FAIL_MAX_RESTARTS = "MaxRestartsExceeded"  # the restart budget (maxRestarts) is spent
FAIL_CONFIGURATION = contract.FAILURES[0].reason  # the trainer failed with a configuration error
# ... and the other failures no restart can fix, by the contract's table: BadData, NonFiniteLoss, OutOfMemory
FAIL_PREFLIGHT = "PreflightFailed"  # the stage's inputs are missing or disagree with the spec


@dataclass(frozen=True)
class StageObservation:
    """What a backend observed about one stage."""

    phase: StagePhase = "Pending"
    restarts: int = 0
    committed: bool = False  # final/ verified in storage (manifest present, files and sizes match)
    message: str = ""  # why it failed, or why final/ is not committed
    retryable: bool = True  # False for a failure no restart can fix (contract.FAILURES)
    failure: str = ""  # when not retryable: the table's reason (contract.Failure.reason)
    disrupted: bool = False  # a pod was evicted (drain, preemption): a restart that spends no maxRestarts
    fingerprint: dict | None = None  # the record stamped into the committed final/ (None: none stamped)


@dataclass(frozen=True)
class StartStage:
    index: int
    config: TrainerConfig
    restart: bool = False  # a gang restart after a failure (the trainer resumes from its checkpoint)
    admission: Admission | None = None  # the GPU-memory decision that let it start, if one was made
    restarts: int = 0  # the stage's restart count once this launch is made (counted here, nowhere else)
    kind: str = field(default="start", init=False)


@dataclass(frozen=True)
class Wait:
    reason: str
    index: int | None = None
    admission: Admission | None = None  # set when the stage is held back: it does not fit its GPUs
    kind: str = field(default="wait", init=False)


@dataclass(frozen=True)
class SpecChanged:
    """Stage `index` is committed, but by other settings or inputs than the job file's now: it is not done,
    and nothing reruns by itself (`changes`: one line per field, `old -> new`). The ways on: rerun from that
    stage (`vlmctl run --rerun-from`, `spec.runPolicy.rerunFrom`), or a new metadata.name."""

    index: int
    changes: tuple[str, ...]
    kind: str = field(default="changed", init=False)

    def message(self, job: VLMTrainingJob) -> str:
        name = job.spec.stages[self.index].name
        return (f"stage {name!r} was committed by other settings than the job's now: " + "; ".join(self.changes)
                + f". To run it again with the job's settings, rerun from it (vlmctl run --rerun-from {name}; on "
                f"Kubernetes spec.runPolicy.rerunFrom: {name}): its outputs and those of the stages after it are "
                "kept aside, not deleted. Or give the job a new metadata.name.")


@dataclass(frozen=True)
class Suspend:
    index: int | None
    kind: str = field(default="suspend", init=False)


@dataclass(frozen=True)
class Done:
    kind: str = field(default="done", init=False)


@dataclass(frozen=True)
class Fail:
    index: int
    reason: str
    code: str = FAIL_MAX_RESTARTS  # the Failed condition's reason: one of the FAIL_* codes
    kind: str = field(default="fail", init=False)


Action = StartStage | Wait | Suspend | Done | Fail | SpecChanged


def stage_output(job: VLMTrainingJob, index: int) -> str:
    """<storage.uri>/<job>/<stage>: the stage's checkpoints, final/, progress and eval files."""
    return contract.stage_output(job.spec.storage.uri, job.name, job.spec.stages[index].name)


def final_uri(job: VLMTrainingJob, index: int) -> str:
    return contract.stage_final(job.spec.storage.uri, job.name, job.spec.stages[index].name)


def resolve_shard(job: VLMTrainingJob, shard: str) -> str:
    """Relative shard URLs resolve against spec.storage.uri; absolute URIs and paths stay."""
    if "://" in shard or shard.startswith("/"):
        return shard
    return storage.join(job.spec.storage.uri, shard)


def previous_training_stage(job: VLMTrainingJob, index: int) -> int | None:
    """The last stage before `index` that trains weights (not a data stage such as curate): whose final/
    weights stage `index` starts from."""
    for i in range(index - 1, -1, -1):
        if kind(job.spec.stages[i].type).trains:
            return i
    return None


def curated_shards(job: VLMTrainingJob, name: str) -> list[str]:
    """The committed output shards of curate stage `name`: one per input shard, under its final/."""
    index = [s.name for s in job.spec.stages].index(name)
    stage = curate_stage(job.spec.stages[index])
    assert stage is not None, f"stage {name!r} is not a curate stage"
    n = len(storage.expand_shards(stage.input.shards))
    return [contract.curated_shard(final_uri(job, index), i) for i in range(n)]


def resolve_stage(job: VLMTrainingJob, index: int) -> TrainerConfig:
    """The trainer config of stage `index`: its inputs made explicit.

    weights: init_from = the previous *training* stage's committed final/ (None for the first training stage,
    and for curate stages, which read no weights); data: shard URLs resolved against spec.storage.uri, and
    `data.fromStage` resolved to that curate stage's committed shards; output = the stage's prefix.
    """
    stage = job.spec.stages[index].model_copy(deep=True)
    init_from = None  # a data stage (curate) reads no weights, and neither does the first training stage
    if (curate := curate_stage(stage)) is not None:
        curate.input.shards = [resolve_shard(job, s) for s in curate.input.shards]
    if (training := training_stage(stage)) is not None:
        data = training.data
        if data.from_stage is not None:
            # the trainer gets plain shard URLs (a resolved config names no stage to look up)
            data.shards, data.from_stage = curated_shards(job, data.from_stage), None
        else:
            data.shards = [resolve_shard(job, s) for s in data.shards]
        for source in data.sources:
            source.shards = [resolve_shard(job, s) for s in source.shards]
        reward = training.rl.reward if training.rl is not None else None
        if reward is not None and reward.from_stage is not None:  # rl: the reward stage's committed final/
            names = [s.name for s in job.spec.stages]
            reward.model = final_uri(job, names.index(reward.from_stage))
        data.eval_shards = [resolve_shard(job, s) for s in data.eval_shards]
        prev = previous_training_stage(job, index)
        init_from = final_uri(job, prev) if prev is not None else None
    stage.max_restarts = max_restarts(job, index)
    # Fields validate by their camelCase aliases (the wire form), so build it by alias.
    return TrainerConfig.model_validate({
        "job": job.name,
        "stageIndex": index,
        "stage": stage,
        "model": job.spec.model,
        "storage": job.spec.storage,
        "initFrom": init_from,
        "output": stage_output(job, index),
    })


def resolve_stages(job: VLMTrainingJob) -> list[TrainerConfig]:
    """Every stage's trainer config, in order (what `vlmctl render` shows)."""
    return [resolve_stage(job, i) for i in range(len(job.spec.stages))]


def max_restarts(job: VLMTrainingJob, index: int) -> int:
    """The stage's restart budget: its own maxRestarts, else spec.runPolicy.maxRestarts."""
    s = job.spec.stages[index]
    return s.max_restarts if s.max_restarts is not None else job.spec.run_policy.max_restarts


def failure_after(job: VLMTrainingJob, index: int, o: StageObservation) -> Fail | None:
    """Stage `index` failed (`o.restarts` restarts before the failed launch): the Fail that ends the job
    when no restart may follow (a configuration error, or the restart budget spent), else None."""
    name = job.spec.stages[index].name
    if o.disrupted:  # evicted, not failed: restarted without spending the budget
        return None
    if not o.retryable:
        failure = next((f for f in contract.FAILURES if f.reason == o.failure), contract.FAILURES[0])
        return Fail(index, f"stage {name!r} failed with {failure.what} (not retried): {o.message}",
                    code=failure.reason)
    limit = max_restarts(job, index)
    if o.restarts >= limit:
        return Fail(index, f"stage {name!r} failed after {o.restarts} restart(s) (maxRestarts {limit}): {o.message}",
                    code=FAIL_MAX_RESTARTS)
    return None


def preflight_failure(job: VLMTrainingJob, index: int, problems: Sequence[str]) -> Fail | None:
    """The Fail for a stage whose preflight found `problems` (a configuration error: never retried), or
    None when there are none."""
    if not problems:
        return None
    name = job.spec.stages[index].name
    return Fail(index, redact(f"stage {name!r} failed with a configuration error (not retried): preflight failed: "
                              + "; ".join(problems)), code=FAIL_PREFLIGHT)


def _launch_config(job: VLMTrainingJob, index: int, fingerprint: Callable[[int], Fingerprint] | None) -> TrainerConfig:
    """The resolved config a launch carries, with the fingerprint the trainer stamps into its manifests."""
    config = resolve_stage(job, index)
    if fingerprint is not None:
        config = config.model_copy(update={"fingerprint": fingerprint(index).record()})
    return config


def plan(
    job: VLMTrainingJob,
    observed: list[StageObservation],
    admit: Callable[[int], Admission | None] | None = None,
    preflight: Callable[[int], Sequence[str]] | None = None,
    fingerprint: Callable[[int], Fingerprint] | None = None,
) -> Action:
    """The next action for `job` given each stage's observation (missing entries count as Pending).

    `admit(index)` (see `admission.checker`) is asked before a stage starts; a refusal holds it in a Wait.
    `preflight(index)` (see `preflight.check_stage`) is asked before a stage's first launch (not before a
    restart: its inputs were checked then); any problem fails the job (`preflight_failure`).
    `fingerprint(index)` (see `vlm_core.fingerprint.compute`: it reads the inputs in storage) is asked for a
    committed stage, whose stamped fingerprint must equal it (else `SpecChanged`), and for a stage about to
    start, whose config carries it (the trainer stamps it and resumes only a checkpoint with the same one).
    """
    stages = job.spec.stages
    obs = list(observed) + [StageObservation()] * (len(stages) - len(observed))
    for i, stage in enumerate(stages):
        o = obs[i]
        if o.phase == "Succeeded":
            if o.committed:
                changes = differences(o.fingerprint, fingerprint(i)) if fingerprint is not None else []
                if changes:
                    return SpecChanged(i, tuple(changes))
                continue
            return Wait(f"stage {stage.name!r} finished but its final/ is not committed yet: {o.message}", i)
        if job.spec.suspend or job.spec.run_policy.suspend:
            return Suspend(i)
        if o.phase == "Running":
            return Wait(f"stage {stage.name!r} is running", i)
        if o.phase == "Failed":
            failed = failure_after(job, i, o)
            if failed is not None:
                return failed
        decision = admit(i) if admit is not None else None
        if decision is not None and not decision.admitted:
            return Wait(decision.message, i, admission=decision)
        if o.phase == "Failed":
            spent = 0 if o.disrupted else 1  # an eviction is not the stage's failure
            return StartStage(i, _launch_config(job, i, fingerprint), restart=True, restarts=o.restarts + spent,
                              admission=decision)
        # the preflight first: inputs it finds missing or unreadable are named there, not by the fingerprint
        failed = preflight_failure(job, i, preflight(i)) if preflight is not None else None
        if failed is not None:
            return failed
        return StartStage(i, _launch_config(job, i, fingerprint), restarts=o.restarts, admission=decision)
    return Done()
