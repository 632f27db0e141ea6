"""Cached vision features: the same loss and gradients as running the frozen tower; reused across epochs
(memory) and stages (storage); a changed tower never reuses them; refused when the tower trains."""

from __future__ import annotations

import copy

import pytest
import torch
from test_objective import loss_and_grads, mixed_batch, tiny_llava
from vlm_core.spec import StageSpec
from vlm_trainer.features import FeatureCache, cache_root, install_feature_cache, setup_feature_cache
from vlm_trainer.frozen import run_frozen_tower_in_inference
from vlm_trainer.model import apply_freezing
from vlm_trainer.objective import CausalLMObjective

pytestmark = pytest.mark.unit


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    apply_freezing(model, ["projector", "language_model"])
    run_frozen_tower_in_inference(model)
    return model


def with_cache(model: torch.nn.Module, root: str) -> tuple[torch.nn.Module, FeatureCache]:
    model = frozen(model)
    return model, setup_feature_cache(model, root=root, compute="fp32:cpu", fingerprint_of_rank0=lambda fp: fp)


def test_cached_features_give_the_same_loss_and_gradients_and_are_reused_across_epochs_and_stages(tmp_path):
    base, batch = tiny_llava(), mixed_batch()
    root = cache_root(f"file://{tmp_path}", "job")
    reference_loss, reference_grads = loss_and_grads(CausalLMObjective(), frozen(base), batch)

    model, cache = with_cache(base, root)
    for _epoch in range(2):  # epoch 0 computes and stores the 3 images' features, epoch 1 reads them from memory
        loss, grads = loss_and_grads(CausalLMObjective(), model, batch)
        assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-6)
        assert grads.keys() == reference_grads.keys()
        for name, grad in reference_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-6, rtol=0), name
    assert cache.stats.as_dict() == {"hits": 3, "hits_memory": 3, "hits_storage": 0, "misses": 3, "writes": 3,
                                     "write_errors": 0}
    stored = sorted(p.name for p in (tmp_path / "job" / "vision-features" / cache.fingerprint).rglob("*.pt"))
    assert len(stored) == 3

    # a later stage (a new process) with the same tower and transform: every image comes from storage
    later, later_cache = with_cache(base, root)
    assert later_cache.fingerprint == cache.fingerprint
    loss, _ = loss_and_grads(CausalLMObjective(), later, batch)
    assert loss.item() == pytest.approx(reference_loss.item(), abs=1e-6)
    assert (later_cache.stats.hits_storage, later_cache.stats.misses) == (3, 0)

    # a changed tower (one weight) gets another fingerprint: nothing stale is reused
    changed = copy.deepcopy(base)
    with torch.no_grad():
        next(changed.model.vision_tower.parameters()).add_(0.5)
    changed_model, changed_cache = with_cache(changed, root)
    assert changed_cache.fingerprint != cache.fingerprint
    changed_loss, _ = loss_and_grads(CausalLMObjective(), changed_model, batch)
    assert changed_cache.stats.misses == 3 and changed_cache.stats.hits == 0
    expected, _ = loss_and_grads(CausalLMObjective(), frozen(changed), batch)
    assert changed_loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(changed_loss.item() - reference_loss.item()) > 1e-4  # stale features would have given this one
    # a changed image (another transform output) is another key
    shifted = {**batch, "pixel_values": batch["pixel_values"] + 0.25}
    loss_and_grads(CausalLMObjective(), model, shifted)
    assert cache.stats.misses == 6


def test_cached_features_are_refused_when_the_tower_trains():
    model = tiny_llava()
    apply_freezing(model, ["projector", "vision_tower"])
    with pytest.raises(ValueError, match="cacheVisionFeatures"):
        install_feature_cache(model, FeatureCache(None, "x", [-1]))
    stage = {"name": "s", "type": "align", "maxSteps": 1, "data": {"shards": ["file:///d/a.tar"], "format": "caption"},
             "cacheVisionFeatures": True, "trainable": ["projector", "vision_tower"]}
    with pytest.raises(ValueError, match="cacheVisionFeatures: needs a frozen vision tower"):
        StageSpec.model_validate(stage)
    assert StageSpec.model_validate({**stage, "trainable": ["projector"]}).cache_vision_features
    with pytest.raises(ValueError, match="cacheVisionFeatures: needs strategy ddp or zero2, got 'fsdp'"):
        StageSpec.model_validate({**stage, "trainable": ["projector"], "strategy": "fsdp"})
    with pytest.raises(ValueError, match="crossEntropy: 'chunked' is for align/instruct"):
        StageSpec.model_validate({**stage, "type": "dpo", "trainable": ["language_model"],
                                  "cacheVisionFeatures": False, "crossEntropy": "chunked",
                                  "data": {"shards": ["file:///d/a.tar"], "format": "preference"}})
