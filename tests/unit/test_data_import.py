"""`vlmctl data import` in process (`vlm_core.dataimport`): each shipped format converts, the summary counts
what was planted, every written sample decodes and encodes with the trainer's own reader and encoder, the
shards do not depend on the worker count, a re-run keeps the committed shards, --dry-run writes nothing."""

from __future__ import annotations

import json
import os

import pytest
from import_fixtures import (
    llava_dataset,
    parquet_rows,
    preference_file,
    rlaif_parquet,
    sharegpt4v_file,
    write_parquet,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from vlm_core import dataimport, storage
from vlm_core.dataimport import ImportProblem, ImportSettings, run_import
from vlm_operator.cli import main as vlmctl
from vlm_trainer.data import count_samples, read_shard
from vlm_trainer.samples import EncodedPair, SampleEncoder

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def encoder() -> SampleEncoder:
    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system", ":", "it", "is", "what", "colour"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.chat_template = TEMPLATE
    processor = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 16, "width": 16}), tokenizer=tok,
                               patch_size=8, vision_feature_select_strategy="full", chat_template=TEMPLATE,
                               num_additional_image_tokens=0)
    return SampleEncoder(processor, 4, max_length=128)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    path, images, expected = llava_dataset(root)
    out = root / "out"
    summary = run_import(ImportSettings([str(path)], f"file://{out}", image_root=str(images), shard_bytes=100_000,
                                        workers=2))
    return {"root": root, "json": path, "images": images, "expected": expected, "out": out, "summary": summary}


def _shards(out) -> list[str]:
    return [f"file://{out}/{f['path']}" for f in storage.read_manifest(f"file://{out}")["files"]]


def _samples(out) -> list[dict]:
    return [s.raw(url) for url in _shards(out) for s in read_shard(url)]


def test_llava_json_summary_counts_what_was_planted(llava):
    s, exp = llava["summary"], llava["expected"]
    assert (s.records, s.samples, s.markers_added, s.format) == (exp["records"], exp["samples"], 1, "conversation")
    assert s.skipped == exp["skipped"]
    assert s.skipped_ids == exp["skipped_ids"]
    assert s.shards > 1  # 100 kB shards
    text = dataimport.render(s)
    assert "image_missing: 3 (first: rec-5, rec-17, rec-300)" in text and "image_unreadable: 1 (first: rec-42)" in text
    assert "data.format: conversation" in text
    assert count_samples(_shards(llava["out"])) == exp["samples"]


def test_every_imported_sample_decodes_and_encodes_with_the_trainers_reader(llava, encoder):
    raws = _samples(llava["out"])
    assert len(raws) == llava["expected"]["samples"]
    by_id = {}
    for raw in raws:
        enc = encoder.encode(raw, "conversation")
        assert enc.num_label_tokens > 0
        by_id[json.loads(raw["json"])["id"]] = (raw, enc)
    multi, enc = by_id[llava["expected"]["multi_image"]]
    assert {"0.png", "1.jpg"} <= multi.keys() and len(enc.pixel_values) == 2  # several images, in order
    no_marker, _ = by_id[llava["expected"]["no_marker"]]
    assert json.loads(no_marker["json"])["conversations"][0]["content"].startswith("<image>\n")
    keys = [raw["__key__"] for raw in raws]
    assert keys == sorted(keys)  # input order kept


def test_shards_are_the_same_whatever_the_worker_count(llava, tmp_path):
    run_import(ImportSettings([str(llava["json"])], str(tmp_path / "w0"), image_root=str(llava["images"]),
                              shard_bytes=100_000, workers=0))
    mine = storage.read_manifest(str(tmp_path / "w0"))["files"]
    theirs = storage.read_manifest(f"file://{llava['out']}")["files"]
    assert [(f["path"], f["sha256"]) for f in mine] == [(f["path"], f["sha256"]) for f in theirs]


def test_a_rerun_keeps_committed_shards_and_finishes_the_rest(llava, tmp_path):
    out = tmp_path / "resume"
    settings = ImportSettings([str(llava["json"])], str(out), image_root=str(llava["images"]), shard_bytes=100_000,
                              workers=0)
    first = run_import(settings)
    files = sorted(p.name for p in out.glob("shard-*.tar"))
    # A crash after shard 1: later shards and their states gone, the manifest not yet written.
    for name in files[2:]:
        os.remove(out / name)
        os.remove(out / ".import" / name.replace(".tar", ".json"))
    os.remove(out / "manifest.json")
    kept = {n: (out / n).stat().st_mtime_ns for n in files[:2]}
    again = run_import(settings)
    assert again.shards_kept == 2 and again.shards == first.shards
    assert {n: (out / n).stat().st_mtime_ns for n in files[:2]} == kept  # not rewritten
    assert (again.samples, again.skipped, again.skipped_ids) == (first.samples, first.skipped, first.skipped_ids)
    assert storage.verify_committed(str(out), check_sha256=True).ok
    # Same inputs, another shard size: refused, naming the option to change.
    with pytest.raises(ImportProblem, match="--output: .* holds shards of another import"):
        run_import(ImportSettings(settings.inputs, str(out), image_root=settings.image_root, shard_bytes=200_000))


def test_dry_run_checks_everything_and_writes_nothing(llava, tmp_path, capsys):
    out = tmp_path / "dry"
    rc = vlmctl(["data", "import", str(llava["json"]), "--output", str(out), "--image-root", str(llava["images"]),
                 "--dry-run", "--workers", "0"])
    assert rc == 0 and not out.exists()
    text = capsys.readouterr().out
    assert f"would write {llava['expected']['samples']} conversation samples" in text and "image_missing: 3" in text


def test_sharegpt4v_preference_and_parquet_inputs_convert(llava, encoder, tmp_path):
    images = llava["images"]
    cases = []
    path, exp = sharegpt4v_file(tmp_path, images)
    cases.append(("sharegpt4v", [str(path)], exp, "conversation", str(images)))
    path, exp = preference_file(tmp_path, images)
    cases.append(("preference", [str(path)], exp, "preference", str(images)))
    rows, facts = parquet_rows()
    a = write_parquet(tmp_path / "hf-00000.parquet", rows[:30], row_group_size=8)
    b = write_parquet(tmp_path / "hf-00001.parquet", rows[30:], row_group_size=8)
    cases.append(("parquet", [str(a), str(b)], {"records": 60, "samples": 56, "skipped": facts["import_skipped"]},
                  "conversation", None))  # the path-only image resolves against the Parquet file's folder: missing
    cases.append(("rlaif-v", [str(rlaif_parquet(tmp_path / "rlaif.parquet"))],
                  {"records": 12, "samples": 12, "skipped": {}}, "preference", None))
    for name, inputs, exp, fmt, root in cases:
        out = tmp_path / f"out-{name}"
        s = run_import(ImportSettings(inputs, str(out), image_root=root, workers=2, shard_bytes=1 << 16))
        assert (s.records, s.samples, s.skipped, s.format) == (exp["records"], exp["samples"], exp["skipped"], fmt), name
        raws = _samples(out)
        assert len(raws) == exp["samples"], name
        for raw in raws:
            enc = encoder.encode(raw, fmt)
            assert isinstance(enc, EncodedPair) == (fmt == "preference")


def test_bad_inputs_are_one_line_naming_the_input(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b")
    assert vlmctl(["data", "import", str(tmp_path / "x.csv"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith("accepted inputs are .json (a list of records), .jsonl or .parquet")
    (tmp_path / "bad.json").write_text("{not json")
    assert vlmctl(["data", "import", str(tmp_path / "bad.json"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input: ") and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert vlmctl(["data", "import", str(tmp_path / "none.json"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
