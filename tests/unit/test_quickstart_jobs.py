"""The quickstart's job files follow the recipe, and `evaluate` refuses a job whose stages did not run."""

from __future__ import annotations

import json
import os

import pytest
from vlm_core.spec import parse_job
from vlm_quickstart.components import build_language_model, build_tokenizer
from vlm_quickstart.evaluate import evaluate
from vlm_quickstart.noise import write_raw_shards
from vlm_quickstart.prepare import Recipe, job_documents
from vlm_quickstart.shapes import make_samples, shard_paths, text_documents, write_eval_shard, write_shards


@pytest.fixture
def prepared(tmp_path):
    data = str(tmp_path / "data")
    paths = write_shards(data, "train", 40, seed=0, per_shard=20) + write_shards(data, "heldout", 10, seed=0)
    paths += write_raw_shards(data, make_samples("train", 40, 0), seed=0, per_shard=20).shards
    paths.append(write_eval_shard(data, make_samples("heldout", 10, 0)))
    return tmp_path, paths


def test_staged_job_raw_job_and_naive_baseline_follow_the_recipe(prepared):
    tmp_path, paths = prepared
    recipe = Recipe()
    job_doc, naive_doc, raw_doc = job_documents(str(tmp_path), paths, seed=5, recipe=recipe)
    job, naive, raw = parse_job(job_doc), parse_job(naive_doc), parse_job(raw_doc)
    assert job.spec.storage.uri == f"file://{tmp_path}/storage"
    curate, align, instruct, dpo, evaluate_ = job.spec.stages
    assert [(s.name, s.type) for s in job.spec.stages] == [
        ("curate", "curate"), ("align", "align"), ("instruct", "instruct"), ("dpo", "dpo"), ("eval", "eval")
    ]
    # the eval stage answers the held-out questions with dpo's model (the planner's handoff)
    assert [os.path.basename(s) for s in evaluate_.data.shards] == ["heldout-eval-00000.tar"]
    assert evaluate_.eval.metrics == ["exact_match"] and evaluate_.resources.procs_per_node == 2
    assert [s.data.format for s in (align, instruct, dpo)] == ["caption", "conversation", "preference"]
    # curate reads the raw shards with the stage-0 dual encoder; align reads curate's committed output.
    assert curate.input.shards and all("/raw-caption-" in s for s in curate.input.shards)
    assert curate.encoder == f"file://{tmp_path}/stage0/dual_encoder"
    assert curate.filters.clip_score.threshold == recipe.clip_threshold
    near = curate.filters.near_dedup
    assert near.hashes == ["phash", "dhash"] and near.max_distance == recipe.near_dedup_max_distance
    assert near.verify is not None and near.verify.min_similarity == recipe.near_dedup_min_similarity
    assert curate.filters.semantic_dedup is None
    assert curate.resources.procs_per_node == 2 and curate.seed == 5
    assert align.data.from_stage == "curate" and not align.data.shards
    # raw.yaml: the same align stage on the raw shards, nothing else different.
    (raw_align,) = raw.spec.stages
    assert raw_align.data.shards == curate.input.shards and raw_align.data.from_stage is None
    assert raw_align.model_dump(exclude={"data"}) == align.model_dump(exclude={"data"})
    assert raw_align.data.model_dump(exclude={"shards", "from_stage"}) == align.data.model_dump(
        exclude={"shards", "from_stage"}
    )
    assert raw.name not in (job.name, naive.name) and raw.spec.model == job.spec.model
    assert align.trainable == ["projector"] and 1e-3 <= align.optimizer.lr <= 3e-3
    assert instruct.trainable == ["projector", "language_model"] and instruct.optimizer.lr == pytest.approx(
        1e-4
    )
    assert dpo.dpo.beta == pytest.approx(0.1)
    for stage in [align, instruct, dpo, *naive.spec.stages]:
        assert stage.resources.procs_per_node == 2
        assert stage.batch.global_size == 64
        assert stage.seed == 5
        assert (stage.data.workers, stage.data.cache_mib) == (recipe.data_workers, recipe.data_cache_mib)
        assert stage.data.eval_shards and all("/heldout-" in s for s in stage.data.eval_shards)
        assert all("/train-" in s for s in stage.data.shards)
        assert all(
            s.startswith("file:///") and os.path.exists(s[len("file://") :]) for s in stage.data.shards
        )
    # The baseline: one stage, everything unfrozen at a high lr, same data as instruct, same total steps.
    (baseline,) = naive.spec.stages
    assert sorted(baseline.trainable) == ["language_model", "projector", "vision_tower"]
    assert baseline.optimizer.lr == pytest.approx(1e-3) and baseline.optimizer.projector_lr_multiplier == 1.0
    assert baseline.data.shards == instruct.data.shards
    assert baseline.max_steps == align.max_steps + instruct.max_steps
    assert naive.name != job.name and naive.spec.model == job.spec.model


def test_evaluate_fails_naming_the_missing_stage_output(prepared, capsys):
    tmp_path, paths = prepared
    job_doc, naive_doc, _ = job_documents(str(tmp_path), paths, seed=0, recipe=Recipe())
    tok = build_tokenizer()
    build_language_model(str(tmp_path / "stage0" / "language_model"), tok)
    (tmp_path / "stage0" / "pretrain.json").write_text("{}")
    text = tmp_path / "data" / "heldout-text.txt"
    text.write_text("\n".join(text_documents(5, 0, "text-heldout")))
    for name, doc in (("job.yaml", job_doc), ("naive.yaml", naive_doc)):
        (tmp_path / name).write_text(json.dumps(doc))  # JSON is YAML
    held = [p for p in paths if "/heldout-" in p]
    info = {
        "seed": 0,
        "job": str(tmp_path / "job.yaml"),
        "naive": str(tmp_path / "naive.yaml"),
        "heldout_text": str(text),
        "heldout_shards": {f: shard_paths(held, f) for f in ("caption", "conversation", "preference")},
        "stage0": {"language_model": str(tmp_path / "stage0" / "language_model")},
    }
    (tmp_path / "quickstart.json").write_text(json.dumps(info))
    assert evaluate(str(tmp_path)) != 0
    out = capsys.readouterr().out
    assert "quickstart/align/final" in out and "manifest.json" in out  # curate is checked after the training stages
    assert not (tmp_path / "storage" / "quickstart" / "report.json").exists()


@pytest.mark.parametrize("variant", ["zero2", "lora"])
def test_instruct_variants_change_only_the_instruct_stage(prepared, variant):
    tmp_path, paths = prepared
    default, _, _ = job_documents(str(tmp_path), paths, seed=0, recipe=Recipe())
    doc, _, _ = job_documents(str(tmp_path), paths, seed=0, recipe=Recipe(instruct_variant=variant))
    job = parse_job(doc)
    instruct = job.spec.stages[2]
    if variant == "zero2":
        assert instruct.strategy == "zero2" and instruct.lora is None
    else:
        assert instruct.strategy == "ddp" and instruct.lora.rank == 16 and instruct.optimizer.lr == pytest.approx(1e-3)
    for i in (0, 1, 3):
        assert doc["spec"]["stages"][i] == default["spec"]["stages"][i]
