"""curate: data curation, raw image-text shards filtered, deduplicated and balanced into curated shards.

It trains nothing: it runs in the same torchrun launch, under the same lease and handoff as a training
stage, but its runner is `vlm_trainer.curate.runner` (analyse, decide, write, commit). A later training
stage reads its shards with `data.fromStage`.
"""

from __future__ import annotations

from typing import Any

from vlm_core.kinds import StageKind, kind
from vlm_core.spec import TrainerConfig

from vlm_trainer.curate.runner import run_curate
from vlm_trainer.parallel import DistEnv


class CurateKind:
    """The curate kind: its table row and its runner."""

    row: StageKind = kind("curate")

    def run(self, config: TrainerConfig, env: DistEnv) -> dict[str, Any]:
        return run_curate(config, env)


KIND = CurateKind()
