"""The schema's foundation: the API's names, the strict base model every part derives from, and the
upper bounds each numeric field has (with the reason a user sees when a value is past it).

Torch-free on purpose: `vlm_operator` imports the spec (never torch). Field names are camelCase on the
wire (Kubernetes convention) and snake_case in Python. Unknown fields are errors, so a typo never passes
silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import AliasGenerator, BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

API_GROUP = "training.vlm.dev"
API_VERSION = "v1alpha1"
KIND = "VLMTrainingJob"
PLURAL = "vlmtrainingjobs"
STAGE_TAGS = ("training", "curate")  # the stage union's tags in validation error locations (left out of paths)

BOUND_REASONS: dict[str, str] = {
    "globalSize": "no published VLM recipe uses more than a few thousand samples per step",
    "microSize": "one rank's micro batch",
    "maxSteps": "a stage of a billion optimizer steps would never finish",
    "epochs": "passes over the data",
    "maxLength": "tokens per sample; beyond any model's context window",
    "seed": "numpy's generator takes 32-bit seeds, and each rank adds its rank",
    "lr": "an AdamW learning rate above 1 diverges",
    "projectorLrMultiplier": "projector lr = lr x this",
    "weightDecay": "decoupled weight decay is a fraction",
    "nodes": "pods in one torchrun gang",
    "procsPerNode": "processes (GPUs) per node",
    "gpusPerNode": "GPUs per pod",
    "imageSize": "pixels per side",
    "maxImages": "images in one sample",
    "everySteps": "checkpoint interval in optimizer steps",
    "keepLast": "checkpoints kept",
    "maxRestarts": "gang restarts per stage",
    "ttlSecondsAfterFinished": "one year",
    "shuffleBuffer": "samples held in memory for shuffling",
    "beta": "DPO's KL strength",
    "margin": "a reward gap, in reward units",
    "gradClip": "a global gradient-norm bound",
}


@dataclass(frozen=True)
class NoEffect:
    """Field metadata (`Annotated[T, NoEffect("why")]`): the field cannot change what a stage produces (it
    says where the stage runs, how it is scheduled or watched, or how fast it goes), so it is left out of the
    stage's fingerprint (`vlm_core.fingerprint`) and changing it never makes a finished stage differ.
    Every other field counts."""

    why: str


@dataclass(frozen=True)
class ContentOf:
    """Field metadata (`Annotated[T, ContentOf("shards")]`): the field names data or weights in storage whose
    CONTENT enters the stage's fingerprint: "shards" (shard URL patterns: each shard's size and etag or
    mtime), "folder" (a model folder: every file's size and etag or mtime), "file" (one file), "checkpoint"
    (a committed folder: its manifest's file digests)."""

    kind: Literal["shards", "folder", "file", "checkpoint"]


def content_of(info: Any) -> ContentOf | None:
    """The ContentOf marker of a pydantic FieldInfo, if it has one."""
    return next((m for m in getattr(info, "metadata", ()) if isinstance(m, ContentOf)), None)


def no_effect(info: Any) -> NoEffect | None:
    """The NoEffect marker of a pydantic FieldInfo, if it has one."""
    return next((m for m in getattr(info, "metadata", ()) if isinstance(m, NoEffect)), None)


def _number_annotation(annotation: Any) -> str | None:
    """'number' for int/float fields (optional or not), 'boolean' for bool ones, else None."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) else [annotation]
    if args and all(a in (int, float) for a in args):
        return "number"
    if args == [bool]:
        return "boolean"
    return None


class Strict(BaseModel):
    """Base: camelCase field names on the wire, unknown fields forbidden, numbers finite and never
    booleans or strings (YAML's `true` is not 1, `"5"` is not 5), booleans only booleans."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
    )

    @field_validator("*", mode="before")
    @classmethod
    def _exact_scalar_types(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        kind = _number_annotation(field.annotation) if field is not None else None
        if kind == "number" and (isinstance(v, (bool, str))):
            raise ValueError(f"must be a number, got {v!r}")
        if kind == "boolean" and not isinstance(v, bool):
            raise ValueError(f"must be true or false, got {v!r}")
        return v


def field_default(model: type[Strict], camel_name: str) -> Any:
    """A field's default by its wire (camelCase) name: the one value both these rules and the CRD's CEL
    rules fall back to when the field is absent."""
    for name, info in model.model_fields.items():
        if (info.alias or to_camel(name)) == camel_name:
            return info.get_default(call_default_factory=True)
    raise KeyError(f"{model.__name__} has no field {camel_name!r}")


def wire_names(model: type[BaseModel]) -> tuple[str, ...]:
    """A model's field names as they are spelled on the wire (camelCase, or the field's own alias)."""
    return tuple(info.alias or to_camel(name) for name, info in model.model_fields.items())
