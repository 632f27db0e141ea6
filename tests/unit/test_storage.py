"""Committed checkpoints: manifest written last, folders without one are never checkpoints."""

import json
import os

from vlm_core import contract, storage


def make_dir(tmp_path, name="src", files=None):
    d = tmp_path / name
    d.mkdir()
    for rel, data in (files or {"model.safetensors": b"w" * 100, "sub/opt.pt": b"o" * 10}).items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return d


def test_commit_writes_files_then_a_manifest_that_verifies(tmp_path):
    out = f"file://{tmp_path}/store/job/align/checkpoint-5"
    storage.commit_dir(str(make_dir(tmp_path)), out, step=5, stage="align")
    m = json.loads((tmp_path / "store/job/align/checkpoint-5/manifest.json").read_text())
    assert m["step"] == 5 and m["stage"] == "align"
    assert {f["path"] for f in m["files"]} == {"model.safetensors", "sub/opt.pt"}
    assert storage.verify_committed(out, check_sha256=True).ok


def test_verification_catches_missing_truncated_and_corrupted_files(tmp_path):
    out = f"{tmp_path}/ck"
    storage.commit_dir(str(make_dir(tmp_path)), out, step=1, stage="s")
    (tmp_path / "ck/sub/opt.pt").write_bytes(b"x" * 10)  # same size, other bytes
    assert storage.verify_committed(out).ok
    v = storage.verify_committed(out, check_sha256=True)
    assert not v.ok and "sha256" in v.reason
    (tmp_path / "ck/model.safetensors").write_bytes(b"w" * 99)
    v = storage.verify_committed(out)
    assert not v.ok and "99 bytes" in v.reason
    (tmp_path / "ck/model.safetensors").unlink()
    assert "missing" in storage.verify_committed(out).reason


def test_latest_checkpoint_ignores_folders_without_manifest(tmp_path):
    out = f"{tmp_path}/stage"
    for step in (10, 20):
        storage.commit_dir(str(make_dir(tmp_path, f"s{step}")), storage.join(out, f"checkpoint-{step}"), step=step, stage="s")
    (tmp_path / "stage/checkpoint-30").mkdir()  # a crash mid-save: files, no manifest
    (tmp_path / "stage/checkpoint-30/model.safetensors").write_bytes(b"partial")
    assert storage.latest_checkpoint(out) == (20, f"{out}/checkpoint-20")
    assert [s for s, _ in storage.list_checkpoints(out)] == [10, 20]


def test_prune_keeps_the_newest(tmp_path):
    out = f"{tmp_path}/stage"
    for step in (1, 2, 3):
        storage.commit_dir(str(make_dir(tmp_path, f"s{step}")), storage.join(out, f"checkpoint-{step}"), step=step, stage="s")
    storage.prune_checkpoints(out, keep_last=2)
    assert [s for s, _ in storage.list_checkpoints(out)] == [2, 3]


def test_recommit_removes_the_stale_manifest_first(tmp_path):
    out = f"{tmp_path}/final"
    storage.commit_dir(str(make_dir(tmp_path, "a")), out, step=1, stage="s")
    storage.commit_dir(str(make_dir(tmp_path, "b", {"other.bin": b"1"})), out, step=2, stage="s")
    m = storage.read_manifest(out)
    assert m["step"] == 2 and [f["path"] for f in m["files"]] == ["other.bin"]


def test_join_keeps_schemes():
    assert storage.join("s3://b/x/", "job", "/stage/") == "s3://b/x/job/stage"
    assert storage.local_path("file:///tmp/a") == "/tmp/a"


def test_storage_options_travel_with_the_job_not_the_process(monkeypatch, tmp_path) -> None:
    """Two jobs, two endpoints, one process: each filesystem gets its own job's endpoint/credentials,
    and building a local runner leaves the process environment alone."""
    from vlm_core.spec import StorageSpec, parse_job
    from vlm_operator.local import LocalRunner

    monkeypatch.delenv(contract.ENDPOINT_URL_ENV, raising=False)
    a = StorageSpec.model_validate({"uri": "s3://bucket/a", "endpointUrl": "http://127.0.0.1:9001"})
    b = StorageSpec.model_validate({"uri": "s3://bucket/b", "endpointUrl": "http://127.0.0.1:9002"})
    fs_a, _ = storage.filesystem(a.uri, a.fsspec_options())
    fs_b, _ = storage.filesystem(b.uri, b.fsspec_options({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}))
    assert fs_a is not fs_b
    assert fs_a.client_kwargs["endpoint_url"] == "http://127.0.0.1:9001"
    assert fs_b.client_kwargs["endpoint_url"] == "http://127.0.0.1:9002" and (fs_b.key, fs_b.secret) == ("k", "s")
    assert StorageSpec.model_validate({"uri": str(tmp_path)}).fsspec_options() == {}

    before = dict(os.environ)
    job = parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "j"},
        "spec": {"model": {"visionEncoder": "v", "languageModel": "l"},
                 "storage": {"uri": "s3://bucket/runs", "endpointUrl": "http://127.0.0.1:9003"},
                 "stages": [{"name": "align", "type": "align", "maxSteps": 1,
                             "data": {"shards": ["d.tar"], "format": "caption"}}]},
    })
    runner = LocalRunner(job, log_dir=str(tmp_path))
    assert dict(os.environ) == before
    assert runner.env[contract.ENDPOINT_URL_ENV] == "http://127.0.0.1:9003"  # for its trainers' environment only
    assert runner.storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9003"


def test_brace_patterns_expand_in_order_and_an_empty_list_names_the_field():
    assert storage.expand_shards(["s3://b/train-{00..02}.tar", "x.tar"]) == [
        "s3://b/train-00.tar", "s3://b/train-01.tar", "s3://b/train-02.tar", "x.tar"]
    import pytest

    with pytest.raises(ValueError, match="stage.data.shards: no shard URLs"):
        storage.expand_shards([], field="stage.data.shards")


def test_only_the_storage_layer_expands_shards_or_opens_storage_files_for_writing():
    """One write path (`storage.write_bytes`) and one brace expansion: nothing else in the operator or the
    trainer opens an fsspec file for writing, pipes bytes into one, or calls braceexpand."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    writes = re.compile(r"fsspec\.open\(|\bfs\.pipe|\bfs\.open\([^)]*['\"][wa]b?['\"]|braceexpand")
    offenders = []
    for folder in ("operator", "trainer"):
        for path in (root / folder).rglob("*.py"):
            if path.relative_to(root).as_posix() == "trainer/vlm_core/storage.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if writes.search(line):
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert offenders == []
