"""Job files in and out: YAML loading (one document, unique keys), validation into a VLMTrainingJob, and the
camelCase dump the operator and trainer see."""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from vlm_core import kinds
from vlm_core.spec.errors import SpecError, format_errors
from vlm_core.spec.job import VLMTrainingJob
from vlm_core.spec.rules import duplicate_stage_names, from_stage_problems, stage_rule_problems


def parse_job(doc: dict[str, Any]) -> VLMTrainingJob:
    """Validate a job document; raise SpecError listing every problem by field path."""
    if not isinstance(doc, dict):
        raise SpecError([f"the document must be a mapping, got {type(doc).__name__}"])
    try:
        return VLMTrainingJob.model_validate(doc)
    except ValidationError as err:
        problems = format_errors(err)
        # Job-level rules only run once every stage is valid; report duplicates now too.
        raw = (doc.get("spec") or {}).get("stages") if isinstance(doc.get("spec"), dict) else None
        if isinstance(raw, list):
            stages: list[dict[str, Any]] = [s if isinstance(s, dict) else {} for s in raw]
            data: list[dict[str, Any]] = [d if isinstance(d := s.get("data"), dict) else {} for s in stages]
            for p in [*duplicate_stage_names([s.get("name") for s in stages]),
                      *from_stage_problems([(s.get("type"), s.get("name"), d.get("fromStage"))
                                            for s, d in zip(stages, data, strict=True)])]:
                if f"spec.{p}" not in problems:
                    problems.append(f"spec.{p}")
            # A stage with a bad field never reached its cross-field rules; run them on the raw input.
            for i, stage in enumerate(raw):
                training = isinstance(stage, dict) and stage.get("type") not in kinds.DATA_TYPES
                for p in stage_rule_problems(stage) if training else []:
                    if f"spec.stages[{i}].{p}" not in problems:
                        problems.append(f"spec.stages[{i}].{p}")
        raise SpecError(problems) from None


MAX_JOB_FILE_BYTES = 1 << 20  # the API server refuses objects past ~1.5 MB; a job file is a few KB


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a repeated key is an error, not 'the later one silently wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_job_text(data: bytes, source: str = "<input>") -> VLMTrainingJob:
    """Validate a job file's bytes (UTF-8, a BOM and CRLF line ends allowed; one YAML document)."""
    if len(data) > MAX_JOB_FILE_BYTES:
        raise SpecError([f"{source}: {len(data)} bytes; a job file is at most {MAX_JOB_FILE_BYTES} bytes"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError([f"{source}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})"]) from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        return parse_job(doc)
    except yaml.YAMLError as err:
        raise SpecError([f"not valid YAML: {err}"]) from None
    except RecursionError:
        raise SpecError([f"{source}: nested too deeply to be a VLMTrainingJob"]) from None


def load_job(path: str) -> VLMTrainingJob:
    """Read and validate a job YAML file (one document); `-` reads standard input. Every failure is a
    SpecError or an OSError with a message, never a traceback-worthy surprise."""
    if path == "-":
        return parse_job_text(sys.stdin.buffer.read(), "<stdin>")
    if os.path.isdir(path):
        raise SpecError([f"{path}: is a directory; give the path of a job YAML file"])
    with open(path, "rb") as f:
        data = f.read(MAX_JOB_FILE_BYTES + 1)
    return parse_job_text(data, path)


def dump_job(job: VLMTrainingJob) -> dict[str, Any]:
    """The job as a camelCase dict with defaults filled in (what the operator and trainer see)."""
    doc = job.model_dump(by_alias=True, mode="json", exclude_none=True)
    for stage in doc["spec"]["stages"]:
        if stage.get("data", {}).get("fromStage") is not None:
            stage["data"].pop("shards", None)  # the planner fills them in; the CRD wants none or some
    return doc
