"""Cross-field rules: those of one stage (on its camelCase dict, raw input included) and those of the job's
stage list (unique names, fromStage references).

The rules that depend on a stage's kind (a field only some kinds have, the data formats a kind accepts,
packing, the per-token loss) and on its strategy (offloads, LoRA/QLoRA, compile, the vision-feature cache)
are DATA: `STAGE_RULES`, generated from the kinds table (vlm_core.kinds) and the strategy traits table
(vlm_core.strategies). Each rule is "when C1, then C2", written once with the small condition language
below; `Rule.broken` evaluates it in Python (this package's validation) and `Rule.cel` renders it as a CEL
expression (the CRD's `x-kubernetes-validations`, vlm_operator.crd), so the two cannot drift.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from vlm_core import kinds, strategies
from vlm_core.spec.base import Strict, field_default
from vlm_core.spec.data import DataSpec
from vlm_core.spec.resources import ResourcesSpec
from vlm_core.spec.training_parts import DEFAULT_CROSS_ENTROPY, BatchSpec, CheckpointSpec
from vlm_core.strategies import DEFAULT_STRATEGY, NO_OFFLOAD, or_list

_MISSING = object()  # the field is absent (or null)
_WRONG = object()  # a value on the path is not a mapping: its own field error reports it
_REQUIRED = ("type",)  # stage fields the schema requires: CEL needs no has() for them


def _get(stage: Mapping[str, Any], path: str) -> Any:
    node: Any = stage
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return _WRONG
        node = node.get(part)
        if node is None:
            return _MISSING
    return node


def _has(path: str) -> str:
    parts = path.split(".")
    return " && ".join(f"has(self.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))


def _cel_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (YAML's `1` is not `true`)."""
    return type(a) is type(b) and a == b


class Cond(ABC):
    """A condition on one stage, read two ways: in Python on the stage's dict, and as a CEL expression."""

    @abstractmethod
    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        """True or False; None where the stage's values have the wrong types (their own errors report them)."""

    @abstractmethod
    def cel(self) -> str:
        """The same condition as a CEL expression over `self` (the stage)."""


@dataclass(frozen=True)
class Given(Cond):
    """The field is set (present and not null)."""

    path: str

    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        v = _get(stage, self.path)
        return None if v is _WRONG else v is not _MISSING

    def cel(self) -> str:
        return _has(self.path)


@dataclass(frozen=True)
class OneOf(Cond):
    """The field's value, or `default` where it is absent, is one of `values` (no default: absent is false)."""

    path: str
    values: tuple[Any, ...]
    default: Any = None

    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        v = _get(stage, self.path)
        if v is _WRONG:
            return None
        if v is _MISSING:
            v = self.default
        return v is not None and any(_same(v, x) for x in self.values)

    def cel(self) -> str:
        values = f"[{', '.join(_cel_literal(x) for x in self.values)}]"
        if self.path in _REQUIRED:
            return f"self.{self.path} in {values}"
        if self.default is None:
            return f"{_has(self.path)} && self.{self.path} in {values}"
        return f"({_has(self.path)} ? self.{self.path} : {_cel_literal(self.default)}) in {values}"


@dataclass(frozen=True)
class Above(Cond):
    """The field's number, or `default` where it is absent, is greater than `bound`."""

    path: str
    bound: int
    default: int

    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        v = _get(stage, self.path)
        v = self.default if v is _MISSING else v
        return v > self.bound if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def cel(self) -> str:
        return f"({_has(self.path)} ? self.{self.path} : {self.default}) > {self.bound}"


@dataclass(frozen=True)
class Trains(Cond):
    """`trainable` includes `part`; absent, the kind's default trainable parts decide."""

    part: str

    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        v = _get(stage, "trainable")
        if v is _MISSING:
            t = stage.get("type")
            row = kinds.KINDS.get(t) if isinstance(t, str) else None
            v = list(row.default_trainable) if row is not None else []
        return self.part in v if isinstance(v, list) else None

    def cel(self) -> str:
        by_default = [t for t, k in kinds.KINDS.items() if self.part in k.default_trainable]
        fallback = f"self.type in [{', '.join(_cel_literal(t) for t in by_default)}]" if by_default else "false"
        return f"(has(self.trainable) ? {_cel_literal(self.part)} in self.trainable : {fallback})"


@dataclass(frozen=True)
class DataFormatsIn(Cond):
    """Every format the stage's data names (data.format and each data.sources[].format) is one of `formats`.

    CEL checks data.format only: a walk over data.sources (no size bound) would exceed the API server's CEL
    cost budget; the typed spec checks the sources too."""

    formats: tuple[str, ...]

    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        return not _data_formats(stage) - set(self.formats)

    def cel(self) -> str:
        return f"!({_has('data.format')}) || self.data.format in [{', '.join(_cel_literal(f) for f in self.formats)}]"


@dataclass(frozen=True)
class Not(Cond):
    cond: Cond

    def holds(self, stage: Mapping[str, Any]) -> bool | None:
        v = self.cond.holds(stage)
        return None if v is None else not v

    def cel(self) -> str:
        return f"!({self.cond.cel()})"


def _data_formats(stage: Mapping[str, Any]) -> set[str]:
    data = stage.get("data")
    if not isinstance(data, Mapping):
        return set()
    fmt = data.get("format")
    fmts = {fmt} if isinstance(fmt, str) else set()
    if isinstance(data.get("sources"), list):
        fmts |= {s["format"] for s in data["sources"] if isinstance(s, Mapping) and isinstance(s.get("format"), str)}
    return fmts


@dataclass(frozen=True)
class Rule:
    """When `when` holds, `need` must hold; else the problem `message(stage)` is reported at `field`."""

    field: str  # camelCase path the problem names
    when: Cond
    need: Cond
    message: Callable[[Mapping[str, Any]], str]  # the Python message (may quote the stage's values)
    cel_message: str  # the API server's message (static)
    reason: str = "FieldValueForbidden"

    def broken(self, stage: Mapping[str, Any]) -> bool:
        return self.when.holds(stage) is True and self.need.holds(stage) is False

    def cel(self) -> str:
        return f"!({self.when.cel()}) || ({self.need.cel()})"


def _strategy(stage: Mapping[str, Any]) -> str:
    v = stage.get("strategy")
    return v if isinstance(v, str) else DEFAULT_STRATEGY


def _sequences_per_sample(s: Mapping[str, Any]) -> int:
    t = s.get("type")
    row = kinds.KINDS.get(t) if isinstance(t, str) else None
    return row.sequences_per_sample if row is not None else 1


def _quoted(values: tuple[str, ...]) -> str:
    return or_list([repr(v) for v in values])


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _own_field_message(field: str, owners: tuple[str, ...], s: Mapping[str, Any]) -> str:
    return f"{field}: only valid for type {or_list(owners)}, this stage is {s.get('type')!r}"


def _format_message(k: kinds.StageKind, s: Mapping[str, Any]) -> str:
    bad = ", ".join(repr(f) for f in sorted(_data_formats(s) - set(k.formats)))
    return f"data.format: {_a(k.type)} stage needs {_quoted(k.formats)} data, got {bad}"


def _offload_message(offload: str, ok: tuple[str, ...], s: Mapping[str, Any]) -> str:
    row = strategies.TRAITS.get(_strategy(s))
    why = f" ({row.name} {strategies.SHARDING_WORDS[row.sharding]})" if row is not None else ""
    return f"offload: {offload!r} needs strategy {or_list(ok)}{why}"


def _kind_rules() -> list[Rule]:
    """Rules that follow from the kinds table."""
    training = [k for k in kinds.KINDS.values() if k.trains]
    types = [k.type for k in training]
    rules = []
    for f in dict.fromkeys(f for k in training for f in k.own_fields):
        owners = tuple(k.type for k in training if f in k.own_fields)
        rules.append(Rule(
            f, Given(f), OneOf("type", owners),
            partial(_own_field_message, f, owners),
            f"{f}: only valid for type {or_list(owners)}",
        ))
    for k in training:
        rules.append(Rule(
            "data.format", OneOf("type", (k.type,)), DataFormatsIn(k.formats),
            partial(_format_message, k),
            f"data.format: {_a(k.type)} stage needs {_quoted(k.formats)} data", reason="FieldValueInvalid",
        ))
    packing = tuple(k.type for k in training if k.packing)
    if len(packing) < len(types):
        rules.append(Rule(
            "batch.tokensPerMicroBatch", Given("batch.tokensPerMicroBatch"), OneOf("type", packing),
            lambda s: (f"batch.tokensPerMicroBatch: packing is for {'/'.join(packing)} stages, not {s.get('type')}"
                       + (" (pairs are not packed)" if _sequences_per_sample(s) > 1 else "")),
            f"batch.tokensPerMicroBatch: packing is for {'/'.join(packing)} stages",
        ))
    token_loss = tuple(k.type for k in training if k.token_loss)
    if len(token_loss) < len(types):
        labelled = OneOf("crossEntropy", (DEFAULT_CROSS_ENTROPY,), DEFAULT_CROSS_ENTROPY)
        rules.append(Rule(
            "crossEntropy", Not(labelled), OneOf("type", token_loss),
            lambda s: (f"crossEntropy: {s.get('crossEntropy')!r} is for {'/'.join(token_loss)} stages; "
                       f"{s.get('type')} has no per-token LM loss (use the default {DEFAULT_CROSS_ENTROPY!r})"),
            f"crossEntropy: only {DEFAULT_CROSS_ENTROPY!r} outside {'/'.join(token_loss)} stages",
        ))
    return rules


def _strategy_rules() -> list[Rule]:
    """Rules that follow from the strategy traits table (and those tying LoRA, QLoRA and DPO together)."""
    strategy = lambda values: OneOf("strategy", values, DEFAULT_STRATEGY)  # noqa: E731
    true = lambda path: OneOf(path, (True,), False)  # noqa: E731
    rules = []
    for off in strategies.OFFLOADS:
        ok = strategies.allowing_offload(off)
        if len(ok) < len(strategies.STRATEGIES):
            rules.append(Rule(
                "offload", OneOf("offload", (off,), NO_OFFLOAD), strategy(ok),
                partial(_offload_message, off, ok),
                f"offload: {off!r} needs strategy {or_list(ok)}",
            ))
    lora = strategies.supporting("lora")
    compile_ = strategies.supporting("compile")
    cache = strategies.supporting("cache_vision_features")
    rules += [
        Rule("lora", Given("lora"), strategy(lora),
             lambda s: f"lora: supports strategy {or_list(lora)} only, got {_strategy(s)!r}",
             f"lora: supports strategy {or_list(lora)} only"),
        Rule("qlora", true("qlora"), Given("lora"),
             lambda s: "qlora: true needs lora settings (stage.lora) for the adapters trained on the 4-bit base",
             "qlora: true needs lora settings (stage.lora)", reason="FieldValueRequired"),
        Rule("qlora", true("qlora"), Above("resources.gpusPerNode", 0, field_default(ResourcesSpec, "gpusPerNode")),
             lambda s: ("qlora: true needs CUDA GPUs (bitsandbytes 4-bit); set resources.gpusPerNode > 0 or "
                        "use lora without qlora on CPU"),
             "qlora: true needs CUDA GPUs (resources.gpusPerNode > 0)", reason="FieldValueInvalid"),
        Rule("qlora", true("qlora"), strategy(lora),
             lambda s: f"qlora: true supports strategy {or_list(lora)} only, got {_strategy(s)!r}",
             f"qlora: true supports strategy {or_list(lora)} only"),
        Rule("compile", true("compile"), strategy(compile_),
             lambda s: f"compile: true supports strategy {or_list(compile_)}, got {_strategy(s)!r}",
             f"compile: true supports strategy {or_list(compile_)}"),
        Rule("cacheVisionFeatures", true("cacheVisionFeatures"), strategy(cache),
             lambda s: (f"cacheVisionFeatures: needs strategy {or_list(cache)}, got {_strategy(s)!r} (it shards the "
                        "vision tower's blocks, so their forward is a collective: a cache hit on one rank and a "
                        "miss on another would hang)"),
             f"cacheVisionFeatures: needs strategy {or_list(cache)}"),
        Rule("cacheVisionFeatures", true("cacheVisionFeatures"), Not(Trains("vision_tower")),
             lambda s: ("cacheVisionFeatures: needs a frozen vision tower, but this stage trains it (trainable "
                        f"{s.get('trainable')} includes vision_tower, which is also how LoRA reaches it); remove "
                        "vision_tower from trainable or set cacheVisionFeatures: false"),
             "cacheVisionFeatures: needs a frozen vision tower (vision_tower not in trainable)"),
        Rule("dpo.reference", OneOf("dpo.reference", ("adapter_disabled",)), Given("lora"),
             lambda s: "dpo.reference: 'adapter_disabled' needs lora (the reference is the base without adapters)",
             "dpo.reference: 'adapter_disabled' needs lora", reason="FieldValueRequired"),
    ]
    # Kinds that generate inside the stage need whole parameters on every rank: generation outside the top-level
    # forward under parameter sharding fails (FSDP2: mixed Tensor/DTensor; ZeRO-3: a collective per token).
    generating = kinds.with_trait("generates")
    whole = tuple(n for n, t in strategies.TRAITS.items() if t.sharding != "parameters_too")
    if generating:
        rules.append(Rule(
            "strategy", OneOf("type", generating), strategy(whole),
            lambda s: (f"strategy: {_strategy(s)!r} shards the parameters; {s.get('type')} stages generate answers "
                       f"inside the stage, which needs whole parameters on every rank: use {or_list(whole)}"),
            f"strategy: {'/'.join(generating)} stages generate answers and need strategy {or_list(whole)}",
            reason="FieldValueInvalid",
        ))
    return rules


# Every stage rule that is data; vlm_operator.crd renders each as a CEL rule of the stage schema.
STAGE_RULES: tuple[Rule, ...] = (*_kind_rules(), *_strategy_rules())


def stage_rule_problems(stage: Mapping[str, Any]) -> list[str]:
    """Cross-field rules of one training stage, on its camelCase dict: one 'field.path: message' per broken rule.

    Works on raw input too (wrong types are skipped: their own field errors report them), so a stage with
    a bad field still gets its cross-field problems reported in the same run.
    """

    def num(d: Any, model: type[Strict], key: str) -> int | None:
        default = field_default(model, key)
        v = d.get(key, default) if isinstance(d, Mapping) else default
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    out = []
    data = stage.get("data")
    tokens = (stage.get("batch") or {}).get("tokensPerMicroBatch") if isinstance(stage.get("batch"), Mapping) else None
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        max_length = data.get("maxLength", field_default(DataSpec, "maxLength")) if isinstance(data, Mapping) else None
        if isinstance(max_length, int) and tokens < max_length:
            out.append(f"batch.tokensPerMicroBatch: {tokens} must be >= data.maxLength ({max_length}) so that every "
                       "sample fits in a row")
    if stage.get("trainable") == []:
        out.append("trainable: at least one part must train, got []")
    if (stage.get("maxSteps") is None) == (stage.get("epochs") is None):
        out.append(f"maxSteps: set exactly one of maxSteps or epochs (got maxSteps={stage.get('maxSteps')}, "
                   f"epochs={stage.get('epochs')})")
    out += [rule.message(stage) for rule in STAGE_RULES if rule.broken(stage)]
    rl, ckpt = stage.get("rl"), stage.get("checkpoint")
    iterations = rl.get("iterations") if isinstance(rl, Mapping) else None
    every = ckpt.get("everySteps", field_default(CheckpointSpec, "everySteps")) if isinstance(ckpt, Mapping) \
        else field_default(CheckpointSpec, "everySteps")
    if isinstance(iterations, int) and isinstance(every, int) and iterations > 1 and every % iterations:
        out.append(f"checkpoint.everySteps: {every} must be a multiple of rl.iterations ({iterations}): a checkpoint "
                   "is taken between batches of rollouts, so a resume regenerates none")
    batch, res = stage.get("batch") or {}, stage.get("resources") or {}
    sizes = (num(batch, BatchSpec, "globalSize"), num(batch, BatchSpec, "microSize"),
             num(res, ResourcesSpec, "nodes"), num(res, ResourcesSpec, "procsPerNode"))
    glob, micro, nodes, procs = sizes
    if glob is not None and micro is not None and nodes is not None and procs is not None:
        if glob % (micro * nodes * procs):
            out.append(f"batch.globalSize: {glob} must be a multiple of batch.microSize ({micro}) x world size "
                       f"({nodes * procs} = resources.nodes x resources.procsPerNode)")
    return out


def from_stage_problems(stages: list[tuple[Any, Any, Any]]) -> list[str]:
    """One 'stages[i].data.fromStage: ...' problem per (type, name, fromStage) whose fromStage does not name an
    earlier curate stage."""
    out = []
    for i, (_type, _name, ref) in enumerate(stages):
        if ref is None:
            continue
        earlier = [n for t, n, _ in stages[:i] if t in kinds.DATA_TYPES]
        if ref not in earlier:
            accepted = ", ".join(repr(n) for n in earlier) or "none before this stage"
            out.append(f"stages[{i}].data.fromStage: {ref!r} is not an earlier curate stage (curate stages: {accepted})")
    return out


def reward_stage_problems(stages: list[tuple[Any, Any, Any]]) -> list[str]:
    """One 'stages[i].rl.reward.fromStage: ...' problem per (type, name, rl.reward.fromStage) that does not name an
    earlier stage of type `reward` (a stage whose final/ is a reward model)."""
    out = []
    for i, (_type, _name, ref) in enumerate(stages):
        if ref is None:
            continue
        earlier = [n for t, n, _ in stages[:i] if t == "reward"]
        if ref not in earlier:
            accepted = ", ".join(repr(n) for n in earlier) or "none before this stage"
            out.append(f"stages[{i}].rl.reward.fromStage: {ref!r} is not an earlier reward stage (reward stages: "
                       f"{accepted})")
    return out


def duplicate_stage_names(names: list[Any]) -> list[str]:
    """One 'stages[i].name: ...' problem per stage whose name an earlier stage already uses."""
    seen: set[Any] = set()
    out = []
    for i, name in enumerate(names):
        if name in seen:
            out.append(f"stages[{i}].name: {name!r} is used by an earlier stage; names must be unique")
        seen.add(name)
    return out
