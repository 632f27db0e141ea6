"""GPU-memory admission: estimate a stage before it starts; refuse it (with alternatives that fit) when the
estimate exceeds the GPU memory the stage declares.

Pure given the model shape: `decide(stage, shape, policy)` compares `vlm_core.accounting`'s memory
estimate (its framework overhead is the documented headroom) with `resources.gpuMemoryGiB` and, for a
stage that does not fit, computes alternatives by searching nearby settings (strategy, offload,
gradient checkpointing, micro batch, more nodes), each validated as a stage spec and estimated the same
way. `checker(job)` reads the model's config.json files through the storage layer (so s3:// works) and
is what the planner calls for both backends.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from vlm_core import accounting, storage
from vlm_core.spec import ModelSpec, StageSpec, VLMTrainingJob
from vlm_core.stage_classes import training_stage
from vlm_core.storage_errors import StorageError, classify

MAX_ALTERNATIVES = 4
NODE_FACTORS = (1, 2, 4)


@dataclass(frozen=True)
class Alternative:
    """A change to the stage (camelCase dotted field paths) that fits, with its estimate."""

    patch: Mapping[str, Any]
    bytes_per_gpu: int
    gpus: int

    @property
    def text(self) -> str:
        changes = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in self.patch.items())
        return f"{changes} ({self.gpus} GPUs): {self.bytes_per_gpu / accounting.GIB:.1f} GiB/GPU"


@dataclass(frozen=True)
class Admission:
    """The decision for one stage. `reason` is the Admitted condition's reason."""

    admitted: bool
    reason: str  # Fits | InsufficientGPUMemory | InsufficientGPUMemoryWarned | EstimateUnavailable
    message: str
    estimate_bytes: int | None = None
    limit_bytes: int | None = None
    alternatives: tuple[Alternative, ...] = ()


def _yaml_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def load_shape(model: ModelSpec, options: storage.Options | None = None) -> accounting.ModelShape:
    """The VLM's shape from the vision encoder's and the LM's config.json (no weights read)."""
    vision = read_config(model.vision_encoder, "spec.model.visionEncoder", options)
    language = read_config(model.language_model, "spec.model.languageModel", options)
    return accounting.ModelShape.from_configs(vision, language, feature_select=model.vision_feature_select_strategy)


def read_config(uri: str, field: str, options: storage.Options | None = None) -> dict[str, Any]:
    """`<uri>/config.json` through the storage layer; a ValueError naming the field if it cannot be read."""
    path = storage.join(uri, "config.json")
    try:
        return storage.read_json(path, options=options)
    except StorageError as err:  # no credentials, endpoint down, access denied: its own one line
        raise ValueError(str(classify(err, path, options, field=field) or err)) from err
    except (OSError, ImportError, ValueError) as err:  # missing, no access, no fsspec backend, not JSON
        raise ValueError(f"{field}: cannot read {path}: {err}") from err


def _allowed(field: str) -> tuple[str, ...]:
    """The values this spec version accepts for a Literal field of StageSpec (empty if it has no such field)."""
    info = StageSpec.model_fields.get(field)
    if info is None:
        return ()
    return tuple(a for a in typing.get_args(info.annotation) if isinstance(a, str))


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    *head, last = path.split(".")
    for key in head:
        doc = doc.setdefault(key, {})
    doc[last] = value


def patched_stage(stage: StageSpec, patch: Mapping[str, Any]) -> StageSpec:
    """The stage with `patch` applied (camelCase dotted paths), validated like user input."""
    doc = stage.model_dump(by_alias=True, mode="json", exclude_none=True)
    for path, value in patch.items():
        _set_path(doc, path, value)
    return StageSpec.model_validate(doc)


def estimate_stage(shape: accounting.ModelShape, stage: StageSpec) -> accounting.MemoryEstimate:
    """Memory per GPU of a stage on GPUs (admission is about GPU memory even for a CPU test run)."""
    return accounting.estimate_memory(shape, accounting.stage_input(stage, on_gpu=True))


def alternatives(
    shape: accounting.ModelShape, stage: StageSpec, limit_bytes: float, *, limit: int = MAX_ALTERNATIVES
) -> list[Alternative]:
    """Nearby settings that fit, fewest GPUs and smallest change first; one per kind of change (an
    alternative changing the same fields as a cheaper one listed, or more, is left out)."""
    strategies = _allowed("strategy") or (stage.strategy,)
    offloads = _allowed("offload") or ("none",)
    micro = stage.batch.micro_size
    micros = [micro]
    while micros[-1] > 1:
        micros.append(micros[-1] // 2)
    ckpts = [stage.gradient_checkpointing] + ([True] if not stage.gradient_checkpointing else [])
    found: list[tuple[tuple, Alternative]] = []
    for strategy, offload, ckpt, m, factor in itertools.product(strategies, offloads, ckpts, micros, NODE_FACTORS):
        patch: dict[str, Any] = {}
        if strategy != stage.strategy:
            patch["strategy"] = strategy
        if offload != getattr(stage, "offload", "none"):
            patch["offload"] = offload
        if ckpt != stage.gradient_checkpointing:
            patch["gradientCheckpointing"] = ckpt
        if m != micro:
            patch["batch.microSize"] = m
        if factor != 1:
            patch["resources.nodes"] = stage.resources.nodes * factor
        if not patch:
            continue
        try:
            candidate = patched_stage(stage, patch)
            est = estimate_stage(shape, candidate)
        except (ValidationError, ValueError):
            continue  # not a valid stage in this spec version (e.g. offload with ddp, batch not divisible)
        if est.total_bytes > limit_bytes:
            continue
        cost = (factor, len(patch), offload != "none", micro // m, est.total_bytes)
        found.append((cost, Alternative(patch, est.total_bytes, candidate.world_size)))
    out: list[Alternative] = []
    for _, alt in sorted(found, key=lambda x: x[0]):
        if any(set(a.patch) <= set(alt.patch) for a in out):
            continue  # the same kind of change (or more of it) as a cheaper one already listed
        out.append(alt)
        if len(out) == limit:
            break
    return out


def describe(stage: StageSpec) -> str:
    offload = getattr(stage, "offload", "none")
    parts = [stage.strategy, f"{stage.world_size} GPU{'s' if stage.world_size > 1 else ''}",
             f"microSize {stage.batch.micro_size}", f"maxLength {stage.data.max_length}"]
    if offload != "none":
        parts.insert(1, f"offload {offload}")
    if stage.gradient_checkpointing:
        parts.append("gradient checkpointing")
    return ", ".join(parts)


def decide(stage: StageSpec, shape: accounting.ModelShape, policy: str) -> Admission:
    """Admit or refuse one stage whose resources.gpuMemoryGiB is set."""
    limit_gib = stage.resources.gpu_memory_gib
    assert limit_gib is not None
    limit = limit_gib * accounting.GIB
    est = estimate_stage(shape, stage)
    gib = est.total_bytes / accounting.GIB
    if est.total_bytes <= limit:
        return Admission(True, "Fits", f"stage {stage.name!r}: estimated {gib:.1f} GiB per GPU fits "
                         f"resources.gpuMemoryGiB {limit_gib:g} ({describe(stage)})", est.total_bytes, int(limit))
    alts = tuple(alternatives(shape, stage, limit))
    message = (f"stage {stage.name!r} needs an estimated {gib:.1f} GiB per GPU ({describe(stage)}) but "
               f"resources.gpuMemoryGiB is {limit_gib:g}; ")
    if alts:
        message += "alternatives that fit: " + "; ".join(a.text for a in alts)
    else:
        message += ("no nearby setting fits (tried strategies, offload, gradient checkpointing, smaller micro "
                    "batches, up to 4x the nodes); use GPUs with more memory or a smaller model")
    if policy == "warn":
        return Admission(True, "InsufficientGPUMemoryWarned", "started anyway (runPolicy.admission: warn): "
                         + message, est.total_bytes, int(limit), alts)
    return Admission(False, "InsufficientGPUMemory", message, est.total_bytes, int(limit), alts)


def checker(
    job: VLMTrainingJob,
    shape_loader: Callable[..., accounting.ModelShape] = load_shape,
    options: storage.Options | Callable[[], storage.Options] | None = None,
) -> Callable[[int], Admission | None]:
    """The planner's admission function for `job`: stage index -> decision (None: nothing to decide,
    i.e. admission off or no GPU memory declared). The model's shape is read once, on first use.

    `options` (or a function returning them, called only then) are the job's storage options; they are
    used for model URIs on the same scheme as spec.storage.uri (the models live beside the checkpoints).
    """
    policy = job.spec.run_policy.admission or "enforce"
    cache: list[accounting.ModelShape] = []

    def admit(index: int) -> Admission | None:
        stage = training_stage(job.spec.stages[index])  # None for a data stage (curate): no model in memory
        if policy == "off" or stage is None or stage.resources.gpu_memory_gib is None:
            return None
        try:
            if not cache:
                cache.append(shape_loader(job.spec.model, model_storage_options(job, options)))
            return decide(stage, cache[0], policy)
        except (OSError, ValueError, KeyError) as err:
            # Unknown model shape: say so and start the stage (the trainer reports its real memory).
            return Admission(True, "EstimateUnavailable", f"stage {stage.name!r}: no memory estimate: {err}")

    return admit


def model_storage_options(
    job: VLMTrainingJob, options: storage.Options | Callable[[], storage.Options] | None
) -> storage.Options | None:
    """The job's storage options where the model checkpoints live on the same scheme as its storage."""
    scheme = job.spec.storage.uri.split("://", 1)[0] if "://" in job.spec.storage.uri else "file"
    model_schemes = {u.split("://", 1)[0] if "://" in u else "file"
                     for u in (job.spec.model.vision_encoder, job.spec.model.language_model)}
    if options is None or model_schemes != {scheme}:
        return None
    return options() if callable(options) else options
