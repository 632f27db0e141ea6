"""The reward stage kind: the Bradley-Terry loss, last-non-padding-token pooling, the scalar head (freezing, LoRA),
its objective on a tiny Llava, the schema field and the accounting that follows from the kinds row."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from job_fixtures import GOOD
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
from vlm_core import accounting
from vlm_core.kinds import kind
from vlm_core.spec import SpecError, parse_job
from vlm_trainer import reward_model
from vlm_trainer.lora import apply_lora
from vlm_trainer.model import apply_freezing
from vlm_trainer.samples import Encoded, EncodedPair
from vlm_trainer.stages import training_kind
from vlm_trainer.stages.reward import RewardObjective, bradley_terry_loss

pytestmark = pytest.mark.unit

VOCAB, IMAGE_ID, IMAGE_TOKENS = 64, 63, 16


def tiny_llava(*, tied: bool, seed: int = 0) -> LlavaForConditionalGeneration:
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=tied)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
        image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        tie_word_embeddings=tied,
    )).float()


def pair_batch(pairs: int = 2, seq: int = 24) -> dict[str, torch.Tensor]:
    """[chosen_1..chosen_P, rejected_1..rejected_P], right-padded, one image each; chosen rows end in token 5,
    rejected rows in token 6 (so a reward model can tell them apart)."""
    g = torch.Generator().manual_seed(1)
    rows = 2 * pairs
    ids = torch.randint(1, 40, (rows, seq), generator=g)
    ids[:, :IMAGE_TOKENS] = IMAGE_ID
    mask = torch.ones_like(ids)
    for r in range(rows):
        length = seq - (r % 3)
        ids[r, length - 1] = 5 if r < pairs else 6
        ids[r, length:] = 0
        mask[r, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100),
            "pixel_values": torch.randn(rows, 3, 32, 32, generator=g)}


# --- the loss ---------------------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_the_hand_computed_value():
    # r_chosen 1.0, r_rejected -0.5: -log sigmoid(1.5) = log(1 + e^-1.5) = 0.20141327798275246
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([-0.5]))
    assert loss.item() == pytest.approx(0.20141327798275246, abs=1e-7)
    # with margin 1: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.47407698418010663
    with_margin = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([-0.5]), margin=1.0)
    assert with_margin.item() == pytest.approx(0.47407698418010663, abs=1e-7)
    # equal rewards: log 2 without a margin, log(1 + e^m) with one
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).tolist() == pytest.approx([math.log(2.0)] * 3)
    assert bradley_terry_loss(torch.zeros(1), torch.zeros(1), margin=0.5).item() == pytest.approx(math.log1p(math.exp(0.5)))


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(chosen, rejected, margin=0.5).sum().backward()
    # d/dc -log sigmoid(c - r - m) = -(1 - sigmoid(c - r - m)) = -sigmoid(-(0.2 - 0.5))
    expected = 1.0 / (1.0 + math.exp(-0.3))
    assert chosen.grad.item() == pytest.approx(-expected, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(expected, abs=1e-6)


# --- pooling ----------------------------------------------------------------------------------------------


def test_pooling_takes_the_last_non_padding_token_with_right_and_left_padding():
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert reward_model.last_token_index(right).tolist() == [3, 5]
    assert reward_model.pool_last(values, right).tolist() == [3.0, 11.0]
    assert reward_model.last_token_index(left).tolist() == [5, 5]
    assert reward_model.pool_last(values.unsqueeze(-1), left).tolist() == [5.0, 11.0]
    # a generation batch: left-padded prompts, responses of different lengths, then padding
    gen = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert reward_model.pool_last(values, gen).tolist() == [3.0, 10.0]


def test_the_reward_does_not_depend_on_padding_side():
    model = tiny_llava(tied=True)
    reward_model.install_scalar_head(model, torch.randn(1, 32))
    model.eval()
    ids = torch.randint(1, 40, (1, 20))
    ids[:, :IMAGE_TOKENS] = IMAGE_ID
    pixels = torch.randn(1, 3, 32, 32)
    alone = reward_model.sequence_rewards(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                  "pixel_values": pixels})
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    padded_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], 1)
    right = reward_model.sequence_rewards(model, {"input_ids": padded_ids, "attention_mask": padded_mask,
                                                  "pixel_values": pixels})
    assert right.item() == pytest.approx(alone.item(), abs=1e-5)


# --- the head ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_the_scalar_head_replaces_the_lm_head_and_starts_at_zero(tied):
    model = tiny_llava(tied=tied)
    original = model.lm_head.weight.detach().clone()
    head = reward_model.install_scalar_head(model)
    assert model.lm_head is head and tuple(head.weight.shape) == (1, 32) and head.bias is None
    assert torch.count_nonzero(head.weight) == 0
    assert reward_model.head_key(model) == "lm_head.weight"
    if tied:  # the LM head is the embedding: nothing to set aside, the embedding stays
        assert reward_model.original_lm_head(model) is None
        assert torch.equal(model.model.language_model.embed_tokens.weight, original)
    else:
        assert torch.equal(reward_model.original_lm_head(model), original)
    inputs = {k: v for k, v in pair_batch().items() if k != "labels"}
    assert tuple(model(**inputs).logits.shape) == (4, 24, 1)
    assert torch.count_nonzero(reward_model.sequence_rewards(model, inputs)) == 0


def test_the_head_always_trains_even_when_the_language_model_is_frozen():
    model = tiny_llava(tied=True)
    kind_ = training_kind("reward")
    reward_model.install_scalar_head(model)
    always = kind_.always_trained(model)
    assert always == ("lm_head",)
    apply_freezing(model, ["projector"], always=always)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable
    assert any(n.startswith("model.multi_modal_projector") for n in trainable)
    assert not any(n.startswith("model.language_model") for n in trainable)


def test_with_lora_the_head_is_fully_trained_next_to_the_adapters():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][2] = {"name": "rm", "type": "reward", "data": {"shards": ["c.tar"], "format": "preference"},
                                "maxSteps": 5, "lora": {"rank": 4, "targetModules": ["q_proj", "v_proj"]}}
    stage = parse_job(doc).spec.stages[2]
    model = tiny_llava(tied=True)
    reward_model.install_scalar_head(model)
    peft_model = apply_lora(model, stage, torch.device("cpu"), modules_to_save=training_kind("reward").always_trained(model))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in trainable), trainable
    assert any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    assert reward_model.head_key(peft_model) == "lm_head.weight"
    out = peft_model(**{k: v for k, v in pair_batch().items() if k != "labels"})
    assert out.logits.shape[-1] == 1


# --- the objective ----------------------------------------------------------------------------------------


def test_the_objective_starts_at_log2_and_learns_to_rank_the_pairs():
    model = tiny_llava(tied=True)
    reward_model.install_scalar_head(model)
    batch = pair_batch()
    objective = RewardObjective(margin=0.0)
    loss, stats = objective(model, batch)
    assert objective.count(batch) == 2
    assert loss.item() == pytest.approx(2 * math.log(2.0), abs=1e-6)  # a sum over the 2 pairs
    assert stats["reward_accuracy"].item() == 0.0 and stats["reward_margin"].item() == 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        loss, stats = objective(model, batch)
        loss.backward()
        optimizer.step()
    loss, stats = objective(model, batch)
    assert loss.item() < 2 * math.log(2.0) * 0.5
    assert stats["reward_accuracy"].item() == 2.0 and stats["reward_margin"].item() > 0
    assert stats["chosen_reward"].item() > stats["rejected_reward"].item()


def test_the_kind_collates_pairs_and_reports_means_per_pair():
    def enc(n: int) -> Encoded:
        return Encoded(input_ids=list(range(1, n + 1)), labels=[-100] * n, pixel_values=[torch.zeros(3, 4, 4)])

    kind_ = training_kind("reward")
    batch = kind_.collate([EncodedPair(enc(3), enc(4)), EncodedPair(enc(2), enc(5))], 0)
    assert batch["input_ids"].shape == (4, 5) and kind_.sequences_per_sample == 2
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 0]
    assert kind_.eval_statistics({"reward_accuracy": 9.0, "reward_margin": 3.0}, 10.0) == {
        "reward_accuracy": 0.9, "reward_margin": 0.3}


# --- the schema and the row -------------------------------------------------------------------------------


def reward_job(**stage):
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][2] = {"name": "rm", "type": "reward", "data": {"shards": ["c.tar"], "format": "preference"},
                                "maxSteps": 5, **stage}
    return parse_job(doc)


def test_a_reward_stage_takes_its_defaults_from_the_row_and_its_margin_from_its_own_field():
    stage = reward_job().spec.stages[2]
    assert stage.trainable == ["projector", "language_model"] and stage.optimizer.lr == kind("reward").default_lr
    assert stage.reward is not None and stage.reward.margin == 0.0
    assert reward_job(reward={"margin": 0.5}).spec.stages[2].reward.margin == 0.5


@pytest.mark.parametrize(("doc", "message"), [
    ({"reward": {"margin": -1}}, "reward.margin"),
    ({"reward": {"margin": 1000}}, "a reward gap"),
    ({"reward": {"scale": 1}}, "reward.scale"),
    ({"data": {"shards": ["c.tar"], "format": "conversation"}}, "data.format: a reward stage needs 'preference' data"),
    ({"batch": {"tokensPerMicroBatch": 512}}, "batch.tokensPerMicroBatch"),
])
def test_bad_reward_stages_are_refused_naming_the_field(doc, message):
    with pytest.raises(SpecError, match=message):
        reward_job(**doc)


def test_only_a_reward_stage_may_set_reward():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][2]["reward"] = {"margin": 1.0}
    with pytest.raises(SpecError, match="reward: only valid for type reward, this stage is 'dpo'"):
        parse_job(doc)


def test_accounting_counts_pairs_no_reference_and_a_one_output_head():
    shape = accounting.ModelShape.from_llava(tiny_llava(tied=True).config.to_dict())
    dpo = accounting.StageInput(stage_type="dpo", micro_batch=2, seq_len=64, on_gpu=False, precision="fp32")
    reward = accounting.StageInput(stage_type="reward", micro_batch=2, seq_len=64, on_gpu=False, precision="fp32")
    instruct = accounting.StageInput(stage_type="instruct", micro_batch=2, seq_len=64, on_gpu=False, precision="fp32")
    assert reward.sequences_per_sample == 2
    logits = {i.stage_type: accounting.activation_bytes(shape, i)["logits"] for i in (dpo, reward, instruct)}
    assert logits["reward"] * VOCAB == logits["dpo"] == 2 * logits["instruct"]  # one output instead of the vocabulary
    flops = {i.stage_type: accounting.StageFlops.of(shape, i) for i in (dpo, reward, instruct)}
    assert flops["reward"].per_token < flops["instruct"].per_token < flops["dpo"].per_token  # no reference forward
    assert flops["reward"].sequences_per_sample == 2


# --- the loader -------------------------------------------------------------------------------------------


def test_the_loader_refuses_an_uncommitted_folder_and_one_without_a_head(tmp_path):
    from vlm_core import storage
    from vlm_trainer.model import ModelConfigError

    with pytest.raises(ModelConfigError, match=r"reward model file://.*/nothing: "):
        reward_model.RewardModel.load(f"file://{tmp_path}/nothing")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    storage.commit_dir(str(folder), f"file://{tmp_path}/final", step=1, stage="instruct")
    with pytest.raises(ModelConfigError, match="no reward_head.safetensors, so it is not the final/ of a reward stage"):
        reward_model.RewardModel.load(f"file://{tmp_path}/final")


def test_the_head_file_round_trips(tmp_path):
    weight = torch.randn(1, 32)
    reward_model.write_head(str(tmp_path), weight, margin=0.5)
    assert torch.equal(reward_model.read_head(f"file://{tmp_path}"), weight)
    import json

    doc = json.loads((tmp_path / reward_model.HEAD_CONFIG).read_text())
    assert doc["pooling"] == "last_non_padding_token" and doc["hidden_size"] == 32 and doc["margin"] == 0.5
    assert reward_model.read_head(f"file://{tmp_path}/elsewhere") is None
