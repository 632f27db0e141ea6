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


def test_a_torch_import_inside_an_operator_function_breaks_the_build(tree: Path) -> None:
    with open(tree / "operator" / "vlm_operator" / "builders.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    import torch\n\n    return torch\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert "vlm_operator is not allowed to import torch" in out.stdout
    assert "vlm_operator.builders -> torch" in out.stdout


def test_a_second_module_talking_to_the_kubernetes_api_breaks_the_build(tree: Path) -> None:
    with open(tree / "operator" / "vlm_operator" / "reconcile.py", "a") as f:
        f.write("\n\nfrom kubernetes import client as _client  # noqa: E402\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert "Only vlm_operator.kube talks to the Kubernetes API BROKEN" in out.stdout


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


def test_a_torch_import_in_the_core_breaks_the_build(tree: Path) -> None:
    with open(tree / "trainer" / "vlm_core" / "storage.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    import torch\n\n    return torch\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert "The core is torch-free and knows neither side BROKEN" in out.stdout
    assert "vlm_core.storage -> torch" in out.stdout


def test_the_core_importing_the_trainer_breaks_the_build(tree: Path) -> None:
    with open(tree / "trainer" / "vlm_core" / "kinds.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    from vlm_trainer import stages\n\n    return stages\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert "The core is torch-free and knows neither side BROKEN" in out.stdout


def test_the_operator_importing_the_trainer_breaks_the_build(tree: Path) -> None:
    with open(tree / "operator" / "vlm_operator" / "planner.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    import vlm_trainer.checkpoint\n\n    return vlm_trainer\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert "The operator never imports torch (nor what drags it in), nor the trainer BROKEN" in out.stdout


def test_an_import_circle_breaks_the_build(tree: Path) -> None:
    """storage -> contract and contract -> storage: a circle inside vlm_core."""
    with open(tree / "trainer" / "vlm_core" / "storage.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    from vlm_core import contract\n\n    return contract\n")
    out = lint_imports(tree)
    assert out.returncode != 0
    assert "No import circles inside a package BROKEN" in out.stdout


def test_the_operator_sources_never_name_the_trainer_package() -> None:
    """Not even in a docstring or a string: the operator knows the trainer only through the contract
    (contract.TRAINER_MODULE is the `-m` torchrun runs)."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "operator").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "vlm_trainer" in line]
    assert hits == [], hits
