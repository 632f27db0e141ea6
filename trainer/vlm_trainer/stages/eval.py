"""eval: greedy generation on held-out shards with a committed model, scored by the field's standard metrics.

It trains nothing and hands no weights on (its row's output is "report"): the model is the previous training
stage's final/ (the planner's `initFrom`), or the final/ its `eval.model` names. Every rank loads the model and
generates its share of the batches (vlm_trainer.evaluation.generate); rank 0 gathers the answers, scores them
(vlm_trainer.evaluation.scoring) and commits final/ = eval.json (the metrics) + predictions.jsonl (one line per
sample: prompt, prediction, references, scores), manifest last; eval.json also goes to the stage's output (as
every stage's report does), the metrics to the `vlm_trainer_eval_metric` gauges, the `evaluated` event and the
manifest's `eval` (which the operator copies into the stage's status).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import torch
from vlm_core import contract, storage
from vlm_core.fingerprint import KEY as FINGERPRINT_KEY
from vlm_core.kinds import StageKind, kind
from vlm_core.spec import TrainerConfig
from vlm_core.stage_classes import eval_stage

from vlm_trainer.data import count_samples
from vlm_trainer.evaluation.generate import evaluate_by_generation
from vlm_trainer.evaluation.scoring import headline
from vlm_trainer.loader import BadDataError
from vlm_trainer.model import build_vlm
from vlm_trainer.parallel import DistEnv, barrier
from vlm_trainer.progress import emit

log = logging.getLogger(__name__)


def _metrics_server(config: TrainerConfig) -> Any:
    from vlm_trainer.metrics import TrainerMetrics

    return TrainerMetrics.serve(config.job, config.stage.name)


def _progress(config: TrainerConfig, done: int, total: int) -> None:
    record = contract.ProgressRecord(step=min(done, total), total=total, updated_at=time.time())
    try:
        storage.write_json(storage.join(config.output, contract.PROGRESS_FILE), record.to_doc())
    except OSError as err:  # progress is advisory
        log.warning("could not write progress: %s", err)


def run_eval(config: TrainerConfig, env: DistEnv) -> dict[str, Any]:
    """Generate, gather, score and commit; returns the report (on every rank)."""
    stage = eval_stage(config.stage)
    assert stage is not None and stage.eval is not None, f"stage {config.stage.name!r} is not an eval stage"
    spec = stage.eval
    started = time.perf_counter()
    torch.manual_seed(stage.seed)
    vlm = build_vlm(config.model, config.init_from, seed=stage.seed, resolution_policy=stage.data.resolution)
    model = vlm.model.to(env.device)
    if env.device.type == "cuda" and stage.precision == "bf16":  # CPU runs generate in fp32
        model = model.to(torch.bfloat16)
    model.eval()
    metrics = _metrics_server(config)
    source = stage.data.source_list()[0]
    total = count_samples(source.shards) if env.is_main else 0
    total = min(total, spec.max_samples) if spec.max_samples is not None else total

    def progress(done: int) -> None:
        if env.is_main:  # advisory progress: the operator's status shows samples done / total
            _progress(config, done * env.world_size, total)

    scores, samples = evaluate_by_generation(
        model, vlm.processor, shards=source.shards, fmt=source.format, metrics=list(spec.metrics),
        max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, max_samples=spec.max_samples, env=env,
        on_batch=progress)
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {
        "stage": stage.name, "type": stage.type, "model": config.init_from, "world_size": env.world_size,
        **scores, "wall_seconds": round(seconds, 3),
    }
    if env.is_main:
        if not samples:
            raise BadDataError(f"stage.data.shards: no usable held-out sample in {source.shards} "
                             f"({scores['bad_samples']} bad)")
        final = storage.join(config.output, contract.FINAL_DIR)
        with tempfile.TemporaryDirectory(prefix="vlm-eval-") as tmp:
            with open(os.path.join(tmp, contract.EVAL_FILE), "w") as fh:
                json.dump(report, fh, indent=2)
            with open(os.path.join(tmp, contract.PREDICTIONS_FILE), "w") as fh:
                fh.writelines(json.dumps(s.line()) + "\n" for s in samples)
            stamp = {FINGERPRINT_KEY: config.fingerprint} if config.fingerprint is not None else {}
            storage.commit_dir(tmp, final, step=len(samples), stage=stage.name,
                               extra={"kind": "eval_report", "eval": headline(report), "config": config.dump(),
                                      **stamp})
        storage.write_json(storage.join(config.output, contract.EVAL_FILE), report)
        if metrics is not None:
            metrics.observe_eval(headline(report))
        emit(contract.EVENT_EVALUATED, stage=stage.name, samples=report["samples"], final=final, **headline(report))
    barrier(env)
    if metrics is not None:
        metrics.close()
    return report


class EvalKind:
    """The eval kind: its table row and its runner."""

    row: StageKind = kind("eval")

    def run(self, config: TrainerConfig, env: DistEnv) -> dict[str, Any]:
        return run_eval(config, env)


KIND = EvalKind()
