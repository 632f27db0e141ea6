"""One FLOP and memory accounting for a VLM stage, torch-free: the operator's estimate and admission
and the trainer's MFU metric both call it.

Everything is computed from the checkpoints' `config.json` alone (no weights read):

- `ModelShape.from_configs(vision, language)` / `ModelShape.from_llava(config)`: the dimensions of a
  CLIP/SigLIP vision tower, the LLaVA projector and a Llama/Qwen2/Mistral-style LM, with exact
  parameter counts per part (tested against `numel()` of models built from the same configs).
- `StageInput`: what a stage does that matters for memory and compute (strategy, offload, LoRA/QLoRA,
  micro batch, sequence length, checkpointing, world size, trainable parts). `stage_input(stage)` builds
  it from a `StageSpec`, reading fields that newer spec versions add with defaults.
- `estimate_memory(shape, inp)`: bytes per GPU by component (weights, gradients, fp32 master weights,
  optimizer states, activations, logits, DPO reference, framework overhead) and bytes offloaded to
  host memory.
- `StageFlops`: training FLOPs per token and per sequence (frozen parts forward only, a frozen part that
  gradients flow through forward + input-gradient, trained parts forward + input- + weight-gradient, the
  vision tower's forward once per image). `StageFlops.step_flops(tokens, samples)` is the trainer's MFU
  numerator.

Conventions (stated once, also in the README): parameter FLOPs only (2 per multiply-accumulate; the
attention-score term, ~8% more for a 7B LM at 2K tokens, is left out, as in Chinchilla's 6ND); memory
in bytes, GiB = 2**30 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vlm_core import strategies
from vlm_core.kinds import kind
from vlm_core.model_config import tokens_per_image
from vlm_core.spec import TRAINABLE_PARTS, DPOSpec, LoRASpec

GIB = 2**30

# What a GPU's framework state costs beyond the tensors counted here: the CUDA context, cuBLAS
# workspaces and NCCL buffers (a fixed amount), and the caching allocator's fragmentation and
# short-lived temporaries (a share of the counted tensors). Admission compares the total with the
# declared GPU memory, so these two numbers are the documented headroom.
OVERHEAD_FIXED_BYTES = 1 * GIB
OVERHEAD_FRACTION = 0.10

# QLoRA: NF4 stores 4 bits per weight; double quantisation stores one 8-bit absmax per 64 weights and
# one fp32 scale per 256 of those (bitsandbytes defaults).
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

LM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

STRATEGIES = strategies.STRATEGIES
OFFLOADS = strategies.OFFLOADS
PARTS = TRAINABLE_PARTS


@dataclass(frozen=True)
class GPU:
    """A GPU product: usable memory and dense bf16 (fp16 where no bf16) tensor-core peak."""

    name: str
    memory_gib: float
    peak_flops_per_second: float


# The common data-centre and consumer cards (memory as the driver reports it, in GiB).
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("H200", 139.8, 989e12),
    GPU("H100", 79.6, 989e12),
    GPU("A100-80GB", 79.2, 312e12),
    GPU("A100-40GB", 39.4, 312e12),
    GPU("L40S", 44.4, 362e12),
    GPU("A10G", 22.0, 70e12),
    GPU("L4", 22.0, 121e12),
    GPU("RTX4090", 23.6, 165e12),
    GPU("RTX3090", 23.6, 71e12),
    GPU("V100-32GB", 31.7, 125e12),
    GPU("T4", 14.6, 65e12),
)}


# Used when the device is a CPU or unknown: an order of magnitude for a few AVX cores, so the CPU
# ratio is comparable between runs rather than meaningful in absolute terms.
CPU_PEAK_FLOPS_PER_SECOND = 1e11


def gpu_for_device(device_name: str | None) -> GPU | None:
    """The table entry for a device named like `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB"): matched by product family (longest first, so L40S is not L4); None if unknown."""
    if not device_name:
        return None
    name = device_name.upper().replace(" ", "")
    families: dict[str, list[GPU]] = {}
    for gpu in GPUS.values():
        families.setdefault(gpu.name.split("-")[0].upper(), []).append(gpu)
    for family in sorted(families, key=len, reverse=True):
        if family in name:
            variants = families[family]
            by_memory = [g for g in variants if g.name.upper().replace("-", "").removeprefix(family) in name]
            return (by_memory or variants)[0]
    return None


def peak_flops_for_device(device_name: str | None) -> float:
    """Dense bf16 peak FLOP/s of a device (the GPUS table, the estimator's); the CPU figure otherwise."""
    gpu = gpu_for_device(device_name)
    return gpu.peak_flops_per_second if gpu is not None else CPU_PEAK_FLOPS_PER_SECOND


def gpu_named(name: str) -> GPU:
    """The table entry for `name` (case-insensitive); a clear error listing the known names otherwise."""
    for key, gpu in GPUS.items():
        if key.lower() == name.lower():
            return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


# --- shapes and parameter counts -------------------------------------------------------------------


def _get(cfg: Mapping[str, Any], key: str, default: Any = None, *, what: str) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise ValueError(f"{what}: config.json has no {key!r}")
    return default


@dataclass(frozen=True)
class LMShape:
    """A Llama/Qwen2/Mistral-style decoder: RMSNorm, GQA attention, SwiGLU MLP."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, tied: bool | None = None) -> LMShape:
        what = "language model"
        mtype = cfg.get("model_type", "")
        if mtype not in ("llama", "qwen2", "mistral", "qwen3"):
            raise ValueError(
                f"{what}: model_type {mtype!r} is not supported by the estimator; supported: llama, qwen2, "
                "qwen3, mistral"
            )
        hidden = int(_get(cfg, "hidden_size", what=what))
        heads = int(_get(cfg, "num_attention_heads", what=what))
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            hidden=hidden,
            intermediate=int(_get(cfg, "intermediate_size", what=what)),
            layers=int(_get(cfg, "num_hidden_layers", what=what)),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(_get(cfg, "vocab_size", what=what)),
            tied=bool(cfg.get("tie_word_embeddings", False)) if tied is None else tied,
            qkv_bias=mtype == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mtype == "qwen3",
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """(in, out, bias) of each linear in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias),
            "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias),
            "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }

    @property
    def layer_params(self) -> int:
        linears = sum(a * b + (b if bias else 0) for a, b, bias in self.linear_shapes().values())
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return linears + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own parameters (0 when tied to the embeddings)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embedding_params + self.layers * self.layer_params + self.hidden + self.head_params

    @property
    def matmul_params(self) -> int:
        """Parameters used in a matmul per token: every layer's linears and the head (tied or not)."""
        linears = sum(a * b for a, b, _ in self.linear_shapes().values())
        return self.layers * linears + self.vocab * self.hidden


@dataclass(frozen=True)
class VisionShape:
    """A CLIP or SigLIP vision transformer (pre-LN, GELU MLP, biases everywhere)."""

    kind: str  # "clip" | "siglip"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch: int
    image_size: int
    channels: int = 3
    siglip_head: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> VisionShape:
        what = "vision encoder"
        mtype = cfg.get("model_type", "")
        if mtype in ("clip", "siglip") and isinstance(cfg.get("vision_config"), Mapping):
            cfg, mtype = cfg["vision_config"], f"{mtype}_vision_model"
        if mtype not in ("clip_vision_model", "siglip_vision_model"):
            raise ValueError(
                f"{what}: model_type {mtype!r} is not supported by the estimator; supported: "
                "clip_vision_model, siglip_vision_model (or a full clip/siglip config with vision_config)"
            )
        return cls(
            kind="clip" if mtype.startswith("clip") else "siglip",
            hidden=int(_get(cfg, "hidden_size", what=what)),
            intermediate=int(_get(cfg, "intermediate_size", what=what)),
            layers=int(_get(cfg, "num_hidden_layers", what=what)),
            heads=int(_get(cfg, "num_attention_heads", what=what)),
            patch=int(_get(cfg, "patch_size", what=what)),
            image_size=int(_get(cfg, "image_size", what=what)),
            channels=int(cfg.get("num_channels") or 3),
            siglip_head=bool(cfg.get("vision_use_head", True)),
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def positions(self) -> int:
        """Tokens through the encoder per image (patches, + CLS for CLIP)."""
        return self.patches + (1 if self.kind == "clip" else 0)

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h

    @property
    def embedding_params(self) -> int:
        h = self.hidden
        conv = self.channels * self.patch * self.patch * h + (h if self.kind == "siglip" else 0)
        cls_token = h if self.kind == "clip" else 0
        return conv + cls_token + self.positions * h

    @property
    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        extra = 2 * h  # post_layernorm
        if self.kind == "clip":
            extra += 2 * h  # pre_layrnorm
        elif self.siglip_head:  # attention-pooling head: probe, MHA, LayerNorm, MLP
            extra += h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
        return self.embedding_params + self.layers * self.layer_params + extra

    @property
    def matmul_params(self) -> int:
        """Per-position matmul parameters: the patch convolution and every layer's linears."""
        h, i = self.hidden, self.intermediate
        return self.channels * self.patch * self.patch * h + self.layers * (4 * h * h + 2 * h * i)


@dataclass(frozen=True)
class ModelShape:
    """The VLM: vision tower -> projector (Linear, GELU, Linear) -> LM."""

    vision: VisionShape
    lm: LMShape
    feature_select: str = "full"  # "default" drops CLIP's CLS token

    @classmethod
    def from_configs(
        cls, vision: Mapping[str, Any], language: Mapping[str, Any], *, feature_select: str = "full"
    ) -> ModelShape:
        """From the vision encoder's and the LM's config.json (as `spec.model` names them)."""
        return cls(VisionShape.from_config(vision), LMShape.from_config(language), feature_select)

    @classmethod
    def from_llava(cls, cfg: Mapping[str, Any]) -> ModelShape:
        """From a LlavaConfig's dict (the assembled model's or a committed final/'s config.json)."""
        text = dict(cfg["text_config"])
        tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        return cls(
            VisionShape.from_config(cfg["vision_config"]),
            LMShape.from_config(text, tied=bool(tied) if tied is not None else None),
            str(cfg.get("vision_feature_select_strategy", "default")),
        )

    @property
    def image_tokens(self) -> int:
        """LM tokens per image (what transformers' LLaVA processor expands `<image>` to: `model_config`'s rule)."""
        return tokens_per_image(image_size=self.vision.image_size, patch_size=self.vision.patch,
                                has_cls_token=self.vision.kind == "clip", feature_select=self.feature_select)

    @property
    def projector_params(self) -> int:
        v, h = self.vision.hidden, self.lm.hidden
        return (v * h + h) + (h * h + h)

    @property
    def params_by_part(self) -> dict[str, int]:
        return {
            "vision_tower": self.vision.params,
            "projector": self.projector_params,
            "language_model": self.lm.params,
        }

    @property
    def params(self) -> int:
        return sum(self.params_by_part.values())

    @property
    def largest_layer_params(self) -> int:
        """Largest module gathered at once under ZeRO-3/FSDP (a decoder block or the embedding)."""
        return max(self.lm.layer_params, self.lm.embedding_params, self.vision.layer_params)


def lora_params(shape: ModelShape, rank: int, targets: Sequence[str], *, vision: bool = False) -> int:
    """Adapter parameters: r x (in + out) per targeted linear, in the LM (and the vision tower if it trains).

    `targets` are module names (last path component) or "all-linear".
    """
    if rank <= 0:
        raise ValueError(f"lora.rank: must be > 0, got {rank}")
    want = set(targets)
    every = "all-linear" in want
    total = 0
    for name, (a, b, _) in shape.lm.linear_shapes().items():
        if every or name in want:
            total += shape.lm.layers * rank * (a + b)
    if vision:
        h, i = shape.vision.hidden, shape.vision.intermediate
        vshapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h), "fc1": (h, i), "fc2": (i, h)}
        for name, (a, b) in vshapes.items():
            if every or name in want:
                total += shape.vision.layers * rank * (a + b)
    return total


def quantizable_lm_params(shape: ModelShape) -> int:
    """LM parameters QLoRA stores in 4 bit: the decoder layers' linear weights (not norms, embeddings, head)."""
    return shape.lm.layers * sum(a * b for a, b, _ in shape.lm.linear_shapes().values())


# --- what a stage does -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageInput:
    """The stage settings the accounting depends on (a StageSpec reduced to numbers)."""

    stage_type: str = "instruct"  # align | instruct | dpo
    trainable: tuple[str, ...] = ("projector", "language_model")
    strategy: str = "ddp"
    offload: str = "none"
    precision: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 2048  # tokens per sequence, image tokens included
    images_per_sample: int = 1
    gradient_checkpointing: bool = False
    world_size: int = 1
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = field(default_factory=lambda: tuple(LoRASpec().target_modules))  # the schema's default
    qlora: bool = False
    dpo_reference: str = "sharded"  # sharded | precomputed | adapter_disabled
    on_gpu: bool = True  # False on CPU: no CUDA context, fp32 everywhere

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload: {self.offload!r} is not one of {', '.join(OFFLOADS)}")
        row = strategies.traits(self.strategy)
        if self.offload not in row.offloads:
            raise ValueError(f"offload: needs strategy {strategies.or_list(strategies.allowing_offload(self.offload))} "
                             f"for {self.offload!r} ({row.name} {strategies.SHARDING_WORDS[row.sharding]})")
        bad = set(self.trainable) - set(PARTS)
        if bad or not self.trainable:
            raise ValueError(f"trainable: {sorted(bad) or '[]'} not accepted; parts: {', '.join(PARTS)}")
        if self.qlora and self.lora_rank is None:
            raise ValueError("qlora: needs lora settings (a LoRA rank)")
        for name in ("micro_batch", "seq_len", "world_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @property
    def sequences_per_sample(self) -> int:
        """A preference sample (DPO) is a pair: chosen and rejected sequences both run (the kinds table says)."""
        return kind(self.stage_type).sequences_per_sample

    @property
    def lm_trains_full(self) -> bool:
        return "language_model" in self.trainable and self.lora_rank is None


def stage_input(stage: Any, *, on_gpu: bool | None = None) -> StageInput:
    """A `StageSpec` as a StageInput. Fields a spec version may not have yet (offload, lora, qlora,
    dpo.reference) are read with defaults, so this works before and after they exist."""
    lora = getattr(stage, "lora", None)
    dpo = getattr(stage, "dpo", None) or DPOSpec()
    reference = dpo.resolved_reference(lora=lora is not None)
    res = stage.resources
    gpu = res.gpus_per_node > 0 if on_gpu is None else on_gpu
    return StageInput(
        stage_type=stage.type,
        trainable=tuple(stage.trainable or ()),
        strategy=stage.strategy,
        offload=getattr(stage, "offload", "none") or "none",
        precision=stage.precision if gpu else "fp32",
        micro_batch=stage.batch.micro_size,
        seq_len=stage.data.max_length,
        gradient_checkpointing=stage.gradient_checkpointing,
        world_size=res.nodes * res.procs_per_node,
        lora_rank=getattr(lora, "rank", None) if lora is not None else None,
        lora_targets=tuple(lora.target_modules) if lora is not None else tuple(LoRASpec().target_modules),
        qlora=bool(getattr(stage, "qlora", False)),
        dpo_reference=reference,
        on_gpu=gpu,
    )


# --- memory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Bytes per parameter the strategy keeps, before sharding."""

    weights: float  # the model's own parameters
    grads: float  # gradients in the model's dtype
    master: float  # fp32 master copy held by the optimizer (0 when the weights are fp32 already)
    grads_fp32: float  # DeepSpeed's fp32 gradient partition fed to the optimizer
    optimizer: float  # AdamW m and v


def recipe(strategy: str, precision: str) -> Recipe:
    """How this trainer keeps state per strategy.

    ddp/fsdp keep fp32 parameters (the master weights) and gradients and compute in bf16 (autocast;
    FSDP2's mixed-precision policy); DeepSpeed ZeRO keeps 16-bit parameters (and, ZeRO-2, 16-bit
    gradients) plus an fp32 master copy, fp32 gradient partition and Adam m/v: its own estimators'
    2 + 18 (ZeRO-2) and 18 (ZeRO-3) bytes per parameter.
    """
    row = strategies.traits(strategy)
    if row.deepspeed and precision == "bf16":
        # ZeRO-3 reduce-scatters each block's 16-bit gradients straight into the fp32 partition
        return Recipe(weights=2, grads=0 if row.shards_parameters else 2, master=4, grads_fp32=4, optimizer=8)
    return Recipe(weights=4, grads=4, master=0, grads_fp32=0, optimizer=8)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by component (what `vlmctl estimate -o json` prints), and bytes in host memory."""

    components: dict[str, int]
    offloaded_bytes: int = 0  # per GPU, held in host memory instead
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


@dataclass(frozen=True)
class ParamBook:
    """Parameters by role for one stage."""

    total: int
    trained: int  # parameters with gradients and optimizer state
    frozen_full: int  # frozen, kept at the recipe's weight width
    frozen_4bit: int  # frozen, NF4 (QLoRA)
    adapters: int


def param_book(shape: ModelShape, inp: StageInput) -> ParamBook:
    parts = shape.params_by_part
    trained = sum(parts[p] for p in inp.trainable if not (p == "language_model" and inp.lora_rank is not None))
    adapters = 0
    if inp.lora_rank is not None:
        adapters = lora_params(shape, inp.lora_rank, inp.lora_targets, vision="vision_tower" in inp.trainable)
        if "vision_tower" in inp.trainable:  # the vision tower gets adapters instead of full training
            trained -= parts["vision_tower"]
    frozen = shape.params - trained
    frozen_4bit = quantizable_lm_params(shape) if inp.qlora else 0
    return ParamBook(shape.params + adapters, trained + adapters, frozen - frozen_4bit, frozen_4bit, adapters)


def _lm_layer_activation_bytes(lm: LMShape, mode: str, act: float, resid: float) -> float:
    """Bytes one decoder layer saves for backward, per token.

    mode "trained": every linear saves its input; "through": frozen weights, but gradients flow to
    earlier parts, so only the non-linear ops save (norms, attention, SiLU/mul); "none": nothing.
    `act` = bytes of the compute dtype, `resid` = bytes of the residual stream.
    """
    h, i, q, kv = lm.hidden, lm.intermediate, lm.q_dim, lm.kv_dim
    attention = act * (2 * q + 2 * kv)  # SDPA's q, k, v inputs and output
    if mode == "trained":
        norms = 2 * (resid + 4 + act) * h  # input, fp32 normalised (weight grad), output cast for the linears
        mlp = act * 4 * i  # gate, up, silu(gate), product
        return norms + attention + mlp
    if mode == "through":
        return 2 * (resid + 4) * h + attention + act * 3 * i
    return 0.0


def _vision_layer_activation_bytes(v: VisionShape, act: float, resid: float) -> float:
    """Bytes one trained vision block saves per position (LayerNorms, q/k/v/out, GELU MLP)."""
    h, i = v.hidden, v.intermediate
    return 2 * (resid + 4 + act) * h + act * 4 * h + act * 2 * i


def head_outputs(lm: LMShape, inp: StageInput) -> int:
    """Outputs of the head on top of the LM: the vocabulary, or 1 for a kind whose scalar head replaces it."""
    return 1 if kind(inp.stage_type).scalar_head else lm.vocab


def activation_bytes(shape: ModelShape, inp: StageInput) -> dict[str, int]:
    """Saved activations and the logits buffer for one micro batch on one GPU.

    With gradient checkpointing each decoder (and vision) block keeps only its input, plus one block's
    full activations while it is recomputed in backward.
    """
    act = 2.0 if (inp.precision == "bf16" and inp.on_gpu) else 4.0
    # fp32 parameters under autocast keep an fp32 residual stream; 16-bit models a 16-bit one.
    resid = 4.0 if recipe(inp.strategy, inp.precision).weights == 4 else act
    seqs = inp.micro_batch * inp.sequences_per_sample
    tokens = seqs * inp.seq_len
    lm, vis = shape.lm, shape.vision
    vision_trains = "vision_tower" in inp.trainable
    lm_mode = "trained" if ("language_model" in inp.trainable) else "through"
    if inp.lora_rank is not None and "language_model" in inp.trainable:
        lm_mode = "through"  # frozen base: only the adapters' inputs add (counted below)
    per_layer = _lm_layer_activation_bytes(lm, lm_mode, act, resid)
    if inp.lora_rank is not None:
        targeted = [n for n in LM_LINEAR_NAMES if n in inp.lora_targets or "all-linear" in inp.lora_targets]
        shapes = lm.linear_shapes()
        # each adapter saves its input (dropout mask included) and its rank-r intermediate
        per_layer += sum(act * shapes[n][0] * 2 + act * inp.lora_rank for n in targeted)
    # logits (compute dtype), their fp32 copy for the loss (none when already fp32), the log-softmax the
    # cross-entropy saves, and the fp32 gradient at the start of backward; a scalar head (reward) has one output
    logits = tokens * head_outputs(lm, inp) * (act + (4 if act != 4 else 0) + 4 + 4)
    if inp.gradient_checkpointing:
        # a block is recomputed only after the logits' gradient is consumed: the peak has the larger of the two
        lm_bytes = tokens * lm.layers * resid * lm.hidden + max(0.0, tokens * per_layer - logits)
    else:
        lm_bytes = tokens * lm.layers * per_layer
    lm_bytes += tokens * (resid + 4 + act) * lm.hidden  # final norm and the head's input

    images = seqs * inp.images_per_sample
    vision_bytes = 0.0
    if vision_trains:
        per_block = _vision_layer_activation_bytes(vis, act, resid)
        if inp.gradient_checkpointing:
            vision_bytes = images * vis.positions * (vis.layers * resid * vis.hidden + per_block)
        else:
            vision_bytes = images * vis.positions * vis.layers * per_block
    projector_bytes = 0.0
    if "projector" in inp.trainable or vision_trains:
        projector_bytes = images * shape.image_tokens * act * (vis.hidden + 2 * lm.hidden)
    return {
        "activations": int(lm_bytes + vision_bytes + projector_bytes),
        "logits": int(logits),
    }


def estimate_memory(shape: ModelShape, inp: StageInput) -> MemoryEstimate:
    """Memory per GPU of one stage by component.

    Sharding: fsdp and zero3 divide weights, gradients and optimizer state by the world size; zero2
    divides gradients and optimizer state; ddp divides nothing (and keeps a gradient-sized bucket
    copy for its all-reduce when the world size is > 1). Frozen parts have no gradients or optimizer
    state. ZeRO-3 and FSDP also hold the largest gathered block (DeepSpeed: 4 bytes x its parameters).
    """
    r = recipe(inp.strategy, inp.precision)
    if not inp.on_gpu:
        r = Recipe(weights=4, grads=4, master=0, grads_fp32=0, optimizer=8)
    book = param_book(shape, inp)
    w = inp.world_size
    row = strategies.traits(inp.strategy)
    shard_weights, shard_grads = row.shards_parameters, row.shards_gradients
    frozen_width = 2 if (inp.qlora or (r.weights == 2)) else r.weights
    weights = book.trained * r.weights + book.frozen_full * frozen_width
    weights += book.frozen_4bit * QLORA_BYTES_PER_PARAM
    grads = book.trained * r.grads
    master = book.trained * r.master
    grads_fp32 = book.trained * r.grads_fp32
    optim = book.trained * r.optimizer
    if shard_weights:
        weights /= w
    if shard_grads:
        grads, master, grads_fp32, optim = grads / w, master / w, grads_fp32 / w, optim / w
    notes = []
    offloaded = 0.0
    if inp.offload != "none":
        if not row.deepspeed:  # torch's CPUOffloadPolicy (FSDP2) moves parameters, gradients and optimizer state
            offloaded = weights + grads + master + grads_fp32 + optim
            weights = grads = master = grads_fp32 = optim = 0.0
        else:
            offloaded = master + grads_fp32 + optim + grads
            master = grads_fp32 = optim = grads = 0.0
            if inp.offload == "optimizer_and_params":
                offloaded += weights
                weights = 0.0
    comps: dict[str, float] = {
        "weights": weights,
        "gradients": grads,
        "master_weights": master,
        "gradients_fp32": grads_fp32,
        "optimizer_states": optim,
    }
    if not shard_grads and w > 1:  # replicated: DDP's gradient buckets for the all-reduce
        comps["ddp_buckets"] = book.trained * r.grads
    gathered = 0.0
    if shard_weights and row.deepspeed:
        gathered = 4 * shape.largest_layer_params
    elif shard_weights:
        # the block being computed and the one prefetched, unsharded (bf16 compute copies on GPU), and the
        # root (embeddings, head, projector), which stays unsharded from forward to backward
        width = 2 if inp.on_gpu and inp.precision == "bf16" else 4
        root = shape.lm.embedding_params + shape.lm.head_params + shape.projector_params
        gathered = (2 * shape.lm.layer_params + root) * width
    comps["gathered_params"] = gathered
    if not shard_grads and inp.on_gpu and inp.precision == "bf16" and r.weights == 4:
        comps["autocast_copies"] = book.trained * 2  # autocast caches bf16 casts of trainable weights
    comps.update(activation_bytes(shape, inp))
    reference_model = kind(inp.stage_type).reference_model
    if reference_model and inp.dpo_reference == "sharded":
        ref = shape.params * (r.weights if not inp.qlora else QLORA_BYTES_PER_PARAM)
        comps["dpo_reference"] = ref / w if shard_weights else ref
    elif reference_model:
        notes.append(f"dpo reference {inp.dpo_reference}: no second copy of the weights")
    tensors = sum(comps.values())
    comps["overhead"] = (OVERHEAD_FIXED_BYTES if inp.on_gpu else 0) + OVERHEAD_FRACTION * tensors
    return MemoryEstimate({k: int(v) for k, v in comps.items()}, int(offloaded), tuple(notes))


def model_state_bytes(est: MemoryEstimate) -> int:
    """Weights, gradients, master weights, optimizer states and gathered blocks: DeepSpeed's 'model states'."""
    keys = ("weights", "gradients", "master_weights", "gradients_fp32", "optimizer_states", "gathered_params")
    return sum(est.components.get(k, 0) for k in keys)


# --- compute ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageFlops:
    """Training FLOPs of a stage: per sequence token (LM) and per sequence (vision tower + projector,
    one image each). The trainer multiplies by its counted tokens and samples for MFU."""

    per_token: float
    per_sequence: float
    sequences_per_sample: int = 1

    @classmethod
    def of(cls, shape: ModelShape, inp: StageInput) -> StageFlops:
        lm_full = inp.lm_trains_full
        vision_trains = "vision_tower" in inp.trainable
        n_lm = shape.lm.matmul_params - (shape.lm.vocab - head_outputs(shape.lm, inp)) * shape.lm.hidden
        # LM: forward 2N; gradients always flow through it to the loss's inputs (2N); weight grads if it trains.
        lm = 2 * n_lm + 2 * n_lm + (2 * n_lm if lm_full else 0)
        if inp.lora_rank is not None and "language_model" in inp.trainable:
            lm += 6 * lora_params(shape, inp.lora_rank, inp.lora_targets)
        n_v = shape.vision.matmul_params * shape.vision.positions
        vision = 2 * n_v * (3 if vision_trains else 1)
        n_p = (shape.projector_params - 2 * shape.lm.hidden) * shape.image_tokens
        projector = 2 * n_p + (2 * n_p if "projector" in inp.trainable else 0) + (2 * n_p if vision_trains else 0)
        per_seq = (vision + projector) * inp.images_per_sample
        if kind(inp.stage_type).reference_model and inp.dpo_reference != "precomputed":  # the reference's forward
            lm += 2 * n_lm
            per_seq += (2 * n_v + 2 * n_p) * inp.images_per_sample
        return cls(float(lm), float(per_seq), inp.sequences_per_sample)

    def step_flops(self, tokens: int, samples: int) -> float:
        """FLOPs of a step that processed `tokens` LM tokens (image tokens included) in `samples` samples."""
        return self.per_token * tokens + self.per_sequence * samples * self.sequences_per_sample


def flops_for_trainer(llava_config: Mapping[str, Any], stage: Any) -> StageFlops | None:
    """The trainer's MFU constants, from the built model's LlavaConfig dict and its StageSpec; None for a
    model family the accounting does not know (the trainer then reports no MFU rather than a wrong one)."""
    try:
        return StageFlops.of(ModelShape.from_llava(llava_config), stage_input(stage))
    except (ValueError, KeyError):
        return None


CHINCHILLA_TOKENS_PER_PARAM = 20.0


def compute_optimal(budget_flops: float) -> tuple[float, float]:
    """(parameters, tokens) that a budget trains compute-optimally: C = 6ND with D = 20N (Chinchilla)."""
    if budget_flops <= 0:
        raise ValueError(f"budget: must be > 0, got {budget_flops:g} FLOPs")
    n = math.sqrt(budget_flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return n, CHINCHILLA_TOKENS_PER_PARAM * n


@dataclass
class StageCompute:
    """A stage's size in samples, tokens, FLOPs and time."""

    steps: int | None
    samples: int | None
    tokens: int | None  # LM tokens processed (image tokens included)
    text_tokens: int | None  # tokens the LM reads as text (visual tokens are context, not predicted)
    flops: float | None
    tokens_per_trained_param: float | None
    seconds: float | None
    gpu_hours: float | None
    warnings: list[str] = field(default_factory=list)


def stage_compute(
    shape: ModelShape,
    inp: StageInput,
    *,
    max_steps: int | None,
    epochs: float | None,
    num_samples: int | None,
    global_batch: int,
    mfu: float,
    peak_flops_per_second: float,
) -> StageCompute:
    """Steps, tokens (sequences padded or packed to seq_len: an upper bound), FLOPs and wall time at `mfu`."""
    warnings: list[str] = []
    steps = max_steps
    if steps is None and epochs is not None and num_samples:
        steps = max(1, math.ceil(epochs * num_samples / global_batch))
    samples = steps * global_batch if steps is not None else None
    fl = StageFlops.of(shape, inp)
    book = param_book(shape, inp)
    tokens = text = flops = per_param = seconds = hours = None
    if samples is not None:
        seqs = samples * inp.sequences_per_sample
        tokens = seqs * inp.seq_len
        text = seqs * max(inp.seq_len - shape.image_tokens * inp.images_per_sample, 0)
        flops = fl.step_flops(tokens, samples)
        per_param = text / book.trained if book.trained else None
        seconds = flops / (inp.world_size * peak_flops_per_second * mfu)
        hours = seconds * inp.world_size / 3600
    image_tokens = shape.image_tokens * inp.images_per_sample
    if inp.seq_len <= image_tokens:
        warnings.append(f"data.maxLength {inp.seq_len} leaves no room for text: one image alone is {image_tokens} "
                        "tokens")
    if num_samples is not None:
        warnings += data_advice(inp.stage_type, num_samples, samples)
    elif max_steps is None:
        warnings.append("data.numSamples not set: steps, tokens and time of an epochs-based stage are unknown")
    return StageCompute(steps, samples, tokens, text, flops, per_param, seconds, hours, warnings)


def data_advice(stage_type: str, num_samples: int, seen: int | None) -> list[str]:
    """The published guidance on the data size of a `stage_type` stage (its kind's `DataAdvice`) as warnings:
    `num_samples` examples in the data, `seen` samples the stage runs (None: unknown)."""
    advice, out = kind(stage_type).advice, []
    if advice.min_samples is not None and num_samples < advice.min_samples:
        out.append(f"{stage_type} data has {num_samples:,} examples; {advice.min_reason}")
    if advice.max_samples is not None and num_samples > advice.max_samples:
        out.append(f"{stage_type} data has {num_samples:,} examples; {advice.max_reason}")
    # 5% over the epoch limit: not just the rounding of steps to whole global batches
    if advice.max_epochs is not None and seen is not None and seen > 1.05 * advice.max_epochs * num_samples:
        out.append(f"{stage_type} runs {seen / num_samples:.1f} epochs; {advice.epochs_reason}")
    return out


def with_changes(inp: StageInput, **changes: Any) -> StageInput:
    """A copy of `inp` with some settings changed (used to compute admission alternatives)."""
    return replace(inp, **changes)
