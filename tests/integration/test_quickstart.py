"""The quickstart, end to end, exactly as `make run` runs it: `vlmctl quickstart`.

Synthetic data, stage-0 components, align -> instruct -> dpo with 2 torchrun processes per stage, the
naive baseline, and the held-out evaluation. Thresholds were set from repeated runs on a 2-core
machine with margin (see the README's measurements).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

VLMCTL = [sys.executable, "-m", "vlm_operator.cli"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict:
    qdir = tmp_path_factory.mktemp("qs")
    proc = subprocess.run([*VLMCTL, "quickstart", "--dir", str(qdir)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    base = qdir / "storage" / "quickstart"
    return {"dir": qdir, "base": base, "stdout": proc.stdout, "report": json.loads((base / "report.json").read_text())}


def stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def test_staged_model_learns_each_stage(quickstart):
    r = quickstart["report"]
    assert stage(r, "align")["caption_accuracy"] >= 0.90
    assert stage(r, "instruct")["answer_accuracy"] >= 0.90
    assert stage(r, "instruct")["caption_accuracy"] >= 0.90  # instruct did not make it forget captioning
    dpo = stage(r, "dpo")
    assert dpo["reward_accuracy"] >= 0.85 and dpo["reward_margin"] > 0


def test_staged_training_keeps_the_language_model_naive_training_breaks_it(quickstart):
    r = quickstart["report"]
    before = r["stage0"]["text_perplexity"]
    after = stage(r, "dpo")["text_perplexity"]
    naive = r["naive"][0]["text_perplexity"]
    assert after <= 1.25 * before, (before, after)
    assert naive >= 3 * after, (naive, after)


def test_progress_table_and_report_with_loss_curves(quickstart):
    out = quickstart["stdout"]
    for name in ("align", "instruct", "dpo"):
        assert name in out
        png = quickstart["base"] / f"loss-{name}.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200
            colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
            # a plotted curve: many distinct colours (anti-aliased line, text), not a blank canvas
            assert colours is not None and len(colours) > 20
            blue = sum(n for n, (r, g, b) in colours if b > 150 and r < 120)
            assert blue > 200, "no loss curve drawn"
    md = (quickstart["base"] / "report.md").read_text()
    assert "| align | align | 300 |" in md and "![dpo loss](loss-dpo.png)" in md


def test_rerunning_a_finished_job_does_nothing(quickstart):
    job = quickstart["dir"] / "job.yaml"
    finals = {p: os.path.getmtime(p) for p in quickstart["base"].glob("*/final/manifest.json")}
    assert len(finals) == 3
    proc = subprocess.run([*VLMCTL, "run", str(job)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "done earlier" in proc.stdout
    assert {p: os.path.getmtime(p) for p in finals} == finals
