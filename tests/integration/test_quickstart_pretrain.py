"""Stage 0 of the quickstart: the language model learns the text.

Trains the real LM briefly on one process (~20 s on 2 cores) and checks what stage 1 needs: its held-out
perplexity falls to near the floor of the documents' randomness. (The vision side, the dual encoder whose
image tower is the VLM's encoder, is checked on the quickstart's own stage 0 in test_quickstart.py, and
its embeddings in tests/unit/test_curate_embed.py.)
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vlm_quickstart.pretrain import (
    pretrain_language_model,
    text_perplexity,
)
from vlm_quickstart.shapes import text_documents


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
