"""From one WebDataset sample to model inputs: chat-template rendering, image tokens, label masking, collate.

Formats (see the data contract):
- caption: json `{"caption": ...}` (or a `.txt` member) -> user `<image>`, assistant `<caption>`;
- conversation: json `{"conversations": [{"role": "user"|"assistant", "content": ...}, ...]}` (LLaVA's
  `{"from": "human"|"gpt", "value": ...}` is accepted too); `<image>` marks the image, else it goes first;
- preference: json `{"prompt", "chosen", "rejected"}` -> two one-turn conversations sharing the prompt.

Label masking: the conversation is rendered once with the tokenizer's chat template. For every assistant
turn i, the text the template adds between `messages[:i]` rendered with `add_generation_prompt=True` and
`messages[:i+1]` rendered without it is that turn's answer (its content plus the template's end-of-turn
marker, so the model learns to stop). Tokens whose characters lie inside an answer span keep their ids
as labels (a token straddling a span's edge, e.g. a BPE token carrying the answer's leading space,
counts as answer); every other token (system/user text, role headers, image tokens, padding) gets -100.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


class SampleError(ValueError):
    """A sample does not match its declared format; the message names the sample key and the field, `reason`
    is a short name the loader counts skipped samples by (missing_field, bad_json, image_decode, ...)."""

    def __init__(self, message: str, reason: str = "invalid_sample"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Encoded:
    """One tokenized sample: ids, labels (-100 where not trained) and its images' pixel values, one tensor per
    image in the order their image tokens appear in `input_ids` (the order Llava merges features in)."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor]

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodedPair:
    """A preference sample: the chosen and the rejected answer to one prompt about one image."""

    chosen: Encoded
    rejected: Encoded


def decode_image(raw: dict[str, Any]) -> Image.Image:
    for ext in _IMAGE_EXTS:
        if ext in raw:
            try:
                return Image.open(io.BytesIO(raw[ext])).convert("RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise SampleError(f"sample {raw.get('__key__')!r}: .{ext} cannot be decoded ({err})", "image_decode") from None
    raise SampleError(
        f"sample {raw.get('__key__')!r}: no image member (.png/.jpg/.jpeg/.webp); has {_members(raw)}", "missing_field"
    )


def decode_json(raw: dict[str, Any]) -> dict[str, Any]:
    if "json" not in raw:
        raise SampleError(f"sample {raw.get('__key__')!r}: no .json member; has {_members(raw)}", "missing_field")
    try:
        doc = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"sample {raw.get('__key__')!r}: .json is not valid JSON ({err})", "bad_json") from None
    if not isinstance(doc, dict):
        raise SampleError(f"sample {raw.get('__key__')!r}: .json must hold an object, got {type(doc).__name__}", "bad_json")
    return doc


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def caption_messages(raw: dict[str, Any]) -> list[dict[str, str]]:
    if "json" in raw:
        doc = decode_json(raw)
        caption = doc.get("caption")
    else:
        caption = raw["txt"].decode("utf-8") if "txt" in raw else None
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError(f"sample {raw.get('__key__')!r}: caption format needs a non-empty json 'caption' (or .txt)", "missing_field")
    return [{"role": "user", "content": IMAGE_TOKEN}, {"role": "assistant", "content": caption.strip()}]


def conversation_messages(raw: dict[str, Any]) -> list[dict[str, str]]:
    doc = decode_json(raw)
    turns = doc.get("conversations")
    key = raw.get("__key__")
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"sample {key!r}: conversation format needs a non-empty json 'conversations' list", "missing_field")
    messages = []
    for i, turn in enumerate(turns):
        role = _ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))))
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise SampleError(
                f"sample {key!r}: conversations[{i}] needs role user|assistant|system (or from human|gpt) "
                f"and string content, got {turn!r}", "missing_field"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError(f"sample {key!r}: conversations has no assistant turn, nothing to train on", "no_assistant_turn")
    return with_image_token(messages, key)


def preference_messages(raw: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    doc = decode_json(raw)
    key = raw.get("__key__")
    for field in ("prompt", "chosen", "rejected"):
        if not isinstance(doc.get(field), str):
            raise SampleError(f"sample {key!r}: preference format needs string json '{field}'", "missing_field")
    if doc["chosen"].strip() == doc["rejected"].strip():
        raise SampleError(f"sample {key!r}: chosen == rejected, the pair carries no preference", "identical_pair")
    prompt = with_image_token([{"role": "user", "content": doc["prompt"]}], key)
    return (
        prompt + [{"role": "assistant", "content": doc["chosen"]}],
        prompt + [{"role": "assistant", "content": doc["rejected"]}],
    )


def with_image_token(messages: list[dict[str, str]], key: Any) -> list[dict[str, str]]:
    """Exactly one `<image>` in the conversation; without one the image goes before the first user text."""
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if count > 1:
        raise SampleError(f"sample {key!r}: {count} {IMAGE_TOKEN} markers, but a sample carries one image", "too_many_images")
    if count == 0:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError(f"sample {key!r}: no user turn to attach the image to", "missing_field")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = f"{IMAGE_TOKEN}\n{messages[first_user]['content']}"
    return messages


class SampleEncoder:
    """Renders conversations with the processor's chat template and masks everything but the answers."""

    def __init__(self, processor: Any, image_token_count: int, max_length: int):
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.chat_template:
            raise ValueError("the processor's tokenizer has no chat_template; samples cannot be rendered")
        self.image_token_count = image_token_count
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.max_length = max_length
        if image_token_count >= max_length:
            raise ValueError(
                f"stage.data.maxLength ({max_length}) must exceed the {image_token_count} image tokens of one image"
            )

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def answer_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of every assistant turn (content + end-of-turn)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not upto.startswith(prefix) or not full.startswith(upto):
                raise ValueError(
                    "the chat template does not render conversations incrementally (the prompt with "
                    "add_generation_prompt=True is not a prefix of the rendered turn); cannot mask labels"
                )
            spans.append((len(prefix), len(upto)))
        return full, spans

    def tokenize(self, messages: list[dict[str, str]], image: Image.Image, key: Any = None) -> Encoded:
        expanded = [
            {**m, "content": m["content"].replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_token_count)} for m in messages
        ]
        text, spans = self.answer_spans(expanded)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for j, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(start < e and end > s for s, e in spans):
                labels[j] = ids[j]
        labels = [IGNORE_INDEX if t == self.image_token_id else t for t in labels]
        n_image = sum(1 for t in ids if t == self.image_token_id)
        if n_image != self.image_token_count:
            raise SampleError(
                f"sample {key!r}: {n_image} image tokens after tokenization, expected {self.image_token_count} "
                f"(does the tokenizer keep {IMAGE_TOKEN} as one special token?)"
            )
        if len(ids) > self.max_length:  # never cut: a cut through image tokens hangs multi-GPU training
            raise SampleError(
                f"sample {key!r}: {len(ids)} tokens after image expansion exceed stage.data.maxLength "
                f"({self.max_length}); skipped (raise maxLength to train on it)", "too_long"
            )
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return Encoded(ids, labels, [pixel_values])

    def encode(self, raw: dict[str, Any], fmt: str) -> Encoded | EncodedPair:
        """One raw WebDataset sample (dict of member bytes) in format `fmt`."""
        key = raw.get("__key__")
        image = decode_image(raw)
        if fmt == "caption":
            return self.tokenize(caption_messages(raw), image, key)
        if fmt == "conversation":
            return self.tokenize(conversation_messages(raw), image, key)
        if fmt == "preference":
            chosen, rejected = preference_messages(raw)
            return EncodedPair(self.tokenize(chosen, image, key), self.tokenize(rejected, image, key))
        raise ValueError(f"stage.data.format: unknown format {fmt!r}")


def collate(items: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and labels."""
    width = max(len(e.input_ids) for e in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.stack([p for e in items for p in e.pixel_values]),
    }


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen answers first, then rejected ones, in one padded batch of 2 x pairs rows."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)
