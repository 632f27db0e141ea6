"""The test tier is the folder: tests/unit (pure functions), tests/integration (processes, servers,
tools on loopback), tests/gpu (CUDA, opt-in). Markers are applied here, so no test can be left out of
`make test` by a forgotten marker, and a module cannot claim another folder's tier."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "gpu")
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE / "support"))  # helpers shared by the tiers (not tests themselves)


def tier_of(path: Path) -> str | None:
    try:
        top = Path(path).resolve().relative_to(_HERE).parts[0]
    except (ValueError, IndexError):
        return None
    return top if top in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/gpu")
        others = {m.name for m in item.iter_markers() if m.name in TIERS and m.name != tier}
        if others:
            raise pytest.UsageError(f"{item.nodeid}: marked {sorted(others)} but lives in tests/{tier}/")
        item.add_marker(getattr(pytest.mark, tier))
