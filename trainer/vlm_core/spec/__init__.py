"""The `VLMTrainingJob` schema: one typed source of truth for the CRD, the operator and the trainer.

Torch-free on purpose: `vlm_operator` imports this package (never torch). Field names are camelCase on the
wire (Kubernetes convention) and snake_case in Python; unknown fields are errors, so a typo never passes
silently. By subject:

    base       the API's names, the strict base model, numeric bounds and their reasons
    model      ModelSpec (the starting model) and StorageSpec (where outputs live)
    data       a training stage's data (shards, sources, format, resolution)
    training_parts  optimizer, schedule, batch, DPO, LoRA and checkpoint settings
    resources  ResourcesSpec (pods, GPUs, quantities) and Toleration
    stages     StageSpec: a training stage (defaults by kind from vlm_core.kinds)
    curate     CurateStage and its filters
    rules      cross-field rules, one description read by this package and by the CRD's CEL generation
    job        JobSpec, VLMTrainingJob, the stage union, TrainerConfig
    errors     SpecError and field-path error lines
    loading    YAML loading (as kubectl parses it), parse_job, load_job, dump_job
"""

from vlm_core.spec.base import (
    API_GROUP,
    API_VERSION,
    BOUND_REASONS,
    KIND,
    PLURAL,
    STAGE_TAGS,
    ContentOf,
    NoEffect,
    Strict,
    content_of,
    field_default,
    no_effect,
    wire_names,
)
from vlm_core.spec.curate import (
    CURATE_TYPE,
    SCRIPTS,
    BalanceSpec,
    ClipScoreSpec,
    CurateFiltersSpec,
    CurateInputSpec,
    CurateOutputSpec,
    CurateStage,
    ExactDedupSpec,
    ImageFilterSpec,
    NearDedupSpec,
    NsfwSpec,
    SemanticDedupSpec,
    TextFilterSpec,
)
from vlm_core.spec.data import DataFormat, DataSourceSpec, DataSpec, ResolutionPolicy, ResolutionSpec
from vlm_core.spec.errors import SpecError, format_errors
from vlm_core.spec.job import (
    CURATE_ONLY_FIELDS,
    STAGE_TYPES,
    TRAINING_ONLY_FIELDS,
    AnyStage,
    ImageSpec,
    JobSpec,
    ObjectMeta,
    RunPolicySpec,
    TrainerConfig,
    VLMTrainingJob,
)
from vlm_core.spec.loading import MAX_JOB_FILE_BYTES, dump_job, load_job, parse_job, parse_job_text
from vlm_core.spec.model import ModelSpec, StorageSpec
from vlm_core.spec.resources import ResourcesSpec, Toleration
from vlm_core.spec.rules import (
    STAGE_RULES,
    Rule,
    duplicate_stage_names,
    from_stage_problems,
    stage_rule_problems,
)
from vlm_core.spec.stages import (
    TRAINABLE_PARTS,
    Offload,
    Precision,
    StageSpec,
    StageType,
    Strategy,
    TrainablePart,
)
from vlm_core.spec.training_parts import (
    BatchSpec,
    CheckpointSpec,
    DPOReference,
    DPOSpec,
    LoRASpec,
    OptimizerSpec,
    RewardSpec,
    ScheduleSpec,
)

__all__ = [
    "API_GROUP", "API_VERSION", "BOUND_REASONS", "CURATE_ONLY_FIELDS", "CURATE_TYPE", "KIND", "MAX_JOB_FILE_BYTES",
    "PLURAL", "SCRIPTS", "STAGE_RULES", "STAGE_TAGS", "STAGE_TYPES", "TRAINING_ONLY_FIELDS", "AnyStage", "BalanceSpec", "BatchSpec",
    "CheckpointSpec", "ClipScoreSpec", "ContentOf", "CurateFiltersSpec", "CurateInputSpec", "CurateOutputSpec", "CurateStage",
    "DPOReference", "DPOSpec", "DataFormat", "DataSourceSpec", "DataSpec", "ExactDedupSpec", "ImageFilterSpec",
    "ImageSpec", "JobSpec", "NoEffect", "LoRASpec", "ModelSpec", "NearDedupSpec", "NsfwSpec", "ObjectMeta", "Offload",
    "OptimizerSpec", "Precision", "RewardSpec", "ResolutionPolicy", "ResolutionSpec", "ResourcesSpec", "Rule", "RunPolicySpec",
    "ScheduleSpec", "SemanticDedupSpec", "SpecError", "StageSpec", "StageType", "StorageSpec", "Strategy",
    "Strict", "TextFilterSpec", "Toleration", "TrainablePart", "TRAINABLE_PARTS", "TrainerConfig", "VLMTrainingJob",
    "content_of", "duplicate_stage_names", "dump_job", "field_default", "format_errors", "from_stage_problems", "load_job", "no_effect",
    "parse_job", "parse_job_text", "stage_rule_problems", "wire_names",
]
