"""Resumable checkpoints and the stage's published `final/`, through the storage layer.

`<output>/checkpoint-<step>/` holds the COMPLETE resume state:
- `model.pt`: the trainable parameters (full tensors, by name). Frozen parameters are not copied: they
  are rebuilt bit-identically from the stage's inputs (initFrom or the component checkpoints);
- `optimizer.pt`: AdamW state (by parameter name) and the LR scheduler's state;
- `rng.pt`: Python, NumPy, torch (and CUDA) RNG states of every rank;
- `trainer_state.json`: step, total steps, world size, every rank's data position, running stats.
Rank 0 writes them to a local temp folder after gathering the per-rank parts, then `storage.commit_dir`
uploads files first and `manifest.json` (sha256 of each file) last, then old checkpoints are pruned.
A folder without a manifest is never loaded; a checkpoint whose hashes do not match is skipped.

`<output>/final/`: `LlavaForConditionalGeneration.save_pretrained` (safetensors) + the processor, so
`from_pretrained` loads it as is; once committed, the stage is done and a re-run does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlm_trainer import contract, storage
from vlm_trainer.data import DataPosition
from vlm_trainer.parallel import DistEnv, barrier, gather_objects

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class ResumeState:
    """What the loop continues from."""

    step: int
    data_position: DataPosition
    stats: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None


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


class Checkpointer:
    """Saves, finds, verifies and loads this stage's checkpoints; publishes final/."""

    def __init__(self, output: str, stage: str, *, every_steps: int, keep_last: int, env: DistEnv):
        self.output = output
        self.stage = stage
        self.every_steps = every_steps
        self.keep_last = keep_last
        self.env = env

    @property
    def final_uri(self) -> str:
        return storage.join(self.output, contract.FINAL_DIR)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 and step < total_steps

    # --- save -------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        position: DataPosition,
        *,
        total_steps: int,
        stats: dict[str, Any],
    ) -> float:
        """Collective: every rank calls it. Returns the seconds it took (files committed, pruned)."""
        started = time.perf_counter()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model_sd = get_model_state_dict(model, options=_FULL)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
        rngs = gather_objects(capture_rng(), self.env)
        positions = gather_objects(position.to_dict(), self.env)
        if self.env.is_main:
            tmp = tempfile.mkdtemp(prefix=f"vlm-{self.stage}-ckpt-")
            try:
                torch.save({k: v for k, v in model_sd.items() if k in trainable}, os.path.join(tmp, MODEL_FILE))
                torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict()}, os.path.join(tmp, OPTIMIZER_FILE))
                torch.save(rngs, os.path.join(tmp, RNG_FILE))
                state = {
                    "step": step,
                    "total_steps": total_steps,
                    "world_size": self.env.world_size,
                    "stage": self.stage,
                    "data_positions": positions,
                    "trainable": sorted(trainable),
                    "stats": stats,
                }
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f, indent=2)
                uri = storage.join(self.output, f"{contract.CHECKPOINT_PREFIX}{step}")
                storage.commit_dir(tmp, uri, step=step, stage=self.stage)
                storage.prune_checkpoints(self.output, self.keep_last)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.env)
        return time.perf_counter() - started

    # --- load -------------------------------------------------------------------------------------

    def latest_verified(self) -> tuple[int, str] | None:
        """Newest committed checkpoint whose files match their manifest sha256 (others are skipped)."""
        for step, uri in reversed(storage.list_checkpoints(self.output)):
            verification = storage.verify_committed(uri, check_sha256=True)
            if verification.ok:
                return step, uri
            log.warning("skipping checkpoint %s: %s", uri, verification.reason)
        return None

    def load(
        self, uri: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> ResumeState:
        """Collective: restore model (trainable part), optimizer, scheduler, this rank's RNG and data position."""
        path = storage.download_dir(uri, tempfile.mkdtemp(prefix=f"vlm-{self.stage}-resume-"))
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        if state["world_size"] != self.env.world_size:
            raise ValueError(
                f"checkpoint {uri} was written by {state['world_size']} processes, this run has "
                f"{self.env.world_size}: data positions are per rank, so resume with the same world size"
            )
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state["trainable"]) != trainable:
            raise ValueError(f"checkpoint {uri} trained other parameters than this stage's stage.trainable")
        model_sd = torch.load(os.path.join(path, MODEL_FILE), map_location="cpu", weights_only=True)
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=False))
        bundle = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            model, optimizer, bundle["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        scheduler.load_state_dict(bundle["scheduler"])
        # Our own file, written by rank 0 of this stage: it holds NumPy/Python RNG tuples, not just tensors.
        rngs = torch.load(os.path.join(path, RNG_FILE), map_location="cpu", weights_only=False)
        restore_rng(rngs[self.env.rank])
        return ResumeState(
            step=int(state["step"]),
            data_position=DataPosition.from_dict(state["data_positions"][self.env.rank]),
            stats=state.get("stats", {}),
            uri=uri,
        )

    # --- final ------------------------------------------------------------------------------------

    def publish_final(self, model: nn.Module, processor: Any, *, step: int, extra: dict[str, Any] | None = None) -> str:
        """Collective: gather full weights, rank 0 saves HF format + processor and commits final/."""
        model_sd = get_model_state_dict(model, options=_FULL)
        if getattr(model.config, "tie_word_embeddings", False):
            # Gathered copies of tied tensors are distinct; the head is re-tied on load, so store it once.
            model_sd.pop("lm_head.weight", None)
        if self.env.is_main:
            tmp = tempfile.mkdtemp(prefix=f"vlm-{self.stage}-final-")
            try:
                model.save_pretrained(tmp, state_dict=model_sd)
                processor.save_pretrained(tmp)
                storage.commit_dir(tmp, self.final_uri, step=step, stage=self.stage, extra=extra)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.env)
        return self.final_uri
