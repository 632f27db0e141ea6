"""The quickstart's synthetic data: deterministic, in the contract's formats, labelled right, held-out disjoint."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from vlm_quickstart.components import build_tokenizer
from vlm_quickstart.shapes import read_shards, shard_paths, text_documents, write_shards
from vlm_quickstart.vocab import COLOUR_RGB, COLOURS, SHAPES, caption_of
from vlm_trainer.samples import SampleEncoder


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    train = write_shards(str(d / "a"), "train", 240, seed=3, per_shard=100)
    heldout = write_shards(str(d / "a"), "heldout", 60, seed=3, per_shard=100)
    return str(d), train, heldout


def test_same_seed_gives_byte_identical_shards_and_another_seed_does_not(shards, tmp_path):
    d, train, _ = shards
    again = write_shards(str(tmp_path / "b"), "train", 240, seed=3, per_shard=100)
    other = write_shards(str(tmp_path / "c"), "train", 240, seed=4, per_shard=100)
    assert [os.path.basename(p) for p in again] == [os.path.basename(p) for p in train]
    assert [_sha(p) for p in again] == [_sha(p) for p in train]
    assert _sha(other[0]) != _sha(train[0])


def test_shard_names_and_sizes(shards):
    _, train, heldout = shards
    names = [os.path.basename(p) for p in train]
    assert names == [
        f"train-{fmt}-{i:05d}.tar" for fmt in ("caption", "conversation", "preference") for i in range(3)
    ]
    assert [os.path.basename(p) for p in heldout] == [
        f"heldout-{f}-00000.tar" for f in ("caption", "conversation", "preference")
    ]
    assert len(read_shards(shard_paths(train, "caption"))) == 240
    # WebDataset layout: <key>.png + <key>.json per sample, members of one sample adjacent.
    with tarfile.open(train[0]) as tar:
        members = tar.getnames()
    assert members[:2] == ["train-000000.png", "train-000000.json"]
    assert len(members) == 200


def _dominant_colour(img: Image.Image) -> str:
    px = np.asarray(img, dtype=np.float32).reshape(-1, 3)
    saturated = px[(px.max(1) - px.min(1)) > 80]  # the grey background and its noise are not saturated
    mean = saturated.mean(0)
    return min(COLOURS, key=lambda c: float(np.sum((mean - np.array(COLOUR_RGB[c])) ** 2)))


def test_caption_labels_match_the_pixels(shards):
    _, train, _ = shards
    samples = read_shards(shard_paths(train, "caption"))
    for _key, img, rec in samples:
        assert img.size == (32, 32)
        assert rec["caption"] == caption_of(rec["colour"], rec["shape"])
        assert _dominant_colour(img) == rec["colour"]
    # Every colour and shape occurs.
    assert {r["colour"] for _, _, r in samples} == set(COLOURS)
    assert {r["shape"] for _, _, r in samples} == set(SHAPES)


def test_conversations_mix_captions_with_questions_and_answer_right(shards):
    _, train, _ = shards
    kinds = {"caption": 0, "colour": 0, "shape": 0}
    bare = convs = 0
    for _key, _img, rec in read_shards(shard_paths(train, "conversation")):
        conv = rec["conversations"]
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert conv[0]["content"].startswith("<image>")
        assert sum(t["content"].count("<image>") for t in conv) == 1
        bare += conv[0]["content"] == "<image>"
        convs += 1
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            if "colour" in q["content"]:
                assert a["content"] == rec["colour"]
                kinds["colour"] += 1
            elif "shape" in q["content"]:
                assert a["content"] == rec["shape"]
                kinds["shape"] += 1
            else:
                assert a["content"] == caption_of(rec["colour"], rec["shape"])
                kinds["caption"] += 1
    total = sum(kinds.values())
    assert all(n > total * 0.2 for n in kinds.values()), kinds
    # Some conversations are the caption format itself (the image alone, then the caption).
    assert 0.15 * convs < bare < 0.35 * convs


def test_the_eval_set_asks_colour_and_shape_per_image(tmp_path):
    from vlm_quickstart.shapes import make_samples, write_eval_shard

    samples = make_samples("heldout", 6, seed=2)
    records = read_shards([write_eval_shard(str(tmp_path), samples)])
    assert len(records) == 12
    for (ckey, _i, crec), (skey, _j, srec), s in zip(records[::2], records[1::2], samples, strict=True):
        assert ckey == f"{s.key}-colour" and crec["task"] == "exact_match" and crec["conversations"][1]["content"] == s.colour
        assert skey == f"{s.key}-shape" and srec["conversations"][1]["content"] == s.shape

def test_preferences_reject_a_wrong_colour_or_shape(shards):
    _, train, _ = shards
    wrong = {"colour": 0, "shape": 0}
    for _key, _img, rec in read_shards(shard_paths(train, "preference")):
        assert rec["prompt"] == "<image>" or rec["prompt"].startswith("<image>\n")
        assert rec["chosen"] != rec["rejected"]
        chosen, rejected = rec["chosen"].split(), rec["rejected"].split()
        assert rec["colour"] in chosen or rec["shape"] in chosen
        if len(chosen) == 1:
            assert chosen == [rec["colour"]] or chosen == [rec["shape"]]
        else:
            assert rec["chosen"] == caption_of(rec["colour"], rec["shape"])
        bad_colour = [w for w in rejected if w in COLOURS and w != rec["colour"]]
        bad_shape = [w for w in rejected if w in SHAPES and w != rec["shape"]]
        assert len(bad_colour) + len(bad_shape) == 1, rec
        wrong["colour" if bad_colour else "shape"] += 1
    assert min(wrong.values()) > 0.3 * sum(wrong.values())


def test_heldout_is_disjoint_from_train(shards):
    _, train, heldout = shards
    train_keys = {k for k, _, _ in read_shards(shard_paths(train, "caption"))}
    held = read_shards(shard_paths(heldout, "caption"))
    assert not train_keys & {k for k, _, _ in held}

    def png_hashes(paths):
        out = set()
        for p in paths:
            with tarfile.open(p) as tar:
                out |= {
                    hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                    for m in tar
                    if m.name.endswith(".png")
                }
        return out

    assert not png_hashes(shard_paths(train, "caption")) & png_hashes(shard_paths(heldout, "caption"))
    assert text_documents(20, 3, "text") != text_documents(20, 3, "text-heldout")


def test_every_word_is_in_the_tokenizer_vocabulary(shards):
    _, train, _ = shards
    tok = build_tokenizer()
    texts = text_documents(500, 0)
    for _k, _i, rec in read_shards(shard_paths(train, "conversation")):
        texts += [t["content"] for t in rec["conversations"]]
    for _k, _i, rec in read_shards(shard_paths(train, "preference")):
        texts += [rec["prompt"], rec["chosen"], rec["rejected"]]
    for text in texts:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False).input_ids, text


class _Processor:
    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor, self.chat_template = (
            tokenizer,
            image_processor,
            tokenizer.chat_template,
        )


def test_trainer_encodes_the_shards_with_labels_on_answers_only(shards):
    """The trainer's own sample encoder accepts our formats and trains only the answer tokens."""
    from vlm_quickstart.components import build_image_processor

    _, train, _ = shards
    tok = build_tokenizer()
    enc = SampleEncoder(_Processor(tok, build_image_processor()), image_token_count=16, max_length=96)
    with tarfile.open(shard_paths(train, "conversation")[0]) as tar:
        png = tar.extractfile("train-000000.png").read()
        rec = json.loads(tar.extractfile("train-000000.json").read())
    raw = {"__key__": "train-000000", "png": png, "json": json.dumps(rec).encode()}
    out = enc.encode(raw, "conversation")
    trained = tok.decode([t for t in out.labels if t != -100])
    answers = " </s> ".join(t["content"] for t in rec["conversations"][1::2]) + " </s>"
    assert trained.split() == answers.split()
    assert [p.shape for p in out.pixel_values] == [(3, 32, 32)]
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_raw_set_plants_each_kind_of_noise_behind_opaque_keys(tmp_path):
    from vlm_quickstart.noise import JUNK_CAPTIONS, NOISE_SHARES, write_raw_shards
    from vlm_quickstart.shapes import make_samples

    clean = make_samples("train", 200, seed=4)
    raw = write_raw_shards(str(tmp_path / "a"), clean, seed=4, per_shard=100)
    again = write_raw_shards(str(tmp_path / "b"), clean, seed=4, per_shard=100)
    assert [_sha(p) for p in raw.shards] == [_sha(p) for p in again.shards] and raw.truth == again.truth
    samples = read_shards(raw.shards)
    order = [k for k, _, _ in samples]
    assert order == [f"raw-{i:06d}" for i in range(len(order))] and set(order) == set(raw.truth)
    by_key = {k: (img, rec) for k, img, rec in samples}
    assert all(set(rec) == {"caption"} for _, rec in by_key.values())  # nothing but the content tells
    for kind, share in NOISE_SHARES.items():
        assert len(raw.keys_of(kind)) == round(share * 200), kind
    assert len(raw.keys_of(None)) == 200
    assert {by_key[k][1]["caption"] for k in raw.keys_of("junk_caption")} <= set(JUNK_CAPTIONS)
    assert all(min(by_key[k][0].size) < 32 for k in raw.keys_of("tiny_image"))
    assert all(max(by_key[k][0].size) / min(by_key[k][0].size) == 5 for k in raw.keys_of("extreme_aspect"))
    for group in raw.duplicate_groups():
        original, *copies = group
        assert raw.truth[original]["kind"] is None
        for copy in copies:
            assert order.index(copy) > order.index(original)  # the original comes first
            a, b = (np.asarray(by_key[k][0], dtype=np.int16) for k in (original, copy))
            assert by_key[copy][1] == by_key[original][1]
            if raw.truth[copy]["kind"] == "exact_duplicate":
                assert np.array_equal(a, b)  # the same pixels, in another PNG encoding
            else:
                assert 0 < np.abs(a - b).max() <= 8  # re-edited: brightness shifted
    for k, t in raw.truth.items():
        img, rec = by_key[k]
        assert _dominant_colour(img) == t["image"].split()[1]  # the truth describes the pixels
        assert (rec["caption"] != t["image"]) == (t["kind"] in ("shuffled_caption", "junk_caption"))
