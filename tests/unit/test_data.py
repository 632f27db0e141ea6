"""Label masking (only answer tokens are trained), sample formats, collate, and the resumable shard stream."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from vlm_trainer.data import DataPosition, TrainStream, count_samples, eval_samples
from vlm_trainer.samples import IGNORE_INDEX, SampleEncoder, SampleError, collate, collate_pairs

N_IMAGE = 4  # 16x16 image, 8x8 patches, SigLIP (no CLS)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":", "a", "red", "blue", "circle", "square",
         "what", "colour", "is", "it", "?", "and", "shape"]
SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="full", chat_template=tokenizer.chat_template, num_additional_image_tokens=0,
    )


@pytest.fixture(scope="module")
def word_processor() -> LlavaProcessor:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.chat_template = SIMPLE_TEMPLATE
    return _processor(tok)


@pytest.fixture(scope="module")
def bpe_processor() -> LlavaProcessor:
    """A byte-level BPE tokenizer (the Llama/Qwen family) with a ChatML template."""
    from tokenizers import decoders, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["what colour is it? red", "a red circle and a blue square", "what shape is it? circle"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>")
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.chat_template = CHATML_TEMPLATE
    return _processor(tok)


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _raw(doc: dict, key: str = "k0") -> dict:
    return {"__key__": key, "png": _png(), "json": json.dumps(doc).encode()}


def _trained_text(processor: LlavaProcessor, ids: list[int], labels: list[int]) -> list[str]:
    return [processor.tokenizer.convert_ids_to_tokens(t) for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_caption_trains_only_the_caption_and_end_of_turn(word_processor):
    enc = SampleEncoder(word_processor, N_IMAGE, max_length=64).encode(_raw({"caption": "a red circle"}), "caption")
    tokens = word_processor.tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens.count("<image>") == N_IMAGE
    assert _trained_text(word_processor, enc.input_ids, enc.labels) == ["a", "red", "circle", "</s>"]
    # Everything before the answer (role headers, image tokens, the user's end-of-turn) is masked.
    first_answer = tokens.index("a", tokens.index("assistant"))
    assert all(lab == IGNORE_INDEX for lab in enc.labels[:first_answer])
    assert [p.shape for p in enc.pixel_values] == [(3, 16, 16)]


def test_multi_turn_conversation_trains_every_assistant_turn_and_no_user_turn(word_processor):
    doc = {"conversations": [
        {"role": "user", "content": "<image>\nwhat colour is it ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "what shape is it ?"},
        {"role": "assistant", "content": "a circle"},
    ]}
    enc = SampleEncoder(word_processor, N_IMAGE, max_length=64).encode(_raw(doc), "conversation")
    assert _trained_text(word_processor, enc.input_ids, enc.labels) == ["red", "</s>", "a", "circle", "</s>"]
    assert enc.num_label_tokens == 5


def test_llava_style_turns_and_a_missing_image_marker_put_the_image_first(word_processor):
    doc = {"conversations": [{"from": "human", "value": "what colour is it ?"}, {"from": "gpt", "value": "blue"}]}
    enc = SampleEncoder(word_processor, N_IMAGE, max_length=64).encode(_raw(doc), "conversation")
    tokens = word_processor.tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens[:3] == ["user", ":", "<image>"] and tokens.count("<image>") == N_IMAGE
    assert _trained_text(word_processor, enc.input_ids, enc.labels) == ["blue", "</s>"]


def test_preference_pair_shares_the_prompt_and_trains_only_the_answers(word_processor):
    doc = {"prompt": "<image>\nwhat colour is it ?", "chosen": "red", "rejected": "blue"}
    pair = SampleEncoder(word_processor, N_IMAGE, max_length=64).encode(_raw(doc), "preference")
    assert _trained_text(word_processor, pair.chosen.input_ids, pair.chosen.labels) == ["red", "</s>"]
    assert _trained_text(word_processor, pair.rejected.input_ids, pair.rejected.labels) == ["blue", "</s>"]
    n_prompt = pair.chosen.labels.index(next(t for t in pair.chosen.labels if t != IGNORE_INDEX))
    assert pair.chosen.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]


def test_bpe_chatml_answer_masking_keeps_exactly_the_answer_text(bpe_processor):
    doc = {"conversations": [{"role": "user", "content": "<image>\nwhat colour is it?"},
                             {"role": "assistant", "content": "red circle"}]}
    enc = SampleEncoder(bpe_processor, N_IMAGE, max_length=128).encode(_raw(doc), "conversation")
    trained = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert bpe_processor.tokenizer.decode(trained) == "red circle<|im_end|>\n"
    # The assistant header tokens are prompt, not answer.
    prompt = bpe_processor.tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX])
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_sample_longer_than_max_length_is_never_cut(word_processor):
    doc = {"caption": "a red circle and a blue square"}
    with pytest.raises(ValueError, match="maxLength"):
        SampleEncoder(word_processor, N_IMAGE, max_length=4)
    for max_length in (5, 12):  # through the image tokens, or only through the text: both refused, none cut
        with pytest.raises(SampleError, match="maxLength") as err:
            SampleEncoder(word_processor, N_IMAGE, max_length=max_length).encode(_raw(doc), "caption")
        assert err.value.reason == "too_long"
    enc = SampleEncoder(word_processor, N_IMAGE, max_length=17).encode(_raw(doc), "caption")
    assert len(enc.input_ids) == 17 and enc.image_tokens == [N_IMAGE]


def test_malformed_samples_name_the_key_and_the_field(word_processor):
    encoder = SampleEncoder(word_processor, N_IMAGE, max_length=64)
    with pytest.raises(SampleError, match=r"'k7'.*'caption'"):
        encoder.encode(_raw({"text": "x"}, key="k7"), "caption")
    with pytest.raises(SampleError, match="rejected"):
        encoder.encode(_raw({"prompt": "<image>", "chosen": "red"}), "preference")
    with pytest.raises(SampleError, match="image"):
        encoder.encode({"__key__": "k1", "json": b"{}"}, "caption")
    with pytest.raises(SampleError, match="2 <image>") as mismatch:
        encoder.encode(_raw({"conversations": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "red"}]}), "conversation")
    assert mismatch.value.reason == "image_mismatch"
    cases = [
        ({"__key__": "k2", "png": _png(), "json": b"{not json"}, "caption", "bad_json"),
        (_raw({"conversations": [{"role": "user", "content": "red"}]}), "conversation", "no_assistant_turn"),
        ({"__key__": "k3", "png": b"not a png", "json": b'{"caption": "red"}'}, "caption", "image_decode"),
        ({"__key__": "k4", "json": b'{"caption": "red"}'}, "caption", "no_image"),
        (_raw({"prompt": "what colour", "chosen": "red", "rejected": "red"}), "preference", "identical_pair"),
    ]
    for raw, fmt, reason in cases:
        with pytest.raises(SampleError, match=repr(raw["__key__"])) as err:
            encoder.encode(raw, fmt)
        assert err.value.reason == reason


def test_collate_pads_right_and_masks_padding(word_processor):
    encoder = SampleEncoder(word_processor, N_IMAGE, max_length=64)
    short = encoder.encode(_raw({"caption": "red"}), "caption")
    long = encoder.encode(_raw({"caption": "a red circle and a blue square"}), "caption")
    batch = collate([short, long], pad_token_id=0)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == 0).all()
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    pairs = collate_pairs([encoder.encode(_raw({"prompt": "<image>", "chosen": "red", "rejected": "a blue square"}), "preference")], 0)
    assert pairs["input_ids"].shape[0] == 2  # chosen row first, rejected second
    assert torch.equal(pairs["pixel_values"][0], pairs["pixel_values"][1])


def _write_shards(tmp_path, n_shards: int, per_shard: int) -> list[str]:
    urls = []
    for s in range(n_shards):
        path = tmp_path / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                for ext, data in (("png", _png()), ("json", json.dumps({"caption": f"{s}-{i}"}).encode())):
                    info = tarfile.TarInfo(f"s{s}i{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(f"file://{path}")
    return urls


def _keys(stream, n: int) -> list[str]:
    return [next(stream)["__key__"] for _ in range(n)]


def test_stream_is_deterministic_and_resumes_from_a_recorded_position(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    urls = _write_shards(tmp_path, 3, 10)
    assert count_samples([str(tmp_path / "shard-{000..002}.tar")]) == 30

    def stream(position=None):
        return TrainStream(urls, seed=7, rank=0, world=1, shuffle_buffer=8, position=position)

    first = stream()
    order = _keys(first, 45)  # one and a half epochs
    assert first.position == DataPosition(epoch=1, consumed=15)
    assert sorted(order[:30]) == sorted(set(order[:30])) and len(set(order[:30])) == 30  # an epoch is a permutation
    assert order[30:45] != order[:15]  # the next epoch is reshuffled
    assert _keys(stream(), 45) == order  # same seed, same order
    resumed = stream(DataPosition(epoch=1, consumed=5))
    assert _keys(resumed, 10) == order[35:45]
    with pytest.raises(ValueError, match="consumed"):
        next(stream(DataPosition(epoch=0, consumed=99)))


def test_ranks_split_shards_and_samples_without_overlap(tmp_path, monkeypatch):
    urls = _write_shards(tmp_path, 4, 5)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))  # wds.split_by_node reads torchrun's env
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(_keys(TrainStream(urls, seed=0, rank=rank, world=2, shuffle_buffer=4), 10)))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20
    # Fewer shards than ranks: every rank reads the shard and keeps every other sample.
    one = urls[:1]
    split = [set(_keys(TrainStream(one, seed=0, rank=r, world=2, shuffle_buffer=0), 2)) for r in range(2)]
    assert not split[0] & split[1]
    held_out = [[s["__key__"] for s in eval_samples(urls, rank=r, world=2)] for r in range(2)]
    assert len(held_out[0]) == len(held_out[1]) == 10 and not set(held_out[0]) & set(held_out[1])
