"""Import direction: the trainer never reaches for Kubernetes; the operator never imports torch."""

import ast
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_trainer_never_imports_the_operator_or_kubernetes():
    files = sorted((ROOT / "trainer" / "vlm_trainer").rglob("*.py"))
    assert files
    for f in files:
        bad = imported_modules(f) & {"vlm_operator", "kopf", "kubernetes"}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_operator_never_imports_torch():
    """Import every vlm_operator module in a fresh interpreter and check torch stayed out."""
    mods = sorted(p.stem for p in (ROOT / "operator" / "vlm_operator").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module('vlm_operator.' + m)\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(','.join(leaked))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"torch imported by vlm_operator: {out.stdout.strip()}"


def test_shared_modules_are_torch_free():
    for name in ("spec", "storage", "contract"):
        assert "torch" not in imported_modules(ROOT / "trainer" / "vlm_trainer" / f"{name}.py")
