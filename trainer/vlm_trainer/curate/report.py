"""The curate stage's report: decisions.jsonl, funnel.json and a PNG funnel chart (pure functions).

decisions.jsonl: one line per input sample, in global input order:
    {"key": "<sample key>", "kept": true|false, "reason": null | "<one of select.REASONS>"}
funnel.json: the count entering and leaving each filter in pipeline order, removed per reason, the text
filter's checks broken down, a few example keys and captions per reason, per dedup filter its duplicate
groups (how many, members, sizes), and throughput; the counts add up (input - sum of removed = kept), and
they are computed from the same decisions as decisions.jsonl.
duplicates.png / duplicates.html: a sample of removed duplicates (per dedup filter) side by side with the
kept sample each repeats, with keys and the near-duplicate similarity, to eyeball false positives.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from PIL import Image

from vlm_trainer.curate.select import FILTERS, REASONS, Decisions

DEDUP_FILTERS = {"exact_dedup": "exact_duplicate", "near_dedup": "near_duplicate", "semantic_dedup": "semantic_duplicate"}


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
                                 if i in decisions.duplicate_of else {}),
                              **({"similarity": round(decisions.similarity[i], 4)} if i in decisions.similarity else {})}
                             for i in by_reason[r][:examples_per_reason]] for r in reasons},
        }
        if name in DEDUP_FILTERS and name in decisions.groups:
            found = decisions.groups[name]
            sizes: dict[int, int] = {}
            for g in found:
                sizes[len(g)] = sizes.get(len(g), 0) + 1
            step["groups"] = {"count": len(found), "members": sum(len(g) for g in found),
                              "kept": sum(1 for g in found for i in g if decisions.reasons[i] is None),
                              "sizes": {str(k): v for k, v in sorted(sizes.items())}}
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


def duplicate_pairs(decisions: Decisions, per_filter: int) -> list[tuple[str, int, int]]:
    """(dedup filter, removed index, kept index it repeats) of the first `per_filter` removed samples of each
    dedup filter, in global order: the pairs the duplicates report shows."""
    out = []
    for name, reason in DEDUP_FILTERS.items():
        removed = [i for i, r in enumerate(decisions.reasons) if r == reason and i in decisions.duplicate_of]
        out += [(name, i, decisions.duplicate_of[i]) for i in removed[:per_filter]]
    return out


def _label(records: list[dict[str, Any]], decisions: Decisions, name: str, i: int, j: int) -> str:
    sim = f", similarity {decisions.similarity[i]:.3f}" if i in decisions.similarity else ""
    return f"{name}: {records[i]['key']} (removed) repeats {records[j]['key']} (kept){sim}"


def duplicates_png(records: list[dict[str, Any]], decisions: Decisions, pairs: list[tuple[str, int, int]],
                   images: dict[int, Image.Image], side: int = 96) -> bytes:
    """The pairs as rows: removed image | kept image | label (PIL only)."""
    from PIL import ImageDraw

    width, row_h = 2 * side + 520, side + 8
    canvas = Image.new("RGB", (width, 28 + row_h * max(1, len(pairs))), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 8), "removed | kept it repeats" if pairs else "no duplicates removed", fill="black")
    for k, (name, i, j) in enumerate(pairs):
        y = 28 + k * row_h
        for col, idx in enumerate((i, j)):
            im = images.get(idx)
            if im is not None:
                canvas.paste(im.convert("RGB").resize((side, side)), (4 + col * (side + 4), y))
            else:
                draw.rectangle((4 + col * (side + 4), y, 4 + col * (side + 4) + side, y + side), outline="grey")
        draw.text((2 * side + 16, y + side // 2 - 6), _label(records, decisions, name, i, j), fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def duplicates_html(records: list[dict[str, Any]], decisions: Decisions, pairs: list[tuple[str, int, int]],
                    images: dict[int, Image.Image], side: int = 128) -> str:
    """The pairs as an HTML page, images inline (base64 PNG), captions and similarity beside them."""

    def img(idx: int) -> str:
        im = images.get(idx)
        if im is None:
            return "<td>(not read)</td>"
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return (f'<td><img width="{side}" height="{side}" style="image-rendering:pixelated" '
                f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"></td>')

    rows = []
    for name, i, j in pairs:
        sim = f"{decisions.similarity[i]:.3f}" if i in decisions.similarity else ""
        rows.append(f"<tr><td>{html.escape(name)}</td>{img(i)}{img(j)}<td>{html.escape(str(records[i]['key']))}<br>"
                    f"{html.escape(str(records[i].get('caption') or ''))}</td><td>{html.escape(str(records[j]['key']))}"
                    f"<br>{html.escape(str(records[j].get('caption') or ''))}</td><td>{sim}</td></tr>")
    return ("<!doctype html><meta charset=utf-8><title>curate: removed duplicates</title>"
            "<h1>Removed duplicates, side by side with the sample each repeats</h1>"
            "<table border=1 cellpadding=4><tr><th>filter</th><th>removed</th><th>kept</th><th>removed key, caption</th>"
            "<th>kept key, caption</th><th>similarity</th></tr>" + "".join(rows) + "</table>\n")
