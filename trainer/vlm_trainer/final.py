"""Writing `final/` as a Hugging Face folder from a full state dict, whatever the strategy held.

The state dict comes from the strategy (gathered once, at the end) or from merging a LoRA adapter; the
folder is what `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHTS_FILE = "model.safetensors"


def write_hf_folder(
    folder: str, config: Any, generation_config: Any, state: dict[str, torch.Tensor], processor: Any
) -> None:
    """config.json, generation_config.json, model.safetensors (fp32) and the processor's files."""
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    if getattr(config, "tie_word_embeddings", False):
        # The head is re-tied to the embeddings on load; store the shared tensor once.
        weights.pop("lm_head.weight", None)
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    save_file(weights, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    processor.save_pretrained(folder)
