"""Parquet files as a training source, read in place: row groups split across ranks, loader workers encode
their share, every good row exactly once per epoch, exact resume, bad rows skipped and counted by reason;
the spec refuses a tar/Parquet mix naming the field; preflight and the sample count read Parquet too."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from import_fixtures import parquet_rows, write_parquet
from vlm_core.spec import SpecError, parse_job
from vlm_trainer.data import DataPosition, TrainStream, count_samples, eval_samples
from vlm_trainer.loader import Source, TrainLoader
from vlm_trainer.samples import Encoded, SampleError, decode_json, image_members

N_ROWS = 60


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    rows, facts = parquet_rows(N_ROWS)
    files = [f"file://{write_parquet(root / 'hf-00000.parquet', rows[:25], row_group_size=6)}",
             f"file://{write_parquet(root / 'hf-00001.parquet', rows[25:], row_group_size=7)}"]
    return {"files": files, "facts": facts, "root": root}


def _row(raw: dict) -> tuple[str, int]:
    """Which row of which file a raw sample is (file row number = its key; the files' rows 0..24, 0..34)."""
    offset = 0 if raw["__url__"].endswith("00000.parquet") else 25
    return raw["__url__"], offset + int(raw["__key__"])


def _epoch(files, rank, world, seed=0, shuffle=16) -> list[dict]:
    stream = TrainStream(files, seed=seed, rank=rank, world=world, shuffle_buffer=shuffle)
    out = []
    for raw in stream:
        if stream.position.epoch > 0:
            break
        out.append(raw)
    return out


def test_ranks_split_row_groups_and_read_every_row_once_per_epoch(dataset):
    facts = dataset["facts"]
    per_rank = [_epoch(dataset["files"], r, 2) for r in range(2)]
    rows = [_row(raw)[1] for part in per_rank for raw in part]
    assert sorted(rows) == list(range(N_ROWS))  # every row exactly once over both ranks
    assert {_row(r)[1] for r in per_rank[0]}.isdisjoint({_row(r)[1] for r in per_rank[1]})
    bad = Counter(raw["__bad__"] for part in per_rank for raw in part if "__bad__" in raw)
    # The normaliser's reasons; the corrupt image is found by the encoder (image_decode), below.
    assert bad == {k: v for k, v in facts["source_bad"].items() if k != "image_decode"}
    good = [raw for part in per_rank for raw in part if "__bad__" not in raw]
    doc = decode_json(good[0])
    assert doc["conversations"][0]["content"].startswith("<image>") and image_members(good[0]) in (["png"], ["jpg"])
    # Deterministic per (seed, epoch): the same order again; another seed shuffles differently.
    assert [_row(r) for r in _epoch(dataset["files"], 0, 2)] == [_row(r) for r in per_rank[0]]
    assert [_row(r) for r in _epoch(dataset["files"], 0, 2, seed=1)] != [_row(r) for r in per_rank[0]]


def test_a_resumed_stream_continues_at_the_exact_row(dataset):
    full = TrainStream(dataset["files"], seed=3, rank=1, world=2, shuffle_buffer=8)
    expected = [_row(next(full)) for _ in range(70)]  # crosses into epoch 1
    first = TrainStream(dataset["files"], seed=3, rank=1, world=2, shuffle_buffer=8)
    head = [_row(next(first)) for _ in range(23)]
    resumed = TrainStream(dataset["files"], seed=3, rank=1, world=2, shuffle_buffer=8,
                          position=DataPosition(first.position.epoch, first.position.consumed))
    assert head + [_row(next(resumed)) for _ in range(47)] == expected


def _encode(raw: dict, fmt: str) -> Encoded:
    """Decodes the sample as the trainer does (json, image members, PIL) and keeps which row it was."""
    import io

    from PIL import Image

    doc = decode_json(raw)
    for m in image_members(raw):
        try:
            Image.open(io.BytesIO(raw[m])).convert("RGB")
        except Exception:
            raise SampleError(f"sample {raw['__key__']!r}: image {m} cannot be decoded", "image_decode") from None
    _url, row = _row(raw)
    return Encoded([row], [row], [], [], []) if doc else Encoded([], [], [], [], [])


def test_two_ranks_with_two_workers_train_on_every_good_row_once_and_count_bad_rows(dataset):
    facts = dataset["facts"]
    good, bad = [], Counter()
    for rank in range(2):
        loader = TrainLoader([Source(dataset["files"], "conversation")], _encode, seed=0, rank=rank, world=2,
                             shuffle_buffer=16, workers=2, chunk=4)
        while True:
            item = loader._take()
            if item.epoch > 0:
                break
            loader._account(item)
            if item.reason is None:
                good.append(item.payload.input_ids[0])
        loader.close()
        bad.update(loader.position.bad)
    assert sorted(good) == facts["good_rows"]  # every good row exactly once over 2 ranks x 2 workers
    assert bad == facts["source_bad"]  # bad rows skipped and counted by reason


def test_sample_count_and_eval_read_parquet(dataset):
    assert count_samples(dataset["files"]) == N_ROWS
    rows = sorted(_row(r)[1] for rank in range(2) for r in eval_samples(dataset["files"], rank=rank, world=2))
    assert rows == list(range(N_ROWS))


def _job(shards: list[str]) -> dict:
    return {"apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "pq"},
            "spec": {"model": {"visionEncoder": "file:///m/v", "languageModel": "file:///m/l"},
                     "storage": {"uri": "file:///tmp/s"},
                     "stages": [{"name": "sft", "type": "instruct", "maxSteps": 2,
                                 "data": {"shards": shards, "format": "conversation"}}]}}


def test_the_spec_takes_parquet_files_and_refuses_a_mix_naming_the_field():
    parse_job(_job(["s3://b/hf/train-{00000..00003}.parquet"]))
    with pytest.raises(SpecError) as err:
        parse_job(_job(["s3://b/hf/train-00000.parquet", "s3://b/wds/train-000.tar"]))
    text = "\n".join(err.value.problems)
    assert "shards" in text and "mixes Parquet files (s3://b/hf/train-00000.parquet) with WebDataset tar shards" in text


def test_preflight_checks_a_parquet_shard_is_parquet(dataset, tmp_path):
    from vlm_operator.preflight import _shards

    job = parse_job(_job(dataset["files"]))
    out: list[str] = []
    _shards(job, 0, "shards", dataset["files"], None, out)
    assert out == []
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet" * 100)
    _shards(job, 0, "shards", [f"file://{fake}"], None, out)
    assert out == [f"spec.stages[0].data.shards[0]: file://{fake} is not a Parquet file (no PAR1 header)"]
    json.dumps(out)
