"""`stage.compile`: torch.compile per transformer block, as torchtitan does.

Order (torchtitan's): model -> freezing/LoRA -> activation checkpointing -> compile each block -> the
strategy wraps (DDP around the root, FSDP2 `fully_shard` per block then the root). Blocks are compiled in
place (`nn.Module.compile`), so parameter names, state dicts, checkpoints and `final/` are unchanged; FSDP2's
hooks run outside the compiled regions (dynamo skips FSDP hooks). Every LM block has the same code, so one
compiled graph serves them all; the LM head, the loss and the vision-feature merge stay eager (the
labelled-positions loss has a data-dependent shape).
"""

from __future__ import annotations

from torch import nn

from vlm_trainer import family


def compile_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer block of the LM and of the vision encoder in place; returns how many."""
    blocks = family.decoder_blocks(module)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
