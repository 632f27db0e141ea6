"""The resource: a VLMTrainingJob (metadata and spec: model, storage, stages, run policy, image), the union of
stage kinds, and TrainerConfig (one stage resolved by the planner)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from vlm_core import __version__, kinds, validators
from vlm_core.spec.base import API_GROUP, API_VERSION, KIND, ContentOf, NoEffect, Strict, wire_names
from vlm_core.spec.curate import CURATE_TYPE, CurateStage
from vlm_core.spec.model import ModelSpec, StorageSpec
from vlm_core.spec.resources import Toleration
from vlm_core.spec.rules import duplicate_stage_names, from_stage_problems, reward_stage_problems
from vlm_core.spec.stages import StageSpec

# Fields only one side of the stage union has, derived from the two models (never typed by hand): a curate
# stage naming a training field, or a training stage naming a curate field, is refused with the field's name.
TRAINING_ONLY_FIELDS: tuple[str, ...] = tuple(n for n in wire_names(StageSpec) if n not in wire_names(CurateStage))
CURATE_ONLY_FIELDS: tuple[str, ...] = tuple(n for n in wire_names(CurateStage) if n not in wire_names(StageSpec))
STAGE_TYPES: tuple[str, ...] = kinds.STAGE_TYPES


def _stage_kind(v: Any) -> str:
    """The union's tag: 'curate' for curate stages, 'training' for every other type (whose own Literal then
    names the accepted types). A callable discriminator, because Strict's before-validator runs on `type`."""
    t = v.get("type") if isinstance(v, Mapping) else getattr(v, "type", None)
    return "curate" if t == CURATE_TYPE else "training"


def _fields_of_its_kind(v: Any) -> Any:
    """A stage names only fields its side of the union has (each other one is reported by name)."""
    if not isinstance(v, Mapping):
        return v
    if v.get("type") == CURATE_TYPE:
        own = ", ".join(wire_names(CurateStage))
        found = [f"{k}: a curate stage has no training fields (its fields: {own})" for k in TRAINING_ONLY_FIELDS if k in v]
    else:
        found = [f"{k}: only valid for type curate, this stage is {v.get('type')!r}" for k in CURATE_ONLY_FIELDS if k in v]
    if found:
        raise ValueError("\n".join(found))
    return v


AnyStage = Annotated[
    Annotated[StageSpec, Tag("training")] | Annotated[CurateStage, Tag("curate")],
    Discriminator(_stage_kind),
    BeforeValidator(_fields_of_its_kind),
]


class RunPolicySpec(Strict):
    """Restarts, suspension and scheduling hints (Kubernetes backend)."""

    max_restarts: int = Field(3, ge=0, le=1000, description="Gang restarts per stage before the job fails.")
    suspend: bool = Field(False, description="Suspended jobs hold no pods; resuming continues the current stage.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=365 * 24 * 3600, description="Delete the job this long after it finishes.")
    priority_class_name: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    queue_name: str | None = Field(None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    admission: Literal["enforce", "warn", "off"] | None = Field(
        None, description="GPU-memory admission of each stage: enforce (do not start a stage whose estimate "
        "exceeds resources.gpuMemoryGiB), warn (start it with a Warning event) or off. Default: enforce where "
        "a stage declares gpuMemoryGiB."
    )
    service_account_name: str | None = Field(
        None,
        description="ServiceAccount of the trainer pods (default: vlm-trainer, created by the chart); "
        "its API token is never mounted.",
    )
    rerun_from: str | None = Field(
        None, description="Rerun from this stage (a stage name): its committed output and those of the stages after "
        "it are kept aside under <storage.uri>/<job>/.replaced/ and the stages run again with the job's settings. "
        "Applied once per value: setting it again to the same stage does nothing; clear it, then set it. A finished "
        "stage whose settings or inputs changed is never rerun without it (condition SpecChanged).",
    )


class ImageSpec(Strict):
    """Trainer container image (Kubernetes backend)."""

    repository: str = "ghcr.io/vlm-training-operator/trainer"
    tag: str = Field(__version__, description="Image tag; defaults to this release of the operator.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class JobSpec(Strict):
    """spec of a VLMTrainingJob."""

    model: ModelSpec
    storage: StorageSpec
    stages: list[AnyStage] = Field(
        min_length=1, description="Run in order. A training stage starts from the previous training stage's final/ "
        "(spec.model for the first); a curate stage's output is read by a later stage's data.fromStage."
    )
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    image: ImageSpec = Field(default_factory=ImageSpec)
    suspend: bool = Field(False, description="Suspend the job (Kueue-compatible); same as runPolicy.suspend.")

    @model_validator(mode="after")
    def _unique_names(self) -> JobSpec:
        dups = duplicate_stage_names([s.name for s in self.stages])
        if dups:
            raise ValueError("; ".join(dups))
        refs = from_stage_problems([(s.type, s.name, s.data.from_stage if isinstance(s, StageSpec) else None)
                                    for s in self.stages])
        if refs:
            raise ValueError("\n".join(refs))
        rewards = reward_stage_problems([(s.type, s.name, s.rl.reward.from_stage if isinstance(s, StageSpec)
                                          and s.rl is not None else None) for s in self.stages])
        if rewards:
            raise ValueError("\n".join(rewards))
        names = [s.name for s in self.stages]
        if self.run_policy.rerun_from is not None and self.run_policy.rerun_from not in names:
            raise ValueError(f"runPolicy.rerunFrom: {self.run_policy.rerun_from!r} is not a stage of this job; "
                             f"one of: {', '.join(names)}")
        return self



class ObjectMeta(Strict):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return validators.dns_label(v) if v is not None else None

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return validators.dns_label(v, max_length=40)


class VLMTrainingJob(Strict):
    """The resource: apiVersion training.vlm.dev/v1alpha1, kind VLMTrainingJob."""

    model_config = ConfigDict(extra="ignore")  # status etc. are not ours to validate
    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    spec: JobSpec

    @field_validator("api_version")
    @classmethod
    def _api(cls, v: str) -> str:
        want = f"{API_GROUP}/{API_VERSION}"
        if v != want:
            raise ValueError(f"must be {want!r}, got {v!r}")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != KIND:
            raise ValueError(f"must be {KIND!r}, got {v!r}")
        return v

    @property
    def name(self) -> str:
        return self.metadata.name


class TrainerConfig(Strict):
    """One stage, resolved by the planner: everything a trainer process needs, nothing it must look up.

    `init_from` is the previous stage's committed `final/` (None for the first stage, which assembles
    the VLM from spec.model's vision encoder and language model); `output` is this stage's prefix.
    """

    job: Annotated[str, NoEffect("a name")]
    stage_index: Annotated[int, NoEffect("a position")] = Field(ge=0)
    stage: AnyStage
    model: ModelSpec
    storage: StorageSpec
    # Where the weights come from and go: locations, not results (the weights' content is an input).
    init_from: Annotated[str | None, NoEffect("a location"), ContentOf("checkpoint")] = None
    output: Annotated[str, NoEffect("a location")]
    fingerprint: Annotated[dict[str, Any] | None, NoEffect("the fingerprint itself")] = Field(
        None, description="What produces the stage's output (vlm_core.fingerprint): set by the backend at launch, "
        "stamped by the trainer into every manifest it commits, and compared on resume.")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")

    @classmethod
    def load(cls, doc: dict[str, Any]) -> TrainerConfig:
        return cls.model_validate(doc)
