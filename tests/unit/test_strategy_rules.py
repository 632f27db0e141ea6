"""Strategies, LoRA and QLoRA rules that need no process group: the generated DeepSpeed config, which
checkpoints a run may resume from, data positions on another world size, the stage rules `vlmctl validate`
reports, and freezing/param groups by module on a PEFT-wrapped tiny Llava."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import yaml
from job_fixtures import GOOD
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
from vlm_core.spec import SpecError, StageSpec, Strategy, parse_job
from vlm_trainer.checkpoint import check_resumable, resplit_positions
from vlm_trainer.data import DataPosition
from vlm_trainer.lora import QLoRAUnavailable, apply_lora, check_qlora_device
from vlm_trainer.model import apply_freezing, param_groups
from vlm_trainer.parallel import DistEnv
from vlm_trainer.strategies import STRATEGIES, build_strategy
from vlm_trainer.strategies.deepspeed_zero import deepspeed_config

pytestmark = pytest.mark.unit

CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def stage(**extra) -> StageSpec:
    doc = {"name": "s", "type": "instruct", "data": {"shards": ["b.tar"], "format": "conversation"}, "maxSteps": 10,
           "batch": {"globalSize": 32, "microSize": 4}, "resources": {"procsPerNode": 4}}
    doc.update(extra)
    return StageSpec.model_validate(doc)


def problems(doc: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    return err.value.problems


def test_registry_covers_every_strategy_of_the_spec():
    assert set(STRATEGIES) == set(Strategy.__args__)
    assert build_strategy(stage(strategy="zero3"), CPU1).name == "zero3"


def test_deepspeed_config_is_generated_from_the_stage():
    s = stage(strategy="zero3", offload="optimizer_and_params", optimizer={"gradClip": 0.5})
    cpu = deepspeed_config(s, zero_stage=3, world_size=4, cuda=False)
    assert cpu["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "offload_param": {"device": "cpu", "pin_memory": False}}
    assert cpu["train_batch_size"] == 32 and cpu["train_micro_batch_size_per_gpu"] == 4
    assert cpu["gradient_accumulation_steps"] == 2 and cpu["gradient_clipping"] == 0.5
    assert cpu["bf16"] == {"enabled": False}  # bf16 on CUDA only
    assert deepspeed_config(s, zero_stage=3, world_size=4, cuda=True)["bf16"] == {"enabled": True}
    zero2 = deepspeed_config(stage(strategy="zero2"), zero_stage=2, world_size=4, cuda=True)
    assert zero2["zero_optimization"] == {"stage": 2}
    # The frozen DPO reference gets no optimizer settings.
    assert "gradient_clipping" not in deepspeed_config(s, zero_stage=3, world_size=4, cuda=False, with_optimizer=False)


@pytest.mark.parametrize(("strategy", "ok"), [("ddp", True), ("fsdp", True), ("zero2", False), ("zero3", False)])
def test_resume_on_another_world_size_is_refused_by_name_where_it_cannot_work(strategy, ok):
    strat = build_strategy(stage(strategy=strategy), CPU1)
    strat.trainable_names = lambda: {"w"}  # type: ignore[method-assign]
    fmt = "deepspeed" if strategy.startswith("zero") else "dcp"
    state = {"world_size": 2, "strategy": strategy, "format": fmt, "trainable": ["w"]}
    if ok:
        check_resumable(state, "file:///c/checkpoint-2", strat, CPU1)
    else:
        with pytest.raises(ValueError, match=f"strategy '{strategy}' cannot resume on another world size"):
            check_resumable(state, "file:///c/checkpoint-2", strat, CPU1)
    with pytest.raises(ValueError, match="stage.strategy: checkpoint .* was written by strategy 'other'"):
        check_resumable({**state, "world_size": 1, "strategy": "other", "format": "x"}, "u", strat, CPU1)


def test_data_positions_are_resplit_for_another_world_size():
    old = [{"epoch": 1, "consumed": 10}, {"epoch": 1, "consumed": 12}, {"epoch": 2, "consumed": 1}]
    assert resplit_positions(old, 2) == [DataPosition(1, 11), DataPosition(1, 11)]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        ({"lora": {"rank": 8}, "qlora": True}, "spec.stages[1].qlora: true needs CUDA GPUs"),
        ({"qlora": True, "resources": {"gpusPerNode": 1}}, "spec.stages[1].qlora: true needs lora settings"),
        ({"offload": "optimizer"}, "spec.stages[1].offload: 'optimizer' needs strategy fsdp, zero2 or zero3"),
        ({"offload": "optimizer_and_params", "strategy": "zero2"}, "spec.stages[1].offload: 'optimizer_and_params' needs"),
        ({"strategy": "zero9"}, "spec.stages[1].strategy: Input should be 'ddp', 'fsdp', 'zero2' or 'zero3'"),
        ({"lora": {"rank": 8}, "strategy": "fsdp"}, "spec.stages[1].lora: supports strategy ddp"),
        ({"lora": {"rank": 0}}, "spec.stages[1].lora.rank: Input should be greater than 0"),
        ({"compile": True, "strategy": "zero3"}, "spec.stages[1].compile: true supports strategy ddp or fsdp"),
    ],
)
def test_strategy_and_lora_rules_name_the_field(mutate, expected):
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][1].update(mutate)
    got = problems(doc)
    assert any(p.startswith(expected) for p in got), got


def test_vlmctl_validate_rejects_qlora_without_gpus(tmp_path):
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][1].update(lora={"rank": 8}, qlora=True)
    path = tmp_path / "qlora.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "vlm_operator.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "spec.stages[1].qlora: true needs CUDA GPUs" in out.stderr and "resources.gpusPerNode" in out.stderr
    doc["spec"]["stages"][1]["resources"] = {"gpusPerNode": 1}
    path.write_text(yaml.safe_dump(doc))
    ok = subprocess.run([sys.executable, "-m", "vlm_operator.cli", "validate", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_trainer_refuses_qlora_without_cuda_naming_the_field():
    s = stage(lora={"rank": 8}, qlora=True, resources={"gpusPerNode": 1, "procsPerNode": 4})
    with pytest.raises(QLoRAUnavailable, match="stage.qlora: true needs a CUDA device"):
        check_qlora_device(s, torch.device("cpu"))


def tiny_llava() -> LlavaForConditionalGeneration:
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=64, tie_word_embeddings=True)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                     image_token_index=63, tie_word_embeddings=True))


def test_freezing_and_param_groups_work_by_module_under_peft():
    s = stage(lora={"rank": 4, "targetModules": ["q_proj", "v_proj", "fc1"]},
              optimizer={"lr": 1e-4, "projectorLrMultiplier": 10})
    model = apply_lora(tiny_llava(), s, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n and "language_model" in n) or "modules_to_save" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and not any("fc1" in n for n in trainable)  # no vision
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, s)
    assert {names[id(p)] for g in groups for p in g["params"]} == trainable
    for g in groups:
        projector = all("multi_modal_projector" in names[id(p)] for p in g["params"])
        assert g["part"] == ("projector" if projector else "model")
        assert g["lr"] == pytest.approx(1e-3 if projector else 1e-4)
    # The same module-based rule freezes a plain model by parts.
    plain = tiny_llava()
    apply_freezing(plain, ["projector"])
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == {
        n for n, _ in plain.named_parameters() if n.startswith("model.multi_modal_projector.")}


def test_deepspeed_and_bitsandbytes_are_imported_only_when_used():
    code = ("import sys, torch; from vlm_trainer import trainer, strategies; "
            "from vlm_trainer.parallel import DistEnv; "
            "print(sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
