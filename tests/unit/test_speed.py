"""Issue 14's step speed-ups keep the step's numbers: per-block compile (runs on CPU, same loss), the frozen
vision tower in inference mode (same loss and gradients, no autograd in the tower), fused AdamW where it
applies."""

from __future__ import annotations

import copy

import pytest
import torch
from test_objective import mixed_batch, tiny_llava
from vlm_core.spec import StageSpec
from vlm_trainer.frozen import run_frozen_tower_in_inference
from vlm_trainer.model import apply_freezing
from vlm_trainer.objective import CausalLMObjective
from vlm_trainer.optim import fused_applies
from vlm_trainer.strategies.compile import compile_blocks

pytestmark = pytest.mark.unit


def stage(**fields: object) -> StageSpec:
    return StageSpec.model_validate({"name": "s", "type": "instruct", "maxSteps": 1, "data": {"shards": ["x.tar"], "format": "conversation"},
                                     **fields})


def step_loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss_sum, _ = CausalLMObjective()(model, batch)
    (loss_sum / CausalLMObjective.count(batch)).backward()
    return float(loss_sum), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_vision_tower_runs_without_autograd_and_changes_no_number():
    eager, batch = tiny_llava(), mixed_batch()
    apply_freezing(eager, ["projector", "language_model"])
    fast = copy.deepcopy(eager)
    assert run_frozen_tower_in_inference(fast) and not run_frozen_tower_in_inference(fast)  # once
    tower = fast.model.vision_tower
    assert not tower(batch["pixel_values"]).last_hidden_state.requires_grad
    want_loss, want = step_loss_and_grads(eager, batch)
    got_loss, got = step_loss_and_grads(fast, batch)
    assert got_loss == pytest.approx(want_loss, abs=1e-6) and got.keys() == want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-7) for n in want)
    trains_tower = tiny_llava()
    apply_freezing(trains_tower, ["vision_tower", "projector"])
    assert not run_frozen_tower_in_inference(trains_tower)  # a training tower keeps autograd


def test_compile_per_block_runs_on_cpu_with_the_eager_loss():
    eager, batch = tiny_llava(), mixed_batch()
    apply_freezing(eager, ["projector", "language_model"])
    compiled = copy.deepcopy(eager)
    # aot_eager: dynamo captures each block and AOTAutograd builds its forward and backward graphs (what
    # inductor would lower); inductor's C++ build took minutes on the shared CPUs, so it runs in the bench.
    assert compile_blocks(compiled, backend="aot_eager") == 4  # 2 LM blocks + 2 vision blocks
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and final/ unchanged
    want_loss, want = step_loss_and_grads(eager, batch)
    got_loss, got = step_loss_and_grads(compiled, batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-4) and got.keys() == want.keys()
    assert all(torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-5) for n in want)


def test_fused_adamw_where_the_strategy_holds_plain_tensors():
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert fused_applies(params, stage())  # ddp on CPU
    assert not fused_applies(params, stage(strategy="zero2"))  # DeepSpeed steps its own partitions
    assert not fused_applies(params, stage(strategy="fsdp"))  # CPU FSDP2 keeps foreach
    meta = [{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}]
    assert not fused_applies(meta, stage())


def test_ddp_clips_inside_fused_adamw_like_clip_grad_norm_and_skips_a_non_finite_step():
    """ddp's step without a host sync: clipping as fused AdamW's grad_scale gives clip_grad_norm_'s update,
    the norm comes back as a device tensor, and a non-finite gradient leaves the weights untouched."""
    from vlm_trainer.parallel import DistEnv
    from vlm_trainer.strategies.ddp import DDPStrategy

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    want_model = torch.nn.Linear(8, 4)
    got = DDPStrategy(stage(optimizer={"lr": 0.1, "gradClip": 0.5}), env)
    got.prepare(copy.deepcopy(want_model), lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, fused=True))
    want = torch.optim.AdamW(want_model.parameters(), lr=0.1, fused=True)
    x = torch.randn(16, 8)
    for _ in range(3):
        want_model(x).pow(2).sum().backward()
        want_norm = torch.nn.utils.clip_grad_norm_(list(want_model.parameters()), 0.5)
        want.step()
        want.zero_grad()
        got.model(x).pow(2).sum().backward()
        norm = got.step()
        assert isinstance(norm, torch.Tensor) and float(norm) == pytest.approx(float(want_norm), rel=1e-6)
        assert float(norm) > 0.5  # the clip was active
    for a, b in zip(got.module.parameters(), want_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    before = [p.detach().clone() for p in got.module.parameters()]
    (got.model(x).sum() * float("nan")).backward()
    assert not torch.isfinite(got.step())
    assert all(torch.equal(a, b) for a, b in zip(got.module.parameters(), before, strict=True))
