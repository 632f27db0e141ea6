"""instruct: instruction tuning, language model + projector on conversations (LLaVA's stage 2).

The supervised next-token objective on answer tokens, over padded or packed sequences: the shared loop's
defaults (`TrainingKind`). Its defaults, formats and data-size advice are its row in vlm_core.kinds.
"""

from __future__ import annotations

from vlm_trainer.stages.base import TrainingKind

KIND = TrainingKind("instruct")
