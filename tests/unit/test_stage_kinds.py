"""Stage kinds are one seam: the trainer's registry has exactly the rows of the kinds table, and nothing
outside the registry, the table and the schema decides by a stage's type string or schema class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from vlm_core import accounting
from vlm_core.kinds import KINDS, STAGE_TYPES, kind
from vlm_trainer.samples import Encoded, EncodedPair
from vlm_trainer.stages import STAGES, stage_kind, training_kind
from vlm_trainer.stages.base import TrainingKind

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Where a stage's kind may be decided from its type string or schema class: the table, the schema (a module
# now, a package once split), the narrowing helper and the trainer's registry of kind modules.
SEAM = ("trainer/vlm_core/kinds.py", "trainer/vlm_core/spec", "trainer/vlm_core/stage_classes.py",
        "trainer/vlm_trainer/stages/")
STAGE_CLASSES = {"StageSpec", "CurateStage"}


def test_the_registry_has_one_module_per_row_of_the_kinds_table():
    assert sorted(STAGES) == sorted(KINDS), "a kind needs a row in vlm_core.kinds AND a module in vlm_trainer.stages"
    for stage_type, impl in STAGES.items():
        assert impl.row is KINDS[stage_type]
        assert isinstance(impl, TrainingKind) == impl.row.trains, stage_type


def test_an_unknown_type_names_the_accepted_ones():
    with pytest.raises(KeyError, match="accepted: " + ", ".join(STAGE_TYPES)):
        stage_kind("nosuchkind")
    with pytest.raises(ValueError, match="trains no weights"):
        training_kind("curate")


def _encoded(n: int) -> Encoded:
    return Encoded(input_ids=list(range(1, n + 1)), labels=[-100] + list(range(2, n + 1)),
                   pixel_values=[torch.zeros(3, 4, 4)])


def test_training_kinds_take_their_formats_from_the_table_and_collate_their_samples():
    assert training_kind("dpo").formats == ("preference",)
    assert "caption" in training_kind("align").formats
    rows = training_kind("instruct").collate([_encoded(3), _encoded(5)], 0)
    assert rows["input_ids"].shape == (2, 5)
    pairs = training_kind("dpo").collate([EncodedPair(_encoded(3), _encoded(4)), EncodedPair(_encoded(2), _encoded(5))], 0)
    assert pairs["input_ids"].shape == (4, 5)  # [chosen_1, chosen_2, rejected_1, rejected_2]
    assert torch.equal(pairs["input_ids"][0, :3], torch.tensor([1, 2, 3]))
    assert torch.equal(pairs["input_ids"][2, :4], torch.tensor([1, 2, 3, 4]))
    assert training_kind("dpo").sequences_per_sample == 2
    assert training_kind("dpo").eval_statistics({"reward_accuracy": 3.0}, 4.0) == {"reward_accuracy": 0.75}


def test_data_advice_comes_from_the_kinds_rows():
    advice = accounting.data_advice
    assert advice("instruct", 50_000, None) == [
        "instruct data has 50,000 examples; the guidance is 500K-1M (below 100K the model tends to overfit the format)"
    ]
    assert advice("instruct", 6_000_000, None) == [
        "instruct data has 6,000,000 examples; beyond 5M the returns are small (guidance 500K-1M)"
    ]
    assert advice("align", 1000, 3000) == ["align runs 3.0 epochs; stage 1 (projector only) needs at most 1 epoch"]
    assert advice("align", 1000, 1050) == []  # rounding to whole batches is not a second epoch
    assert advice("dpo", 10, 10_000) == [] and kind("dpo").advice.min_samples is None


# --- the seam cannot erode --------------------------------------------------------------------------------


def _names_type(node: ast.expr) -> bool:
    """`x.type`, `x.stage_type`, `x["type"]` or `x.get("type")`: an expression reading a stage's type."""
    if isinstance(node, ast.Attribute):
        return node.attr in ("type", "stage_type")
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "type"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "type"
    return False


def _is_stage_type_literal(node: ast.expr) -> bool:
    """A stage type string, CURATE_TYPE, or a tuple/list/set of them."""
    if isinstance(node, ast.Constant):
        return node.value in STAGE_TYPES
    if isinstance(node, ast.Name | ast.Attribute):
        return (node.id if isinstance(node, ast.Name) else node.attr) in ("CURATE_TYPE", "TRAINING_TYPES", "DATA_TYPES")
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_is_stage_type_literal(e) for e in node.elts)
    return False


def _class_names(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Tuple):
        return {n for e in node.elts for n in _class_names(e)}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _class_names(node.left) | _class_names(node.right)
    return set()


def kind_dispatches(source: str) -> list[tuple[int, str]]:
    """(line, code) of each decision by a stage's type string or schema class in `source`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and all(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn)
                                                 for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(_is_stage_type_literal(s) for s in sides) and (
                any(_names_type(s) for s in sides) or any(_is_stage_type_literal(s) and not isinstance(s, ast.Constant)
                                                          for s in sides)
            ):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass") \
                and len(node.args) == 2 and _class_names(node.args[1]) & STAGE_CLASSES:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_checker_finds_each_form_of_kind_dispatch():
    code = "\n".join([
        'if stage.type == "dpo": pass',
        'if stage.type != CURATE_TYPE: pass',
        'if inp.stage_type in ("align", "instruct"): pass',
        'if r["type"] == "curate": pass',
        'if v.get("type") != S.CURATE_TYPE: pass',
        "if isinstance(stage, CurateStage): pass",
        "if not isinstance(stage, (StageSpec, dict)): pass",
        'if schedule.type == "constant": pass',  # not a stage type: allowed
        'if device.type == "cuda": pass',
        'if kind(stage.type).trains: pass',
    ])
    assert [line for line, _ in kind_dispatches(code)] == [1, 2, 3, 4, 5, 6, 7]


def test_no_kind_dispatch_outside_the_registry_the_table_and_the_schema():
    offenders = []
    for folder in ("operator", "trainer"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(SEAM):
                continue
            offenders += [f"{rel}:{line}: {code}" for line, code in kind_dispatches(path.read_text())]
    assert not offenders, (
        "decide by the kinds table (vlm_core.kinds.kind(stage.type).<fact>), narrow with vlm_core.stage_classes, "
        "or put the difference in the kind's module (vlm_trainer.stages):\n" + "\n".join(offenders)
    )
