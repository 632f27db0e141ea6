"""torch.distributed.checkpoint (DCP) for the `ddp` and `fsdp` strategies.

Each rank writes only the tensors (or shards) it owns into its own `__<rank>_0.distcp` file plus rank 0's
`.metadata`; loading reads the pieces each rank needs, so an FSDP checkpoint reshards onto another world
size. Frozen parameters are not saved: they are rebuilt bit-identically from the stage's inputs.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vlm_trainer.parallel import DistEnv

_SHARDED = StateDictOptions(ignore_frozen_params=True)
_SHARDED_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen ones are not in the file
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def dcp_save(module: nn.Module, optimizer: torch.optim.Optimizer, local_dir: str) -> None:
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_SHARDED)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=dcp.FileSystemWriter(local_dir))


def dcp_load(module: nn.Module, optimizer: torch.optim.Optimizer, local_dir: str) -> None:
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_SHARDED)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, storage_reader=dcp.FileSystemReader(local_dir))
    set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_SHARDED_LOAD
    )


def full_state_dict(module: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    sd = get_model_state_dict(module, options=_FULL)
    return sd if env.is_main else {}
