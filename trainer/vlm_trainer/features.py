"""Cached vision features: a frozen vision tower's output computed once per image, reused across epochs and stages.

Opt-in per stage (`stage.cacheVisionFeatures: true`); refused when the stage trains the vision tower
(`trainable` with `vision_tower`, which is also the only way LoRA reaches it). When set, the frozen tower's
forward is replaced by a look-up:

- key of one image (one AnyRes tile for LlavaNext) = sha256 of the exact pixel tensor the tower would see,
  i.e. the image transform's OUTPUT: a different transform, resolution or image gives a different key, so no
  transform setting can make a stale entry match (an image transform here is deterministic; a random one
  would only produce misses, never wrong features);
- the cache folder is named by the ENCODER fingerprint: sha256 of the tower's class, config, every
  parameter/buffer (names, dtypes, shapes, bytes), the feature layers Llava reads and the compute dtype
  (`stage.precision` on the device type). A tower with any changed weight gets a new folder: stale
  features are never reused;
- entries live in memory (up to `MEMORY_BYTES`, first in first kept) and in the job's storage through the
  storage layer (fsspec): `<storage.uri>/<job>/vision-features/<fingerprint>/<key[:2]>/<key>.pt`, the hidden
  states of the feature layers only (not all layers). A later epoch hits memory; a later stage (or a
  restarted one) with the same tower and transform reads the stored entries.

Only the layers Llava selects (`vision_feature_layer`) are kept; the returned output holds them at their
index of `hidden_states` (others are None), which is all `get_image_features` of Llava and LlavaNext read.
Loss and gradients equal the uncached run's (`tests/unit/test_features.py`): the tower runs under no_grad
anyway (`vlm_trainer.frozen`), its output never needed a gradient.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vlm_core import storage

from vlm_trainer.family import base_model, vision_tower

log = logging.getLogger(__name__)

_NOT_FEATURES = ("transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path")
MEMORY_BYTES = 2 * 2**30  # in-memory entries per process; beyond that, entries come from storage


def feature_layers(config: Any) -> list[int]:
    """The vision hidden-state indices Llava reads (config.vision_feature_layer: one int or a list)."""
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def encoder_fingerprint(tower: nn.Module, layers: list[int], compute: str) -> str:
    """sha256 over the tower's class, config, every parameter and buffer, the feature layers and the
    compute dtype: equal only for the same encoder producing the same features."""
    h = hashlib.sha256()
    h.update(type(tower).__name__.encode())
    config = getattr(tower, "config", None)
    if config is not None:  # what shapes the features; not where it was loaded from or which release wrote it
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _NOT_FEATURES}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(repr((sorted(layers), compute)).encode())
    for name, t in tower.state_dict().items():
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def image_key(pixels: torch.Tensor) -> str:
    """sha256 of one image's transformed pixel tensor (dtype, shape and bytes)."""
    t = pixels.detach().cpu().contiguous()
    h = hashlib.sha256()  # SHA-NI: ~3x blake2b's speed on x86 (11 vs 40 ms for 8 images at 336 px)
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


@dataclass
class CacheStats:
    hits_memory: int = 0
    hits_storage: int = 0
    misses: int = 0
    writes: int = 0
    write_errors: int = 0

    @property
    def hits(self) -> int:
        return self.hits_memory + self.hits_storage

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "hits_memory": self.hits_memory, "hits_storage": self.hits_storage,
                "misses": self.misses, "writes": self.writes, "write_errors": self.write_errors}


class FeatureCache:
    """Per-image features of one encoder fingerprint: memory first, then `<root>/<fingerprint>/` in storage."""

    def __init__(self, root: str | None, fingerprint: str, layers: list[int], *, memory_bytes: int = MEMORY_BYTES):
        self.folder = storage.join(root, fingerprint) if root else None
        self.fingerprint, self.layers = fingerprint, list(layers)
        self.memory: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.memory_bytes, self.used = memory_bytes, 0
        self.stats = CacheStats()

    def _uri(self, key: str) -> str:
        assert self.folder is not None
        return storage.join(self.folder, key[:2], f"{key}.pt")

    def _remember(self, key: str, layers: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in layers)
        if self.used + size <= self.memory_bytes:
            self.memory[key] = layers
            self.used += size

    def get(self, key: str) -> list[torch.Tensor] | None:
        found = self.memory.get(key)
        if found is not None:
            self.stats.hits_memory += 1
            return found
        if self.folder is None:
            return None
        try:
            layers = torch.load(io.BytesIO(storage.read_bytes(self._uri(key))), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        self.stats.hits_storage += 1
        self._remember(key, layers)
        return layers

    def put(self, key: str, layers: list[torch.Tensor]) -> None:
        layers = [t.detach().cpu().contiguous() for t in layers]
        self._remember(key, layers)
        if self.folder is None:
            return
        buf = io.BytesIO()
        torch.save(layers, buf)
        uri = self._uri(key)
        try:  # atomic: a reader never sees half an entry
            storage.write_bytes(uri, buf.getvalue(), atomic=True)
            self.stats.writes += 1
        except OSError as err:  # the cache is an optimisation: a failed write costs a recompute later
            self.stats.write_errors += 1
            log.warning("vision feature cache: could not write %s: %s", uri, err)


def install_feature_cache(module: nn.Module, cache: FeatureCache) -> None:
    """Replace the frozen vision tower's forward by cache look-ups (misses run the real forward on the
    missing images only and are stored). The tower must be frozen (`vlm_trainer.frozen`)."""
    tower = vision_tower(module)
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("stage.cacheVisionFeatures: the vision tower trains in this stage; cached features "
                         "need a frozen tower (remove vision_tower from stage.trainable)")
    forward = tower.forward

    @functools.wraps(forward)
    def cached_forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
        keys = [image_key(p) for p in pixel_values]
        found: list[list[torch.Tensor] | None] = [cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        depth: int | None = None
        if missing:
            cache.stats.misses += len(missing)
            with torch.no_grad():
                out = forward(pixel_values[missing], *args, **{**kwargs, "output_hidden_states": True,
                                                               "return_dict": True})
            depth = len(out.hidden_states)
            for j, i in enumerate(missing):
                layers = [out.hidden_states[layer][j] for layer in cache.layers]
                cache.put(keys[i], layers)
                found[i] = layers
        device = pixel_values.device
        stacked = [torch.stack([f[n] for f in found if f is not None]).to(device)  # type: ignore[index]
                   for n in range(len(cache.layers))]
        depth = depth or _depth(tower)
        hidden: list[torch.Tensor | None] = [None] * depth
        for n, layer in enumerate(cache.layers):
            hidden[layer] = stacked[n]
        return BaseModelOutputWithPooling(last_hidden_state=hidden[-1] if hidden[-1] is not None else stacked[-1],
                                          hidden_states=tuple(hidden))  # type: ignore[arg-type]

    tower.forward = cached_forward
    tower._vlm_feature_cache = cache


def _depth(tower: nn.Module) -> int:
    """len(hidden_states) of the tower's output: the embeddings plus one per encoder layer."""
    config = getattr(tower, "config", None)
    return int(config.num_hidden_layers) + 1 if config is not None else 0


def cache_of(module: nn.Module) -> FeatureCache | None:
    return getattr(vision_tower(module), "_vlm_feature_cache", None)


def cache_root(storage_uri: str, job: str) -> str:
    """Where a job's cached features live: <storage.uri>/<job>/vision-features (shared by its stages)."""
    return storage.join(storage_uri, job, "vision-features")


def setup_feature_cache(module: nn.Module, *, root: str | None, compute: str, fingerprint_of_rank0: Any) -> FeatureCache:
    """Install a cache on the frozen tower of `module`. `fingerprint_of_rank0(fp)` shares rank 0's fingerprint
    (other ranks may hold the tower on the meta device until the strategy copies rank 0's weights)."""
    tower, layers = vision_tower(module), feature_layers(base_model(module).config)
    local = None if any(p.is_meta for p in tower.parameters()) else encoder_fingerprint(tower, layers, compute)
    fingerprint = fingerprint_of_rank0(local)
    depth = _depth(tower)
    cache = FeatureCache(root, fingerprint, [layer % depth if depth else layer for layer in layers])
    install_feature_cache(module, cache)
    return cache
