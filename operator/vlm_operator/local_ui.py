"""What a person sees when running locally: a progress bar per stage, then a report.

The trainer prints one JSON line per logged step (a `contract.EVENT_STEP` event); this module turns those into
rich progress bars, keeps each stage's history in `<stage output>/train-log.jsonl`, and writes
`<storage>/<job>/report.md` with a summary table and one PNG loss curve per stage.
"""

from __future__ import annotations

import io
import json
import signal
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text
from vlm_core import contract, fingerprint, storage
from vlm_core.kinds import kind
from vlm_core.redact import redact
from vlm_core.spec import VLMTrainingJob

from vlm_operator import planner, preflight
from vlm_operator.local import Interrupted, LocalRunner, RunResult


def _history(job: VLMTrainingJob, index: int) -> list[dict]:
    uri = storage.join(planner.stage_output(job, index), contract.TRAIN_LOG_FILE)
    if not storage.exists(uri):
        return []
    rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
    by_step: dict[int, dict] = {}
    for r in rows:  # a resumed stage logs some steps twice; the later run wins
        by_step[int(r[contract.KEY_STEP])] = r
    return [by_step[s] for s in sorted(by_step)]


def _duration(seconds: float | None) -> str:
    """The trainer's ETA (progress.EtaClock, the one ETA) as h:mm:ss."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plot_loss(rows: list[dict], title: str) -> bytes:
    """A PNG of loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([r[contract.KEY_STEP] for r in rows], [r[contract.KEY_LOSS] for r in rows], color="#1f77b4", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(job: VLMTrainingJob, result: RunResult) -> str:
    """Write report.md and one loss-curve PNG per stage under <storage>/<job>/; return the report URI."""
    base = contract.job_output(job.spec.storage.uri, job.name)
    walls = {s.name: s for s in result.stages}
    lines = [f"# {job.name}", "", f"Result: {'succeeded' if result.succeeded else 'FAILED: ' + redact(result.message)}", "",
             "| stage | type | steps | loss first | loss last | tokens/s | wall s (this run) | attempts | fingerprint |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, st in enumerate(job.spec.stages):
        rows = _history(job, i)
        w = walls.get(st.name)
        if rows:
            png = f"loss-{st.name}.png"
            storage.write_bytes(storage.join(base, png), plot_loss(rows, f"{job.name} / {st.name} ({st.type})"))
        if rows:
            first, last = rows[0], rows[-1]
            tps = last.get(contract.KEY_TOKENS_PER_SECOND)
            cells = [str(last[contract.KEY_STEP]), f"{first[contract.KEY_LOSS]:.4f}", f"{last[contract.KEY_LOSS]:.4f}",
                     f"{tps:.0f}" if tps is not None else "-"]
        else:
            cells = ["-"] * 4
        cells += [f"{w.wall_seconds:.1f}", str(w.attempts)] if w else ["- (earlier run)", "-"]
        # what produced the committed final/ (its manifest holds the settings and inputs: `vlmctl describe -o json`)
        stamp = fingerprint.recorded(storage.read_manifest(planner.final_uri(job, i)))
        cells.append(stamp["digest"][:12] if stamp else "-")
        lines.append(f"| {st.name} | {st.type} | " + " | ".join(cells) + " |")
    lines.append("")
    for i, st in enumerate(job.spec.stages):
        final = planner.final_uri(job, i)
        if not kind(st.type).trains and storage.exists(storage.join(final, contract.FUNNEL_FILE)):  # curate's funnel
            doc = storage.read_json(storage.join(final, contract.FUNNEL_FILE))
            rates = ", ".join(f"{t.get('samples_per_second')}" for t in doc.get("throughput", []))
            lines.append(f"{st.name}: {doc['input']} -> {doc['kept']} samples (removed: "
                         + ", ".join(f"{k} {v}" for k, v in doc["removed"].items() if v)
                         + f"); samples/s per rank: {rates}; funnel: {storage.join(final, contract.FUNNEL_CHART)}")
            lines.append("")
        if kind(st.type).output == "report" and storage.exists(storage.join(final, contract.EVAL_FILE)):  # eval
            doc = storage.read_json(storage.join(final, contract.EVAL_FILE))
            shown = ", ".join(f"{k} {v:.3f}" for k, v in doc.items() if isinstance(v, float) and k != "wall_seconds")
            lines.append(f"{st.name}: {doc.get('samples')} held-out samples: {shown}; predictions: "
                         f"{storage.join(final, contract.PREDICTIONS_FILE)}")
            lines.append("")
    for st in job.spec.stages:
        if kind(st.type).trains:  # a loss curve per stage that trains
            lines.append(f"![{st.name} loss](loss-{st.name}.png)")
    uri = storage.join(base, "report.md")
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


def _refuse_changed(console: Console, job: VLMTrainingJob, changed: planner.SpecChanged, job_file: str | None) -> int:
    """A committed stage differs from the file: say what changed and the two ways on; nothing was run."""
    name = job.spec.stages[changed.index].name
    file = job_file or "<job.yaml>"
    lines = [f"refused: stage {name!r} of job {job.name!r} was committed by other settings or inputs than {file} says now:"]
    lines += [f"  {c}" for c in changed.changes]
    lines += [f"Nothing was run. To run {name!r} and the stages after it again with the file's settings: "
              f"`vlmctl run {file} --rerun-from {name}` (their previous outputs are kept aside under "
              f"{storage.join(job.spec.storage.uri, job.name, contract.REPLACED_DIR)}/, not deleted); "
              "or give the job a new metadata.name. `vlmctl describe` lists every stage."]
    console.print(Text(redact("\n".join(lines))), highlight=False, soft_wrap=True)
    return 1


def run_with_progress(job: VLMTrainingJob, *, verbose: bool = False, job_file: str | None = None,
                      rerun_from: str | None = None) -> int:
    """`vlmctl run`: run the job with live progress bars; print a summary and write the report.

    The job's storage is checked first (reachable, credentials, bucket, writable): a problem is one line
    naming the spec.storage field, exit code 2, before anything starts."""
    problems = preflight.check_storage(job, job.spec.storage.fsspec_options())
    if problems:
        print(f"error: {redact(problems[0])}", file=sys.stderr)
        return 2
    console = Console()
    bars: dict[str, TaskID] = {}
    logs: dict[str, list[str]] = {}
    progress = Progress(
        TextColumn("[bold]{task.fields[stage]:<10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeElapsedColumn(),
        TextColumn("eta {task.fields[eta]}"),
        console=console, transient=False, refresh_per_second=4,
    )

    def flush(stage: str) -> None:
        buf = logs.pop(stage, [])
        if buf:
            out = storage.join(planner.stage_output(job, [s.name for s in job.spec.stages].index(stage)), contract.TRAIN_LOG_FILE)
            old = storage.read_text(out) if storage.exists(out) else ""
            storage.write_text(out, old + "".join(buf))

    def on_line(stage: str, line: str, rank: int | None, event: dict | None) -> None:
        name = event[contract.EVENT_KEY] if event and rank in (0, None) else None
        if event is not None and name == contract.EVENT_STEP:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, stage=stage, total=event.get(contract.KEY_TOTAL), loss="-",
                                                tps="-", eta="-")
            progress.update(bars[stage], completed=event[contract.KEY_STEP], total=event.get(contract.KEY_TOTAL),
                            loss=f"{event.get(contract.KEY_LOSS, float('nan')):.4f}",
                            tps=f"{event.get(contract.KEY_TOKENS_PER_SECOND, 0):.0f}",
                            eta=_duration(event.get(contract.KEY_ETA_SECONDS)))
            logs.setdefault(stage, []).append(json.dumps(event) + "\n")
            if len(logs[stage]) >= 20:
                flush(stage)
        elif event is not None and name == contract.EVENT_CURATE:  # a curate stage's shards
            if stage not in bars:
                bars[stage] = progress.add_task(stage, stage=stage, total=event.get(contract.KEY_TOTAL), loss="-",
                                                tps="-", eta="-")
            progress.update(bars[stage], completed=event.get(contract.KEY_STEP), total=event.get(contract.KEY_TOTAL))
        elif event is not None and name == contract.EVENT_CURATED:
            progress.console.print(f"{stage}: kept {event.get(contract.KEY_INPUT)} -> {event.get(contract.KEY_KEPT)} "
                                   "samples; removed "
                                   + ", ".join(f"{k} {v}" for k, v in (event.get(contract.KEY_REMOVED) or {}).items() if v),
                                   markup=False, highlight=False, soft_wrap=True)
        elif event is not None and name in (contract.EVENT_CHECKPOINT_SKIPPED, contract.EVENT_RESUME):
            # what resume did is said in the normal output, not only with -v
            text = (f"{stage}: skipped checkpoint {event.get(contract.KEY_CHECKPOINT)}: {event.get(contract.KEY_REASON)}"
                    if name == contract.EVENT_CHECKPOINT_SKIPPED
                    else f"{stage}: resumed at step {event.get(contract.KEY_STEP)} from {event.get(contract.KEY_CHECKPOINT)}")
            progress.console.print(redact(text), markup=False, highlight=False, soft_wrap=True)
            if verbose:
                progress.console.print(redact(line.rstrip()), markup=False, highlight=False)
        elif verbose:
            progress.console.print(redact(line.rstrip()), markup=False, highlight=False)

    def on_sigterm(signum: int, _frame: object) -> None:  # before TorchX installs its own handler
        raise Interrupted(signum, None, None)

    signal.signal(signal.SIGTERM, on_sigterm)
    t0 = time.monotonic()
    try:
        with progress:
            runner = LocalRunner(job, on_line=on_line, rerun_from=rerun_from)
            try:
                result = runner.run()
            finally:
                for stage in list(logs):
                    flush(stage)
    except (Interrupted, KeyboardInterrupt) as caught:
        stop = caught if isinstance(caught, Interrupted) else Interrupted(signal.SIGINT, None, None)
        console.print(f"{stop}. The stage's processes are stopped; its committed checkpoints are kept.",
                      markup=False, highlight=False, soft_wrap=True)
        console.print(f"Run `vlmctl run {job_file or '<job.yaml>'}` again to resume from the last checkpoint.",
                      markup=False, highlight=False, soft_wrap=True)
        return stop.exit_code
    for src, dst in result.set_aside:
        console.print(f"rerun: kept {src} aside at {dst}", markup=False, highlight=False, soft_wrap=True)
    if result.changed is not None:
        return _refuse_changed(console, job, result.changed, job_file)
    table = Table(title=f"{job.name}: {'succeeded' if result.succeeded else 'failed'} in {time.monotonic() - t0:.1f} s")
    for col in ("stage", "type", "result", "wall s", "attempts"):
        table.add_column(col)
    done = {s.name: s for s in result.stages}
    for st in job.spec.stages:
        s = done.get(st.name)
        table.add_row(st.name, st.type, ("ok" if s.succeeded else "failed") if s else "done earlier" if result.succeeded else "-",
                      f"{s.wall_seconds:.1f}" if s else "-", str(s.attempts) if s else "-")
    console.print(table)
    report = write_report(job, result)
    console.print(f"report: {report}", markup=False, highlight=False)
    if not result.succeeded:
        # The trainer's own words, never read as console markup (a gloo path like '[/__w/...]' is text).
        console.print(Text("failed: ", style="red") + Text(redact(result.message)), highlight=False, soft_wrap=True)
        return 1
    return 0
