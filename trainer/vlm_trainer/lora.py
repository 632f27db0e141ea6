"""LoRA and QLoRA through PEFT: adapters on the LM's projections, the projector fully trained.

`apply_lora` wraps the Llava model in a `PeftModel`: LoRA adapters on `stage.lora.targetModules` inside
the language model (and inside the vision tower only if it is in stage.trainable), the projector as a
`modules_to_save` module (a trainable copy), everything else frozen. QLoRA (`stage.qlora`) first reloads
the model with its language model in 4-bit NF4 with double quantisation (bitsandbytes, bf16 compute) on
CUDA, and trains with bitsandbytes' paged AdamW. bitsandbytes is imported only for QLoRA.

`final/` gets the merged full model (the base reloaded in fp32, the adapter loaded and merged), loadable
by `LlavaForConditionalGeneration.from_pretrained`, and `final/adapter/` the adapter itself, loadable by
`PeftModel.from_pretrained`.
"""

from __future__ import annotations

import re
import tempfile

import torch
from torch import nn
from vlm_core.spec import StageSpec

from vlm_trainer import family
from vlm_trainer.model import VLM


class QLoRAUnavailable(ValueError):
    """QLoRA was asked for where it cannot run; the message names the field."""


def check_qlora_device(stage: StageSpec, device: torch.device) -> None:
    """QLoRA needs CUDA (bitsandbytes 4-bit kernels): fail at start, naming the field."""
    if stage.qlora and device.type != "cuda":
        raise QLoRAUnavailable(
            f"stage.qlora: true needs a CUDA device (bitsandbytes 4-bit NF4), but this process runs on "
            f"{device.type}; set qlora: false (plain LoRA runs on CPU) or give the stage GPUs (resources.gpusPerNode)"
        )


def target_pattern(stage: StageSpec, fam: family.Family = family.ASSEMBLED) -> str:
    """PEFT target_modules regex: the listed module names inside the LM (and the vision tower if trainable),
    the parts' module names taken from the family's row."""
    assert stage.lora is not None
    parts = ["language_model"] + (["vision_tower"] if "vision_tower" in (stage.trainable or []) else [])
    # the LM part's first module is its body (the head is never adapted: the pattern wants `<part>.<...>.<name>`)
    scopes = [family.part_module_names(fam, p)[0] for p in parts]
    names = "|".join(re.escape(n) for n in stage.lora.target_modules)
    return rf".*\.({'|'.join(scopes)})\..*\.({names})$"


def lora_config(stage: StageSpec, fam: family.Family = family.ASSEMBLED, *,
                modules_to_save: tuple[str, ...] = ()):  # noqa: ANN201 - peft's LoraConfig
    """`modules_to_save`: module names a stage kind always trains in full (a reward model's head), besides the
    projector when it trains."""
    from peft import LoraConfig

    assert stage.lora is not None
    saved = (family.part_module_names(fam, "projector") if "projector" in (stage.trainable or []) else [])
    saved += [m for m in modules_to_save if m not in saved]
    return LoraConfig(
        r=stage.lora.rank,
        lora_alpha=stage.lora.alpha,
        lora_dropout=stage.lora.dropout,
        target_modules=target_pattern(stage, fam),
        modules_to_save=saved or None,
        bias="none",
    )


def quantized_copy(vlm: VLM, device: torch.device) -> nn.Module:
    """The model reloaded with its language model in 4-bit NF4 (double quantisation, bf16 compute)."""
    fam = family.of_model(vlm.model)
    from transformers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory(prefix="vlm-qlora-") as tmp:
        vlm.model.save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(fam.unquantized_modules),
        )
        return fam.model_class.from_pretrained(  # Llava or LlavaNext, as built
            tmp, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device.index or 0}
        )


def apply_lora(model: nn.Module, stage: StageSpec, device: torch.device, *,
               modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """The PeftModel to train (adapters + projector copy + `modules_to_save` trainable, the rest frozen)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if stage.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=stage.gradient_checkpointing)
    model.requires_grad_(False)
    return get_peft_model(model, lora_config(stage, family.of_model(model), modules_to_save=modules_to_save))


def paged_adamw(groups: list[dict], stage: StageSpec) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW(groups, betas=tuple(stage.optimizer.betas), weight_decay=stage.optimizer.weight_decay)


def merged_state_dict(base: nn.Module, adapter_dir: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights: `base` (the stage's starting model, unquantised) + the saved adapter, merged."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().float().cpu().contiguous() for k, v in merged.state_dict().items()}
