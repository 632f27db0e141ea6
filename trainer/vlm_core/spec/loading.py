"""Job files in and out: YAML loading (one document, unique keys), validation into a VLMTrainingJob, and the
camelCase dump the operator and trainer see."""

from __future__ import annotations

import math
import os
import re
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


# The YAML 1.2 core schema's plain scalars: `1e-3` and `.inf` are numbers (as kubectl reads them), `0o17` octal,
# `0x1F` hex, `017` decimal; only true/false (any case form the spec lists) are booleans: `yes`, `no`, `on`,
# `off`, `y`, `n` stay strings, so a boolean field refuses them by name instead of guessing (kubectl's go-yaml v2
# would still read `yes`/`on` as true); `1_000`, `1:30` and dates stay strings too. PyYAML's default resolver is
# YAML 1.1's, which reads `1e-3` as a string and `no` as false.
_CORE_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_CORE_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_CORE_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_YAML11_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp", "value")}

# Aliases may repeat a block or two; past this many nodes they are a "billion laughs" bomb, refused before the
# document is built (validation would walk every repeat).
MAX_ALIAS_NODES = 10_000


class _JobLoader(yaml.SafeLoader):
    """YAML as kubectl reads it (the 1.2 core schema's scalars, above), where a repeated key is an error, not
    'the later one silently wins'."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

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

    def construct_core_int(self, node: yaml.ScalarNode) -> int:
        v = str(self.construct_scalar(node))
        if not _CORE_INT.match(v):
            raise yaml.constructor.ConstructorError(None, None, f"not an integer: {v!r}", node.start_mark)
        return int(v[2:], 8) if v.startswith("0o") else int(v[2:], 16) if v.startswith("0x") else int(v)

    def construct_core_float(self, node: yaml.ScalarNode) -> float:
        v = str(self.construct_scalar(node))
        if not _CORE_FLOAT.match(v):
            raise yaml.constructor.ConstructorError(None, None, f"not a number: {v!r}", node.start_mark)
        low = v.lower()
        if low.endswith(".inf"):
            return -math.inf if low.startswith("-") else math.inf
        return math.nan if low == ".nan" else float(v)


_JobLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _CORE_BOOL, list("tTfF"))
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:int", _CORE_INT, list("-+0123456789"))  # before float: 1 is an int
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:float", _CORE_FLOAT, list("-+.0123456789"))
_JobLoader.add_constructor("tag:yaml.org,2002:int", _JobLoader.construct_core_int)
_JobLoader.add_constructor("tag:yaml.org,2002:float", _JobLoader.construct_core_float)


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """(path step, child) of a node: '.key' for a mapping's values (keys count as nodes too), '[i]' for items."""
    if isinstance(node, yaml.MappingNode):
        out: list[tuple[str, yaml.Node]] = []
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else "?"
            out += [("", k), (f".{name}", v)]
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", v) for i, v in enumerate(node.value)]
    return []


def _refuse_alias_bombs(root: yaml.Node, source: str) -> None:
    """Count the nodes the document would have with every alias expanded, from the composed graph (where an alias
    is one shared node), without expanding it; refuse a document whose aliases add more than MAX_ALIAS_NODES,
    naming the deepest field whose value does."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for _, c in _children(node))
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise SpecError([f"{source}: line {node.start_mark.line + 1}: a YAML alias refers to a node that contains "
                             "it (a recursive alias); write the value out"])
        on_path.add(id(node))
        stack.append((node, True))
        stack += [(c, False) for _, c in _children(node) if id(c) not in size]
    added = size[id(root)] - len(size)
    if added <= MAX_ALIAS_NODES:
        return
    path, node = "", root
    while True:  # follow the biggest value down through mappings (and lists of mappings, such as stages)
        steps = [(step, c) for step, c in _children(node) if step and size[id(c)] > MAX_ALIAS_NODES]
        if isinstance(node, yaml.SequenceNode):
            steps = [(step, c) for step, c in steps if isinstance(c, yaml.MappingNode)]
        if not steps:
            break
        step, node = max(steps, key=lambda sc: size[id(sc[1])])
        path += step
    where = path.lstrip(".") or source
    raise SpecError([f"{where}: YAML aliases expand this value to {size[id(node)]:,} nodes (line "
                     f"{node.start_mark.line + 1}); aliases may add at most {MAX_ALIAS_NODES:,} nodes to a job file "
                     "(an alias bomb?); write the values out"])


def _load_yaml(text: str, source: str) -> Any:
    """One YAML document, alias bombs refused before it is built."""
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_alias_bombs(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_job_text(data: bytes, source: str = "<input>") -> VLMTrainingJob:
    """Validate a job file's bytes (UTF-8, a BOM and CRLF line ends allowed; one YAML document, read as kubectl
    reads it)."""
    if len(data) > MAX_JOB_FILE_BYTES:
        raise SpecError([f"{source}: {len(data)} bytes; a job file is at most {MAX_JOB_FILE_BYTES} bytes"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError([f"{source}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})"]) from None
    try:
        doc = _load_yaml(text, source)
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
