"""The one normaliser of shipped record layouts (`vlm_core.records`): LLaVA, ShareGPT(4V), HF messages,
the_cauldron, preference variants -> this project's json layout; bad records named by reason."""

from __future__ import annotations

import json

import pytest
from vlm_core.records import RecordError, embedded_sample, image_ext, member_names, normalise

PNG = b"\x89PNG\r\n\x1a\n" + b"rest"
JPG = b"\xff\xd8\xff\xe0rest"


def _reason(record, index: int = 0) -> str:
    with pytest.raises(RecordError) as err:
        normalise(record, index)
    return err.value.reason


def test_llava_record_maps_roles_and_keeps_the_marker_where_it_was():
    n = normalise({"id": "a1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]}, 0)
    assert n.format == "conversation" and not n.markers_added
    assert n.doc == {"id": "a1", "conversations": [
        {"role": "user", "content": "What is it?\n<image>"}, {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Black."}]}
    assert [r.path for r in n.images] == ["coco/1.jpg"]


def test_a_record_without_a_marker_gets_one_per_image_in_the_first_user_turn():
    n = normalise({"image": ["a.png", "b.png"], "system": "Be brief.", "conversations": [
        {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]}, 7)
    assert n.markers_added
    assert n.doc["id"] == "7"
    assert n.doc["conversations"][0] == {"role": "system", "content": "Be brief."}
    assert n.doc["conversations"][1]["content"] == "<image>\n<image>\nCompare."
    assert [r.path for r in n.images] == ["a.png", "b.png"]


def test_hf_messages_with_image_parts_and_embedded_images_keep_their_order():
    rec = {"images": [{"bytes": PNG, "path": "x.png"}, {"bytes": JPG, "path": None}], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                     {"type": "text", "text": "differ?"}]},
        {"role": "assistant", "content": "yes"}]}
    n = normalise(rec, 3)
    assert n.doc["conversations"][0]["content"] == "<image>\nand\n<image>\ndiffer?"
    assert [r.data for r in n.images] == [PNG, JPG]
    raw = embedded_sample(rec, 3, "3", "file:///d.parquet")
    assert raw["0.png"] == PNG and raw["1.jpg"] == JPG and raw["__key__"] == "3"
    assert json.loads(raw["json"])["conversations"][1] == {"role": "assistant", "content": "yes"}


def test_the_cauldron_texts_become_turns():
    n = normalise({"images": [{"bytes": PNG, "path": None}], "texts": [
        {"user": "Q1", "assistant": "A1", "source": "vqa"}, {"user": "Q2", "assistant": "A2", "source": "vqa"}]}, 0)
    assert [m["content"] for m in n.doc["conversations"]] == ["<image>\nQ1", "A1", "Q2", "A2"]


@pytest.mark.parametrize("record", [
    {"id": "p", "image": "a.png", "prompt": "<image>\nColour?", "chosen": "red", "rejected": "blue"},
    {"id": "p", "image": {"bytes": PNG, "path": None}, "question": "Colour?", "chosen": "red", "rejected": "blue"},
    {"id": "p", "images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\nColour?"}],
     "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"}},
    {"id": "p", "images": ["a.png"],
     "chosen": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
     "rejected": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "blue"}]},
], ids=["prompt", "rlaif-v question", "llama-factory", "hf message lists"])
def test_preference_layouts_give_one_prompt_and_two_answers(record):
    n = normalise(record, 0)
    assert n.format == "preference"
    assert n.doc == {"id": "p", "prompt": "<image>\nColour?", "chosen": "red", "rejected": "blue"}


@pytest.mark.parametrize(("record", "reason"), [
    ({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "no_image"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
     "image_mismatch"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> hi"}]}, "no_assistant_turn"),
    ({"image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}, "missing_field"),
    ({"image": "a.png", "prompt": "q", "chosen": "same", "rejected": " same "}, "identical_pair"),
    ({"image": "a.png", "caption": "just a caption"}, "bad_record"),
    (["not", "an", "object"], "bad_record"),
    ({"image": 5, "conversations": []}, "missing_field"),
])
def test_bad_records_are_named_by_reason(record, reason):
    assert _reason(record) == reason


def test_parquet_rows_become_bad_sample_markers_with_their_reason():
    bad = embedded_sample({"images": [{"bytes": None, "path": "a.png"}], "texts": [{"user": "q", "assistant": "a"}]},
                          4, "4", "s3://b/x.parquet")
    assert bad["__bad__"] == "image_missing" and bad["__url__"] == "s3://b/x.parquet" and "a.png" in bad["__detail__"]


def test_image_bytes_are_named_by_their_magic_number():
    assert image_ext(PNG) == "png" and image_ext(JPG) == "jpg" and image_ext(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert image_ext(b"GIF89a") is None
    assert member_names(["jpg"]) == ["jpg"] and member_names(["jpg", "png"]) == ["0.jpg", "1.png"]
