"""The torch-free FLOP/memory accounting: parameter counts from config.json against real `numel()`,
the seed's hand-computed 7B table, sharding per strategy, LoRA/QLoRA, and DeepSpeed's own estimators."""

from __future__ import annotations

import pytest
import torch
from vlm_core import accounting as A

GB = 1e9

# Llama-2-7B / Vicuna-7B and CLIP ViT-L/14-336 (their public config.json values).
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "tie_word_embeddings": False}
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336}


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3"])
def test_lm_parameter_count_matches_numel(kind):
    import transformers as T

    common = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=301)
    cls, model_cls, extra = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, {"tie_word_embeddings": False, "attention_bias": True}),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, {"tie_word_embeddings": False}),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"tie_word_embeddings": True, "head_dim": 24}),
    }[kind]
    cfg = cls(**common, **extra)
    shape = A.LMShape.from_config(cfg.to_dict())
    assert shape.params == numel(model_cls(cfg))


@pytest.mark.parametrize("kind", ["clip", "siglip", "clip-full-config"])
def test_vision_parameter_count_matches_numel(kind):
    import transformers as T

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                patch_size=8, image_size=32)
    if kind == "siglip":
        cfg = T.SiglipVisionConfig(**dims)
        d = cfg.to_dict()
    else:
        cfg = T.CLIPVisionConfig(**dims)
        d = cfg.to_dict() if kind == "clip" else T.CLIPConfig(vision_config=cfg.to_dict()).to_dict()
    assert A.VisionShape.from_config(d).params == numel(T.AutoModel.from_config(cfg))


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_assembled_llava_count_and_image_tokens_match(vision):
    import transformers as T

    v = (T.CLIPVisionConfig if vision == "clip" else T.SiglipVisionConfig)(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    t = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True)
    cfg = T.LlavaConfig(vision_config=v.to_dict(), text_config=t.to_dict(), vision_feature_layer=-2,
                        vision_feature_select_strategy="default", tie_word_embeddings=True)
    model = T.LlavaForConditionalGeneration(cfg)
    from_llava = A.ModelShape.from_llava(cfg.to_dict())
    from_parts = A.ModelShape.from_configs(v.to_dict(), t.to_dict(), feature_select="default")
    assert from_llava.params == from_parts.params == numel(model)
    assert from_parts.params_by_part["projector"] == numel(model.model.multi_modal_projector)
    # what transformers computes: "default" drops the first position (CLIP's CLS; for SigLIP a real patch)
    features = model.model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32)).pooler_output
    assert from_parts.image_tokens == features[0].shape[0] == (16 if vision == "clip" else 15)


def _seven_b(trainable=("language_model",)):
    return A.ModelShape.from_configs(CLIP_L_336, LLAMA_7B), trainable


def test_seed_7b_full_finetune_table():
    shape, _ = _seven_b()
    lm = shape.lm.params
    assert 6.7e9 < lm < 6.8e9  # Llama-2-7B: 6.74B
    # DeepSpeed-style bf16 recipe on one GPU, LM only trainable; vision tower and projector frozen
    inp = A.StageInput(trainable=("language_model",), strategy="zero2", world_size=1, micro_batch=1, seq_len=2048)
    est = A.estimate_memory(shape, inp).components
    frozen = shape.vision.params + shape.projector_params
    assert est["weights"] == 2 * lm + 2 * frozen
    assert est["gradients"] == 2 * lm and 13.4 < est["gradients"] / GB < 13.6  # ~14 GB
    assert est["optimizer_states"] == 8 * lm and 53.5 < est["optimizer_states"] / GB < 54.5  # ~56 GB (7.0B x 8)
    assert est["master_weights"] == 4 * lm  # fp32 master copy, kept by this recipe
    # the logits buffer: 1 x 2048 x 32000 x (2 bf16 + 4 fp32 copy + 4 log-softmax + 4 grad)
    assert est["logits"] == 2048 * 32000 * 14


def test_fsdp_over_8_divides_the_sharded_parts_by_8():
    shape, _ = _seven_b()
    one = A.estimate_memory(shape, A.StageInput(strategy="fsdp", world_size=1)).components
    eight = A.estimate_memory(shape, A.StageInput(strategy="fsdp", world_size=8)).components
    for key in ("weights", "gradients", "optimizer_states"):
        assert eight[key] == pytest.approx(one[key] / 8, abs=1)
    assert eight["activations"] == one["activations"]  # per-GPU micro batch unchanged
    # the seed's "FSDP over 8 GPUs ~18 GB + activations": 16 bytes x 7B / 8 = 14 GB of states
    states = sum(eight[k] for k in ("weights", "gradients", "optimizer_states"))
    assert 13 < states / GB < 15


@pytest.mark.parametrize("strategy,sharded", [
    ("ddp", set()),
    ("zero2", {"gradients", "master_weights", "gradients_fp32", "optimizer_states"}),
    ("zero3", {"weights", "gradients", "master_weights", "gradients_fp32", "optimizer_states"}),
])
def test_zero_stages_shard_exactly_what_they_shard(strategy, sharded):
    shape, _ = _seven_b()
    one = A.estimate_memory(shape, A.StageInput(strategy=strategy, world_size=1)).components
    four = A.estimate_memory(shape, A.StageInput(strategy=strategy, world_size=4)).components
    for key in ("weights", "gradients", "master_weights", "gradients_fp32", "optimizer_states"):
        if key in sharded:
            assert four[key] == pytest.approx(one[key] / 4, abs=1), key
        else:
            assert four[key] == one[key], key


def test_frozen_parts_have_no_gradients_or_optimizer_state():
    shape, _ = _seven_b()
    est = A.estimate_memory(shape, A.StageInput(stage_type="align", trainable=("projector",), strategy="ddp")).components
    assert est["gradients"] == 4 * shape.projector_params
    assert est["optimizer_states"] == 8 * shape.projector_params
    # the frozen LM saves fewer activations than a trained one, but gradients still flow through it
    trained = A.estimate_memory(shape, A.StageInput(trainable=("projector", "language_model"))).components
    assert 0 < est["activations"] < trained["activations"]


def test_lora_r16_on_q_v_of_7b_and_qlora_base():
    shape, _ = _seven_b()
    assert A.lora_params(shape, 16, ["q_proj", "v_proj"]) == 32 * 2 * 16 * (4096 + 4096)  # 8.4M
    inp = A.StageInput(trainable=("language_model",), lora_rank=16, lora_targets=("q_proj", "v_proj"), qlora=True)
    book = A.param_book(shape, inp)
    assert book.trained == book.adapters == 8_388_608
    base_4bit = book.frozen_4bit * A.QLORA_BYTES_PER_PARAM
    assert 3.2 < base_4bit / GB < 3.6  # the seed's "QLoRA base ~3.5 GB" (decoder linears in NF4)
    est = A.estimate_memory(shape, inp).components
    assert est["optimizer_states"] == 8 * 8_388_608
    lora = A.estimate_memory(shape, A.StageInput(trainable=("language_model",), lora_rank=16)).components
    assert est["weights"] < lora["weights"] / 3  # 4-bit base vs 16-bit-or-wider base


def test_checkpointing_and_micro_batch_shrink_activations():
    shape, _ = _seven_b()
    base = A.StageInput(micro_batch=4, seq_len=2048)
    full = A.activation_bytes(shape, base)["activations"]
    ckpt = A.activation_bytes(shape, A.with_changes(base, gradient_checkpointing=True))["activations"]
    half = A.activation_bytes(shape, A.with_changes(base, micro_batch=2))["activations"]
    assert ckpt < full / 5
    assert half == pytest.approx(full / 2, rel=1e-6)


def test_flops_frozen_forward_only_trained_forward_and_backward():
    shape, _ = _seven_b()
    n = shape.lm.matmul_params
    align = A.StageFlops.of(shape, A.StageInput(stage_type="align", trainable=("projector",)))
    instruct = A.StageFlops.of(shape, A.StageInput(trainable=("projector", "language_model")))
    assert align.per_token == 4 * n  # forward + input gradients through the frozen LM
    assert instruct.per_token == 6 * n
    vision_fwd = 2 * shape.vision.matmul_params * shape.vision.positions
    assert vision_fwd < align.per_sequence < vision_fwd * 1.2  # frozen tower: forward only, + the projector
    dpo = A.StageFlops.of(shape, A.StageInput(stage_type="dpo", trainable=("language_model",)))
    assert dpo.per_token == 8 * n and dpo.sequences_per_sample == 2  # + the reference's forward


def test_compute_optimal_budget_and_warnings():
    n, d = A.compute_optimal(6 * 20 * (1e9) ** 2)
    assert n == pytest.approx(1e9) and d == pytest.approx(20e9)
    shape, _ = _seven_b()
    c = A.stage_compute(shape, A.StageInput(stage_type="instruct"), max_steps=None, epochs=1, num_samples=50_000,
                        global_batch=128, mfu=0.4, peak_flops_per_second=989e12)
    assert c.steps == 391 and any("100K" in w for w in c.warnings)
    c = A.stage_compute(shape, A.StageInput(stage_type="align", trainable=("projector",)), max_steps=None, epochs=2,
                        num_samples=558_000, global_batch=256, mfu=0.4, peak_flops_per_second=989e12)
    assert any("at most 1 epoch" in w for w in c.warnings)
    assert c.seconds == pytest.approx(c.flops / (989e12 * 0.4))


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="offload: needs strategy"):
        A.StageInput(strategy="ddp", offload="optimizer")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        A.LMShape.from_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="known: H200"):
        A.gpu_named("B9000")


# --- DeepSpeed's own estimators (model states only) -------------------------------------------------

SIZES = {  # three LM sizes (Llama shapes): ~1.1B, ~6.7B, ~13B; a tiny vision tower so the LM dominates
    "1b": dict(LLAMA_7B, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "7b": LLAMA_7B,
    "13b": dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("gpus", [1, 8, 32])
def test_model_states_agree_with_deepspeed(size, gpus, capsys):
    """Same assumptions as DeepSpeed's estimators: every parameter trains, bf16 ZeRO recipe (16-bit params
    and grads, fp32 grads, master and Adam m/v). Differences, not compared here: DeepSpeed adds no
    activations, logits or framework overhead (we do), and its CPU figures include a 1.5x buffer factor."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    shape = A.ModelShape.from_configs(dict(CLIP_L_336, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=1), SIZES[size])
    total = shape.params
    everything = ("vision_tower", "projector", "language_model")
    nodes, per_node = (gpus // 8, 8) if gpus >= 8 else (1, gpus)

    def ours(strategy: str, offload: str) -> int:
        inp = A.StageInput(trainable=everything, strategy=strategy, offload=offload, world_size=gpus)
        return A.model_state_bytes(A.estimate_memory(shape, inp))

    _, ds = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    assert ours("zero2", "none") == pytest.approx(ds, rel=0.05)
    _, ds = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=True)
    assert ours("zero2", "optimizer") == pytest.approx(ds, rel=0.05)
    largest = shape.largest_layer_params
    for offload, (opt, par) in {"none": (False, False), "optimizer": (True, False),
                                "optimizer_and_params": (True, True)}.items():
        _, ds, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=opt,
                                                         cpu_offload_params=par)
        assert ours("zero3", offload) == pytest.approx(ds, rel=0.05), offload
    # the functions the issue names run too (they print DeepSpeed's table)
    estimate_zero2_model_states_mem_needs_all_cold(total_params=total, num_gpus_per_node=per_node, num_nodes=nodes)
    estimate_zero3_model_states_mem_needs_all_cold(total_params=total, largest_layer_params=largest,
                                                   num_gpus_per_node=per_node, num_nodes=nodes)
    assert "per CPU" in capsys.readouterr().out


def test_trainer_flops_come_from_the_same_accounting():
    """The trainer's MFU numerator: flops_for_trainer on the built model's LlavaConfig, per step."""
    import transformers as T
    from job_fixtures import GOOD
    from vlm_core.spec import parse_job

    v = T.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=8, image_size=32)
    t = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=40)
    cfg = T.LlavaConfig(vision_config=v.to_dict(), text_config=t.to_dict(), vision_feature_select_strategy="full")
    stages = parse_job(GOOD).spec.stages
    align = A.flops_for_trainer(cfg.to_dict(), stages[0])
    instruct = A.flops_for_trainer(cfg.to_dict(), stages[1])
    shape = A.ModelShape.from_configs(v.to_dict(), t.to_dict())
    assert align == A.StageFlops.of(shape, A.stage_input(stages[0]))
    assert align.step_flops(1000, 10) < instruct.step_flops(1000, 10)  # the frozen LM costs 4N, not 6N
    assert instruct.step_flops(1000, 10) == 6 * shape.lm.matmul_params * 1000 + 10 * instruct.per_sequence
    bad = dict(cfg.to_dict(), text_config={"model_type": "gpt2"})
    assert A.flops_for_trainer(bad, stages[0]) is None


def test_stage_input_reads_the_strategy_fields_a_newer_spec_adds():
    """offload, lora, qlora and dpo.reference (issue 8's fields) are read when present, defaulted when not."""
    from types import SimpleNamespace as NS

    from job_fixtures import GOOD
    from vlm_core.spec import DPOSpec, parse_job

    plain = A.stage_input(parse_job(GOOD).spec.stages[2])
    assert (plain.offload, plain.lora_rank, plain.qlora, plain.dpo_reference) == ("none", None, False, "sharded")
    newer = NS(type="dpo", trainable=["language_model"], strategy="zero3", offload="optimizer", precision="bf16",
               batch=NS(micro_size=2), data=NS(max_length=512), gradient_checkpointing=True,
               resources=NS(nodes=2, procs_per_node=8, gpus_per_node=8),
               lora=NS(rank=8, target_modules=["q_proj", "v_proj"]), qlora=False, dpo=DPOSpec(reference="auto"))
    inp = A.stage_input(newer)
    assert (inp.strategy, inp.offload, inp.world_size, inp.lora_rank) == ("zero3", "optimizer", 16, 8)
    assert inp.lora_targets == ("q_proj", "v_proj") and inp.dpo_reference == "adapter_disabled"
    shape, _ = _seven_b()
    est = A.estimate_memory(shape, inp)
    assert "dpo_reference" not in est.components and est.offloaded_bytes > 0


def _tiny_processor(kind: str, size: int, patch: int, select: str):
    """A LlavaProcessor as `model.assemble_vlm` builds one (CLIP: shortest-edge resize + centre crop, one CLS
    token; SigLIP: square resize, none), over a one-word tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>")
    tok.add_tokens(["<image>"], special_tokens=True)
    if kind == "clip":
        ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        ip = SiglipImageProcessorPil(size={"height": size, "width": size})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy=select,
                          image_token="<image>", num_additional_image_tokens=1 if kind == "clip" else 0)


@pytest.mark.parametrize("size", [224, 336, 448])
@pytest.mark.parametrize("kind,select,patch", [("clip", "default", 14), ("siglip", "full", 16),
                                               ("clip", "full", 14), ("siglip", "default", 16)])
def test_the_torch_free_image_token_count_is_the_processors(size, kind, select, patch):
    """Estimate and admission count image tokens from config.json alone (`model_config.tokens_per_image`, through
    `ModelShape.image_tokens` and `model_config.image_token_count`); the trainer takes the processor's own
    count (`family.image_token_counts`). Both agree, on images of any shape."""
    from PIL import Image
    from vlm_core.model_config import image_token_count, vision_facts
    from vlm_core.spec import ModelSpec
    from vlm_trainer import family

    processor = _tiny_processor(kind, size, patch, select)
    images = [Image.new("RGB", (size, size)), Image.new("RGB", (3 * size // 2, size // 2))]
    counts = family.image_token_counts(processor, processor.image_processor(images=images, return_tensors="pt"))
    vision = {"model_type": f"{kind}_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "patch_size": patch, "image_size": size}
    lm = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 100}
    shape = A.ModelShape.from_configs(vision, lm, feature_select=select)
    spec = ModelSpec.model_validate({"visionEncoder": "/v", "languageModel": "/l", "imageSize": size,
                                     "visionFeatureSelectStrategy": select})
    assert counts == [shape.image_tokens] * 2 == [image_token_count(spec, vision_facts(vision))] * 2
    assert counts[0] == (size // patch) ** 2 + (kind == "clip") - (select == "default")


def test_lora_default_targets_have_one_home_the_schema():
    """The estimator's LoRA default is the schema's (`LoRASpec.target_modules`), not a copy of it."""
    from vlm_core.spec import LoRASpec

    assert A.StageInput(lora_rank=8).lora_targets == tuple(LoRASpec().target_modules)
