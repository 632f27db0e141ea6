"""The VLMTrainingJob CRD, generated from the typed spec (`vlm_core.spec.JobSpec`) and status model.

One source of truth: pydantic's JSON Schema is flattened into a Kubernetes structural schema ($refs
inlined, `anyOf [X, null]` turned into `nullable: true`, tuples into fixed-length arrays, JSON Schema
2020 numeric bounds into OpenAPI v3.0 ones, descriptions kept for `kubectl explain`) and rules the
types cannot express are added as CEL `x-kubernetes-validations`.

    python -m vlm_operator.crd > crds/training.vlm.dev_vlmtrainingjobs.yaml

A unit test regenerates the file and fails on drift. `to_json_schema` turns the OpenAPI schema back
into a JSON Schema (draft 4) so tests and tools can validate documents with `jsonschema`.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel
from vlm_core import kinds
from vlm_core import spec as S
from vlm_core.validators import STORAGE_SCHEMES

from vlm_operator.status_model import JobStatus

SHORT_NAMES = ["vlmjob", "vlmjobs"]
CATEGORIES = ["all", "vlm", "training"]
MAX_STAGES = 16  # bounds CEL cost estimation; a pipeline has a handful of stages

_DROP_KEYS = {"title", "additionalProperties", "$defs", "prefixItems"}


def _deref(node: Any, defs: dict[str, Any]) -> Any:
    """Inline `$ref`s; the referencing node's own keys (e.g. a field's description) win."""
    if isinstance(node, list):
        return [_deref(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**_deref(target, defs), **{k: _deref(v, defs) for k, v in node.items() if k != "$ref"}}
        return merged
    return {k: _deref(v, defs) for k, v in node.items()}


def _merge_variants(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """A union of object schemas (a discriminated union such as the stage kinds) as ONE structural object:
    every variant's properties (a property that several variants share must have one schema there, except
    for enums, which are joined: the discriminator), required = what every variant requires. A property only
    some variants have loses its scalar default, so the API server never adds it to a variant without it.
    Which property belongs to which variant is checked by CEL rules (and by the typed spec)."""
    props: dict[str, Any] = {}
    owners: dict[str, int] = {}
    for v in variants:
        if v.get("type") != "object":
            raise ValueError(f"cannot merge a non-object union variant: {v!r}")
        for name, p in v.get("properties", {}).items():
            owners[name] = owners.get(name, 0) + 1
            if name not in props:
                props[name] = copy.deepcopy(p)
            elif "enum" in p and "enum" in props[name]:
                props[name]["enum"] = [*props[name]["enum"], *(e for e in p["enum"] if e not in props[name]["enum"])]
            elif {k: x for k, x in p.items() if k != "description"} != {
                k: x for k, x in props[name].items() if k != "description"
            }:
                raise ValueError(f"union variants give property {name!r} different schemas")
    for name, count in owners.items():
        if count < len(variants):
            props[name].pop("default", None)
    required = [r for r in variants[0].get("required", []) if all(r in v.get("required", []) for v in variants)]
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON Schema node (refs already inlined) as an OpenAPI v3.0 structural schema node."""
    node = dict(node)
    if "oneOf" in node:
        merged = _merge_variants([_structural(v) for v in node.pop("oneOf")])
        node.pop("discriminator", None)
        return {**merged, **{k: v for k, v in node.items() if k in ("description",)}}
    out: dict[str, Any] = {}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [n for n in any_of if n.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {any_of!r} in a structural schema")
        inner = _structural(non_null[0])
        if len(non_null) < len(any_of):
            inner["nullable"] = True
        # The outer node carries the field's description and default; they override the inner type's.
        if "description" in node:
            inner["description"] = node["description"]
        if "default" in node:
            inner.pop("default", None)
            if node["default"] is not None and not isinstance(node["default"], (dict, list)):
                inner["default"] = node["default"]
        node = {k: v for k, v in node.items() if k not in ("description", "default")}
        out.update(inner)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "prefixItems" in node:  # a tuple: all items one type, fixed length
        items = [_structural(i) for i in node["prefixItems"]]
        if any(i != items[0] for i in items):
            raise ValueError(f"tuple items of different types cannot be expressed: {items!r}")
        out["items"] = items[0]
        out["minItems"] = out["maxItems"] = len(items)
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out["properties"] = {k: _structural(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "default":
            if value is not None and not isinstance(value, (dict, list)):
                out["default"] = value
        else:
            out[key] = value
    if isinstance(node.get("additionalProperties"), dict):  # a map such as nodeSelector
        out["additionalProperties"] = _structural(node["additionalProperties"])
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "type" not in out:
        raise ValueError(f"schema node has no type (not structural): {node!r}")
    first: dict[str, Any] = {k: out.pop(k) for k in ("type", "description", "nullable") if k in out}
    return {**first, **out}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic model's JSON Schema (camelCase aliases) as a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True)
    return _structural(_deref(raw, raw.get("$defs", {})))


def _or_default(path: str) -> str:
    """CEL for a stage field that may be absent (camelCase 'batch.globalSize'): its value, else pydantic's
    default, so the API server applies the same rule the spec does."""
    head, attr = path.split(".")
    parts: dict[str, type[S.Strict]] = {"batch": S.BatchSpec, "resources": S.ResourcesSpec, "data": S.DataSpec}
    sub = parts[head]
    default = S.field_default(sub, attr)
    return f"(has(self.{head}) && has(self.{head}.{attr}) ? self.{head}.{attr} : {default})"


def _stage_rules() -> list[dict[str, str]]:
    return _training_rules() + _kind_rules()


def _is_data_kind() -> str:
    """CEL: the stage is of a kind that writes data (a CurateStage), not one that trains."""
    types = [f"'{t}'" for t in kinds.DATA_TYPES]
    return f"self.type == {types[0]}" if len(types) == 1 else f"self.type in [{', '.join(types)}]"


def _not_report_kind() -> str:
    """CEL prefix: 'the stage is of a report kind (eval: no steps) or ...'."""
    types = ", ".join(f"'{t}'" for t in kinds.REPORT_TYPES)
    return f"self.type in [{types}] || " if types else ""


def _kind_rules() -> list[dict[str, str]]:
    """Which fields belong to which side of the stage union (the typed spec's discriminated union, on the merged
    schema). The field lists are derived from the two models, so a new field is covered without an edit here."""
    data_kind = _is_data_kind()
    not_data_kind = data_kind.replace(" == ", " != ") if " == " in data_kind else f"!({data_kind})"
    rules = [
        {
            "rule": f"{not_data_kind} || !has(self.{field})",
            "message": f"{field}: a curate stage has no training fields",
            "fieldPath": f".{field}",
            "reason": "FieldValueForbidden",
        }
        for field in S.TRAINING_ONLY_FIELDS
    ]
    curate_only = S.CURATE_ONLY_FIELDS
    rules += [
        {
            "rule": f"{not_data_kind} || has(self.input)",
            "message": "input: a curate stage needs input.shards",
            "fieldPath": ".input",
            "reason": "FieldValueRequired",
        },
        {
            "rule": f"{data_kind} || has(self.data)",
            "message": "data: a training stage needs data",
            "fieldPath": ".data",
            "reason": "FieldValueRequired",
        },
        {
            "rule": f"{data_kind} || ({' && '.join(f'!has(self.{n})' for n in curate_only)})",
            "message": f"{', '.join(curate_only)}: only valid for type curate",
            "reason": "FieldValueForbidden",
        },
        {
            "rule": "!has(self.data) || ((has(self.data.shards) && size(self.data.shards) > 0) ? 1 : 0) + "
                    "(has(self.data.fromStage) ? 1 : 0) + ((has(self.data.sources) && size(self.data.sources) > 0) ? 1 : 0) == 1",
            "message": "data.shards: set exactly one of data.shards, data.fromStage or data.sources",
            "fieldPath": ".data",
            "reason": "FieldValueInvalid",
        },
    ]
    return rules


def _training_rules() -> list[dict[str, str]]:
    """Cross-field rules of training stages (a curate stage passes them: it has none of these fields): those the
    spec writes as data (`vlm_core.spec.rules.STAGE_RULES`, from the kinds and strategy tables), rendered to CEL,
    and the arithmetic ones."""
    world = f"{_or_default('batch.microSize')} * {_or_default('resources.nodes')} * {_or_default('resources.procsPerNode')}"
    rules = [
        {
            "rule": _not_report_kind() + "has(self.maxSteps) != has(self.epochs)",  # an eval stage takes no steps
            "message": "set exactly one of maxSteps or epochs",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.trainable) || size(self.trainable) > 0",
            "message": "trainable: at least one part must train",
            "fieldPath": ".trainable",
        },
        {
            "rule": f"{_or_default('batch.globalSize')} % ({world}) == 0",
            "message": "batch.globalSize must be a multiple of batch.microSize x nodes x procsPerNode",
            "fieldPath": ".batch",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": "!has(self.batch) || !has(self.batch.tokensPerMicroBatch) || "
                    f"self.batch.tokensPerMicroBatch >= {_or_default('data.maxLength')}",
            "message": "batch.tokensPerMicroBatch must be >= data.maxLength",
            "fieldPath": ".batch.tokensPerMicroBatch",
            "reason": "FieldValueInvalid",
        },
    ]
    rules += [
        {"rule": rule.cel(), "message": rule.cel_message, "fieldPath": f".{rule.field}", "reason": rule.reason}
        for rule in S.STAGE_RULES
    ]
    return [{**r, "rule": f"{_is_data_kind()} || ({r['rule']})"} for r in rules]


def spec_schema() -> dict[str, Any]:
    """The structural schema of `spec`, with list semantics and CEL rules added."""
    spec = structural_schema(S.JobSpec)
    stages = spec["properties"]["stages"]
    stages["maxItems"] = MAX_STAGES
    # Stage names are unique: a map-list keyed by name makes the API server reject duplicates.
    stages["x-kubernetes-list-type"] = "map"
    stages["x-kubernetes-list-map-keys"] = ["name"]
    item = stages["items"]
    item["properties"]["name"].update(maxLength=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    item["x-kubernetes-validations"] = _stage_rules()
    for path in (["data", "shards"], ["data", "evalShards"], ["trainable"]):
        node = item
        for p in path:
            node = node["properties"][p]
        node["maxItems"] = 1024 if "hards" in path[-1] else 3
        node["items"]["maxLength"] = 2048
    item["properties"]["data"]["properties"]["shards"]["minItems"] = 1  # absent (fromStage), never empty
    curate_lists: dict[tuple[str, ...], int] = {("input", "shards"): 1024, ("filters", "text", "extraPatterns"): 64,
                    ("filters", "text", "languages"): 16, ("filters", "balance", "concepts"): 100_000}
    for curate_path, most in curate_lists.items():
        node = item
        for p in curate_path:
            node = node["properties"][p]
        node["maxItems"] = most
        node["items"]["maxLength"] = 2048
    spec["properties"]["runPolicy"]["properties"]["tolerations"]["maxItems"] = 64
    uri = spec["properties"]["storage"]["properties"]["uri"]
    uri["maxLength"] = 2048
    uri["x-kubernetes-validations"] = [
        {
            "rule": "!self.contains('://') || "
            + " || ".join(
                f"self.startsWith('{scheme}://')" for scheme in STORAGE_SCHEMES
            ),
            "message": "storage.uri: scheme must be one of file://, s3://, gs://",
        }
    ]
    return spec


def openapi_schema() -> dict[str, Any]:
    """openAPIV3Schema of the CRD's v1alpha1 version."""
    return {
        "type": "object",
        "description": "A staged vision-language-model training pipeline (align -> instruct -> dpo); each "
        "stage runs as a multi-node torchrun gang and hands its checkpoint to the next through storage.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
                },
            },
            "spec": spec_schema(),
            "status": structural_schema(JobStatus),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage", "description": "Current stage"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Stages done / total, and the current stage's step",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "description": "Gang restarts, all stages",
    },
    {
        "name": "Admitted",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Admitted")].reason',
        "description": "GPU-memory admission of the current stage (Fits, InsufficientGPUMemory, ...)",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{S.PLURAL}.{S.API_GROUP}"},
        "spec": {
            "group": S.API_GROUP,
            "names": {
                "kind": S.KIND,
                "listKind": f"{S.KIND}List",
                "plural": S.PLURAL,
                "singular": S.KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": S.API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = (
    "# GENERATED by `python -m vlm_operator.crd` from vlm_core.spec and vlm_operator.status_model.\n"
    "# Do not edit by hand: tests/unit/test_crd.py fails when this file drifts from the code.\n"
)


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def to_json_schema(node: Any) -> Any:
    """An OpenAPI v3.0 schema as a JSON Schema (draft 4): `nullable` becomes a null type, x- keys go.

    Draft 4 shares OpenAPI v3.0's boolean `exclusiveMinimum`, so use `jsonschema.Draft4Validator`.
    CEL rules and list-map keys are not evaluated (the API server does that).
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"
    }
    if node.get("properties") is not None:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        # The API server prunes unknown fields and `kubectl --validate=strict` rejects them.
        if "additionalProperties" not in node:
            out["additionalProperties"] = False
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return copy.deepcopy(out)


def document_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 4) of a whole VLMTrainingJob document, from the CRD's openAPIV3Schema."""
    schema = to_json_schema(openapi_schema())
    schema["properties"]["metadata"].pop("additionalProperties", None)  # labels, namespace, ... are fine
    return schema


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(render_crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
