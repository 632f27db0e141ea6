"""The curate stage on a synthetic raw set with planted noise (tests/integration/curate_noise.py): each
planted kind removed (semantic duplicates too: re-renders that neither hash catches, found by SemDeDup over a
SLIP-trained dual encoder whose measured separation sets the threshold), clean pairs kept, one sample per duplicate group, decisions.jsonl and funnel.json
agreeing, the output committed like a checkpoint; resume without redoing finished shards; and 2 ranks
under torchrun deciding exactly as 1 rank does (global dedup across ranks)."""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import pytest
from curate_noise import curate_stage, read_decisions, train_curation_encoder, write_noisy_set
from vlm_core import contract, storage
from vlm_core.spec import TrainerConfig, parse_job
from vlm_operator import planner
from vlm_trainer.curate.runner import WORK_DIR, run_curate
from vlm_trainer.parallel import dist_env

KINDS = ("text", "image_decode", "image_size", "aspect_ratio", "clip_score", "nsfw", "exact_duplicate", "near_duplicate",
         "semantic_duplicate", "concept_cap")


def _config(shards: list[str], store: str, name: str, encoder: dict) -> TrainerConfig:
    job = parse_job({
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": name},
        "spec": {"model": {"visionEncoder": "unused", "languageModel": "unused"}, "storage": {"uri": store},
                 "stages": [curate_stage(shards, encoder)]},
    })
    return planner.resolve_stage(job, 0)


def _final(cfg: TrainerConfig) -> str:
    return storage.join(cfg.output, contract.FINAL_DIR)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    torch.set_num_threads(1)  # as each rank of the 2-rank run below: the same CLIP scores to the last bit
    tmp = tmp_path_factory.mktemp("curate")
    encoder = train_curation_encoder(str(tmp / "encoder"))
    noisy = write_noisy_set(str(tmp / "raw"))
    cfg = _config(noisy.shards, f"file://{tmp}/store", "one", encoder)
    os.environ.setdefault(contract.METRICS_PORT_ENV, "off")
    doc = run_curate(cfg, dist_env())
    return {"tmp": tmp, "noisy": noisy, "cfg": cfg, "funnel": doc, "encoder": encoder,
            "decisions": storage.read_text(storage.join(_final(cfg), contract.DECISIONS_FILE))}


def test_curate_removes_each_planted_kind_and_keeps_the_clean_pairs(one_rank):
    noisy, decisions = one_rank["noisy"], read_decisions(one_rank["decisions"])
    assert [d["key"] for d in decisions] == noisy.order  # one line per input sample, in input order
    by_key = {d["key"]: d for d in decisions}
    for kind in KINDS:
        planted = [k for k, t in noisy.truth.items() if t == kind]
        assert len(planted) >= 20
        removed = [k for k in planted if by_key[k]["reason"] == kind]
        assert len(removed) / len(planted) >= 0.95, (kind, [by_key[k] for k in planted if k not in removed])
    clean = [k for k, t in noisy.truth.items() if t is None]
    kept = [k for k in clean if by_key[k]["kept"]]
    assert len(kept) / len(clean) >= 0.95, [by_key[k] for k in clean if k not in kept][:5]
    for group in noisy.groups:
        assert sum(by_key[k]["kept"] for k in group) == 1, [by_key[k] for k in group]
    # the SemDeDup threshold came from a measurement on held-out scenes: a semantic duplicate sits closer to
    # its original than a clean image to its nearest clean neighbour
    sep = one_rank["encoder"]["separation"]
    assert sep["duplicate_cos_median"] > sep["semdedup_threshold"] > sep["clean_nearest_cos_median"], sep
    assert all(d["kept"] == (d["reason"] is None) for d in decisions)


def test_funnel_agrees_with_decisions_and_the_output_is_committed(one_rank):
    doc, decisions = one_rank["funnel"], read_decisions(one_rank["decisions"])
    reasons = collections.Counter(d["reason"] for d in decisions if not d["kept"])
    assert doc["input"] == len(decisions) and doc["kept"] == sum(d["kept"] for d in decisions)
    assert {r: n for r, n in doc["removed"].items() if n} == dict(reasons)
    entering = doc["input"]
    for step in doc["filters"]:  # the funnel adds up, filter by filter
        assert step["entering"] == entering and step["leaving"] == entering - sum(step["removed"].values())
        entering = step["leaving"]
        for reason, examples in step["examples"].items():
            assert len(examples) == min(5, doc["removed"][reason])
            assert all(json.loads(json.dumps(e))["key"] in {d["key"] for d in decisions if d["reason"] == reason}
                       for e in examples)
    assert entering == doc["kept"]
    assert doc["filters"][0]["checks"]["junk_pattern"] > 0 and doc["filters"][0]["checks"]["language"] > 0
    assert doc["throughput"][0]["samples_per_second"] > 0
    final = _final(one_rank["cfg"])
    verified = storage.verify_committed(final, check_sha256=True)
    assert verified.ok, verified.reason
    listed = {f["path"] for f in verified.manifest["files"]}
    assert {contract.FUNNEL_FILE, contract.DECISIONS_FILE, contract.FUNNEL_CHART} <= listed
    assert storage.read_head(storage.join(final, contract.FUNNEL_CHART), 8) == b"\x89PNG\r\n\x1a\n"
    # output: one shard per input shard, holding exactly the kept samples
    kept_keys = []
    for i in range(len(one_rank["noisy"].shards)):
        name = contract.CURATED_SHARD.format(index=i)
        assert name in listed
        with tarfile.open(fileobj=io.BytesIO(open(storage.local_path(storage.join(final, name)), "rb").read())) as tar:
            kept_keys += sorted({m.name.split(".")[0] for m in tar.getmembers()}, key=one_rank["noisy"].order.index)
    assert kept_keys == [d["key"] for d in decisions if d["kept"]]


def test_a_rerun_resumes_without_redoing_finished_shards(one_rank):
    cfg = one_rank["cfg"]
    final, work = _final(cfg), storage.join(cfg.output, WORK_DIR)
    shard1 = storage.local_path(contract.curated_shard(final, 1))
    before = open(shard1, "rb").read()
    # as a run killed after analysing shards 0-2 and writing shard 0 would leave it
    storage.remove(storage.join(final, storage.MANIFEST))
    storage.remove(storage.join(work, "analysis-000003.json"))
    for i in (1, 2, 3):
        storage.remove(storage.join(work, f"written-{i:06d}.json"))
    os.remove(shard1)
    doc = run_curate(cfg, dist_env())
    assert doc["throughput"][0]["shards_resumed"] == 3
    shard3 = storage.read_json(storage.join(work, "analysis-000003.json"))["records"]
    assert doc["throughput"][0]["analysed_samples"] == len(shard3)  # only the unfinished shard was analysed
    assert storage.read_text(storage.join(final, contract.DECISIONS_FILE)) == one_rank["decisions"]
    assert open(shard1, "rb").read() == before
    assert storage.verify_committed(final, check_sha256=True).ok


def test_curate_align_instruct_runs_as_one_job_with_vlmctl_and_2_ranks_decide_as_1(one_rank, capsys):
    """`vlmctl run` of curate (2 ranks) -> align (data: fromStage curate) -> instruct: the 2-rank curate
    decides exactly as the 1-rank run, align reads the committed curated shards and starts only after the
    commit, and weights go align -> instruct."""
    from tiny_parts import build_parts
    from vlm_operator import cli

    tmp = one_rank["tmp"]
    parts = build_parts(tmp / "parts")
    train = {"precision": "fp32", "maxSteps": 1, "batch": {"globalSize": 2, "microSize": 2},
             "checkpoint": {"everySteps": 1, "keepLast": 1}}
    doc = {
        "apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "local"},
        "spec": {
            "model": {"visionEncoder": parts["vision"], "languageModel": parts["lm"], "imageSize": 32},
            "storage": {"uri": f"file://{tmp}/store"},
            "stages": [
                {**curate_stage(one_rank["noisy"].shards, one_rank["encoder"]), "resources": {"procsPerNode": 2}},
                {"name": "align", "type": "align", "data": {"fromStage": "curate", "format": "caption", "maxLength": 64},
                 **train},
                {"name": "instruct", "type": "instruct", "data": {"shards": parts["shards"], "format": "caption",
                                                                  "maxLength": 64}, **train},
            ],
        },
    }
    path = tmp / "local.yaml"
    path.write_text(json.dumps(doc))
    os.environ[contract.METRICS_PORT_ENV] = "off"
    assert cli.main(["run", str(path)]) == 0, capsys.readouterr().out[-3000:]
    out = capsys.readouterr().out
    counts = f"{one_rank['funnel']['input']} -> {one_rank['funnel']['kept']} samples"
    assert f"curate: kept {counts}" in out
    store = f"file://{tmp}/store/local"
    final = f"{store}/curate/final"
    committed = storage.verify_committed(final, check_sha256=True)
    assert committed.ok, committed.reason
    assert storage.read_text(storage.join(final, contract.DECISIONS_FILE)) == one_rank["decisions"]
    funnel_doc = storage.read_json(storage.join(final, contract.FUNNEL_FILE))
    assert funnel_doc["world_size"] == 2 and [t["rank"] for t in funnel_doc["throughput"]] == [0, 1]
    assert all(t["shards"] == 2 and t["samples_per_second"] > 0 for t in funnel_doc["throughput"])
    assert storage.read_json(f"{store}/curate/{contract.PROGRESS_FILE}")["step"] == 4  # rank 0: 2 shards x 2 phases
    align = storage.read_json(f"{store}/align/{contract.CONFIG_FILE}")
    assert align["stage"]["data"]["shards"] == [contract.curated_shard(final, i) for i in range(4)]
    assert align["initFrom"] is None  # the first training stage starts from spec.model
    launched = os.path.getmtime(storage.local_path(f"{store}/align/{contract.CONFIG_FILE}"))
    assert launched >= committed.manifest["committed_at"]  # the consumer started after the commit
    assert storage.read_json(f"{store}/instruct/{contract.CONFIG_FILE}")["initFrom"] == f"{store}/align/final"
    assert storage.verify_committed(f"{store}/instruct/final").ok
    report = storage.read_text(f"{store}/report.md")
    assert f"curate: {counts}" in report and "samples/s per rank" in report
