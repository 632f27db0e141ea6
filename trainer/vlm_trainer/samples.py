"""From one WebDataset sample to model inputs: chat-template rendering, image tokens, label masking, collate.

Images: a sample carries one image member (`<key>.png`, or .jpg/.jpeg/.webp) or numbered ones (`<key>.0.png`,
`<key>.1.png`, ... : WebDataset extensions `0.png`, `1.png`, numbered from 0 without gaps), at most
`data.maxImages`. Each image expands to the number of `<image>` tokens the model's own processor gives it
(`LlavaProcessor`: fixed per size; `LlavaNextProcessor`: per image size, AnyRes tiles), in the order the
images appear in the text; `Encoded.pixel_values` (and `image_sizes`) follow that order.

Formats (see the data contract):
- caption: json `{"caption": ...}` (or, for a sample without a .json member, its `.txt` member) -> user
  `<image>`, assistant `<caption>` (`sample_caption`: the curate stage filters on the same caption);
- conversation: json `{"conversations": [{"role": "user"|"assistant", "content": ...}, ...]}` (LLaVA's
  `{"from": "human"|"gpt", "value": ...}` is accepted too); the i-th `<image>` marker is the i-th image
  (markers must match the images in number); without markers, all images go first into the first user turn;
- interleaved (OBELICS-style documents): json `{"segments": [{"text": "..."}, {"image": "0.png"},
  {"text": "..."}, ...]}`; an image segment names an image member of the same sample by its extension
  (`"png"` for a single image, `"0.png"`, `"1.png"`, ...), each image member is used exactly once. Segments
  are joined with "\n", the tokenizer's BOS goes first and EOS last; every text token (EOS included) is
  trained with next-token loss, image tokens and BOS are not. No chat template is applied;
- preference: json `{"prompt", "chosen", "rejected"}` -> two one-turn conversations sharing the prompt and
  its images.

Label masking: the conversation is rendered once with the tokenizer's chat template. For every assistant
turn i, the text the template adds between `messages[:i]` rendered with `add_generation_prompt=True` and
`messages[:i+1]` rendered without it is that turn's answer (its content plus the template's end-of-turn
marker, so the model learns to stop). Tokens whose characters lie inside an answer span keep their ids
as labels (a token straddling a span's edge, e.g. a BPE token carrying the answer's leading space,
counts as answer); every other token (system/user text, role headers, image tokens, padding) gets -100.

Bad samples raise `SampleError` with a short fixed `reason` (the loader counts skipped samples by it):
- bad_json: the .json member is missing or not valid JSON;
- missing_field: a field the format needs is missing or has the wrong type (caption, conversations,
  segments, prompt/chosen/rejected, a turn's role/content);
- no_assistant_turn: a conversation with nothing to train on;
- no_image: no image member, or one the sample's text names is missing;
- image_decode: an image member PIL cannot decode;
- image_mismatch: `<image>` markers (or image segments) do not match the image members one to one;
- too_many_images: more images than data.maxImages;
- too_long: longer than data.maxLength tokens after image expansion (never cut: a cut through image
  tokens makes the model's feature count disagree with the text, the classic multi-GPU hang);
- identical_pair: a preference pair whose chosen and rejected answers are the same (DPO would train at
  a constant loss of log 2 on it).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
REASONS = (
    "bad_json", "missing_field", "no_assistant_turn", "no_image", "image_decode", "image_mismatch",
    "too_many_images", "too_long", "identical_pair",
)


class SampleError(ValueError):
    """A sample does not match its declared format; the message names the sample key and the field, `reason`
    is one of REASONS (the loader counts skipped samples by it)."""

    def __init__(self, message: str, reason: str = "missing_field"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Encoded:
    """One tokenized sample: ids, labels (-100 where not trained) and its images' pixel values, one tensor per
    image in the order their image tokens appear in `input_ids` (the order Llava merges features in).
    `image_sizes` holds each image's original (height, width), aligned with `pixel_values` (AnyRes needs it);
    `image_tokens` the processor's token count per image."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodedPair:
    """A preference sample: the chosen and the rejected answer to one prompt about its images."""

    chosen: Encoded
    rejected: Encoded


def image_members(raw: dict[str, Any]) -> list[str]:
    """The sample's image members in order: a single `png`/`jpg`/... or numbered `0.png`, `1.png`, ..."""
    key = raw.get("__key__")
    single = [m for m in raw if m.lower() in IMAGE_EXTS]
    numbered: dict[int, str] = {}
    for m in raw:
        head, _, ext = m.rpartition(".")
        if ext.lower() in IMAGE_EXTS and head.isdigit():
            if int(head) in numbered:
                raise SampleError(f"sample {key!r}: image members {numbered[int(head)]!r} and {m!r} share index {head}",
                                  "image_mismatch")
            numbered[int(head)] = m
    if single and numbered or len(single) > 1:
        raise SampleError(
            f"sample {key!r}: image members {sorted(single + list(numbered.values()))} mix unnumbered ones with "
            "others; use one image member (png) or numbered ones (0.png, 1.png, ...)", "image_mismatch"
        )
    if single:
        return single
    order = sorted(numbered)
    if order != list(range(len(order))):
        raise SampleError(f"sample {key!r}: numbered image members must be 0, 1, ... without gaps, got {order}",
                          "image_mismatch")
    return [numbered[i] for i in order]


def open_image(raw: dict[str, Any], member: str) -> Image.Image:
    key = raw.get("__key__")
    if member not in raw:
        raise SampleError(f"sample {key!r}: image member {member!r} is missing; has {_members(raw)}", "no_image")
    try:
        return Image.open(io.BytesIO(raw[member])).convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleError(f"sample {key!r}: image member {member!r} cannot be decoded ({err})", "image_decode") from None


def decode_images(raw: dict[str, Any]) -> list[Image.Image]:
    members = image_members(raw)
    if not members:
        raise SampleError(
            f"sample {raw.get('__key__')!r}: no image member (.png/.jpg/.jpeg/.webp or 0.png, 1.png, ...); "
            f"has {_members(raw)}", "no_image"
        )
    return [open_image(raw, m) for m in members]


def decode_image(raw: dict[str, Any]) -> Image.Image:
    """The sample's first image."""
    return decode_images(raw)[0]


def decode_json(raw: dict[str, Any]) -> dict[str, Any]:
    if "json" not in raw:
        raise SampleError(f"sample {raw.get('__key__')!r}: no .json member; has {_members(raw)}", "bad_json")
    try:
        doc = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"sample {raw.get('__key__')!r}: .json is not valid JSON ({err})", "bad_json") from None
    if not isinstance(doc, dict):
        raise SampleError(f"sample {raw.get('__key__')!r}: .json must be an object, got {type(doc).__name__}",
                          "bad_json")
    return doc


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def sample_caption(raw: dict[str, Any]) -> str:
    """The caption of a sample, the one rule training and curate share: the .json member's "caption" when the
    sample has a .json member, else its .txt member; stripped. Raises SampleError when there is none."""
    if "json" in raw:
        caption = decode_json(raw).get("caption")
    else:
        caption = raw["txt"].decode("utf-8") if "txt" in raw else None
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError(f"sample {raw.get('__key__')!r}: caption format needs a non-empty json 'caption' (or .txt)")
    return caption.strip()


def caption_messages(raw: dict[str, Any], n_images: int = 1) -> list[dict[str, str]]:
    caption = sample_caption(raw)
    return [{"role": "user", "content": "\n".join([IMAGE_TOKEN] * n_images)},
            {"role": "assistant", "content": caption}]


def conversation_messages(raw: dict[str, Any], n_images: int = 1) -> list[dict[str, str]]:
    doc = decode_json(raw)
    turns = doc.get("conversations")
    key = raw.get("__key__")
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"sample {key!r}: conversation format needs a non-empty json 'conversations' list")
    messages = []
    for i, turn in enumerate(turns):
        turn = turn if isinstance(turn, dict) else {}
        role = _ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))))
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise SampleError(
                f"sample {key!r}: conversations[{i}] needs role user|assistant|system (or from human|gpt) "
                f"and string content, got {turns[i]!r}"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError(f"sample {key!r}: conversations has no assistant turn, nothing to train on",
                          "no_assistant_turn")
    return with_image_tokens(messages, key, n_images)


def preference_messages(
    raw: dict[str, Any], n_images: int = 1
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    doc = decode_json(raw)
    key = raw.get("__key__")
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(doc.get(name), str):
            raise SampleError(f"sample {key!r}: preference format needs string json '{name}'")
    if doc["chosen"].strip() == doc["rejected"].strip():
        raise SampleError(f"sample {key!r}: preference 'chosen' and 'rejected' are the same answer", "identical_pair")
    prompt = with_image_tokens([{"role": "user", "content": doc["prompt"]}], key, n_images)
    return (
        prompt + [{"role": "assistant", "content": doc["chosen"]}],
        prompt + [{"role": "assistant", "content": doc["rejected"]}],
    )


def with_image_tokens(messages: list[dict[str, str]], key: Any, n_images: int = 1) -> list[dict[str, str]]:
    """One `<image>` marker per image; without markers all images go before the first user text."""
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if count and count != n_images:
        raise SampleError(
            f"sample {key!r}: {count} {IMAGE_TOKEN} markers but {n_images} image member(s); the i-th marker is "
            "the i-th image (0.png, 1.png, ...)", "image_mismatch"
        )
    if count == 0:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError(f"sample {key!r}: no user turn to attach the image to")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = IMAGE_TOKEN + "\n" + "".join(
            [IMAGE_TOKEN + "\n"] * (n_images - 1)) + messages[first_user]["content"]
    return messages


def with_image_token(messages: list[dict[str, str]], key: Any) -> list[dict[str, str]]:
    """A one-image conversation's markers (kept for callers of the one-image API)."""
    return with_image_tokens(messages, key, 1)


def interleaved_document(raw: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(text pieces, image members in order): pieces alternate text and `<image>` markers, in segment order."""
    doc = decode_json(raw)
    key = raw.get("__key__")
    segments = doc.get("segments")
    if not isinstance(segments, list) or not segments:
        raise SampleError(f"sample {key!r}: interleaved format needs a non-empty json 'segments' list")
    pieces: list[str] = []
    images: list[str] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, dict) and isinstance(seg.get("text"), str) and "image" not in seg:
            if IMAGE_TOKEN in seg["text"]:
                raise SampleError(f"sample {key!r}: segments[{i}].text contains {IMAGE_TOKEN}; use an image segment",
                                  "image_mismatch")
            pieces.append(seg["text"])
        elif isinstance(seg, dict) and isinstance(seg.get("image"), str) and "text" not in seg:
            images.append(seg["image"])
            pieces.append(IMAGE_TOKEN)
        else:
            raise SampleError(
                f"sample {key!r}: segments[{i}] must be {{\"text\": str}} or {{\"image\": \"<member, e.g. 0.png>\"}}, "
                f"got {seg!r}"
            )
    members = image_members(raw)
    if sorted(images) != sorted(members):
        raise SampleError(
            f"sample {key!r}: image segments {images} must name each image member {members} exactly once",
            "image_mismatch" if members else "no_image",
        )
    if not images:
        raise SampleError(f"sample {key!r}: an interleaved document needs at least one image segment", "no_image")
    return pieces, images


class SampleEncoder:
    """Renders conversations with the processor's chat template and masks everything but the answers.

    Image-token counts come from the processor (`replace_image_token`, its own expansion rule);
    `image_token_count` is only used for a processor that has no such rule (a fixed count per image).
    """

    def __init__(self, processor: Any, image_token_count: int | None = None, max_length: int = 256,
                 max_images: int = 8):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.chat_template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.chat_template:
            raise ValueError("the processor's tokenizer has no chat_template; samples cannot be rendered")
        self.image_token_count = image_token_count
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.max_length = max_length
        self.max_images = max_images
        self.counts_by_processor = callable(getattr(processor, "replace_image_token", None))
        if not self.counts_by_processor and image_token_count is None:
            raise ValueError("the processor has no replace_image_token; pass image_token_count")
        if image_token_count is not None and image_token_count >= max_length:
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

    # --- images -----------------------------------------------------------------------------------

    def images(self, raw: dict[str, Any], members: list[str] | None = None) -> list[Image.Image]:
        """The sample's images in order (all image members, or the named ones), bounded by maxImages."""
        key = raw.get("__key__")
        names = image_members(raw) if members is None else members
        if len(names) > self.max_images:
            raise SampleError(f"sample {key!r}: {len(names)} images, stage.data.maxImages is {self.max_images}",
                              "too_many_images")
        if not names:
            raise SampleError(f"sample {key!r}: no image member (.png/.jpg/.jpeg/.webp or 0.png, 1.png, ...); "
                              f"has {_members(raw)}", "no_image")
        return [open_image(raw, m) for m in names]

    def process_images(self, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[int]]:
        """(pixel values per image, original (height, width) per image, `<image>` tokens per image)."""
        inputs = self.image_processor(images=images, return_tensors="pt")
        if self.counts_by_processor:
            from vlm_trainer.family import image_token_counts

            counts = image_token_counts(self.processor, inputs)
        else:
            assert self.image_token_count is not None
            counts = [self.image_token_count] * len(images)
        pixels = [inputs["pixel_values"][i] for i in range(len(images))]
        sizes = [(im.height, im.width) for im in images]
        return pixels, sizes, counts

    @staticmethod
    def expand(texts: list[str], counts: list[int]) -> list[str]:
        """Each `<image>` marker, in order across `texts`, repeated its image's token count."""
        it = iter(counts)
        out = []
        for text in texts:
            parts = text.split(IMAGE_TOKEN)
            out.append(parts[0] + "".join(IMAGE_TOKEN * next(it) + p for p in parts[1:]))
        return out

    def _finish(self, ids: list[int], labels: list[int], pixels: list[torch.Tensor], sizes: list[tuple[int, int]],
                counts: list[int], key: Any) -> Encoded:
        labels = [IGNORE_INDEX if t == self.image_token_id else t for t in labels]
        n_image = sum(1 for t in ids if t == self.image_token_id)
        if n_image != sum(counts):
            raise ValueError(
                f"sample {key!r}: {n_image} image tokens after tokenization, expected {sum(counts)} "
                f"(does the tokenizer keep {IMAGE_TOKEN} as one special token?)"
            )
        if len(ids) > self.max_length:
            raise SampleError(
                f"sample {key!r}: {len(ids)} tokens ({n_image} of them for {len(counts)} image(s)) exceed "
                f"stage.data.maxLength ({self.max_length}); samples are never cut", "too_long"
            )
        return Encoded(ids, labels, pixels, sizes, counts)

    # --- formats ----------------------------------------------------------------------------------

    def tokenize(self, messages: list[dict[str, str]], images: Image.Image | list[Image.Image], key: Any = None,
                 processed: tuple[list[torch.Tensor], list[tuple[int, int]], list[int]] | None = None) -> Encoded:
        """A conversation whose `<image>` markers are `images` in order."""
        if processed is None:
            processed = self.process_images(images if isinstance(images, list) else [images])
        pixels, sizes, counts = processed
        contents = self.expand([m["content"] for m in messages], counts)
        expanded = [{**m, "content": c} for m, c in zip(messages, contents, strict=True)]
        text, spans = self.answer_spans(expanded)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for j, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(start < e and end > s for s, e in spans):
                labels[j] = ids[j]
        return self._finish(ids, labels, pixels, sizes, counts, key)

    def interleaved(self, raw: dict[str, Any]) -> Encoded:
        """An interleaved document: every text token (and EOS) trained, image tokens and BOS not."""
        key = raw.get("__key__")
        pieces, members = interleaved_document(raw)
        pixels, sizes, counts = self.process_images(self.images(raw, members))
        body = "\n".join(self.expand(pieces, counts))
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        ids = list(self.tokenizer(body, add_special_tokens=False)["input_ids"])
        labels = list(ids)
        if bos is not None:
            ids.insert(0, self.tokenizer.convert_tokens_to_ids(bos))
            labels.insert(0, IGNORE_INDEX)
        if eos is not None:
            ids.append(self.tokenizer.convert_tokens_to_ids(eos))
            labels.append(ids[-1])
        return self._finish(ids, labels, pixels, sizes, counts, key)

    def encode(self, raw: dict[str, Any], fmt: str) -> Encoded | EncodedPair:
        """One raw WebDataset sample (dict of member bytes) in format `fmt`."""
        key = raw.get("__key__")
        if fmt == "interleaved":
            return self.interleaved(raw)
        if fmt not in ("caption", "conversation", "preference"):
            raise ValueError(f"stage.data.format: unknown format {fmt!r}")
        images = self.images(raw)
        if fmt == "caption":
            return self.tokenize(caption_messages(raw, len(images)), images, key)
        if fmt == "conversation":
            return self.tokenize(conversation_messages(raw, len(images)), images, key)
        chosen, rejected = preference_messages(raw, len(images))
        processed = self.process_images(images)
        return EncodedPair(self.tokenize(chosen, images, key, processed), self.tokenize(rejected, images, key, processed))


def one_block(pixels: list[torch.Tensor]) -> torch.Tensor | None:
    """`torch.stack(pixels)` without the copy when the images already lie back to back in one storage (a run of
    consecutive images of one loader chunk, `loader.unpack_chunk`): a view of that storage; None otherwise."""
    first = pixels[0]
    if not first.is_contiguous() or first.numel() == 0:
        return None
    step, start, shape, dtype = first.numel() * first.element_size(), first.data_ptr(), first.shape, first.dtype
    for k, p in enumerate(pixels):
        if p.data_ptr() != start + k * step or p.shape != shape or p.dtype != dtype or not p.is_contiguous():
            return None
    if (first.storage_offset() * first.element_size() + len(pixels) * step) > first.untyped_storage().nbytes():
        return None
    return first.as_strided((len(pixels), *shape), (first.numel(), *first.stride()), first.storage_offset())


def stack_images(items: list[Encoded]) -> dict[str, torch.Tensor]:
    """All images of the batch in item order: (N, C, H, W), or for tiles (N, max patches, C, H, W) zero-padded
    plus `image_sizes` (N, 2), which LlavaNext reads to know each image's real tiles."""
    pixels = [p for e in items for p in e.pixel_values]
    if not pixels:
        raise ValueError("collate: the batch has no images")
    if pixels[0].dim() == 3:
        block = one_block(pixels)
        return {"pixel_values": torch.stack(pixels) if block is None else block}
    most = max(p.shape[0] for p in pixels)
    padded = [torch.cat([p, p.new_zeros((most - p.shape[0], *p.shape[1:]))]) if p.shape[0] < most else p for p in pixels]
    sizes = [s for e in items for s in e.image_sizes]
    if len(sizes) != len(pixels):
        raise ValueError(f"collate: {len(pixels)} tiled images but {len(sizes)} image_sizes")
    block = one_block(padded)
    return {"pixel_values": torch.stack(padded) if block is None else block,
            "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def collate(items: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and labels."""
    # Runs on the training process every micro-batch: all rows' ids in one numpy array, scattered through the
    # (row-major) padding mask in one assignment (a row at a time cost ~3 us per row and array).
    lengths = np.fromiter((len(e.input_ids) for e in items), dtype=np.int64, count=len(items))
    width = int(lengths.max())
    mask = np.arange(width) < lengths[:, None]
    total = int(lengths.sum())
    input_ids = np.full((len(items), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
    input_ids[mask] = np.fromiter(chain.from_iterable(e.input_ids for e in items), dtype=np.int64, count=total)
    labels[mask] = np.fromiter(chain.from_iterable(e.labels for e in items), dtype=np.int64, count=total)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
        **stack_images(items),
    }


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen answers first, then rejected ones, in one padded batch of 2 x pairs rows."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)
