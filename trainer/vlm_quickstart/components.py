"""Builders for the quickstart's tiny, untrained components: tokenizer, language model, vision encoder.

Pure and seeded: each writes a Hugging Face folder in the formats a real checkpoint has (the data
contract), so the trainer loads them through its real loading code. Stage 0 (`pretrain.py`) then
trains them briefly and saves them in the same formats.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm_quickstart.vocab import COLOURS, SHAPES, WORDS

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]

# Roles user/assistant; `content` is a string or a list of {"type": "image"|"text"} parts (what
# processors pass). Each assistant turn ends with eos so the model learns to stop generating.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def vocabulary(extra_words: tuple[str, ...] = ()) -> list[str]:
    """Every token of the quickstart, specials first (ids 0..4), then the words (`extra_words` last: a
    variant's own words, e.g. the hallucination variant's "yes" / "no", leave every other id as it is)."""
    words = [w for w in dict.fromkeys([*COLOURS, *SHAPES, *WORDS, *extra_words])]
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer(out_dir: str | None = None, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the quickstart vocabulary (plus `extra_words`), with specials and the chat
    template.

    Saved to `out_dir` when given. Whitespace pre-tokenisation splits punctuation ('?', '.', ':')
    into tokens of their own; newlines are whitespace.
    """
    vocab = {tok: i for i, tok in enumerate(vocabulary(extra_words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=256,
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok


def language_model_config(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 128, layers: int = 2, heads: int = 4, mlp: int = 256
) -> LlamaConfig:
    """The tiny Llama's config: tied embeddings, the tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_language_model(
    out_dir: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    mlp: int = 256,
    seed: int = 0,
) -> str:
    """Save an untrained `LlamaForCausalLM` plus the tokenizer to `out_dir`; return `out_dir`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(language_model_config(tokenizer, hidden, layers, heads, mlp))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def vision_encoder_config(
    image_size: int = 32, patch: int = 8, hidden: int = 64, layers: int = 2
) -> SiglipVisionConfig:
    """The tiny SigLIP's config; no attention-pooling head (LLaVA reads patch features only)."""
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_channels=3,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,
    )


def build_image_processor(image_size: int = 32) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_vision_encoder(
    out_dir: str, image_size: int = 32, patch: int = 8, hidden: int = 64, layers: int = 2, seed: int = 0
) -> str:
    """Save an untrained `SiglipVisionModel` plus its image processor to `out_dir`; return `out_dir`."""
    torch.manual_seed(seed)
    model = SiglipVisionModel(vision_encoder_config(image_size, patch, hidden, layers))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    build_image_processor(image_size).save_pretrained(out_dir)
    return out_dir
