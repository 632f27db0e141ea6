"""One normaliser of the records VLM data ships in -> this project's sample layout (torch-free, no PIL).

Read by `vlmctl data import` (`vlm_core.dataimport`: JSON/JSONL/Parquet -> WebDataset shards) and by the
trainer's Parquet source (`vlm_trainer.data`: Parquet rows read in place). Both turn a record into the
same raw sample the tar reader yields (`raw_sample`: `json` member + image members by extension), so the
stages' encoders (`vlm_trainer.samples`) read imported shards and Parquet rows alike.

Record layouts recognised (by their keys; the first match wins):
- preference (`chosen` and `rejected`): LLaVA-style preference JSON, RLAIF-V, VLFeedback-style columns,
  LLaMA-Factory's ranking records. The prompt is `prompt` / `question` / `query`, or the user turn(s) of
  `conversations` / `messages`, or the turns of `chosen` before its last assistant turn (HF's
  message-list form). `chosen` / `rejected`: a string, a turn `{from|role, value|content}`, or a list of
  turns (the last assistant turn is the answer). -> json `{"prompt", "chosen", "rejected"}` (format
  preference).
- conversation: `conversations` or `messages` (LLaVA, ShareGPT, ShareGPT4V, LLaVA-OneVision, HF chat
  datasets; turns `{from: human|gpt|system, value}` or `{role, content}`, content a string or HF's list of
  `{type: text, text}` / `{type: image}` parts), or the_cauldron's `texts` (`[{user, assistant}]`).
  -> json `{"conversations": [{"role", "content"}, ...]}` (format conversation). A top-level `system`
  string becomes the first turn.
- images: `image` (one, or a list) or `images` (a list), each a path string (resolved by the importer
  against its image root) or HF's `{bytes, path}` struct (embedded bytes). Order kept.

`<image>` placement: the i-th `<image>` marker is the i-th image (kept where the record put it; HF's
`{type: image}` parts become markers in place). A record with images and no marker gets one marker per
image at the start of its first user turn (LLaVA's convention; counted as `markers_added`). Markers that
do not match the images in number are a bad record (`image_mismatch`). A record without any image is
`no_image` (every training format reads at least one image).

Bad records raise `RecordError` with a short `reason`; the importer's summary and the loader's bad-sample
counters count by it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"  # the marker the trainer's encoders expand (vlm_trainer.samples.IMAGE_TOKEN)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}
REASONS = ("bad_record", "missing_field", "no_assistant_turn", "no_image", "image_mismatch", "identical_pair",
           "image_missing", "image_unreadable")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


class RecordError(ValueError):
    """A record this project cannot train on; `reason` is one of REASONS, the message names the field."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ImageRef:
    """One image of a record: embedded bytes (HF's {bytes, path}) or a path to resolve (LLaVA's image root)."""

    data: bytes | None = None
    path: str | None = None


@dataclass
class Normal:
    """A record in this project's layout: its format, the json member, its images in marker order."""

    format: str  # "conversation" | "preference"
    doc: dict[str, Any]
    images: list[ImageRef] = field(default_factory=list)
    markers_added: bool = False


def record_id(record: Mapping[str, Any], index: int) -> str:
    """The record's own id (for summaries and the json), else its index."""
    for name in ("id", "sample_id", "idx"):
        value = record.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return str(index)


def image_ext(data: bytes) -> str | None:
    """The WebDataset extension of encoded image bytes by their magic number (png, jpg, webp), else None."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _images(record: Mapping[str, Any], rid: str) -> list[ImageRef]:
    value = record.get("images", record.get("image"))
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item:
            out.append(ImageRef(path=item))
        elif isinstance(item, Mapping) and (item.get("bytes") is not None or item.get("path")):
            data = item.get("bytes")
            out.append(ImageRef(data=bytes(data) if data is not None else None, path=item.get("path") or None))
        elif item is None:
            continue
        else:
            raise RecordError(f"record {rid}: image[{i}] must be a path or {{bytes, path}}, got {type(item).__name__}",
                              "missing_field")
    return out


def _content(value: Any, rid: str, where: str) -> str:
    """A turn's content: a string, or HF's list of parts ({type: text, text} / {type: image}) joined by newlines,
    each image part becoming an `<image>` marker in place."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        pieces = []
        for part in value:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                pieces.append(IMAGE_TOKEN)
            elif kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise RecordError(f"record {rid}: {where} content parts must be {{type: text, text}} or "
                                  f"{{type: image}}, got {part!r}"[:300], "missing_field")
        return "\n".join(pieces)
    raise RecordError(f"record {rid}: {where} needs string content, got {type(value).__name__}", "missing_field")


def _turn(turn: Any, rid: str, where: str) -> dict[str, str]:
    if not isinstance(turn, Mapping):
        raise RecordError(f"record {rid}: {where} must be an object {{from, value}} or {{role, content}}", "missing_field")
    role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
    if role is None:
        raise RecordError(f"record {rid}: {where} role must be one of human|gpt|user|assistant|system, got "
                          f"{turn.get('role', turn.get('from'))!r}", "missing_field")
    return {"role": role, "content": _content(turn.get("content", turn.get("value")), rid, where)}


def _turns(value: Any, rid: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"record {rid}: '{name}' must be a non-empty list of turns", "missing_field")
    return [_turn(t, rid, f"{name}[{i}]") for i, t in enumerate(value)]


def _markers(texts: list[str]) -> int:
    return sum(t.count(IMAGE_TOKEN) for t in texts)


def _place_markers(messages: list[dict[str, str]], n_images: int, rid: str) -> tuple[list[dict[str, str]], bool]:
    count = _markers([m["content"] for m in messages])
    if count == n_images:
        return messages, False
    if count:
        raise RecordError(f"record {rid}: {count} {IMAGE_TOKEN} marker(s) but {n_images} image(s); the i-th marker is "
                          "the i-th image", "image_mismatch")
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise RecordError(f"record {rid}: no user turn to place the image in", "missing_field")
    messages = [dict(m) for m in messages]
    messages[first_user]["content"] = (IMAGE_TOKEN + "\n") * n_images + messages[first_user]["content"]
    return messages, True


def _answer(value: Any, rid: str, name: str) -> tuple[list[dict[str, str]], str]:
    """(the turns before the answer, the answer) of a preference side: a string, a turn or a list of turns."""
    if isinstance(value, str):
        return [], value
    turns = _turns(value, rid, name)
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise RecordError(f"record {rid}: '{name}' has no assistant turn", "no_assistant_turn")
    return turns[:last], turns[last]["content"]


def _preference(record: Mapping[str, Any], rid: str, images: list[ImageRef]) -> Normal:
    context, chosen = _answer(record["chosen"], rid, "chosen")
    _, rejected = _answer(record["rejected"], rid, "rejected")
    prompt: Any = next((record[k] for k in ("prompt", "question", "query") if record.get(k) is not None), None)
    if prompt is None:
        turns = record.get("conversations", record.get("messages"))
        prompt = turns if turns is not None else context
    if not isinstance(prompt, str):
        users = [t for t in _turns(prompt, rid, "prompt") if t["role"] == "user"]
        if len(users) != 1:
            raise RecordError(f"record {rid}: a preference prompt must be one user turn, got {len(users)}",
                              "missing_field")
        prompt = users[0]["content"]
    if not chosen.strip() or not rejected.strip():
        raise RecordError(f"record {rid}: 'chosen' and 'rejected' must be non-empty answers", "missing_field")
    if chosen.strip() == rejected.strip():
        raise RecordError(f"record {rid}: 'chosen' and 'rejected' are the same answer", "identical_pair")
    [message], added = _place_markers([{"role": "user", "content": prompt}], len(images), rid)
    return Normal("preference", {"id": rid, "prompt": message["content"], "chosen": chosen, "rejected": rejected},
                  images, added)


def _conversation(record: Mapping[str, Any], rid: str, images: list[ImageRef]) -> Normal:
    if "texts" in record and "conversations" not in record and "messages" not in record:
        texts = record["texts"]
        if not isinstance(texts, list) or not texts:
            raise RecordError(f"record {rid}: 'texts' must be a non-empty list of {{user, assistant}}", "missing_field")
        messages = []
        for i, pair in enumerate(texts):
            if not (isinstance(pair, Mapping) and isinstance(pair.get("user"), str)
                    and isinstance(pair.get("assistant"), str)):
                raise RecordError(f"record {rid}: texts[{i}] needs string 'user' and 'assistant'", "missing_field")
            messages += [{"role": "user", "content": pair["user"]}, {"role": "assistant", "content": pair["assistant"]}]
    else:
        name = "conversations" if "conversations" in record else "messages"
        messages = _turns(record[name], rid, name)
    if isinstance(record.get("system"), str) and record["system"] and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError(f"record {rid}: the conversation has no assistant turn, nothing to train on",
                          "no_assistant_turn")
    messages, added = _place_markers(messages, len(images), rid)
    return Normal("conversation", {"id": rid, "conversations": messages}, images, added)


def normalise(record: Any, index: int) -> Normal:
    """The record (a JSON object or a Parquet row as a dict) in this project's layout; RecordError if unusable."""
    if not isinstance(record, Mapping):
        raise RecordError(f"record {index}: must be an object, got {type(record).__name__}", "bad_record")
    rid = record_id(record, index)
    images = _images(record, rid)
    preference = "chosen" in record and "rejected" in record
    if not preference and not any(k in record for k in ("conversations", "messages", "texts")):
        raise RecordError(f"record {rid}: no conversations/messages/texts or chosen/rejected; has "
                          f"{sorted(record)[:12]}", "bad_record")
    if not images:
        raise RecordError(f"record {rid}: no image (image/images): a text-only record", "no_image")
    return _preference(record, rid, images) if preference else _conversation(record, rid, images)


def member_names(exts: list[str]) -> list[str]:
    """WebDataset member extensions of a sample's images in order: `jpg` for one, `0.jpg`, `1.png`, ... for several."""
    return [exts[0]] if len(exts) == 1 else [f"{i}.{ext}" for i, ext in enumerate(exts)]


def raw_sample(normal: Normal, images: list[bytes], exts: list[str], key: str, url: str) -> dict[str, Any]:
    """The sample as the tar reader yields it (`vlm_trainer.data.TarSample.raw`): member bytes by extension."""
    out: dict[str, Any] = {"__key__": key, "__url__": url,
                           "json": json.dumps(normal.doc, ensure_ascii=False, sort_keys=True).encode()}
    for name, data in zip(member_names(exts), images, strict=True):
        out[name] = data
    return out


def embedded_sample(record: Any, index: int, key: str, url: str) -> dict[str, Any]:
    """A record whose images are embedded (a Parquet row) as a raw sample, or the loader's bad-sample marker
    (`{"__bad__": reason, ...}`) naming why not. The image bytes are not decoded here (the encoder does it)."""
    try:
        normal = normalise(record, index)
        datas, exts = [], []
        for i, ref in enumerate(normal.images):
            if ref.data is None:
                raise RecordError(f"record {record_id(record, index)}: image[{i}] has no embedded bytes (path "
                                  f"{ref.path!r} only)", "image_missing")
            datas.append(ref.data)
            exts.append(image_ext(ref.data) or "png")  # unknown bytes: the encoder says image_decode
        return raw_sample(normal, datas, exts, key, url)
    except RecordError as err:
        return {"__bad__": err.reason, "__url__": url, "__key__": key, "__detail__": str(err)}
