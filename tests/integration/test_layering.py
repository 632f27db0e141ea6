"""Layering (docs/architecture.md) is enforced by import-linter's contracts in pyproject.toml, run by
`make lint`: vlm_operator -> vlm_core <- vlm_trainer <- vlm_quickstart; the core is torch-free and knows
neither side, the trainer never reaches for Kubernetes, the operator never imports torch or the trainer
(also not inside a function), only `vlm_operator.kube` talks to the Kubernetes API, and no package has an
import circle. These tests show the contracts hold and that each one does catch a misplaced import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'operator'}{os.pathsep}{tree / 'trainer'}"}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the sources and the contracts, to break on purpose."""
    for part in ("operator", "trainer"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layering_contracts_hold() -> None:
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 broken" in out.stdout and "BROKEN" not in out.stdout


def _in_a_function(import_line: str) -> str:
    return f"\n\ndef _sneaky():\n    {import_line}\n"


# (file appended to, what is appended, what lint-imports must say): one misplaced import per contract
MISPLACED = {
    "torch inside an operator function": (
        "operator/vlm_operator/builders.py", _in_a_function("import torch"),
        ["vlm_operator is not allowed to import torch", "vlm_operator.builders -> torch"]),
    "a second module talking to the API": (
        "operator/vlm_operator/reconcile.py", "\n\nfrom kubernetes import client as _client  # noqa: E402\n",
        ["Only vlm_operator.kube talks to the Kubernetes API BROKEN"]),
    "torch in the core": (
        "trainer/vlm_core/storage.py", _in_a_function("import torch"),
        ["The core is torch-free and knows neither side BROKEN", "vlm_core.storage -> torch"]),
    "the core importing the trainer": (
        "trainer/vlm_core/kinds.py", _in_a_function("from vlm_trainer import stages"),
        ["The core is torch-free and knows neither side BROKEN"]),
    "the operator importing the trainer": (
        "operator/vlm_operator/planner.py", _in_a_function("import vlm_trainer.checkpoint"),
        ["The operator never imports torch (nor what drags it in), nor the trainer BROKEN"]),
    "an import circle (storage -> contract -> storage)": (
        "trainer/vlm_core/storage.py", _in_a_function("from vlm_core import contract"),
        ["No import circles inside a package BROKEN"]),
}


@pytest.mark.parametrize("case", list(MISPLACED))
def test_each_contract_catches_a_misplaced_import(tree: Path, case: str) -> None:
    path, appended, expected = MISPLACED[case]
    with open(tree / path, "a") as f:
        f.write(appended)
    out = lint_imports(tree)
    assert out.returncode != 0
    for line in expected:
        assert line in out.stdout, out.stdout


def test_importing_the_operator_leaves_torch_out() -> None:
    """At run time too: import every vlm_operator module in a fresh interpreter; torch stays out."""
    mods = sorted(p.stem for p in (ROOT / "operator" / "vlm_operator").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module('vlm_operator.' + m)\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"torch imported by vlm_operator: {out.stdout.strip()}"


def test_the_operator_sources_never_name_the_trainer_package() -> None:
    """Not even in a docstring or a string: the operator knows the trainer only through the contract
    (contract.TRAINER_MODULE is the `-m` torchrun runs)."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "operator").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "vlm_trainer" in line]
    assert hits == [], hits
