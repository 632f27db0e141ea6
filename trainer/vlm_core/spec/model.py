"""The model a job starts from (ModelSpec) and where its checkpoints and outputs live (StorageSpec)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from vlm_core import contract, storage, validators
from vlm_core.spec.base import ContentOf, NoEffect, Strict


class ModelSpec(Strict):
    """The VLM's parts: a pretrained vision encoder and language model, joined by a projector."""

    vision_encoder: Annotated[str, ContentOf("folder")] = Field(
        description="Path or storage URI (file://, s3://, gs://) of a Hugging Face vision-encoder checkpoint "
        "(CLIP or SigLIP vision model)."
    )
    language_model: Annotated[str, ContentOf("folder")] = Field(
        description="Path or storage URI of a Hugging Face causal-LM checkpoint; its tokenizer is used."
    )
    projector: Literal["mlp2x_gelu"] = Field(
        "mlp2x_gelu",
        description="Projector from vision features to LM embeddings: LLaVA-1.5's Linear-GELU-Linear "
        "(transformers' LlavaMultiModalProjector; the only one it implements).",
    )
    vision_feature_layer: int = Field(
        -2, ge=-256, le=256, description="Hidden layer of the vision encoder whose patch features feed the projector."
    )
    vision_feature_select_strategy: Literal["default", "full"] = Field(
        "full", description="'default' drops the CLS token (CLIP); 'full' keeps every token (SigLIP has no CLS)."
    )
    image_size: int = Field(336, gt=0, le=8192, description="Square input resolution in pixels (fixed resolution policy).")

    @field_validator("vision_encoder", "language_model")
    @classmethod
    def _checkpoint_uri(cls, v: str) -> str:
        return validators.input_uri(v, validators.STORAGE_SCHEMES)


class StorageSpec(Strict):
    """Where checkpoints and outputs live; credentials only by Secret reference, never inline."""

    uri: Annotated[str, NoEffect("where outputs are written")] = Field(description="Base URI for checkpoints and outputs: file://, s3:// or gs:// (or a local path).")
    secret_ref: Annotated[str | None, NoEffect("how storage is reached")] = Field(
        None,
        description="Name of a Secret whose keys become the trainer pods' env (e.g. AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL). Kubernetes backend only.",
    )
    endpoint_url: Annotated[str | None, NoEffect("how storage is reached")] = Field(None, description="S3-compatible endpoint URL (MinIO, SeaweedFS, ...).")

    def fsspec_options(self, credentials: Mapping[str, str] | None = None) -> dict[str, Any]:
        """fsspec options for this job's storage: its endpoint, plus credentials given as the Secret's
        keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION).
        Without credentials, the filesystem's defaults (the process environment) apply."""
        if not self.uri.startswith("s3://"):
            return {}
        c = credentials or {}
        return storage.s3_options(
            endpoint_url=self.endpoint_url or c.get(contract.ENDPOINT_URL_ENV),
            key=c.get("AWS_ACCESS_KEY_ID"),
            secret=c.get("AWS_SECRET_ACCESS_KEY"),
            token=c.get("AWS_SESSION_TOKEN"),
            region=c.get("AWS_REGION") or c.get("AWS_DEFAULT_REGION"),
        )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return validators.storage_uri(v)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return validators.endpoint_url(v) if v is not None else None
