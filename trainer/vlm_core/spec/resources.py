"""What a stage's pods ask for: nodes, processes, GPUs, CPU and memory; and the tolerations they carry."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from vlm_core import validators
from vlm_core.spec.base import NoEffect, Strict


class ResourcesSpec(Strict):
    """How many nodes and processes; Kubernetes requests for each node's pod."""

    nodes: int = Field(1, gt=0, le=4096, description="Nodes (pods) in the torchrun gang.")
    procs_per_node: int = Field(1, gt=0, le=64, description="torchrun --nproc_per_node: processes (GPUs) per node.")
    gpus_per_node: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod (0 on CPU).")
    cpu: Annotated[str | None, NoEffect("scheduling")] = Field(
        None, description="CPU request/limit per pod, a Kubernetes quantity, e.g. '8' or '500m' (default when omitted: "
        "one CPU per process and per DataLoader worker, procsPerNode x (1 + data.workers)).")
    memory: Annotated[str | None, NoEffect("scheduling")] = Field(
        None, description="Memory request/limit per pod, a Kubernetes quantity, e.g. '64Gi' (default when omitted: 32Gi)."
    )
    gpu_memory_gib: Annotated[float | None, NoEffect("admission")] = Field(
        None, gt=0, le=4096, alias="gpuMemoryGiB", description="Memory of one GPU in GiB (e.g. 79.6 for an H100 80GB). The operator estimates "
        "each stage's memory per GPU before starting it and refuses a stage that does not fit "
        "(spec.runPolicy.admission)."
    )

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        return validators.positive_quantity(v) if v is not None else None


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
