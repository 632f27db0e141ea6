"""Multi-image samples, interleaved documents and AnyRes: token counts checked against transformers' own
processors and the model's own feature path, on a tiny Llava assembled by the trainer's code path (quickstart
parts: 32px SigLIP tower, patch 8, word-level tokenizer) and converted by the resolution policy."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from vlm_core.spec import ModelSpec, ResolutionSpec, StageSpec
from vlm_quickstart.components import build_language_model, build_tokenizer, build_vision_encoder
from vlm_trainer import family, resolution
from vlm_trainer.model import assemble_vlm, param_groups
from vlm_trainer.samples import IMAGE_TOKEN, SampleEncoder, SampleError, collate

pytestmark = pytest.mark.unit

# (height, width): square, wide, tall, exact canvases, odd sizes, tiny, extreme ratios
SIZES = [(32, 32), (20, 70), (70, 20), (64, 64), (100, 40), (33, 97), (17, 17), (128, 50)]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tok = build_tokenizer()
    spec = ModelSpec(
        visionEncoder=build_vision_encoder(str(root / "vision"), image_size=32, patch=8, hidden=32, layers=2),
        languageModel=build_language_model(str(root / "lm"), tok, hidden=32, layers=1, heads=2, mlp=64),
        imageSize=32, visionFeatureSelectStrategy="full",
    )
    fixed = assemble_vlm(spec, seed=0)
    fixed.model.eval()
    anyres = resolution.apply(fixed, ResolutionSpec(policy="anyres"), seed=0)
    anyres.model.eval()
    return fixed, anyres


def _png(colour: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buf, format="PNG")
    return buf.getvalue()


def _processor_tokens(processor, text: str, images: list[Image.Image]) -> int:
    """What the processor's own __call__ expands the text's markers to."""
    ids = processor(text=text, images=images, return_tensors="pt")["input_ids"]
    return int((ids == processor.image_token_id).sum())


def test_anyres_grid_and_token_counts_equal_the_processor_and_the_model(vlms):
    fixed, anyres = vlms
    model, processor = anyres.model, anyres.processor
    assert family.of_model(model) is family.LLAVA_NEXT and isinstance(processor, family.LLAVA_NEXT.processor_class)
    pinpoints = model.config.image_grid_pinpoints
    assert pinpoints == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    encoder = SampleEncoder(processor, max_length=512)
    grids = set()
    for h, w in SIZES:
        raw = {"__key__": f"{h}x{w}", "png": _png("red", (h, w)), "json": json.dumps({"caption": "red"}).encode()}
        enc = encoder.encode(raw, "caption")
        rows, cols = get_anyres_image_grid_shape((h, w), pinpoints, 32)
        grids.add((rows, cols))
        # the tile grid: the processor's tiles are the global thumbnail + rows x cols, as the model counts them
        assert enc.pixel_values[0].shape[0] == 1 + rows * cols == image_size_to_num_patches((h, w), pinpoints, 32)
        tokens = enc.image_tokens[0]
        assert sum(1 for t in enc.input_ids if t == encoder.image_token_id) == tokens
        assert tokens == _processor_tokens(processor, IMAGE_TOKEN, [Image.new("RGB", (w, h))]), (h, w)
        batch = collate([enc], 0)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
        assert feats.pooler_output[0].shape[0] == tokens, (h, w)
        base = 16  # 32px tile / patch 8 -> 4 x 4, SigLIP ("full": no CLS)
        assert tokens > base if rows * cols > 1 else tokens >= base
    assert len(grids) >= 4  # the sizes really exercise different grids


def test_multi_image_batches_carry_the_processors_image_tokens_and_forward(vlms):
    fixed, anyres = vlms
    conv = {"conversations": [
        {"role": "user", "content": "<image> is red . <image> is blue ?"}, {"role": "assistant", "content": "no"}]}
    for vlm in (fixed, anyres):
        encoder = SampleEncoder(vlm.processor, max_length=1024, max_images=3)
        two = encoder.encode({"__key__": "a", "0.png": _png("red", (40, 90)), "1.png": _png("blue", (64, 64)),
                              "json": json.dumps(conv).encode()}, "conversation")
        doc = {"segments": [{"text": "a red circle ."}, {"image": "1.png"}, {"text": "and"}, {"image": "0.png"},
                            {"text": "a blue square ."}]}
        inter = encoder.encode({"__key__": "b", "0.png": _png("red", (50, 20)), "1.png": _png("blue"),
                                "json": json.dumps(doc).encode()}, "interleaved")
        one = encoder.encode({"__key__": "c", "png": _png("red"), "txt": b"red"}, "caption")
        items = [two, inter, one]
        batch = collate(items, 0)
        assert batch["pixel_values"].shape[0] == 5  # every image of the batch, in sample order
        images = [Image.new("RGB", (90, 40)), Image.new("RGB", (64, 64)), Image.new("RGB", (32, 32)),
                  Image.new("RGB", (20, 50)), Image.new("RGB", (32, 32))]  # inter's segment order: 1.png, 0.png
        assert [t for e in items for t in e.image_tokens] == [
            _processor_tokens(vlm.processor, IMAGE_TOKEN, [im]) for im in images
        ]
        per_row = (batch["input_ids"] == encoder.image_token_id).sum(1).tolist()
        assert per_row == [sum(e.image_tokens) for e in items]
        text = "".join(IMAGE_TOKEN for _ in images)
        assert sum(per_row) == _processor_tokens(vlm.processor, text, images)
        with torch.no_grad():  # the model itself checks image tokens against its features and raises if they differ
            out = vlm.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        assert torch.isfinite(out.logits).all()
        # interleaved: every text token trained, no image token
        trained = [t for t, lab in zip(inter.input_ids, inter.labels, strict=True) if lab != -100]
        assert encoder.image_token_id not in trained
        assert vlm.processor.tokenizer.decode(trained).split()[:3] == ["a", "red", "circle"]
        with pytest.raises(SampleError, match="maxImages") as err:
            encoder.encode({"__key__": "d", **{f"{i}.png": _png("red") for i in range(4)}, "txt": b"red"}, "caption")
        assert err.value.reason == "too_many_images"
        with pytest.raises(SampleError, match="exactly once") as err:
            encoder.encode({"__key__": "e", "0.png": _png("red"), "1.png": _png("red"),
                            "json": json.dumps({"segments": [{"image": "0.png"}]}).encode()}, "interleaved")
        assert err.value.reason == "image_mismatch"


def test_fixed_resolution_raise_interpolates_positions_and_anyres_carries_weights(vlms, tmp_path):
    fixed, anyres = vlms
    bigger = resolution.apply(fixed, ResolutionSpec(policy="fixed", imageSize=64), seed=0)
    assert bigger.model.config.vision_config.image_size == 64 and bigger.model.config.image_seq_length == 64
    encoder = SampleEncoder(bigger.processor, max_length=256)
    enc = encoder.encode({"__key__": "k", "png": _png("red", (20, 90)), "txt": b"red"}, "caption")
    assert enc.pixel_values[0].shape == (3, 64, 64) and enc.image_tokens == [64]
    key = next(k for k in fixed.model.state_dict() if k.endswith("embeddings.position_embedding.weight"))
    old, new = fixed.model.state_dict()[key], bigger.model.state_dict()[key]
    assert new.shape == (64, old.shape[1])
    # an identity resize reproduces the embeddings; the 8x8 grid's mean stays close to the 4x4 one's
    assert torch.allclose(resolution.interpolate_positions(old, 4, 4), old, atol=1e-6)
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.1)
    with torch.no_grad():
        out = bigger.model(**{k: v for k, v in collate([enc], 0).items() if k != "labels"}, use_cache=False)
    assert torch.isfinite(out.logits).all()
    # what the stage's final/ holds loads back at the new size (the next stage starts there)
    saved = tmp_path / "final"
    bigger.model.save_pretrained(saved)
    bigger.processor.save_pretrained(saved)
    reloaded, processor = family.load_model(str(saved)), AutoProcessor.from_pretrained(saved)
    assert reloaded.config.vision_config.image_size == 64 and reloaded.config.image_seq_length == 64
    assert torch.equal(reloaded.state_dict()[key], new)
    assert SampleEncoder(processor, max_length=256).encode(
        {"__key__": "k", "png": _png("red"), "txt": b"red"}, "caption").image_tokens == [64]
    # fixed -> anyres: every weight carried, image_newline new and in the projector's optimizer group
    state, carried = fixed.model.state_dict(), anyres.model.state_dict()
    assert set(carried) - set(state) == {"model.image_newline"}
    assert all(torch.equal(state[k], carried[k]) for k in state)
    hidden = anyres.model.config.text_config.hidden_size
    assert 0.3 < float(carried["model.image_newline"].std()) * hidden**0.5 < 3
    stage = StageSpec.model_validate({"name": "s", "type": "align", "maxSteps": 1,
                                      "data": {"shards": ["x.tar"], "format": "caption"}})
    projector = next(g for g in param_groups(anyres.model, stage) if g["part"] == "projector")
    assert any(p is anyres.model.model.image_newline for p in projector["params"])
    with pytest.raises(resolution.ResolutionError, match="fixed after an anyres"):
        resolution.apply(anyres, ResolutionSpec(policy="fixed"), seed=0)


def test_the_family_rows_answer_for_parts_blocks_and_inputs(vlms):
    """Parts, decoder blocks and extra forward inputs come from the family's row, for both families: every
    parameter belongs to a part (LlavaNext's image_newline to the projector), the blocks are the LM's then
    the vision encoder's, and `image_sizes` reaches the forward pass only where the collator made it."""
    from vlm_trainer.objective import model_inputs

    fixed, anyres = vlms
    for vlm in (fixed, anyres):
        model = vlm.model
        parts = family.parameter_parts(model)
        assert {id(p) for p in model.parameters()} <= set(parts)
        assert parts[id(model.model.multi_modal_projector.linear_1.weight)] == "projector"
        assert parts[id(model.lm_head.weight)] == "language_model"
        assert family.vision_tower(model) is model.model.vision_tower
        blocks = family.decoder_blocks(model)
        tower = model.model.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder
        assert blocks == [*model.model.language_model.layers, *encoder.layers]
        assert family.decoder_block_class_names(model) == [type(blocks[0]).__name__, type(blocks[-1]).__name__]
    assert family.parameter_parts(anyres.model)[id(anyres.model.model.image_newline)] == "projector"
    assert family.tiled_form(family.of_model(fixed.model)) is family.of_model(anyres.model)
    batch = {"input_ids": torch.zeros(1, 2), "pixel_values": torch.zeros(1, 3), "labels": torch.zeros(1, 2)}
    assert set(model_inputs(batch)) == {"input_ids", "pixel_values"}
    assert set(model_inputs({**batch, "image_sizes": torch.zeros(1, 2)})) == {"input_ids", "pixel_values", "image_sizes"}


def test_no_family_branches_outside_the_adapter():
    """Every family difference is a trait in `vlm_trainer.family`'s rows: no other trainer module names a
    family row or branches on one."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "trainer"
    branch = re.compile(r"\bis (?:not )?family\.|\bfamily\.LLAVA(?:_NEXT)?\b|\bLLAVA_NEXT\b|isinstance\([^)]*LlavaNext")
    offenders = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.name != "family.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert offenders == []
