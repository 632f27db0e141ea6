"""The typed `status` of a VLMTrainingJob: the CRD's status schema is generated from these models.

Restart and launch counts live here (they are history the children cannot tell once a failed Job is
deleted); everything else is recomputed from the stage Jobs and storage on every reconcile.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Queued: the current stage's Job exists but is suspended (Kueue holds it until admitted).
JobPhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
StagePhaseStatus = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


class _Wire(BaseModel):
    model_config = ConfigDict(
        extra="ignore",  # status may carry keys written by others (e.g. Kopf); they are not ours
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        validate_by_name=True,  # the operator builds statuses in Python (snake_case) ...
        validate_by_alias=True,  # ... and reads them back from the API server (camelCase)
    )


class Condition(_Wire):
    """A standard Kubernetes condition."""

    type: str = Field(description="Running, Queued, Suspended, HandoffReady, Admitted, SpecChanged, Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase machine-readable reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="RFC 3339 time the status last changed.")


class StageStatus(_Wire):
    """Observed state of one stage."""

    name: str
    type: str
    phase: StagePhaseStatus = "Pending"
    job_name: str | None = Field(None, description="The stage's current batch/v1 Job.")
    launches: int = Field(0, ge=0, description="Jobs created for this stage (names end in -<launch>).")
    restarts: int = Field(0, ge=0, description="Gang restarts after a failed pod.")
    start_time: str | None = None
    completion_time: str | None = None
    checkpoint: str | None = Field(None, description="The stage's verified committed final/ URI.")
    step: int | None = Field(None, description="Last optimizer step the trainer reported (progress.json).")
    total_steps: int | None = None
    tokens_per_second: float | None = Field(None, description="Last reported training throughput.")
    metrics: dict[str, float] | None = Field(
        None, description="An eval stage's metrics on its held-out set (eval.json's numbers: vqa_accuracy, "
        "exact_match, pope_f1, caption_cider, ...), once its final/ is committed.")
    message: str | None = None


class RerunStatus(_Wire):
    """spec.runPolicy.rerunFrom as the operator applied it (once per value: a value already applied does
    nothing until it is cleared; clearing it clears this)."""

    from_: str = Field(alias="from", description="The stage the rerun started from (spec.runPolicy.rerunFrom).")
    at: str = Field(description="The rerun's stamp: its outputs set aside are under <storage.uri>/<job>/.replaced/<at>/.")
    set_aside: list[str] = Field(default_factory=list, description="Where the previous outputs were moved.")
    completed: bool = Field(False, description="False while the rerun is being applied (Jobs deleted, outputs "
                            "moved); a crash in between resumes it under the same stamp.")


class JobStatus(_Wire):
    """status of a VLMTrainingJob, written by the operator."""

    phase: JobPhase = Field("Pending", description="Pending, Queued, Running, Succeeded, Failed or Suspended.")
    current_stage: str | None = Field(None, description="Name of the stage running or next to run.")
    current_stage_index: int | None = None
    progress: str | None = Field(None, description="Stages done / total, e.g. '1/3'.")
    restarts: int = Field(0, ge=0, description="Gang restarts, all stages.")
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None
    observed_generation: int | None = Field(None, description="metadata.generation this status reflects.")
    stages: list[StageStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    rerun: RerunStatus | None = Field(None, description="The rerun spec.runPolicy.rerunFrom asked for, once applied.")
