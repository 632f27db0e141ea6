"""The table of distribution strategies (`stages[].strategy`): what each one can do, torch-free.

One row per strategy. The spec's rules (vlm_core.spec), the CRD's CEL rules (vlm_operator.crd) and the
FLOP/memory accounting's input checks (vlm_core.accounting) read this table instead of naming strategies;
the trainer's implementations (vlm_trainer.strategies) are one class per row and may read their row with
`traits(name)`. Adding a strategy = one row here + one class there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a strategy divides over the ranks, from nothing (every rank holds everything) to everything.
Sharding = Literal["nothing", "optimizer_and_gradients", "parameters_too"]
SHARDING_WORDS: dict[str, str] = {
    "nothing": "replicates everything on each device",
    "optimizer_and_gradients": "shards optimizer state and gradients but not parameters",
    "parameters_too": "shards parameters, gradients and optimizer state",
}
OFFLOADS: tuple[str, ...] = ("none", "optimizer", "optimizer_and_params")  # stages[].offload
NO_OFFLOAD = "none"
DEFAULT_STRATEGY = "ddp"


@dataclass(frozen=True)
class StrategyTraits:
    """One strategy (`stages[].strategy`)."""

    name: str
    summary: str  # one line, for the CRD's description and the docs
    sharding: Sharding
    offloads: tuple[str, ...]  # accepted stages[].offload values ("none" always)
    lora: bool  # LoRA adapters (and QLoRA's 4-bit base) on this strategy
    compile: bool  # torch.compile of each block (DeepSpeed wraps the model itself)
    cache_vision_features: bool  # a frozen tower's features cached per image (its forward is no collective)
    fused_adamw_devices: tuple[str, ...]  # devices where torch's fused AdamW runs (offload none)
    checkpoint_format: Literal["dcp", "deepspeed"]
    reshardable: bool  # a checkpoint resumes on another world size

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed's engine keeps the state (16-bit parameters + an fp32 master copy in bf16), not torch's
        (fp32 parameters, autocast or FSDP2's mixed-precision policy); its checkpoints are its own."""
        return self.checkpoint_format == "deepspeed"

    @property
    def shards_parameters(self) -> bool:
        return self.sharding == "parameters_too"

    @property
    def shards_gradients(self) -> bool:
        return self.sharding != "nothing"


TRAITS: dict[str, StrategyTraits] = {
    t.name: t
    for t in (
        StrategyTraits(
            name="ddp", summary="replicated, DistributedDataParallel", sharding="nothing", offloads=(NO_OFFLOAD,),
            lora=True, compile=True, cache_vision_features=True, fused_adamw_devices=("cpu", "cuda"),
            checkpoint_format="dcp", reshardable=True,
        ),
        StrategyTraits(
            name="fsdp", summary="FSDP2 fully_shard per block, bf16 compute / fp32 reduce and master weights",
            sharding="parameters_too", offloads=OFFLOADS, lora=False, compile=True, cache_vision_features=False,
            fused_adamw_devices=("cuda",), checkpoint_format="dcp", reshardable=True,
        ),
        StrategyTraits(
            name="zero2", summary="DeepSpeed ZeRO-2: optimizer state and gradients sharded",
            sharding="optimizer_and_gradients", offloads=(NO_OFFLOAD, "optimizer"), lora=False, compile=False,
            cache_vision_features=True, fused_adamw_devices=(), checkpoint_format="deepspeed", reshardable=False,
        ),
        StrategyTraits(
            name="zero3", summary="DeepSpeed ZeRO-3: parameters sharded too", sharding="parameters_too",
            offloads=OFFLOADS, lora=False, compile=False, cache_vision_features=False, fused_adamw_devices=(),
            checkpoint_format="deepspeed", reshardable=False,
        ),
    )
}

STRATEGIES: tuple[str, ...] = tuple(TRAITS)


def traits(name: str) -> StrategyTraits:
    """The row of strategy `name`; a KeyError names the accepted strategies."""
    try:
        return TRAITS[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}") from None


def supporting(trait: str) -> tuple[str, ...]:
    """The strategies whose boolean trait `trait` (lora, compile, cache_vision_features) is true."""
    return tuple(n for n, t in TRAITS.items() if getattr(t, trait))


def allowing_offload(offload: str) -> tuple[str, ...]:
    """The strategies that accept `offload`."""
    return tuple(n for n, t in TRAITS.items() if offload in t.offloads)


def or_list(names: tuple[str, ...] | list[str]) -> str:
    """'a', 'a or b', 'a, b or c': how messages list what is accepted."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
