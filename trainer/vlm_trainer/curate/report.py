"""The curate stage's report: decisions.jsonl, funnel.json and a PNG funnel chart (pure functions).

decisions.jsonl: one line per input sample, in global input order:
    {"key": "<sample key>", "kept": true|false, "reason": null | "<one of select.REASONS>"}
funnel.json: the count entering and leaving each filter in pipeline order, removed per reason, the text
filter's checks broken down, a few example keys and captions per reason, and throughput; the counts add
up (input - sum of removed = kept), and they are computed from the same decisions as decisions.jsonl.
"""

from __future__ import annotations

import io
import json
from typing import Any

from vlm_trainer.curate.select import FILTERS, REASONS, Decisions


def decision_lines(records: list[dict[str, Any]], decisions: Decisions) -> str:
    """decisions.jsonl's text."""
    return "".join(
        json.dumps({"key": r["key"], "kept": reason is None, "reason": reason}) + "\n"
        for r, reason in zip(records, decisions.reasons, strict=True)
    )


def funnel(records: list[dict[str, Any]], decisions: Decisions, *, examples_per_reason: int = 5,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """funnel.json's content."""
    by_reason: dict[str, list[int]] = {r: [] for r in REASONS}
    for i, reason in enumerate(decisions.reasons):
        if reason is not None:
            by_reason[reason].append(i)
    entering = len(records)
    steps = []
    for name, reasons in FILTERS:
        removed = {r: len(by_reason[r]) for r in reasons}
        leaving = entering - sum(removed.values())
        step: dict[str, Any] = {
            "filter": name, "enabled": decisions.enabled.get(name, False), "entering": entering,
            "leaving": leaving, "removed": removed,
            "examples": {r: [{"key": records[i]["key"], "caption": records[i].get("caption"),
                              **({"duplicate_of": records[decisions.duplicate_of[i]]["key"]}
                                 if i in decisions.duplicate_of else {})}
                             for i in by_reason[r][:examples_per_reason]] for r in reasons},
        }
        if name == "text":
            checks: dict[str, int] = {}
            for i in by_reason["text"]:
                detail = records[i].get("detail") or "text"
                checks[detail] = checks.get(detail, 0) + 1
            step["checks"] = dict(sorted(checks.items()))
        steps.append(step)
        entering = leaving
    kept = sum(1 for r in decisions.reasons if r is None)
    assert entering == kept, (entering, kept)
    return {
        "input": len(records),
        "kept": kept,
        "removed": {r: len(v) for r, v in by_reason.items()},
        "filters": steps,
        **(extra or {}),
    }


def funnel_chart_png(doc: dict[str, Any], title: str) -> bytes:
    """A horizontal bar chart of the samples left after each enabled filter (matplotlib, else PIL)."""
    rows = [("input", doc["input"])] + [(s["filter"], s["leaving"]) for s in doc["filters"] if s["enabled"]]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_chart(rows, title)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2), dpi=100)
    names = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    ax.barh(names, values, color="#4c72b0")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v}", va="center", fontsize=9)
    ax.set_xlabel("samples left")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(values + [1]) * 1.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pil_chart(rows: list[tuple[str, int]], title: str) -> bytes:
    from PIL import Image, ImageDraw

    width, bar_h, left = 640, 22, 130
    img = Image.new("RGB", (width, 40 + bar_h * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    top = max([v for _, v in rows] + [1])
    for k, (name, v) in enumerate(rows):
        y = 32 + k * bar_h
        draw.text((10, y + 4), name, fill="black")
        draw.rectangle((left, y + 2, left + int((width - left - 70) * v / top), y + bar_h - 4), fill="#4c72b0")
        draw.text((left + int((width - left - 70) * v / top) + 5, y + 4), str(v), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
