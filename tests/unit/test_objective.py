"""The labelled-positions loss equals the full-logits loss (values and gradients), for SFT and DPO."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
from vlm_trainer.objective import CausalLMObjective, labelled_logits, labelled_positions
from vlm_trainer.samples import IGNORE_INDEX
from vlm_trainer.stages.dpo import DPOObjective, sequence_logps, target_logps

pytestmark = pytest.mark.unit

IMAGE_ID, VOCAB, IMAGE_TOKENS = 63, 64, 16


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
        image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )).float()


def mixed_batch(rows: int = 3, seq: int = 30) -> dict[str, torch.Tensor]:
    """Rows of different lengths (right padding), image tokens first, answers at different positions."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, IMAGE_ID - 1, (rows, seq), generator=g)
    ids[:, :IMAGE_TOKENS] = IMAGE_ID
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (answer_start, length) in enumerate([(20, 30), (18, 24), (25, 28)][:rows]):
        mask[r, length:] = 0
        ids[r, length:] = 0
        labels[r, answer_start:length] = ids[r, answer_start:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(rows, 3, 32, 32, generator=g)}


def loss_and_grads(objective: CausalLMObjective | DPOObjective, model: torch.nn.Module,
                   batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and gradients as the loop makes them: the objective's sum over the unit count."""
    model.zero_grad(set_to_none=True)
    loss_sum, _ = objective(model, batch)
    loss = loss_sum / objective.count(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_labelled_positions_keep_only_positions_that_predict_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, 7]])
    assert labelled_positions(labels).tolist() == [1, 2, 3]  # logits at t predict labels[t + 1]
    model, batch = tiny_llava(), mixed_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        logits, targets = labelled_logits(model, inputs, batch["labels"])
        full = model(**inputs, use_cache=False).logits[:, :-1]
    kept = labelled_positions(batch["labels"])
    assert logits.shape[1] == len(kept) < full.shape[1] // 2  # the head ran on the answer span only
    assert torch.allclose(logits, full[:, kept], atol=1e-6)
    assert torch.equal(targets, batch["labels"][:, kept + 1])


def test_labelled_positions_loss_and_gradients_equal_the_full_logits_loss():
    model, batch = tiny_llava(), mixed_batch()
    fast_loss, fast_grads = loss_and_grads(CausalLMObjective(), model, batch)
    full_loss, full_grads = loss_and_grads(CausalLMObjective(labelled_only=False), model, batch)
    assert fast_loss.item() == pytest.approx(full_loss.item(), abs=1e-6)
    assert fast_grads.keys() == full_grads.keys()
    assert {"lm_head.weight", "model.multi_modal_projector.linear_1.weight",
            "model.vision_tower.embeddings.patch_embedding.weight"} <= full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=0), name


def test_dpo_sequence_logps_and_gradients_equal_the_full_logits_ones():
    model, reference, batch = tiny_llava(0), tiny_llava(1), mixed_batch(rows=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        fast = target_logps(*labelled_logits(model, inputs, batch["labels"]))
        full = sequence_logps(model(**inputs, use_cache=False).logits, batch["labels"])
    assert torch.allclose(fast, full, atol=1e-6, rtol=0)

    objective = DPOObjective(reference, beta=0.1)
    fast_loss, fast_grads = loss_and_grads(objective, model, batch)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref = sequence_logps(reference(**inputs, use_cache=False).logits, batch["labels"])
    policy = sequence_logps(model(**inputs, use_cache=False).logits, batch["labels"])
    full_loss = -torch.nn.functional.logsigmoid(0.1 * ((policy[0] - ref[0]) - (policy[1] - ref[1])))  # one pair
    full_loss.backward()
    assert fast_loss.item() == pytest.approx(full_loss.item(), abs=1e-6)
    full_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast_grads.keys() == full_grads.keys() and "lm_head.weight" in full_grads
    for name, grad in full_grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=0), name


def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradients():
    """crossEntropy: chunked (head + CE over chunks of the labelled positions, gradients made per chunk)
    gives the plain head's loss and gradients within 1e-6 (fp32); in no_grad (eval) it returns the loss only."""
    model, batch = tiny_llava(), mixed_batch()
    plain_loss, plain_grads = loss_and_grads(CausalLMObjective(), model, batch)
    chunked = CausalLMObjective(chunked=True, chunk=4)  # several chunks: 17 labelled positions x 3 rows
    chunked_loss, chunked_grads = loss_and_grads(chunked, model, batch)
    assert chunked_loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6, rtol=0), name
    with torch.no_grad():
        assert chunked(model, batch)[0].item() == pytest.approx(CausalLMObjective()(model, batch)[0].item(), abs=1e-5)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():  # outside the objective the head is the plain head again
        assert model(**inputs, use_cache=False).logits.shape == (3, 30, VOCAB)
