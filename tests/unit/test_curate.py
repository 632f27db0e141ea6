"""The curate stage's pure parts: the stage-kind union in the spec (and `vlmctl validate` naming the field),
the planner's explicit weights/data inputs, and the text/image checks and global decisions."""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from vlm_core.spec import CurateFiltersSpec, ImageFilterSpec, SpecError, TextFilterSpec, parse_job
from vlm_operator import cli, planner
from vlm_trainer.curate.image import decode, dhash, image_problem, phash, pixel_hash
from vlm_trainer.curate.report import decision_lines, funnel
from vlm_trainer.curate.select import decide
from vlm_trainer.curate.text import detect_script, text_problem

JOB: dict[str, Any] = {
    "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "cur"},
    "spec": {
        "model": {"visionEncoder": "/m/v", "languageModel": "/m/l"},
        "storage": {"uri": "file:///store"},
        "stages": [
            {"name": "pre", "type": "align", "data": {"shards": ["p.tar"], "format": "caption"}, "maxSteps": 2},
            {"name": "curate", "type": "curate", "input": {"shards": ["raw-{000..002}.tar"]}},
            {"name": "align", "type": "align", "data": {"fromStage": "curate", "format": "caption"}, "maxSteps": 2},
        ],
    },
}


def _with(**stage_updates: Any) -> dict[str, Any]:
    doc = copy.deepcopy(JOB)
    for index, update in stage_updates.items():
        doc["spec"]["stages"][int(index[1:])].update(update)
    return doc


def _validate(tmp_path, doc: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        code = cli.main(["validate", str(path)])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_vlmctl_validate_accepts_curate_then_fromstage(tmp_path, capsys):
    code, out = _validate(tmp_path, JOB, capsys)
    assert code == 0, out
    assert "curate (curate) -> align (align)" in out


@pytest.mark.parametrize("doc,field", [
    (_with(s1={"optimizer": {"lr": 0.1}}), "spec.stages[1].optimizer: a curate stage has no training fields"),
    (_with(s1={"maxSteps": 5, "strategy": "ddp"}), "spec.stages[1].maxSteps: a curate stage has no training fields"),
    (_with(s2={"data": {"fromStage": "nope", "format": "caption"}}),
     "spec.stages[2].data.fromStage: 'nope' is not an earlier curate stage (curate stages: 'curate')"),
    (_with(s2={"data": {"fromStage": "pre", "format": "caption"}}), "spec.stages[2].data.fromStage: 'pre'"),
    (_with(s0={"data": {"fromStage": "curate", "format": "caption"}}), "spec.stages[0].data.fromStage: 'curate'"),
    (_with(s2={"data": {"fromStage": "curate", "shards": ["x.tar"], "format": "caption"}}),
     "spec.stages[2].data.shards: set exactly one of data.shards"),
    (_with(s1={"filters": {"clipScore": {"threshold": 0.2}}}), "spec.stages[1].filters.clipScore: needs the stage's encoder"),
    (_with(s1={"filters": {"nearDedup": {"maxDistance": 65}}}), "spec.stages[1].filters.nearDedup.maxDistance"),
    (_with(s1={"input": {"shards": ["raw/part-0.parquet"]}}),  # curate reads tars: told to import Parquet first
     "spec.stages[1].input.shards: a curate stage reads WebDataset tar shards, not Parquet files"),
    (_with(s1={"filters": {"nearDedup": {"hash": "phash"}}}),  # a job file from before `hashes`: told what to write
     "spec.stages[1].filters.nearDedup.hash: replaced by `hashes`, a list"),
    (_with(s1={"filters": {"nearDedup": {"hashes": ["phash", "phash"]}}}),
     "spec.stages[1].filters.nearDedup.hashes: each hash at most once"),
    (_with(s1={"filters": {"nearDedup": {"verify": {"signal": "embedding"}}}}),
     "spec.stages[1].filters.nearDedup.verify.signal: embedding needs the stage's encoder"),
    (_with(s1={"filters": {"nearDedup": {"keep": "clipScore"}}}),
     "spec.stages[1].filters.nearDedup.keep: clipScore needs filters.clipScore"),
    (_with(s1={"filters": {"clipScore": {"percentile": 100}}, "encoder": "/m/enc"}),
     "spec.stages[1].filters.clipScore.percentile"),
    (_with(s1={"filters": {"text": {"languages": ["elvish"]}}}), "spec.stages[1].filters.text.languages: unknown scripts"),
    (_with(s1={"input": {"shards": []}}), "spec.stages[1].input.shards"),
    (_with(s2={"filters": {}}), "spec.stages[2].filters: only valid for type curate, this stage is 'align'"),
])
def test_vlmctl_validate_names_the_field(tmp_path, capsys, doc, field):
    code, out = _validate(tmp_path, doc, capsys)
    assert code == 1
    assert field in out, out


def test_bad_training_field_and_bad_fromstage_are_reported_together():
    doc = _with(s2={"data": {"fromStage": "nope", "format": "caption"}, "batch": {"globalSize": 3}})
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any("data.fromStage" in p for p in err.value.problems)
    assert any("batch.globalSize" in p for p in err.value.problems)


def test_planner_takes_weights_from_the_previous_training_stage_and_data_from_the_curate_stage():
    job = parse_job(JOB)
    curate = planner.resolve_stage(job, 1)
    assert curate.init_from is None  # curation reads no weights
    assert curate.stage.input.shards == [f"file:///store/{s}" for s in ("raw-{000..002}.tar",)]
    align = planner.resolve_stage(job, 2)
    assert align.init_from == "file:///store/cur/pre/final"  # not the curate stage's output
    assert align.stage.data.shards == [f"file:///store/cur/curate/final/curated-{i:06d}.tar" for i in range(3)]
    assert align.stage.data.from_stage is None  # resolved: plain shard URLs
    # the resolved config is a complete, self-contained trainer input
    assert type(align).load(align.dump()).stage.data.shards == align.stage.data.shards


def test_a_consumer_does_not_start_before_the_curated_shards_are_committed():
    job = parse_job(JOB)
    done = planner.StageObservation(phase="Succeeded", committed=True)
    action = planner.plan(job, [done, planner.StageObservation(phase="Succeeded", committed=False, message="no manifest")])
    assert action.kind == "wait" and action.index == 1 and "not committed" in action.reason
    action = planner.plan(job, [done, done])
    assert action.kind == "start" and action.index == 2


@pytest.mark.parametrize("caption,check", [
    ("a red circle", None), ("a small blue square on the left", None), ("Ein roter Kreis", None),
    ("", "missing"), (None, "missing"), ("circle", "word_count"), (" ".join(["w"] * 200), "word_count"),
    ("IMG_0371.jpg", "word_count"), ("see IMG_0371.jpg here", "junk_pattern"), ("click here for more", "junk_pattern"),
    ("Untitled.", "word_count"), ("untitled image", "junk_pattern"), ("visit www.example.com today", "junk_pattern"),
    ("a picture http://x.io/a.png", "junk_pattern"), ("$$$ ### @@@ a", "special_chars"),
    ("a reeeeeed circle", "repeated_chars"), ("красный круг", "language"), ("红色 圆圈", "language"),
])
def test_text_checks(caption, check):
    spec = TextFilterSpec(languages=["latin"])
    assert text_problem(caption, spec) == check


def test_text_checks_switch_off_and_extra_patterns():
    assert text_problem("untitled image", TextFilterSpec.model_validate({"junkPatterns": False})) is None
    assert text_problem("красный круг", TextFilterSpec()) is None  # no allow-list: any script
    assert text_problem("a photo by acme corp", TextFilterSpec.model_validate({"extraPatterns": [r"\bacme\b"]})) == "junk_pattern"
    assert detect_script("Привет world мир") == "cyrillic" and detect_script("123 !!") is None


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_image_checks_and_hashes():
    spec = ImageFilterSpec.model_validate({"minSide": 32, "maxAspectRatio": 3})
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert image_problem(decode(_png(im)), spec) is None
    assert decode(b"not a png") is None and image_problem(decode(_png(im)[:50]), spec) == "image_decode"
    assert image_problem(decode(_png(im.resize((20, 40)))), spec) == "image_size"
    assert image_problem(decode(_png(im.resize((200, 40)))), spec) == "aspect_ratio"
    # exact: same pixels in another encoding hash alike; one changed pixel does not
    again = decode(_png(im))
    assert again is not None and pixel_hash(again) == pixel_hash(im)
    changed = np.asarray(im).copy()
    changed[0, 0] ^= 1
    assert pixel_hash(Image.fromarray(changed)) != pixel_hash(im)
    for h in (phash, dhash):
        assert 0 <= h(im) < 2**64 and h(im) == h(im.resize((96, 72)))  or bin(h(im) ^ h(im.resize((96, 72)))).count("1") <= 4


def _rec(key: str, **kw: Any) -> dict[str, Any]:
    ph = kw.pop("phash", 0)
    return {"key": key, "caption": kw.pop("caption", "a red circle"), "reason": None, "pixel": key,
            "hashes": {"phash": ph, "dhash": ph}, **kw}


def test_decide_keeps_the_first_of_each_group_in_global_order_and_caps_concepts():
    records = [
        _rec("a", pixel="p1", phash=0b1111), _rec("b", pixel="p1", phash=0b1111),  # exact pair
        _rec("c", pixel="p2", phash=0b1111_0000_0000), _rec("d", pixel="p3", phash=0b1111_0000_0011),  # near pair
        _rec("e", pixel="p4", phash=2**63 + 5, reason="text"),
        *[_rec(f"dog{i}", pixel=f"q{i}", phash=(i + 1) * 0x0F0F_0F0F_0000_0000, caption=f"a dog number {i}")
          for i in range(4)],
    ]
    filters = CurateFiltersSpec.model_validate({"balance": {"concepts": ["dog"], "perConceptCap": 2},
                                                "nearDedup": {"maxDistance": 4, "verify": None}})  # hash only
    d = decide(records, filters, concepts=["dog"])
    assert d.reasons == [None, "exact_duplicate", None, "near_duplicate", "text", None, None, "concept_cap", "concept_cap"]
    assert d.duplicate_of == {1: 0, 3: 2}
    doc = funnel(records, d, examples_per_reason=1)
    assert doc["kept"] == 4 and doc["removed"]["concept_cap"] == 2
    assert doc["filters"][4]["examples"]["exact_duplicate"] == [{"key": "b", "caption": "a red circle", "duplicate_of": "a"}]
    assert decision_lines(records, d).splitlines()[1] == '{"key": "b", "kept": false, "reason": "exact_duplicate"}'
    # switched off, nothing is deduplicated or capped
    off = CurateFiltersSpec.model_validate({"exactDedup": {"enabled": False}, "nearDedup": {"enabled": False}})
    assert decide(records, off).reasons.count(None) == 8


def test_semantic_dedup_keeps_the_first_of_a_group_in_global_order_past_position_nine():
    """Positions 2 and 10 are one semantic group: position 2 is kept (as decimal strings, "10" < "2")."""
    import torch

    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(12, 32, generator=gen), dim=-1)
    emb[10] = torch.nn.functional.normalize(emb[2] + 0.001 * torch.randn(32, generator=gen), dim=-1)
    records = [_rec(f"k{i}", pixel=f"p{i}", phash=(2**60 // (i + 1)) * 0b1011_0111) for i in range(12)]
    filters = CurateFiltersSpec.model_validate({"nearDedup": {"enabled": False},
                                                "semanticDedup": {"clusters": 1, "threshold": 0.99}})
    d = decide(records, filters, embeddings=emb)
    assert d.reasons[10] == "semantic_duplicate" and d.reasons.count(None) == 11 and d.duplicate_of == {10: 2}


def test_decide_runs_the_embedding_filters_on_the_global_view():
    import torch

    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    emb[4] = torch.nn.functional.normalize(emb[1] + 0.001 * torch.randn(16, generator=gen), dim=-1)
    scores = [0.9, 0.8, 0.1, 0.7, 0.6, 0.5]
    records = [_rec(f"k{i}", pixel=f"p{i}", phash=(2**60 // (i + 1)) * 0b1011_0111, clip=scores[i], nsfw=(i == 3))
               for i in range(6)]
    filters = CurateFiltersSpec.model_validate({
        "clipScore": {"keepTopFraction": 0.85}, "nsfw": {"probe": "unused"}, "nearDedup": {"enabled": False},
        "semanticDedup": {"clusters": 2, "threshold": 0.99},
    })
    d = decide(records, filters, embeddings=emb)
    # keepTopFraction 0.85 keeps ceil(0.85 x 6) = 6: only the NSFW flag and the semantic duplicate drop
    assert d.reasons == [None, None, None, "nsfw", "semantic_duplicate", None]
    assert d.duplicate_of == {4: 1}
    d = decide(records, filters.model_copy(update={"clip_score": filters.clip_score.model_copy(
        update={"keep_top_fraction": 0.5})}), embeddings=emb)
    # the top half by score (global: all six compete), then NSFW; the semantic pair was already cut
    assert d.reasons == [None, None, "clip_score", "nsfw", "clip_score", "clip_score"]


def test_a_sample_with_json_and_txt_captions_is_filtered_and_trained_on_the_same_caption(tmp_path):
    """Curate reads samples with training's reader and caption rule (json's "caption" before .txt): a sample
    whose json caption is clean and whose txt is junk is kept and trained on the json caption; the reverse
    one is filtered on its json caption, the one training would have trained on."""
    import json
    import tarfile

    from vlm_trainer.curate.runner import Analyser
    from vlm_trainer.data import read_shard
    from vlm_trainer.samples import caption_messages

    rng = np.random.default_rng(0)
    png = _png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    shard = tmp_path / "raw-000.tar"
    samples = {"clean-json": ("a red circle on a white background", "IMG_0371.jpg"),
               "junk-json": ("click here to enlarge", "a blue square on a white background")}
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, (in_json, in_txt) in samples.items():
            for name, payload in ((f"{key}.png", png), (f"{key}.json", json.dumps({"caption": in_json}).encode()),
                                  (f"{key}.txt", in_txt.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    stage = parse_job(_with(s1={"input": {"shards": [str(shard)]}})).spec.stages[1]
    records, _ = Analyser(stage).shard(str(shard))
    assert [(r["key"], r["caption"], r["reason"]) for r in records] == [
        ("clean-json", "a red circle on a white background", None),
        ("junk-json", "click here to enlarge", "text"),
    ]
    trained = [caption_messages(s.raw(str(shard)))[-1]["content"] for s in read_shard(str(shard))]
    assert trained == [r["caption"] for r in records]


def test_vlmctl_curate_calibrate_names_a_stage_that_is_not_a_curate_stage(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    assert cli.main(["curate", "calibrate", str(path), "--stage", "align"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --stage: 'align' is not a curate stage of 'cur' (curate stages: 'curate')"
