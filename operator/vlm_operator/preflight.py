"""Preflight: before a stage's first process starts, check that its inputs exist and agree with the spec.

Torch-free and cheap (a few small reads): the job's storage first (`check_storage`: bucket, credentials,
a probe object written and removed under the job's prefix), then the model's `config.json` files, the
existence of every shard, and the first bytes of the first shard of each pattern. Problems come back as
'field: message' lines and are configuration errors: no restart can fix them, so the stage fails at once
instead of being retried. The planner asks it before a stage's first launch (`planner.plan(preflight=...)`),
for both backends, and words the failure (`planner.preflight_failure`).
"""

from __future__ import annotations

from typing import Any

from vlm_core import parquet, storage
from vlm_core.model_config import (
    VisionFacts,
    max_length_problem,
    stage_image_size,
    vision_facts,
    vision_problems,
)
from vlm_core.spec import VLMTrainingJob
from vlm_core.stage_classes import curate_stage, eval_stage, training_stage
from vlm_core.storage_errors import StorageError, classify

from vlm_operator import planner

TAR_MAGIC_OFFSET = 257  # POSIX tar: "ustar" at byte 257 of the first header


def _config(uri: str, options: storage.Options | None) -> dict[str, Any] | None:
    try:
        doc = storage.read_json(storage.join(uri, "config.json"), options=options)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _vision(job: VLMTrainingJob, index: int, options: storage.Options | None, out: list[str]) -> VisionFacts | None:
    """The vision encoder's facts: from spec.model for the first stage, else from the previous final/."""
    model = job.spec.model
    if index > 0:
        cfg = _config(planner.final_uri(job, index - 1), options)
        vision_cfg = cfg.get("vision_config") if cfg else None
        return vision_facts(vision_cfg) if isinstance(vision_cfg, dict) else None
    facts = None
    for field, uri in (("spec.model.visionEncoder", model.vision_encoder), ("spec.model.languageModel", model.language_model)):
        cfg = _config(uri, options)
        if cfg is None:
            out.append(f"{field}: no Hugging Face checkpoint at {uri} (config.json missing or unreadable)")
        elif field == "spec.model.visionEncoder":
            facts = vision_facts(cfg)
            out.extend(vision_problems(model, facts))
    return facts


def _shards(job: VLMTrainingJob, index: int, field: str, patterns: list[str],
            options: storage.Options | None, out: list[str], section: str = "data") -> None:
    for j, pattern in enumerate(patterns):
        where = f"spec.stages[{index}].{section}.{field}[{j}]"
        urls = storage.expand_shards([planner.resolve_shard(job, pattern)])
        try:
            missing = [u for u in urls if not storage.exists(u, options=options)]
        except StorageError as err:  # shards in another bucket than spec.storage.uri: named by their field
            out.append(str(classify(err, err.uri, options, field=where) or err))
            continue
        if missing:
            out.append(f"{where}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]}")
            continue
        try:
            head = storage.read_head(urls[0], 512, options=options)
        except OSError as err:
            out.append(f"{where}: {urls[0]} is not readable: {err}")
            continue
        if parquet.is_parquet(urls[0]):
            if head[:4] != parquet.MAGIC:
                out.append(f"{where}: {urls[0]} is not a Parquet file (no PAR1 header)")
        elif head[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + 5] != b"ustar":
            out.append(f"{where}: {urls[0]} is not a tar archive (WebDataset shards are tar files)")


def check_storage(job: VLMTrainingJob, options: storage.Options | None = None) -> list[str]:
    """The job's storage (spec.storage): reachable, the credentials accepted, the bucket there and the job's
    prefix writable. One line naming the spec.storage field to fix, or nothing."""
    try:
        storage.check_writable(storage.join(job.spec.storage.uri, job.name), options=options)
    except StorageError as err:
        return [err.message]
    return []


def check_stage(job: VLMTrainingJob, index: int, options: storage.Options | None = None) -> list[str]:
    """Every problem with stage `index`'s inputs; empty when it may start. A storage problem comes alone:
    every other check would fail on it too."""
    out = check_storage(job, options)
    if out:
        return out
    if (curate := curate_stage(job.spec.stages[index])) is not None:  # reads no model; its input shards must exist
        _shards(job, index, "shards", curate.input.shards, options, out, section="input")
        return out
    stage = training_stage(job.spec.stages[index]) or eval_stage(job.spec.stages[index])
    assert stage is not None, f"spec.stages[{index}]: neither a curate, a training nor an eval stage"
    if stage.eval is not None and stage.eval.model is not None:  # eval of a named final/: it must be committed
        named = planner.resolve_shard(job, stage.eval.model)
        if not storage.verify_committed(named, options=options).ok:
            out.append(f"spec.stages[{index}].eval.model: {named} is not a committed final/ (no manifest.json, or its "
                       "files do not match it)")
    facts = _vision(job, index, options, out)
    if facts is not None:
        size = stage_image_size(job.spec.model, list(job.spec.stages[: index + 1]))  # a stage may raise it
        problem = max_length_problem(job.spec.model, facts, stage.data.max_length, f"spec.stages[{index}].data.maxLength",
                                     image_size=size)
        if problem:
            out.append(problem)
    _shards(job, index, "shards", stage.data.shards or [], options, out)
    for i, source in enumerate(stage.data.sources):
        _shards(job, index, f"sources[{i}].shards", source.shards, options, out)
    _shards(job, index, "evalShards", stage.data.eval_shards, options, out)
    if stage.evaluation is not None:
        _shards(job, index, "shards", stage.evaluation.shards, options, out, section="evaluation")
    return out
