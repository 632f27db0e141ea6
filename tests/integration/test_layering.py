"""Layering (DESIGN.md) is enforced by import-linter's contracts in pyproject.toml, run by `make lint`:
the trainer never reaches for Kubernetes, the operator never imports torch (also not through
vlm_trainer, also not inside a function), and only `vlm_operator.kube` talks to the Kubernetes API.
These tests show the contracts hold and that they do catch a misplaced import."""

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
