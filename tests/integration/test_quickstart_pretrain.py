"""Stage 0 of the quickstart: the vision encoder learns shape, the language model learns the text.

Trains the real components briefly on one process (~20 s on 2 cores) and checks what stage 1 needs:
a linear probe reads shape from the features of the dual encoder's image tower (the VLM's vision
encoder) far better than chance (a random encoder carries colour but hardly shape), and the LM's
held-out perplexity falls to near the floor of the documents' randomness.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
from vlm_trainer.quickstart.components import vision_encoder_config
from vlm_trainer.quickstart.dual_encoder import export_vision_tower, train_dual_encoder
from vlm_trainer.quickstart.pretrain import (
    pixel_tensor,
    pretrain_language_model,
    text_perplexity,
    vision_features,
)
from vlm_trainer.quickstart.shapes import make_samples, text_documents
from vlm_trainer.quickstart.vocab import SHAPES


def _shape_probe_accuracy(model: SiglipVisionModel, train, heldout) -> float:
    """Held-out accuracy of a linear probe for shape on the mean-pooled features LLaVA reads."""
    model.eval()
    with torch.no_grad():
        x_train = vision_features(model, pixel_tensor([s.image() for s in train]))
        x_test = vision_features(model, pixel_tensor([s.image() for s in heldout]))
    y_train = torch.tensor([SHAPES.index(s.shape) for s in train])
    y_test = torch.tensor([SHAPES.index(s.shape) for s in heldout])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], len(SHAPES))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(probe(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((probe(x_test).argmax(1) == y_test).float().mean())


def test_contrastive_pretraining_puts_shape_into_the_vision_features(tmp_path):
    torch.set_num_threads(1)
    train = make_samples("train", 1500, seed=1)
    heldout = make_samples("heldout", 300, seed=1)
    result = train_dual_encoder(
        str(tmp_path / "de"), [s.image() for s in train], [s.caption for s in train], seed=1, steps=500
    )
    assert result.loss_last < result.loss_first * 0.6
    pretrained = SiglipVisionModel.from_pretrained(export_vision_tower(str(tmp_path / "de"), str(tmp_path / "ve")))
    torch.manual_seed(1)
    random_init = SiglipVisionModel(vision_encoder_config())
    probe_pretrained = _shape_probe_accuracy(pretrained, train[:1000], heldout)
    probe_random = _shape_probe_accuracy(random_init, train[:1000], heldout)
    # Chance is 1/3; measured 0.90-0.95 pretrained versus 0.50-0.60 random.
    assert probe_pretrained >= 0.80, (probe_pretrained, probe_random)
    assert probe_pretrained >= probe_random + 0.15, (probe_pretrained, probe_random)


def test_language_model_pretraining_drops_heldout_perplexity(tmp_path):
    torch.set_num_threads(1)
    heldout = text_documents(200, seed=1, split="text-heldout")
    result = pretrain_language_model(str(tmp_path / "lm"), seed=1, steps=150, heldout_docs=heldout)
    # Untrained: about the vocabulary size (~36); trained: near the documents' own randomness (~1.5).
    assert result.perplexity_before > 20
    assert result.perplexity_after < 2.0
    # The saved folder is what the trainer loads: the same model, the same perplexity.
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "lm"))
    assert tokenizer.chat_template and tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id
    assert text_perplexity(model, tokenizer, heldout) == pytest.approx(result.perplexity_after, rel=1e-4)
