"""The quickstart's quality checks: one table of every check, its threshold and its role.

A check is either a **gate** (the recipe works: a miss fails the quickstart, exit 1) or **info**
(reported beside its reference value, never a miss, never changes the exit code) — not both.
Gates are the claims the quickstart's data meets with margin on every committed run
(bench/results/quickstart.md: seeds 0-3; bench/results/issue8, issue19). Info is for a ratio that
one answer in 1200 can flip at this tiny scale: DPO's hallucination rate over instruct's (17 vs 18 of
1200 at seed 0, 0.944; 1.036 at seed 3).

Pure functions of the measured rows: `checks` computes every value and verdict, `exit_code` turns the
verdicts into the exit code, `check_rows` the rows of the printed table.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

GATE: Literal["gate"] = "gate"
INFO: Literal["info"] = "info"
EXIT_GATE_MISSED = 1

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, ">": operator.gt, "<=": operator.le}


@dataclass(frozen=True)
class Check:
    threshold: float
    op: Literal[">=", ">", "<="]
    role: Literal["gate", "info"]
    measures: str

    def met(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.threshold)


# The one home of the checks and their roles (the issues' claims; measured figures per check in the
# report of issue 26's item 5 and in bench/results/).
CHECKS: dict[str, Check] = {
    "caption_accuracy_after_align": Check(0.90, ">=", GATE, "align teaches captioning"),
    "answer_accuracy_after_instruct": Check(0.90, ">=", GATE, "instruct teaches answering"),
    "caption_accuracy_after_instruct": Check(0.90, ">=", GATE, "instruct keeps captioning"),
    "dpo_reward_accuracy": Check(0.85, ">=", GATE, "DPO prefers the chosen answers on held-out pairs"),
    "dpo_reward_margin": Check(0.0, ">", GATE, "DPO's implicit reward margin is positive"),
    "perplexity_ratio_staged_over_before_max": Check(1.25, "<=", GATE, "staged training keeps the language model"),
    "perplexity_ratio_naive_over_staged_min": Check(3.0, ">=", GATE, "the naive baseline (all unfrozen, high lr) breaks it"),
    # Issue 11: the curate stage removes what was planted and keeps the clean pairs.
    "curate_planted_recall_min": Check(0.9, ">=", GATE, "curate removes every planted kind"),
    "curate_clean_kept_min": Check(0.95, ">=", GATE, "curate keeps the clean pairs"),
    "curate_duplicate_groups_one_kept_min": Check(0.95, ">=", GATE, "dedup keeps one of each duplicate group"),
    # The seed's "DPO lowers hallucination": not seen at this size (equal within one or two answers of 1200).
    "hallucination_ratio_dpo_over_instruct_max": Check(
        1.0, "<=", INFO, "DPO does not raise the hallucination rate (noisy here)"
    ),
}


def checks(
    stage0_ppl: float, staged: list[dict], naive: list[dict], curate: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Every check of `CHECKS` with its value, threshold, role and verdict (`met`; a missing value is not met)."""
    by = {r["stage"]: r for r in staged}
    final_ppl = staged[-1]["text_perplexity"]
    recalls = [p["recall"] for p in curate["planted"].values() if p["recall"] is not None] if curate else []
    groups = curate["duplicate_groups"] if curate else None
    instruct_h, dpo_h = by["instruct"]["hallucination_rate"], by["dpo"]["hallucination_rate"]
    got = {
        "caption_accuracy_after_align": by["align"]["caption_accuracy"],
        "answer_accuracy_after_instruct": by["instruct"]["answer_accuracy"],
        "caption_accuracy_after_instruct": by["instruct"]["caption_accuracy"],
        "dpo_reward_accuracy": by["dpo"].get("reward_accuracy"),
        "dpo_reward_margin": by["dpo"].get("reward_margin"),
        "perplexity_ratio_staged_over_before_max": final_ppl / stage0_ppl,
        "perplexity_ratio_naive_over_staged_min": naive[-1]["text_perplexity"] / final_ppl if naive else None,
        "curate_planted_recall_min": min(recalls) if recalls else None,
        "curate_clean_kept_min": curate["clean_kept_share"] if curate else None,
        "curate_duplicate_groups_one_kept_min": groups["exactly_one_kept"] / groups["count"] if groups else None,
        # Equal rates (including both 0) meet it: the claim is that DPO does not make it worse.
        "hallucination_ratio_dpo_over_instruct_max": dpo_h / instruct_h if instruct_h else (1.0 if dpo_h == 0 else None),
    }
    return {
        name: {
            "value": got[name],
            "threshold": c.threshold,
            "op": c.op,
            "role": c.role,
            "met": c.met(got[name]),
            "measures": c.measures,
        }
        for name, c in CHECKS.items()
    }


def missed_gates(results: dict[str, dict[str, Any]]) -> list[str]:
    """The gating checks not met (an info check is never a miss)."""
    return [name for name, r in results.items() if r["role"] == GATE and not r["met"]]


def exit_code(results: dict[str, dict[str, Any]]) -> int:
    """0 when every gating check is met, `EXIT_GATE_MISSED` otherwise; info checks never count."""
    return EXIT_GATE_MISSED if missed_gates(results) else 0


def verdict(r: dict[str, Any]) -> str:
    """ok / MISS for a gate; for an info check whether it met its reference (met / not met), never a MISS."""
    if r["role"] == GATE:
        return "ok" if r["met"] else "MISS"
    return "met" if r["met"] else "not met"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


COLUMNS = ("check", "role", "value", "threshold", "verdict", "measures")


def check_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per check, in `COLUMNS`' order."""
    return [
        (name, r["role"], _fmt(r["value"]), f"{r['op']} {r['threshold']:g}", verdict(r), r["measures"])
        for name, r in results.items()
    ]


def summary(results: dict[str, dict[str, Any]]) -> str:
    """One line: the gate's verdict and the exit code it gives."""
    missed = missed_gates(results)
    gates = sum(r["role"] == GATE for r in results.values())
    if not missed:
        return f"quality gate: all {gates} gating checks met (exit 0)"
    return f"quality gate: {len(missed)} of {gates} gating checks missed: {', '.join(missed)} (exit {EXIT_GATE_MISSED})"


def print_checks(console: Any, results: dict[str, dict[str, Any]]) -> None:
    """The quality checks: gate (a MISS fails the quickstart) or info (reported, never a miss)."""
    from rich.table import Table

    table = Table(title="quality checks (gate: a MISS fails the quickstart, exit 1; info: reported only)")
    for title in COLUMNS:
        table.add_column(title, justify="right" if title in ("value", "threshold") else "left")
    for row in check_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"  {summary(results)}", highlight=False)
