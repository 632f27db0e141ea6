"""The worker loader: exact resume with workers, bad samples skipped and counted by reason and shard,
the bad-share rule, deterministic source mixing, and packing = unpacked (loss and gradients)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from vlm_trainer.data import LoaderPosition, mix_order
from vlm_trainer.loader import (
    Source,
    TrainLoader,
    bad_data_message,
    bad_share_exceeded,
    data_report,
    pack_chunk,
    pack_payload,
    to_plain,
    unpack_chunk,
    unpack_payload,
)
from vlm_trainer.objective import CausalLMObjective
from vlm_trainer.packing import block_causal_mask, pack_row
from vlm_trainer.samples import Encoded, EncodedPair, SampleEncoder, collate, collate_pairs

N_IMAGE = 4  # 16x16 image, 8x8 patches, SigLIP (no CLS)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":", "a", "red", "blue", "circle", "square",
         "what", "colour", "is", "it", "?", "and", "shape"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.chat_template = TEMPLATE
    return LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 16, "width": 16}), tokenizer=tok, patch_size=8,
        vision_feature_select_strategy="full", chat_template=TEMPLATE, num_additional_image_tokens=0,
    )


@pytest.fixture(scope="module")
def encoder(processor) -> SampleEncoder:
    return SampleEncoder(processor, N_IMAGE, max_length=24)


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


CAPTIONS = ["a red circle", "a blue square and a red circle", "red", "a blue circle and a red square"]


def _write(path, samples: list[tuple[str, dict | bytes, bytes | None]]) -> str:
    """A shard of (key, json doc or raw json bytes, png bytes or None) samples."""
    with tarfile.open(path, "w") as tar:
        for key, doc, png in samples:
            members = [("json", doc if isinstance(doc, bytes) else json.dumps(doc).encode())]
            if png is not None:
                members.insert(0, ("png", png))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return f"file://{path}"


def _caption_shards(tmp_path, prefix: str, n_shards: int, per_shard: int, bad_every: int = 0) -> list[str]:
    urls = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{s}i{i:03d}"
            bad = bad_every and (s * per_shard + i) % bad_every == bad_every - 1
            samples.append((key, {"caption": CAPTIONS[(s + i) % len(CAPTIONS)]}, b"not an image" if bad else _png()))
        urls.append(_write(tmp_path / f"{prefix}-{s:03d}.tar", samples))
    return urls


def _loader(encoder, sources, *, workers=0, position=None, shuffle_buffer=8, chunk=1, cache=0) -> TrainLoader:
    return TrainLoader(sources, encoder.encode, seed=3, rank=0, world=1, shuffle_buffer=shuffle_buffer,
                       workers=workers, position=position, prefetch_factor=2, chunk=chunk, cache_bytes=cache)


def _batches(loader: TrainLoader, n: int, capacity: int | None = None) -> list[list[str]]:
    out = []
    for _ in range(n):
        loader.next_packed(capacity) if capacity else loader.next_samples(4)
        out.append(list(loader.last_keys))
    return out


@pytest.mark.parametrize("capacity", [None, 64], ids=["padded", "packed"])
def test_resume_with_workers_yields_exactly_the_uninterrupted_batches(tmp_path, encoder, capacity):
    # 2 shards x 10 samples, every 7th image undecodable; 7 batches of 4 cross the epoch boundary.
    # Workers send chunks of 3 (then 2) samples and cache encoded samples: neither changes the order.
    sources = [Source(_caption_shards(tmp_path, "s", 2, 10, bad_every=7), "caption")]
    whole = _loader(encoder, sources, workers=2, chunk=3, cache=1 << 20)
    expected = _batches(whole, 7, capacity)
    whole.close()

    first = _loader(encoder, sources, workers=2, chunk=3)
    got = _batches(first, 3, capacity)
    saved = json.loads(json.dumps(first.position.to_dict()))  # what a checkpoint stores
    first.close()
    assert saved["workers"] == 2 and saved["seen"] > len(sum(got, []))  # bad samples were read and skipped
    resumed = _loader(encoder, sources, workers=1, chunk=2, cache=1 << 20,  # another W and chunk: same order
                      position=LoaderPosition.from_dict(saved))
    got += _batches(resumed, 4, capacity)
    resumed.close()
    assert got == expected
    assert resumed.position.bad == whole.position.bad and resumed.position.seen == whole.position.seen
    assert whole.position.sources[0].epoch == 1  # the epoch boundary was crossed
    in_process = _loader(encoder, sources, workers=0, cache=1 << 20)
    assert _batches(in_process, 7, capacity) == expected  # workers or not: one order
    assert in_process.dataset.cache is not None and in_process.dataset.cache.hits > 0  # epoch 2 came from the cache


@pytest.mark.parametrize("cache", [1 << 20, 1], ids=["cached", "cap-too-small"])
def test_cached_encoding_gives_the_uncached_batches_exactly(tmp_path, encoder, cache):
    """Two epochs of preference pairs (one bad): collated tensors and bad counts equal with and without the cache."""
    colours = ["red", "blue"]
    pairs = [(f"p{i}", {"prompt": "<image> what colour is it ?", "chosen": colours[i % 2], "rejected": colours[1 - i % 2]},
              _png(colours[i % 2])) for i in range(5)]
    pairs[3] = ("p3", {"prompt": "<image> what colour is it ?", "chosen": "red", "rejected": "red"}, _png())
    sources = [Source([_write(tmp_path / "pref.tar", pairs)], "preference")]
    plain, cached = _loader(encoder, sources, shuffle_buffer=0), _loader(encoder, sources, shuffle_buffer=0, cache=cache)
    for _ in range(4):  # 12 good pairs: 15 read in 3 epochs
        a, b = collate_pairs(plain.next_samples(3), 0), collate_pairs(cached.next_samples(3), 0)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert cached.position.bad == plain.position.bad == {"identical_pair": 3}
    store = cached.dataset.cache
    assert store is not None and store.used <= cache
    assert (store.hits, store.misses) == ((10, 5) if cache > 1 else (0, 15))  # bad verdicts are cached too
    blob = pack_payload(encoder.encode({"__key__": "p0", "json": json.dumps(pairs[0][1]).encode(), "png": _png()},
                                       "preference"))
    one = unpack_payload(blob)
    assert len(blob) < 2 * one.chosen.pixel_values[0].numel() * 4  # the pair's shared image travels once


def test_columnar_chunks_give_the_in_process_batches_exactly(tmp_path, encoder):
    """A worker's chunk is one columnar object with the images stacked; micro-batches that are a run of one chunk's
    images are views of it (no copy), others (across a chunk edge or a bad sample) are stacked: all equal the
    in-process batches, over an epoch boundary and cache hits."""
    sources = [Source(_caption_shards(tmp_path, "c", 2, 10, bad_every=7), "caption")]
    here, chunked = _loader(encoder, sources), _loader(encoder, sources, workers=1, chunk=4, cache=1 << 20)
    views = 0
    for _ in range(8):  # 32 good samples of 20 per epoch (3 bad)
        a, items = collate(here.next_samples(4), 0), chunked.next_samples(4)
        b = collate(items, 0)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        views += b["pixel_values"].data_ptr() == items[0].pixel_values[0].data_ptr()
    chunked.close()
    assert 0 < views < 8 and chunked.position.seen == here.position.seen and chunked.position.bad == here.position.bad


def test_chunk_round_trip_stacks_only_uniform_single_samples():
    """Multi-image samples with one image shape share the stacked block; pairs and AnyRes tiles of different counts
    travel per sample; every field comes back equal, bad items included."""
    gen = torch.Generator().manual_seed(0)

    def enc(ids, shapes):
        return Encoded(ids, [-100] + ids[1:], [torch.rand(s, generator=gen) for s in shapes],
                       [(16, 16)] * len(shapes), [4] * len(shapes))

    two, one = enc([1, 2, 3], [(3, 8, 8), (3, 8, 8)]), enc([4, 5], [(3, 8, 8)])
    tiles = [enc([6], [(5, 3, 8, 8)]), enc([7, 8], [(2, 3, 8, 8)])]
    pair = EncodedPair(one, enc([4, 9], [(3, 8, 8)]))
    metas = [(0, 0, 1, "a", "s", None, None), (0, 0, 2, "x", "s", "image_decode", "bad png"), (1, 3, 7, "b", "t", None, None)]
    for payloads, stacked in [([two, None, one], True), ([tiles[0], None, tiles[1]], False), ([pair, None, pair], False)]:
        items = unpack_chunk(pack_chunk(metas, [None if p is None else to_plain(p) for p in payloads]))
        assert [(i.source, i.epoch, i.consumed, i.key, i.shard, i.reason, i.detail) for i in items] == metas
        for item, want in zip(items, payloads, strict=True):
            got = [item.payload] if not isinstance(want, EncodedPair) else [item.payload.chosen, item.payload.rejected]
            wants = [want] if not isinstance(want, EncodedPair) else [want.chosen, want.rejected]
            for g, w in zip(got, wants, strict=True) if want is not None else []:
                assert (g.input_ids, g.labels, g.image_sizes, g.image_tokens) == (w.input_ids, w.labels, w.image_sizes,
                                                                                  w.image_tokens)
                assert all(torch.equal(x, y) for x, y in zip(g.pixel_values, w.pixel_values, strict=True))
        good = [i.payload for i in items if i.payload is not None]
        batch = (collate_pairs if isinstance(good[0], EncodedPair) else collate)(good, 0)
        expected = (collate_pairs if isinstance(good[0], EncodedPair) else collate)([p for p in payloads if p], 0)
        assert all(torch.equal(batch[k], expected[k]) for k in expected) and batch.keys() == expected.keys()
        first = good[0].chosen if isinstance(good[0], EncodedPair) else good[0]
        assert (batch["pixel_values"].data_ptr() == first.pixel_values[0].data_ptr()) == stacked  # a view or a copy


def test_an_old_checkpoint_position_loads_as_one_source():
    old = LoaderPosition.from_dict({"epoch": 2, "consumed": 5})
    assert old.sources[0].epoch == 2 and old.sources[0].consumed == 5 and old.drawn == [5]
    assert LoaderPosition.from_dict(old.to_dict()) == old


BAD_KINDS = [
    ("undecodable image", "caption", ({"caption": "a red circle"}, b"\x89PNG broken"), "image_decode"),
    ("json missing the caption", "caption", ({"text": "a red circle"}, _png()), "missing_field"),
    ("json that does not parse", "caption", (b'{"caption": "a red', _png()), "bad_json"),
    ("no image member", "caption", ({"caption": "a red circle"}, None), "no_image"),
    ("conversation without an assistant turn", "conversation",
     ({"conversations": [{"role": "user", "content": "<image> what colour is it ?"}]}, _png()), "no_assistant_turn"),
    ("longer than maxLength after image expansion", "caption", ({"caption": " ".join(["red"] * 40)}, _png()), "too_long"),
    ("preference with chosen == rejected", "preference",
     ({"prompt": "<image> what colour is it ?", "chosen": "red", "rejected": "red"}, _png()), "identical_pair"),
]
GOOD = {
    "caption": {"caption": "a red circle"},
    "conversation": {"conversations": [{"role": "user", "content": "<image> what colour is it ?"},
                                       {"role": "assistant", "content": "red"}]},
    "preference": {"prompt": "<image> what colour is it ?", "chosen": "red", "rejected": "blue"},
}


@pytest.mark.parametrize(("fmt", "bad", "reason"), [k[1:] for k in BAD_KINDS], ids=[k[0] for k in BAD_KINDS])
def test_each_corrupt_kind_is_skipped_and_counted_with_its_shard(tmp_path, encoder, fmt, bad, reason):
    doc, png = bad
    url = _write(tmp_path / "mixed.tar", [("k0", GOOD[fmt], _png()), ("k1", doc, png), ("k2", GOOD[fmt], _png())])
    loader = _loader(encoder, [Source([url], fmt)], shuffle_buffer=0)
    loader.next_samples(2)
    assert loader.last_keys == ["k0", "k2"]
    assert loader.position.bad == {reason: 1}
    assert loader.position.bad_by_shard == {url: {reason: 1}}
    assert loader.position.seen == 3


@pytest.mark.parametrize(("cut", "keys"), [("inside a member", ["k0", "k1", "k0"]), ("at a member boundary", ["k0", "k0"])])
def test_a_truncated_shard_is_reported_never_silently_shortened(tmp_path, encoder, cut, keys):
    """The sample being read when the data ends is dropped with the shard's tail (it may miss members)."""
    url = _write(tmp_path / "whole.tar", [(f"k{i}", GOOD["caption"], _png()) for i in range(4)])
    data = (tmp_path / "whole.tar").read_bytes()
    member = 512 + 512  # header + one block of json
    png_size = len(_png())
    sample = member + 512 + -(-png_size // 512) * 512  # one whole sample: png member + json member
    keep = 2 * sample + (700 if cut == "inside a member" else 0)
    (tmp_path / "cut.tar").write_bytes(data[:keep])
    cut_url = url.replace("whole.tar", "cut.tar")
    loader = _loader(encoder, [Source([cut_url], "caption")], shuffle_buffer=0)
    loader.next_samples(len(keys))  # the good samples before the cut, the truncation, then the next epoch
    assert loader.last_keys == keys
    assert loader.position.bad == {"truncated_shard": 1}
    assert loader.position.bad_by_shard == {cut_url: {"truncated_shard": 1}}


def test_past_the_bad_share_the_message_names_the_shards(tmp_path, encoder):
    sources = [Source(_caption_shards(tmp_path, "b", 2, 10, bad_every=4), "caption")]
    loader = _loader(encoder, sources, shuffle_buffer=0)
    loader.next_samples(12)
    p = loader.position
    bad = sum(p.bad.values())
    assert bad == 3 and p.seen == 15
    assert not bad_share_exceeded(bad, p.seen, 0.3)  # 20% <= 30%
    assert bad_share_exceeded(bad, p.seen, 0.1)
    assert not bad_share_exceeded(1, 5, 0.1)  # fewer than 1/share samples read: not judged yet
    assert bad_share_exceeded(1, 5, 0.0) and not bad_share_exceeded(0, 5, 0.0)
    message = bad_data_message([p], 0.1)
    assert "3 of 15 samples read were bad" in message and "image_decode: 3" in message
    assert all(url in message for url in sources[0].shards)
    report = data_report([p, LoaderPosition()])
    assert report["bad_samples"] == 3 and report["samples_read"] == 15
    assert sum(r["image_decode"] for r in report["bad_samples_by_shard"].values()) == 3


def test_sources_mix_in_exact_deterministic_ratios_and_resume(tmp_path, encoder):
    choices = list(zip(range(400), mix_order([3.0, 1.0, 0.5], [0, 0, 0]), strict=False))
    counts = Counter()
    for n, (_, c) in enumerate(choices, start=1):
        counts[c] += 1
        for i, share in enumerate((3 / 4.5, 1 / 4.5, 0.5 / 4.5)):
            assert abs(counts[i] - n * share) <= 1  # every prefix within one sample of the ratio
    sources = [Source(_caption_shards(tmp_path, "cap", 1, 6), "caption", 3.0),
               Source(_caption_shards(tmp_path, "qa", 1, 5), "caption", 1.0)]
    loader = _loader(encoder, sources)
    keys = sum(_batches(loader, 10), [])
    realised = Counter(k[:2] for k in keys)
    assert realised == {"ca": 30, "qa": 10}
    again = _loader(encoder, sources)
    head = sum(_batches(again, 4), [])
    resumed = _loader(encoder, sources, position=LoaderPosition.from_dict(again.position.to_dict()))
    assert head + sum(_batches(resumed, 6), []) == keys


def _tiny_llava(processor, attn: str) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config).float()
    model.set_attn_implementation(attn)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss_sum, _ = CausalLMObjective()(model, batch)
    loss = loss_sum / CausalLMObjective.count(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("attn", "mode", "mask_dtype"), [
    ("sdpa", "mask", None), ("eager", "mask", torch.float32), ("sdpa", "position_ids", None),
], ids=["sdpa-bool-4d-mask", "eager-additive-4d-mask", "position-ids-only"])
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(processor, encoder, attn, mode, mask_dtype):
    """Tolerance: 1e-5 relative on the fp32 token-mean loss and on every gradient (atol 1e-6)."""
    colours = ["red", "blue", "green", "white"]
    items = [encoder.encode({"__key__": f"k{i}", "png": _png(colours[i]), "json": json.dumps({"caption": c}).encode()},
                            "caption") for i, c in enumerate(CAPTIONS)]
    assert len({len(e.input_ids) for e in items}) > 1  # mixed lengths: padding would be needed unpacked
    model = _tiny_llava(processor, attn)
    unpacked = collate(items, processor.tokenizer.pad_token_id)
    packed = pack_row(items, mode=mode, mask_dtype=mask_dtype)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in items))
    assert CausalLMObjective.count(packed) == CausalLMObjective.count(unpacked)
    loss_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, grads_p = _loss_and_grads(model, packed)
    assert torch.allclose(loss_p, loss_u, rtol=1e-5, atol=0), (loss_p, loss_u)
    assert grads_u.keys() == grads_p.keys() and grads_u
    for name, g in grads_u.items():
        assert torch.allclose(grads_p[name], g, rtol=1e-5, atol=1e-6), name
    # Without resets/blocks (one causal sequence) the loss differs: the test can fail.
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    leaky.pop("attention_mask", None)
    loss_leaky, _ = _loss_and_grads(model, leaky)
    assert not torch.allclose(loss_leaky, loss_u, rtol=1e-4)


def test_block_causal_mask_separates_samples():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    allowed = block_causal_mask(pos)[0, 0]
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [False, False, False, True, False],
        [False, False, False, True, True],
    ]
    additive = block_causal_mask(pos, torch.float32)[0, 0]
    assert additive[3, 2] == torch.finfo(torch.float32).min and additive[4, 3] == 0
