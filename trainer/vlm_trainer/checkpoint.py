"""Resumable checkpoints and the stage's published `final/`, through the storage layer.

`<output>/checkpoint-<step>/` holds the COMPLETE resume state, written per rank (nothing is gathered on
rank 0):
- `state/`: the strategy's own sharded files: torch.distributed.checkpoint (`ddp`, `fsdp`: one
  `__<rank>_0.distcp` per rank + `.metadata`) or DeepSpeed's checkpoint (`zero2`, `zero3`: one optimizer
  partition per rank). Trainable parameters and optimizer state only; frozen parameters are rebuilt
  bit-identically from the stage's inputs (initFrom or the component checkpoints);
- `scheduler.pt`: the LR scheduler's state; `rng.pt`: Python, NumPy, torch (and CUDA) RNG states of every rank;
- `trainer_state.json`: step, total steps, world size, strategy, every rank's data position
  (`data.LoaderPosition`: per source epoch/consumed, mix counts, bad-sample counters; an older checkpoint's
  `{epoch, consumed}` loads as one source), running stats.
Each rank writes its files to a local temp folder and uploads them (`storage.upload_files`); then rank 0
commits with `storage.commit_dir`, which writes `manifest.json` (sha256 of every rank's files) LAST, and
old checkpoints are pruned. A folder without a manifest is never loaded; one whose hashes do not match is
skipped.

Resume on another world size: `ddp` and `fsdp` (DCP reshards; each new rank continues the epoch at the
old ranks' mean position, so the order of the rest of that epoch differs from an uninterrupted run);
`zero2`/`zero3` refuse with a message naming the strategy.

`<output>/final/`: a Hugging Face folder (`config.json`, `model.safetensors` in fp32, generation config,
processor) that `LlavaForConditionalGeneration.from_pretrained` loads as is; with LoRA also `adapter/`.
Once committed, the stage is done and a re-run does nothing, as long as the job's settings and inputs are those
stamped into its manifest (`vlm_core.fingerprint`; a checkpoint is resumed only under the same fingerprint).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vlm_core import contract, storage
from vlm_core.fingerprint import KEY as FINGERPRINT_KEY
from vlm_core.fingerprint import differences, recorded

from vlm_trainer.data import DataPosition, LoaderPosition
from vlm_trainer.parallel import DistEnv, barrier, gather_objects
from vlm_trainer.strategies import Strategy

log = logging.getLogger(__name__)

STATE_DIR = "state"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"


class ConfigurationError(ValueError):
    """The stage cannot run as configured (not retried: a restart would fail the same way)."""


@dataclass
class ResumeState:
    """What the loop continues from."""

    step: int
    data_position: LoaderPosition
    stats: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None
    world_size: int | None = None


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resplit_positions(positions: list[dict[str, int]], world_size: int) -> list[DataPosition]:
    """Data positions for another world size: every new rank resumes the oldest epoch still running, having
    consumed the old ranks' mean share of it (samples consumed in that epoch / new world size)."""
    old = [DataPosition.from_dict(p) for p in positions]
    epoch = min(p.epoch for p in old)
    consumed = sum(p.consumed if p.epoch == epoch else 0 for p in old)
    return [DataPosition(epoch=epoch, consumed=consumed // world_size) for _ in range(world_size)]


def resplit_loader_positions(positions: list[dict[str, Any]], world_size: int) -> list[LoaderPosition]:
    """`resplit_positions` per data source; the bad-sample counters of all old ranks go to new rank 0."""
    old = [LoaderPosition.from_dict(p) for p in positions]
    n_sources = len(old[0].sources)
    per_source = [resplit_positions([p.sources[i].to_dict() for p in old], world_size) for i in range(n_sources)]
    new = [
        LoaderPosition(
            sources=[per_source[i][r] for i in range(n_sources)],
            drawn=[sum(p.drawn[i] for p in old) // world_size for i in range(n_sources)],
        )
        for r in range(world_size)
    ]
    for p in old:
        new[0].seen += p.seen
        for shard, reasons in p.bad_by_shard.items():
            for reason, n in reasons.items():
                for _ in range(n):
                    new[0].count_bad(reason, shard)
    return new


class Checkpointer:
    """Saves, finds, verifies and loads this stage's checkpoints; publishes final/."""

    def __init__(self, output: str, stage: str, *, every_steps: int, keep_last: int, env: DistEnv,
                 fingerprint: dict[str, Any] | None = None):
        self.output = output
        self.stage = stage
        self.every_steps = every_steps
        self.keep_last = keep_last
        self.env = env
        # Stamped into every manifest this stage commits; a checkpoint is resumed only under the same one.
        self.fingerprint = fingerprint
        self.stamp = {FINGERPRINT_KEY: fingerprint} if fingerprint is not None else {}

    @property
    def final_uri(self) -> str:
        return storage.join(self.output, contract.FINAL_DIR)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 and step < total_steps

    # --- save -------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        strategy: Strategy,
        scheduler: Any,
        position: LoaderPosition,
        *,
        total_steps: int,
        stats: dict[str, Any],
    ) -> float:
        """Collective: every rank calls it. Returns the seconds it took (files committed, pruned)."""
        started = time.perf_counter()
        uri = storage.join(self.output, f"{contract.CHECKPOINT_PREFIX}{step}")
        if self.env.is_main:
            storage.remove(uri)  # a leftover of a crashed save: never mix its files (or manifest) with ours
        barrier(self.env)
        tmp = tempfile.mkdtemp(prefix=f"vlm-{self.stage}-ckpt-")
        try:
            strategy.save(os.path.join(tmp, STATE_DIR))
            rngs = gather_objects(capture_rng(), self.env)
            positions = gather_objects(position.to_dict(), self.env)
            uploaded = [] if self.env.is_main else storage.upload_files(tmp, uri)
            everyone = gather_objects(uploaded, self.env)  # also waits for every rank's upload
            if self.env.is_main:
                torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
                torch.save(rngs, os.path.join(tmp, RNG_FILE))
                state = {
                    "step": step,
                    "total_steps": total_steps,
                    "world_size": self.env.world_size,
                    "stage": self.stage,
                    "strategy": strategy.name,
                    "format": strategy.checkpoint_format,
                    "data_positions": positions,
                    "trainable": sorted(strategy.trainable_names()),
                    "stats": stats,
                }
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f, indent=2)
                files = [entry for rank_files in everyone for entry in rank_files]
                storage.commit_dir(tmp, uri, step=step, stage=self.stage, uploaded=files, extra=self.stamp)
                storage.prune_checkpoints(self.output, self.keep_last)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.env)
        return time.perf_counter() - started

    # --- load -------------------------------------------------------------------------------------

    def latest_verified(self) -> tuple[int, str] | None:
        """Newest committed checkpoint whose files match their manifest sha256. The ones passed over (and
        checkpoint folders without a manifest) are listed in `self.skipped` with the reason."""
        self.skipped: list[dict[str, Any]] = []
        committed = storage.list_checkpoints(self.output)
        for uri in storage.uncommitted_checkpoints(self.output):
            self.skipped.append({"checkpoint": uri, "reason": "no manifest.json (an interrupted save)"})
        for step, uri in reversed(committed):
            verification = storage.verify_committed(uri, check_sha256=True)
            if verification.ok:
                self.check_fingerprint(uri, verification.manifest)
                return step, uri
            self.skipped.append({"checkpoint": uri, "reason": verification.reason})
            log.warning("skipping checkpoint %s: %s", uri, verification.reason)
        return None

    def check_fingerprint(self, uri: str, manifest: dict[str, Any] | None) -> None:
        """Refuse to resume a checkpoint written under other settings or inputs: no half-old, half-new model."""
        if self.fingerprint is None:
            return
        changes = differences(recorded(manifest), self.fingerprint)
        if changes:
            raise ConfigurationError(
                f"stage {self.stage!r}: checkpoint {uri} was written by other settings than this run's: "
                + "; ".join(changes) + f". Rerun the stage from the start (vlmctl run --rerun-from {self.stage}; on "
                f"Kubernetes spec.runPolicy.rerunFrom: {self.stage}), or restore the settings it was written with."
            )

    def load(self, uri: str, strategy: Strategy, scheduler: Any) -> ResumeState:
        """Collective: restore trainable parameters, optimizer, scheduler, this rank's RNG and data position."""
        tmp = tempfile.mkdtemp(prefix=f"vlm-{self.stage}-resume-")
        try:
            path = storage.download_dir(uri, tmp)
            with open(os.path.join(path, STATE_FILE)) as f:
                state = json.load(f)
            check_resumable(state, uri, strategy, self.env)
            strategy.load(os.path.join(path, STATE_DIR))
            scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER_FILE), weights_only=True))
            # Our own file, written by rank 0 of this stage: it holds NumPy/Python RNG tuples, not just tensors.
            rngs = torch.load(os.path.join(path, RNG_FILE), map_location="cpu", weights_only=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        same_world = state["world_size"] == self.env.world_size
        if same_world:
            restore_rng(rngs[self.env.rank])
            position = LoaderPosition.from_dict(state["data_positions"][self.env.rank])
        else:
            position = resplit_loader_positions(state["data_positions"], self.env.world_size)[self.env.rank]
            seed = int(state["step"]) * 1000 + self.env.rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        return ResumeState(
            step=int(state["step"]), data_position=position, stats=state.get("stats", {}), uri=uri,
            world_size=int(state["world_size"]),
        )

    # --- final ------------------------------------------------------------------------------------

    def publish_final(
        self,
        write: Callable[[str], None],
        *,
        step: int,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Rank 0: `write(folder)` fills a local folder, which is committed as final/. Collective (barrier)."""
        if self.env.is_main:
            tmp = tempfile.mkdtemp(prefix=f"vlm-{self.stage}-final-")
            try:
                write(tmp)
                storage.commit_dir(tmp, self.final_uri, step=step, stage=self.stage, extra={**(extra or {}), **self.stamp})
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.env)
        return self.final_uri


def check_resumable(state: dict[str, Any], uri: str, strategy: Strategy, env: DistEnv) -> None:
    """Refuse, with a message a user can act on, a checkpoint this run cannot continue from."""
    fmt = state.get("format", "dcp")
    if fmt != strategy.checkpoint_format:
        raise ValueError(
            f"stage.strategy: checkpoint {uri} was written by strategy {state.get('strategy')!r} ({fmt} format); "
            f"this run uses {strategy.name!r} ({strategy.checkpoint_format}); resume with the same strategy"
        )
    if state["world_size"] != env.world_size and not strategy.reshardable:
        raise ValueError(
            f"checkpoint {uri} was written by {state['world_size']} processes, this run has {env.world_size}: "
            f"strategy {strategy.name!r} cannot resume on another world size (its optimizer partitions are "
            f"per rank); resume with {state['world_size']} processes, or use strategy fsdp or ddp"
        )
    trainable = strategy.trainable_names()
    if set(state["trainable"]) != trainable:
        raise ValueError(f"checkpoint {uri} trained other parameters than this stage's stage.trainable")
