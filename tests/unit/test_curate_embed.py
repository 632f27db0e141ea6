"""The curate stage's embedding filters over a real, briefly trained dual encoder (the quickstart's SigLIP).

CLIP scores separate matched from mismatched pairs, the keep rules (threshold, DataComp's top
fraction) keep what they say, a linear probe file flags what it was fitted on, and SemDeDup keeps
exactly one sample of each near-identical group, whatever the input order.
"""

from __future__ import annotations

import random

import fsspec
import pytest
import torch
from transformers import CLIPConfig, CLIPModel
from vlm_quickstart.components import build_image_processor, build_tokenizer, build_vision_encoder
from vlm_quickstart.dual_encoder import export_vision_tower, train_dual_encoder
from vlm_quickstart.shapes import make_samples
from vlm_quickstart.vocab import COLOURS, SHAPES, caption_of
from vlm_trainer.curate.embed import (
    EmbedError,
    clip_scores,
    keep_by_clip,
    load_dual_encoder,
    nsfw_flags,
    save_linear_probe,
    semdedup,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dual encoder after a short training (~3 s on a quiet core) and held-out pairs."""
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine ran many times slower
    d = tmp_path_factory.mktemp("dual")
    train = make_samples("train", 600, seed=2)
    result = train_dual_encoder(str(d / "de"), [s.image() for s in train], [s.caption for s in train], seed=2, steps=100)
    heldout = make_samples("heldout", 200, seed=2)
    return {"dir": d / "de", "result": result, "heldout": heldout, "encoder": load_dual_encoder(str(d / "de"))}


def _wrong_caption(rng: random.Random, colour: str, shape: str) -> str:
    """A caption that gets the colour or the shape (or both) wrong."""
    while True:
        c, s = rng.choice(COLOURS), rng.choice(SHAPES)
        if (c, s) != (colour, shape):
            return caption_of(c, s)


def test_scores_separate_matched_from_mismatched_pairs(trained):
    enc, held = trained["encoder"], trained["heldout"]
    images = [s.image() for s in held]
    rng = random.Random(0)
    img, txt = enc.embed(images, [s.caption for s in held])
    _, wrong = enc.embed(images, [_wrong_caption(rng, s.colour, s.shape) for s in held])
    assert img.shape == txt.shape == (len(held), enc.dim)
    assert torch.allclose(img.norm(dim=1), torch.ones(len(held)), atol=1e-5)
    matched, mismatched = clip_scores(img, txt), clip_scores(img, wrong)
    # AUC: the chance that a matched pair outscores a mismatched one (0.5 = no signal).
    auc = float((matched[:, None] > mismatched[None, :]).float().mean())
    assert trained["result"].loss_last < trained["result"].loss_first
    assert auc >= 0.90, auc
    assert float(matched.mean()) > float(mismatched.mean()) + 0.3


def test_embeddings_do_not_depend_on_batch_size(trained):
    held = trained["heldout"][:20]
    enc = trained["encoder"]
    small = load_dual_encoder(str(trained["dir"]), batch_size=3)
    a_img, a_txt = enc.embed([s.image() for s in held], [s.caption for s in held])
    b_img, b_txt = small.embed([s.image() for s in held], [s.caption for s in held])
    assert torch.allclose(a_img, b_img, atol=1e-5) and torch.allclose(a_txt, b_txt, atol=1e-5)


def test_loads_from_an_fsspec_uri_and_rejects_what_is_not_a_dual_encoder(trained, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.put(str(trained["dir"]) + "/", "/h11b-de/", recursive=True)
    remote = load_dual_encoder("memory://h11b-de")
    held = trained["heldout"][:4]
    got = remote.embed([s.image() for s in held], [s.caption for s in held])
    want = trained["encoder"].embed([s.image() for s in held], [s.caption for s in held])
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))
    with pytest.raises(EmbedError, match="nothing at"):
        load_dual_encoder(str(tmp_path / "absent"))
    # An image tower alone (what the VLM is assembled from) is not a dual encoder.
    tower = export_vision_tower(str(trained["dir"]), str(tmp_path / "tower"))
    with pytest.raises(EmbedError, match="SiglipVisionModel.*CLIPModel"):
        load_dual_encoder(tower)
    with pytest.raises(EmbedError, match="3 images but 2 captions"):
        trained["encoder"].embed([held[0].image()] * 3, ["a", "b"])


def test_a_clip_model_loads_and_embeds_too(tmp_path):
    tok = build_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 8, "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    build_image_processor(32).save_pretrained(str(tmp_path))
    enc = load_dual_encoder(str(tmp_path))
    held = make_samples("heldout", 5, seed=0)
    img, txt = enc.embed([s.image() for s in held], [s.caption + " and more words than fit" for s in held])
    assert img.shape == txt.shape == (5, 24) and enc.dim == 24
    assert torch.allclose(txt.norm(dim=1), torch.ones(5), atol=1e-5)


def test_keep_by_clip_threshold_and_top_fraction():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.9, 0.2, 0.5, 0.0, 0.4, 0.6])
    assert keep_by_clip(scores, threshold=0.5).tolist() == [s >= 0.5 for s in scores.tolist()]
    # DataComp's clip_score_*_30_percent: the top 3 of 10; equal scores ranked by position.
    top = keep_by_clip(scores, keep_top_fraction=0.3)
    assert torch.nonzero(top).flatten().tolist() == [1, 4, 9]
    assert int(keep_by_clip(scores, keep_top_fraction=0.25).sum()) == 3  # ceil(2.5)
    both = keep_by_clip(scores, threshold=0.55, keep_top_fraction=0.5)
    assert torch.nonzero(both).flatten().tolist() == [4, 9]
    # DataComp style, a percentile of the pool's scores: 70 -> 0.5 (ties kept), 90 -> 0.63, 0 keeps all
    assert torch.nonzero(keep_by_clip(scores, percentile=70)).flatten().tolist() == [1, 3, 4, 6, 9]
    assert torch.nonzero(keep_by_clip(scores, percentile=90)).flatten().tolist() == [4]
    assert bool(keep_by_clip(scores, percentile=0).all())
    with pytest.raises(EmbedError, match="threshold, keepTopFraction or percentile"):
        keep_by_clip(scores)
    with pytest.raises(EmbedError, match=r"keepTopFraction: must be in \(0, 1\], got 1.5"):
        keep_by_clip(scores, keep_top_fraction=1.5)


def test_nsfw_probe_file_flags_what_it_was_fitted_on(trained, tmp_path):
    """A probe fitted (logistic regression) to flag red images stands in for an unsafe-content probe."""
    enc = trained["encoder"]
    train = make_samples("train", 300, seed=5)
    x = enc.embed_images([s.image() for s in train])
    y = torch.tensor([float(s.colour == "red") for s in train])
    probe = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(200):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    uri = f"file://{tmp_path}/probes/red.safetensors"
    save_linear_probe(uri, probe.weight, float(probe.bias.detach()), concept="red")
    held = trained["heldout"]
    flags = nsfw_flags(enc.embed_images([s.image() for s in held]), uri, threshold=0.5)
    red = torch.tensor([s.colour == "red" for s in held])
    assert float(flags[red].float().mean()) >= 0.9  # recall
    assert float(flags[~red].float().mean()) <= 0.05  # false-positive rate
    assert not nsfw_flags(enc.embed_images([s.image() for s in held]), uri, threshold=1.0).any()
    with pytest.raises(EmbedError, match=r"weight \[32\] and bias \[1\]"):
        nsfw_flags(torch.randn(3, 32), uri, threshold=0.5)
    with pytest.raises(EmbedError, match="no file at"):
        nsfw_flags(x, f"file://{tmp_path}/absent.safetensors", threshold=0.5)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EmbedError, match="not a safetensors file"):
        nsfw_flags(x, str(tmp_path / "junk.safetensors"), threshold=0.5)


def _groups(seed: int) -> tuple[list[str], torch.Tensor, list[list[str]]]:
    """60 distinct directions; 15 of them with 1-3 near-identical copies (cosine > 0.99)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(60, 32, generator=gen), dim=-1)
    keys, rows, groups = [], [], []
    for i in range(60):
        group = [f"s{i:03d}"]
        keys.append(group[0])
        rows.append(base[i])
        for j in range(i % 4 if i < 15 else 0):
            group.append(f"s{i:03d}-copy{j}")
            keys.append(group[-1])
            rows.append(base[i] + 0.01 * torch.randn(32, generator=gen))
        groups.append(group)
    return keys, torch.stack(rows), groups


def test_semdedup_keeps_one_per_near_identical_group_whatever_the_order():
    keys, emb, groups = _groups(seed=0)
    dropped = semdedup(keys, emb, clusters=6, threshold=0.95, seed=0)
    for group in groups:
        kept = [k for k in group if k not in dropped]
        assert kept == [min(group)], (group, kept)  # one kept, the first by key
        assert all(dropped[k] == kept[0] for k in group[1:])
    assert len(dropped) == sum(len(g) - 1 for g in groups)
    # Deterministic: the same answer for another input order and on a re-run.
    perm = list(range(len(keys)))
    random.Random(1).shuffle(perm)
    assert semdedup([keys[i] for i in perm], emb[perm], clusters=6, threshold=0.95, seed=0) == dropped
    assert semdedup(keys, emb, clusters=6, threshold=0.95, seed=0) == dropped
    # The copies' cosine is ~0.998: a threshold above it drops nothing; so does one cluster per sample.
    assert semdedup(keys, emb, clusters=6, threshold=0.99999, seed=0) == {}
    assert semdedup(keys, emb, clusters=len(keys), threshold=0.95, seed=0) == {}
    with pytest.raises(EmbedError, match="keys must be unique"):
        semdedup(["a", "a"], emb[:2], clusters=1, threshold=0.9, seed=0)
    with pytest.raises(EmbedError, match="clusters: must be >= 1"):
        semdedup(keys, emb, clusters=0, threshold=0.9, seed=0)


def test_semdedup_over_real_embeddings_groups_copies_of_one_image(trained, tmp_path):
    enc = trained["encoder"]
    held = trained["heldout"][:40]
    keys = [s.key for s in held] + [f"{s.key}-copy" for s in held[:10]]
    images = [s.image() for s in held] + [s.image() for s in held[:10]]
    emb = enc.embed_images(images)
    dropped = semdedup(keys, emb, clusters=4, threshold=0.99999, seed=3)
    assert {f"{s.key}-copy": s.key for s in held[:10]}.items() <= dropped.items()


def test_the_vlm_vision_encoder_is_the_dual_encoders_image_tower(trained, tmp_path):
    from transformers import SiglipVisionModel

    tower = SiglipVisionModel.from_pretrained(export_vision_tower(str(trained["dir"]), str(tmp_path / "ve")))
    reference = SiglipVisionModel.from_pretrained(build_vision_encoder(str(tmp_path / "untrained")))
    def config(model):
        return {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}

    assert config(tower) == config(reference)  # exactly the VLM's encoder config
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        theirs = trained["encoder"].model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(ours, theirs)
