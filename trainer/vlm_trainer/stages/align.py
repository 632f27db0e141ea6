"""align: vision-language alignment, the projector only, on caption data (LLaVA's stage 1).

The supervised next-token objective on answer tokens, over padded or packed sequences: the shared loop's
defaults (`TrainingKind`). Its defaults, formats and data-size advice are its row in vlm_core.kinds.
"""

from __future__ import annotations

from vlm_trainer.stages.base import TrainingKind

KIND = TrainingKind("align")
