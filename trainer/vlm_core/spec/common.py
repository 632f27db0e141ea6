"""The fields every stage has, whatever its kind: its name, seed, resources and restart budget.

`StageSpec` (the kinds that train weights) and `CurateStage` (data curation) both extend `StageBase`, so a
new kind's schema class starts from the same names, bounds and rules.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from vlm_core import validators
from vlm_core.spec.base import NoEffect, Strict
from vlm_core.spec.resources import ResourcesSpec

STAGE_NAME_MAX = 40  # the stage name is part of Job and Service names (63 characters with the job's)


class StageBase(Strict):
    """What every `stages[]` entry has."""

    name: str = Field(description="DNS label, unique in the job; names the stage's storage prefix and Job.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of initialisation, data order and dropout (rank r uses seed + r).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_restarts: Annotated[int | None, NoEffect("the restart budget")] = Field(None, ge=0, le=1000, description="Gang restarts of this stage; default spec.runPolicy.maxRestarts.")

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return validators.dns_label(v, max_length=STAGE_NAME_MAX)

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.procs_per_node
