"""The curate stage, run by every rank of the same torchrun launch that trains (`run_stage` dispatches here).

1. Analyse (per shard, resumable): rank r takes input shards r, r+W, r+2W, ...; for each sample it runs
   the local filters (text, image), hashes the decoded pixels (exact) and the image (perceptual), and
   with a dual encoder computes CLIP score, NSFW flag and the image embedding. The result is written to
   `<output>/curate-work/analysis-<shard>.json` (embeddings first, the JSON last: its presence marks the
   shard done), so a killed stage resumes without redoing finished shards.
2. Decide (global): each rank keeps only its own records (as columns); the global steps (CLIP top fraction,
   exact / near / semantic dedup, concept cap) route small keyed records to the rank owning each key
   (`curate.scale.decide_columns` over torch.distributed): the same decisions for any number of ranks.
3. Write (per shard, resumable): each rank copies the kept samples of its input shards, byte for byte, to
   `<output>/final/curated-<shard>.tar` (one output shard per input shard: sized like the input, less what
   was dropped); a marker records each finished shard.
4. Commit: rank 0 receives the light per-sample records (key, caption, verdict), writes decisions.jsonl,
   funnel.json, funnel.png and the removed duplicates side by side with what they repeat (duplicates.png,
   duplicates.html) and commits final/ like a checkpoint (`storage.commit_dir`: files first, manifest.json
   last, listing the shards). A later training stage reads the shards with `data: {fromStage: <this stage>}`
   once the manifest verifies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from vlm_core import contract, storage
from vlm_core.fingerprint import KEY as FINGERPRINT_KEY
from vlm_core.spec import CurateStage, TrainerConfig
from vlm_core.stage_classes import curate_stage

from vlm_trainer.curate.exchange import Solo, TorchExchange
from vlm_trainer.curate.image import decode, dhash, image_problem, phash, pixel_hash, thumbnail
from vlm_trainer.curate.report import (
    decision_lines,
    duplicate_pairs,
    duplicates_html,
    duplicates_png,
    funnel,
    funnel_chart_png,
)
from vlm_trainer.curate.scale import REASONS, columns_from_records, decide_columns
from vlm_trainer.curate.select import decisions_of, encode_thumb, uses_embeddings
from vlm_trainer.curate.text import text_problem
from vlm_trainer.data import TarSample, read_shard
from vlm_trainer.parallel import DistEnv, barrier, broadcast_object, gather_objects, gather_to_main
from vlm_trainer.progress import emit
from vlm_trainer.samples import IMAGE_EXTS, SampleError, sample_caption

log = logging.getLogger(__name__)

WORK_DIR = "curate-work"  # per-shard analyses and write markers, under the stage's output prefix
CAPTION_CHARS = 300  # a caption is cut to this in the records and the funnel's examples


def read_samples(url: str) -> Iterator[TarSample]:
    """The samples of one input shard, read by training's own reader (`data.read_shard`); a truncated shard
    fails the stage, naming it."""
    return read_shard(url, "stage.input.shards")


def sample_parts(sample: TarSample) -> tuple[str | None, bytes | None]:
    """The caption (by training's rule, `samples.sample_caption`: json's "caption" before .txt) and the image
    bytes of one sample. A sample without a usable caption has None, which the text filter reports."""
    raw = sample.raw("")
    try:
        caption: str | None = sample_caption(raw)
    except (SampleError, UnicodeDecodeError):
        caption = None
    image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    return caption, image


def stage_stamp(config: TrainerConfig) -> dict[str, Any]:
    """The stage fingerprint (vlm_core.fingerprint) the backend launched it with, for final/'s manifest."""
    return {FINGERPRINT_KEY: config.fingerprint} if config.fingerprint is not None else {}


def fingerprint(stage: CurateStage) -> str:
    """What an analysis depends on: a changed filter spec or encoder invalidates earlier analyses."""
    doc = {"filters": stage.filters.model_dump(mode="json"), "encoder": stage.encoder}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class Analyser:
    """Per-sample work of step 1 (the dual encoder, when the stage names one, is loaded once)."""

    def __init__(self, stage: CurateStage):
        self.stage = stage
        self.encoder: Any = None
        f = stage.filters
        if stage.encoder is not None and (f.clip_score or f.nsfw or uses_embeddings(f)):
            from vlm_trainer.curate import embed

            self.encoder = embed.load_dual_encoder(stage.encoder)

    def shard(self, url: str) -> tuple[list[dict[str, Any]], Any]:
        """The records of one shard, and its image embeddings (a tensor, or None without an encoder)."""
        f = self.stage.filters
        hashers = {"phash": phash, "dhash": dhash}
        near = f.near_dedup
        thumbs = near.enabled and near.verify is not None and near.verify.signal == "thumbnail"
        records: list[dict[str, Any]] = []
        passed: list[tuple[int, Any, str]] = []
        for pos, sample in enumerate(read_samples(url)):
            caption, data = sample_parts(sample)
            rec: dict[str, Any] = {"key": sample.key, "pos": pos, "caption": caption[:CAPTION_CHARS] if caption else caption,
                                   "reason": None}
            detail = text_problem(caption, f.text) if f.text.enabled else None
            if detail is not None:
                rec.update(reason="text", detail=detail)
            image = decode(data)
            if rec["reason"] is None and f.image.enabled:
                rec["reason"] = image_problem(image, f.image)
            if rec["reason"] is None and image is None:
                rec["reason"] = "image_decode"  # nothing to hash or embed, whatever the switches say
            if rec["reason"] is None:
                assert image is not None
                rec["pixel"] = pixel_hash(image)
                if near.enabled:
                    rec["hashes"] = {h: hashers[h](image) for h in near.hashes}
                    if thumbs:
                        rec["thumb"] = encode_thumb(thumbnail(image))
                passed.append((pos, image, caption or ""))
            records.append(rec)
        embeddings = self._embed(records, passed) if self.encoder is not None else None
        return records, embeddings

    def _embed(self, records: list[dict[str, Any]], passed: list[tuple[int, Any, str]]) -> Any:
        import torch

        from vlm_trainer.curate import embed

        f = self.stage.filters
        out = torch.zeros(len(records), self.encoder.dim)
        if not passed:
            return out
        img, txt = self.encoder.embed([p[1] for p in passed], [p[2] for p in passed])
        scores = embed.clip_scores(img, txt)
        flags = embed.nsfw_flags(img, f.nsfw.probe, f.nsfw.threshold) if f.nsfw is not None else None
        for j, (pos, _, _) in enumerate(passed):
            records[pos]["clip"] = round(float(scores[j]), 6)
            if flags is not None:
                records[pos]["nsfw"] = bool(flags[j])
            out[pos] = img[j].float().cpu()
        return out


def _load_analysis(work: str, index: int, fp: str) -> dict[str, Any] | None:
    uri = storage.join(work, f"analysis-{index:06d}.json")
    if not storage.exists(uri):
        return None
    try:
        doc = storage.read_json(uri)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("fingerprint") == fp else None


def _save_tensor(uri: str, tensor: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(tensor, buf)
    storage.write_bytes(uri, buf.getvalue())


def _load_tensor(uri: str) -> Any:
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)


def write_output_shard(src: str, dst: str, keep_positions: set[int]) -> dict[str, Any]:
    """Copy the kept samples of `src` (by position) to `dst`, members byte for byte; its manifest entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for pos, sample in enumerate(read_samples(src)):
            if pos not in keep_positions:
                continue
            for name, _ext, data in sample.members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    storage.write_bytes(dst, data)
    return {"path": dst.rsplit("/", 1)[1], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_images(urls: list[str], owners: list[int], records: list[dict[str, Any]], wanted: set[int]) -> dict[int, Any]:
    """The decoded images of the samples `wanted` (global indices), reading each shard that holds one once."""
    by_shard: dict[int, dict[int, int]] = {}
    for i in wanted:
        by_shard.setdefault(owners[i], {})[int(records[i]["pos"])] = i
    out: dict[int, Any] = {}
    for shard, positions in sorted(by_shard.items()):
        last = max(positions)
        for pos, sample in enumerate(read_samples(urls[shard])):
            if pos in positions:
                out[positions[pos]] = decode(sample_parts(sample)[1])
            if pos >= last:
                break
    return {i: im for i, im in out.items() if im is not None}


def read_concepts(stage: CurateStage) -> list[str]:
    b = stage.filters.balance
    if b is None:
        return []
    concepts = list(b.concepts)
    if b.concepts_file is not None:
        concepts += [line.strip() for line in storage.read_text(b.concepts_file).splitlines()
                     if line.strip() and not line.startswith("#")]
    return concepts


class _Progress:
    """Rank 0's progress: `curate` JSON lines on stdout, progress.json, and the metrics' step gauges."""

    def __init__(self, config: TrainerConfig, env: DistEnv, total: int, metrics: Any):
        self.config, self.env, self.total, self.metrics = config, env, total, metrics
        self.done = 0

    def advance(self, phase: str, **fields: Any) -> None:
        self.done += 1
        if self.metrics is not None:
            self.metrics.set_progress(self.done, self.total)
        if not self.env.is_main:
            return
        emit(contract.EVENT_CURATE, stage=self.config.stage.name, phase=phase, step=self.done, total=self.total, **fields)
        record = contract.ProgressRecord(step=self.done, total=self.total, updated_at=time.time())
        try:
            storage.write_json(storage.join(self.config.output, contract.PROGRESS_FILE), record.to_doc())
        except OSError as err:  # progress is advisory
            log.warning("could not write progress: %s", err)


def _start_metrics(config: TrainerConfig) -> Any:
    from vlm_trainer.metrics import TrainerMetrics

    return TrainerMetrics.serve(config.job, config.stage.name)


def run_curate(config: TrainerConfig, env: DistEnv) -> dict[str, Any]:
    """Curate this stage's input into committed output shards; returns the funnel (on every rank)."""
    stage = curate_stage(config.stage)
    assert stage is not None, f"stage {config.stage.name!r} is not a curate stage"
    started = time.perf_counter()
    urls = storage.expand_shards(stage.input.shards, field="stage.input.shards")
    final = storage.join(config.output, contract.FINAL_DIR)
    work = storage.join(config.output, WORK_DIR)
    mine = list(range(env.rank, len(urls), env.world_size))
    fp = fingerprint(stage)
    metrics = _start_metrics(config)
    progress = _Progress(config, env, 2 * len(mine), metrics)
    analyser: Analyser | None = None
    wants_embeddings = uses_embeddings(stage.filters)

    # 1. analyse my shards (or take the analyses an earlier run finished)
    analyses: dict[int, dict[str, Any]] = {}
    analysed_samples, analyse_seconds, resumed = 0, 0.0, 0
    for i in mine:
        doc = _load_analysis(work, i, fp)
        if doc is None:
            t0 = time.perf_counter()
            analyser = analyser or Analyser(stage)
            records, embeddings = analyser.shard(urls[i])
            if embeddings is not None:
                _save_tensor(storage.join(work, f"embeddings-{i:06d}.pt"), embeddings)
            doc = {"fingerprint": fp, "shard": urls[i], "records": records}
            storage.write_json(storage.join(work, f"analysis-{i:06d}.json"), doc)  # last: marks the shard done
            seconds = time.perf_counter() - t0
            analysed_samples += len(records)
            analyse_seconds += seconds
            if metrics is not None:
                metrics.samples_total.inc(len(records))
                metrics.samples_per_second.set(len(records) / max(seconds, 1e-9))
            progress.advance("analyse", shard=i, samples=len(records),
                             samples_per_second=round(len(records) / max(seconds, 1e-9), 2))
        else:
            resumed += 1
            progress.advance("analyse", shard=i, samples=len(doc["records"]), resumed=True)
        analyses[i] = doc

    # 2. decide globally: each rank holds only its own records; the global steps route small keyed records
    #    to the rank owning each key (curate.scale), so the decisions do not depend on the number of ranks
    mine_records = {i: analyses[i]["records"] for i in mine}
    sizes: dict[int, int] = {}
    for part in gather_objects({i: len(mine_records[i]) for i in mine}, env):  # one count per shard
        sizes.update(part)
    offsets = np.cumsum([0] + [sizes[i] for i in range(len(urls))])
    records = [rec for i in mine for rec in mine_records[i]]
    owners = [i for i in mine for _ in mine_records[i]]
    gids = np.array([offsets[i] + int(rec["pos"]) for i, rec in zip(owners, records, strict=True)], dtype=np.int64)
    embeddings = None
    if wants_embeddings:
        import torch

        parts = [_load_tensor(storage.join(work, f"embeddings-{i:06d}.pt")) for i in mine]
        dim = max(d for d in gather_objects(parts[0].shape[1] if parts else 0, env))
        embeddings = torch.cat(parts) if parts else torch.zeros(0, dim)
    cols = columns_from_records(records, gids, embeddings, stage.filters)
    del embeddings
    ex = TorchExchange(env.rank, env.world_size) if env.distributed else Solo()
    stats = decide_columns(cols, stage.filters, ex, concepts=read_concepts(stage), seed=stage.seed)
    reasons = [REASONS[c - 1] if c else None for c in cols.reason.tolist()]

    # 3. write my output shards
    keep: dict[int, set[int]] = {i: set() for i in mine}
    for rec, shard, reason in zip(records, owners, reasons, strict=True):
        if reason is None:
            keep[shard].add(int(rec["pos"]))
    entries = []
    for i in mine:
        marker = storage.join(work, f"written-{i:06d}.json")
        entry = storage.read_json(marker) if storage.exists(marker) else None
        if not (isinstance(entry, dict) and entry.get("fingerprint") == fp):
            entry = {**write_output_shard(urls[i], contract.curated_shard(final, i), keep[i]), "fingerprint": fp}
            storage.write_json(marker, entry)
        entries.append({k: entry[k] for k in ("path", "size", "sha256")})
        progress.advance("write", shard=i, kept=len(keep[i]))

    # 4. rank 0 writes the report and commits final/ (manifest last)
    seconds = time.perf_counter() - started
    mine_count = sum(len(mine_records[i]) for i in mine)
    throughput = {"rank": env.rank, "shards": len(mine), "shards_resumed": resumed, "samples": mine_count,
                  "seconds": round(seconds, 3), "samples_per_second": round(mine_count / max(seconds, 1e-9), 2),
                  "analysed_samples": analysed_samples, "analyse_seconds": round(analyse_seconds, 3),
                  "analyse_samples_per_second": round(analysed_samples / analyse_seconds, 2) if analyse_seconds else None}
    # the report (decisions.jsonl, funnel, duplicates) lists every sample: rank 0 alone receives the light records
    mine_report = (gids, records, reasons, cols.dup_of, owners)
    gathered = gather_to_main((entries, throughput, mine_report), env)
    doc: dict[str, Any] | None = None
    if gathered is not None:
        every = sorted(((int(g), rec, reason, int(dup), shard) for _, _, part in gathered
                        for g, rec, reason, dup, shard in zip(*part, strict=True)), key=lambda t: t[0])
        all_records, all_owners = [t[1] for t in every], [t[4] for t in every]
        decisions = decisions_of([t[2] for t in every], {t[0]: t[3] for t in every if t[3] >= 0}, stage.filters, stats)
        doc = funnel(all_records, decisions, examples_per_reason=stage.output.examples_per_reason,
                     extra={"stage": stage.name, "world_size": env.world_size,
                            "throughput": [t for _, t, _ in gathered]})
        uploaded = [e for part, _, _ in gathered for e in part]
        pairs = duplicate_pairs(decisions, stage.output.examples_per_reason)
        images = read_images(urls, all_owners, all_records, {k for _, i, j in pairs for k in (i, j)})
        with tempfile.TemporaryDirectory(prefix="vlm-curate-") as tmp:
            with open(os.path.join(tmp, contract.DUPLICATES_CHART), "wb") as fh:
                fh.write(duplicates_png(all_records, decisions, pairs, images))
            with open(os.path.join(tmp, contract.DUPLICATES_PAGE), "w") as fh:
                fh.write(duplicates_html(all_records, decisions, pairs, images))
            with open(os.path.join(tmp, contract.DECISIONS_FILE), "w") as fh:
                fh.write(decision_lines(all_records, decisions))
            with open(os.path.join(tmp, contract.FUNNEL_FILE), "w") as fh:
                json.dump(doc, fh, indent=2)
            with open(os.path.join(tmp, contract.FUNNEL_CHART), "wb") as fh:
                fh.write(funnel_chart_png(doc, f"{config.job} / {stage.name}: {doc['kept']} of {doc['input']} kept"))
            storage.commit_dir(tmp, final, step=len(all_records), stage=stage.name, uploaded=uploaded,
                               extra={"kind": "curated_shards", "input": doc["input"], "kept": doc["kept"],
                                      "config": config.dump(), **stage_stamp(config)})
        emit(contract.EVENT_CURATED, stage=stage.name, input=doc["input"], kept=doc["kept"], removed=doc["removed"],
             samples_per_second_per_rank=[t["samples_per_second"] for t in doc["throughput"]], final=final)
    doc = broadcast_object(doc, env)
    barrier(env)
    if metrics is not None:
        metrics.close()
    return doc
