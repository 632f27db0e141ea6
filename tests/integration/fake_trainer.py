"""A stand-in for `-m vlm_trainer` in the operator's harness tests: same contract, no model.

Run by torchrun in place of the trainer module. It reads the stage's TrainerConfig (--config), checks
the handoff (init_from must be a committed final/), resumes from the newest committed checkpoint under
its output, "trains" maxSteps steps (sleeping FAKE_STEP_SECONDS each), commits checkpoint-<step>/
every checkpoint.everySteps and finally final/ (rank 0), all through vlm_core.storage. It fails on
purpose when FAKE_FAIL_STAGE names its stage, so tests can exhaust maxRestarts.

A test that must act while a stage is still running (delete its Job, suspend it, restart the operator) holds
it there instead of racing its length: with FAKE_HOLD_AFTER_STEP=N and FAKE_HOLD_UNTIL=<path>, no step after
N starts until <path> exists (the test creates it when it is done); the ranks are killed or released.
`{stage}` in the path is replaced by the stage's name, to release the stages of a job one by one.

FAKE_RAISE="<ExceptionType>: <message>" (with FAKE_RAISE_STAGE naming the stage, default every stage) makes
rank FAKE_RAISE_RANK (default 0) raise that exception after FAKE_RAISE_AFTER_STEP steps (default 0), through
the trainer's own torchelastic `record` (with its rank), as the real trainer fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from vlm_core import contract, fingerprint, storage
from vlm_core.spec import TrainerConfig


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    args = p.parse_args()
    with open(args.config) as f:
        cfg = TrainerConfig.load(json.load(f))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    node = os.environ.get("JOB_COMPLETION_INDEX", "?")
    name = cfg.stage.name
    print(f"fake trainer: stage {name} rank {rank}/{world} node {node}", flush=True)
    if os.environ.get("FAKE_FAIL_STAGE") == name:
        print("failing on purpose (FAKE_FAIL_STAGE)", flush=True)
        return 1
    if cfg.init_from:
        v = storage.verify_committed(cfg.init_from)
        if not v.ok:
            print(f"init_from not committed: {v.reason}", flush=True)
            return 3
    latest = storage.latest_checkpoint(cfg.output)
    stamp = {fingerprint.KEY: cfg.fingerprint} if cfg.fingerprint is not None else {}
    if latest and cfg.fingerprint is not None:  # like the trainer: resume only under the same fingerprint
        changes = fingerprint.differences(fingerprint.recorded(storage.read_manifest(latest[1])), cfg.fingerprint)
        if changes:
            print(f"checkpoint {latest[1]} was written by other settings: {'; '.join(changes)}", flush=True)
            return 4
    start = latest[0] if latest else 0
    total = cfg.stage.max_steps or 1
    every = cfg.stage.checkpoint.every_steps
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.2"))
    hold_after = int(os.environ.get("FAKE_HOLD_AFTER_STEP") or 0)
    hold_until = os.environ.get("FAKE_HOLD_UNTIL", "").replace("{stage}", name)
    raise_after = int(os.environ.get("FAKE_RAISE_AFTER_STEP") or 0)
    for step in range(start + 1, total + 1):
        if step > raise_after:
            maybe_raise(name, rank)
        while hold_after and hold_until and step > hold_after and not os.path.exists(hold_until):
            time.sleep(0.05)
        time.sleep(step_seconds)
        if rank != 0:
            continue
        record = contract.ProgressRecord(step=step, total=total, tokens_per_second=1000.0 + step,
                                         updated_at=time.time())
        storage.write_json(storage.join(cfg.output, contract.PROGRESS_FILE), record.to_doc())
        if step % every == 0 and step < total:
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({"step": step}, f)
                storage.commit_dir(
                    d, storage.join(cfg.output, f"{contract.CHECKPOINT_PREFIX}{step}"), step=step, stage=name,
                    extra=stamp,
                )
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "weights.json"), "w") as f:
                json.dump({"stage": name, "init_from": cfg.init_from, "world_size": world}, f)
            storage.commit_dir(
                d,
                storage.join(cfg.output, contract.FINAL_DIR),
                step=total,
                stage=name,
                extra={"resumed_from": start, "world_size": world, **stamp},
            )
    return 0


def maybe_raise(stage: str, rank: int) -> None:
    """FAKE_RAISE: this rank raises the named exception type (a class made with that name)."""
    spec = os.environ.get("FAKE_RAISE", "")
    if not spec or os.environ.get("FAKE_RAISE_STAGE", stage) != stage:
        return
    if rank != int(os.environ.get("FAKE_RAISE_RANK") or 0):
        return
    type_name, _, message = spec.partition(":")
    raise type(type_name.strip(), (RuntimeError,), {})(message.strip())


def recorded_main() -> int:
    if not os.environ.get("FAKE_RAISE"):
        return main()
    from torch.distributed.elastic.multiprocessing.errors import record
    from vlm_trainer.__main__ import _ranked_error_handler

    return record(main, error_handler=_ranked_error_handler())()


if __name__ == "__main__":
    sys.exit(recorded_main())
