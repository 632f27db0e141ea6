"""Embedding filters of the curate stage: CLIP score, NSFW probe and semantic dedup (SemDeDup).

Pure functions over one CLIP-style dual encoder (transformers `CLIPModel` or `SiglipModel`), loaded
from a local folder or any fsspec URI holding what `save_pretrained` writes: the model, its tokenizer
and its image processor. Nothing here knows about shards, ranks or the stage spec; the curate
runner gathers embeddings across ranks and calls these on the global view.

- `DualEncoder.embed`: L2-normalised image and caption embeddings, batched, without gradients, on
  the GPU when one is present.
- `clip_scores` / `keep_by_clip`: cosine per pair; keep at or above a threshold and/or the top
  fraction (DataComp's `clip_score_*_30_percent` keeps the top 0.3).
- `nsfw_flags`: a linear probe over the image embeddings (file format in `load_linear_probe`).
- `semdedup`: spherical k-means over the embeddings, then within each cluster a sample whose cosine
  to an already kept one is at or above the threshold is dropped (Abbas et al. 2023).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModel, AutoTokenizer, CLIPModel, PreTrainedModel, SiglipModel

# transformers 5.17's top-level `AutoImageProcessor` is a placeholder that demands torchvision (as in model.py).
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from vlm_core import storage

DUAL_ENCODER_CLASSES = ("CLIPModel", "SiglipModel")


class EmbedError(ValueError):
    """A dual encoder, probe or argument that cannot be used; the message names what and why."""


def _local_dir(uri: str) -> str:
    if not storage.exists(uri):
        raise EmbedError(f"dual encoder: nothing at {uri}; expected a folder written by save_pretrained")
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    return storage.download_dir(uri, tempfile.mkdtemp(prefix="vlm-dual-encoder-"))


def tokenize_captions(tokenizer: Any, model: PreTrainedModel, captions: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for captions, the way each family was trained.

    SigLIP pools the LAST position, so captions are padded to the text tower's full length
    (`padding="max_length"`, as SigLIP checkpoints expect); CLIP pools its end-of-text token, so
    padding to the longest caption is enough. Both truncate at the text tower's length.
    """
    max_len = int(model.config.text_config.max_position_embeddings)
    padding = "max_length" if isinstance(model, SiglipModel) else "longest"
    enc = tokenizer(captions, padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@dataclass
class DualEncoder:
    """A loaded dual encoder: the model (eval mode, on `device`), its tokenizer and image processor."""

    model: PreTrainedModel
    tokenizer: Any
    image_processor: Any
    device: torch.device
    batch_size: int = 256

    @property
    def dim(self) -> int:
        """Width of the shared embedding space."""
        cfg = self.model.config
        if isinstance(self.model, CLIPModel):
            return int(cfg.projection_dim)
        return int(cfg.text_config.projection_size or cfg.text_config.hidden_size)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings, [n, dim], float32 on the CPU."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised caption embeddings, [n, dim], float32 on the CPU."""
        out = []
        for start in range(0, len(captions), self.batch_size):
            enc = tokenize_captions(self.tokenizer, self.model, list(captions[start : start + self.batch_size]))
            feats = self.model.get_text_features(**{k: v.to(self.device) for k, v in enc.items()}).pooler_output
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def embed(self, images: list[Image.Image], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings, caption embeddings) of n pairs, each [n, dim], L2-normalised."""
        if len(images) != len(captions):
            raise EmbedError(f"embed: {len(images)} images but {len(captions)} captions; pass one caption per image")
        return self.embed_images(images), self.embed_texts(captions)


def load_dual_encoder(uri: str, *, device: str | None = None, batch_size: int = 256) -> DualEncoder:
    """A `CLIPModel` or `SiglipModel` with its tokenizer and image processor, from a folder or fsspec URI.

    The device defaults to the first GPU when one is present, else the CPU.
    """
    if batch_size < 1:
        raise EmbedError(f"batch_size: must be >= 1, got {batch_size}")
    path = _local_dir(uri)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise EmbedError(f"dual encoder: {uri} has no config.json; expected a folder written by save_pretrained")
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    if type(model).__name__ not in DUAL_ENCODER_CLASSES:
        raise EmbedError(
            f"dual encoder: {uri} holds a {type(model).__name__}; expected one of {list(DUAL_ENCODER_CLASSES)} "
            "(an image tower and a text tower)"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    return DualEncoder(model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path), dev, batch_size)


def clip_scores(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each (image, caption) pair: [n, d] x [n, d] -> [n]."""
    if img.ndim != 2 or img.shape != txt.shape:
        raise EmbedError(f"clip_scores: expected two [n, d] tensors of one shape, got {tuple(img.shape)} and {tuple(txt.shape)}")
    return (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)


def keep_by_clip(
    scores: torch.Tensor, *, threshold: float | None = None, keep_top_fraction: float | None = None,
    percentile: float | None = None,
) -> torch.Tensor:
    """Which samples pass the CLIP-score filter: a bool [n].

    `threshold`: keep scores at or above it. `keep_top_fraction` (0 < f <= 1): keep the ceil(f * n)
    highest scores (DataComp's `clip_score_*_30_percent` is f = 0.3); equal scores are ranked by
    position, so the result is deterministic. `percentile` (0 <= p < 100): keep scores at or above the
    p-th percentile of these scores (linear interpolation, as numpy's default). Given several, a sample
    must pass each.
    """
    if threshold is None and keep_top_fraction is None and percentile is None:
        raise EmbedError("clip score filter: set threshold, keepTopFraction or percentile")
    if percentile is not None and not 0.0 <= percentile < 100.0:
        raise EmbedError(f"percentile: must be in [0, 100), got {percentile}")
    if keep_top_fraction is not None and not 0.0 < keep_top_fraction <= 1.0:
        raise EmbedError(f"keepTopFraction: must be in (0, 1], got {keep_top_fraction}")
    from vlm_trainer.curate import scale  # the stage's own rule, on one rank

    values = scores.float().numpy()
    keep = np.ones(values.shape[0], dtype=bool)
    if threshold is not None:
        keep &= values >= threshold
    if percentile is not None and values.shape[0]:
        keep &= values.astype(np.float64) >= scale.percentile_cut(values, percentile, scale.Solo())
    if keep_top_fraction is not None:
        keep &= scale.select_top(scale.sortable_f32(values), np.arange(values.shape[0]),
                                 math.ceil(keep_top_fraction * values.shape[0]), scale.Solo())
    return torch.from_numpy(keep)


def save_linear_probe(uri: str, weight: torch.Tensor, bias: float, **metadata: str) -> None:
    """Write a linear probe in the format `nsfw_flags` reads (see `load_linear_probe`)."""
    data = save_safetensors(
        {"weight": weight.detach().float().reshape(-1).contiguous(), "bias": torch.tensor([float(bias)])},
        metadata=metadata or None,
    )
    storage.write_bytes(uri, data)


def load_linear_probe(uri: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear probe file: safetensors with `weight` ([d] or [1, d]) and `bias` ([] or [1]), float.

    The probe reads L2-normalised image embeddings of the same dual encoder: p = sigmoid(e . w + b)
    is the probability that the image is unsafe. `dim` is the encoder's embedding width.
    """
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise EmbedError(f"nsfw probe: no file at {uri}")
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        tensors = load_safetensors(raw)
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise EmbedError(f"nsfw probe: {uri} is not a safetensors file ({err})") from err
    if set(tensors) != {"weight", "bias"}:
        raise EmbedError(f"nsfw probe: {uri} must hold exactly the tensors 'weight' and 'bias', found {sorted(tensors)}")
    weight, bias = tensors["weight"].float().reshape(-1), tensors["bias"].float().reshape(-1)
    if weight.numel() != dim or bias.numel() != 1:
        raise EmbedError(
            f"nsfw probe: {uri} has weight of {weight.numel()} and bias of {bias.numel()} values; "
            f"the dual encoder's embeddings need weight [{dim}] and bias [1]"
        )
    return weight, bias


def nsfw_flags(img: torch.Tensor, probe_uri: str, threshold: float) -> torch.Tensor:
    """Which images the linear probe at `probe_uri` flags unsafe: sigmoid(e . w + b) >= threshold, bool [n]."""
    if not 0.0 <= threshold <= 1.0:
        raise EmbedError(f"nsfw threshold: must be in [0, 1], got {threshold}")
    if img.ndim != 2:
        raise EmbedError(f"nsfw_flags: expected [n, d] image embeddings, got shape {tuple(img.shape)}")
    weight, bias = load_linear_probe(probe_uri, img.shape[1])
    prob = torch.sigmoid(F.normalize(img.float(), dim=-1) @ weight + bias)
    return prob >= threshold


def semdedup(keys: list[str], emb: torch.Tensor, *, clusters: int, threshold: float, seed: int) -> dict[str, str]:
    """Semantic duplicates: {dropped key: the kept key it duplicates}.

    The stage's own SemDeDup (`scale.semantic_dedup`) on one rank: the embeddings are clustered (spherical
    k-means, `clusters` centres, seeded); within a cluster, samples are visited in key order and one is
    dropped when its cosine to an already kept sample is at or above `threshold` (it maps to the most similar kept one). Samples are sorted by key first,
    so the answer depends on the set of (key, embedding) pairs only, not on their order.
    """
    if len(keys) != emb.shape[0] or emb.ndim != 2:
        raise EmbedError(f"semdedup: {len(keys)} keys but embeddings of shape {tuple(emb.shape)}; expected [{len(keys)}, d]")
    if len(set(keys)) != len(keys):
        raise EmbedError("semdedup: keys must be unique")
    if clusters < 1:
        raise EmbedError(f"semantic dedup clusters: must be >= 1, got {clusters}")
    if not -1.0 <= threshold <= 1.0:
        raise EmbedError(f"semantic dedup threshold: a cosine similarity in [-1, 1], got {threshold}")
    if not keys:
        return {}
    from vlm_trainer.curate import scale

    order = sorted(range(len(keys)), key=keys.__getitem__)
    sorted_keys = [keys[i] for i in order]
    n = len(keys)
    cols = scale.Columns(gid=np.arange(n), reason=np.zeros(n, dtype=np.int16), pixel=np.zeros((n, 2), dtype=np.uint64),
                         hashes=np.zeros((n, 1), dtype=np.uint64), emb=emb[order].double().numpy())
    scale.semantic_dedup(cols, clusters, threshold, seed, scale.Solo())
    return {sorted_keys[i]: sorted_keys[int(cols.dup_of[i])] for i in np.flatnonzero(cols.reason).tolist()}
