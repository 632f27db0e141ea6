"""`vlmctl describe job.yaml`: what each stage's committed output was produced by, against the job file now.

Per stage, read from storage (the same facts the planner decides on):
- done: final/ committed with the fingerprint of the file's settings and inputs (a run skips it);
- differs: final/ committed by other settings or inputs (a run refuses until `--rerun-from`), with the changes;
- after-change: committed, but an earlier stage differs or has not run, so it will run again after that one;
- partial: checkpoints but no final/ (a run resumes it, if its fingerprint is the same);
- pending: nothing committed.
Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vlm_core import fingerprint, storage
from vlm_core.spec import VLMTrainingJob

from vlm_operator import planner


@dataclass
class StageState:
    name: str
    type: str
    state: str  # done | differs | after-change | partial | pending
    step: int | None = None
    committed_at: float | None = None
    digest: str | None = None  # the committed fingerprint (done, differs) or the newest checkpoint's (partial)
    changes: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None  # what it was run with (the committed fingerprint record)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(job: VLMTrainingJob, options: storage.Options | None = None) -> list[StageState]:
    options = options if options is not None else job.spec.storage.fsspec_options()
    rows: list[StageState] = []
    blocked = False  # an earlier stage differs or is not done: later outputs will be replaced when it runs
    for i, stage in enumerate(job.spec.stages):
        v = storage.verify_committed(planner.final_uri(job, i), options=options)
        if v.ok:
            manifest = v.manifest or {}
            record = fingerprint.recorded(manifest)
            changes = fingerprint.differences(record, fingerprint.compute(planner.resolve_stage(job, i), options))
            state = "after-change" if blocked else "differs" if changes else "done"
            rows.append(StageState(stage.name, stage.type, state, manifest.get("step"), manifest.get("committed_at"),
                                   (record or {}).get("digest"), changes, record))
            blocked = blocked or bool(changes)
            continue
        blocked = True
        latest = storage.latest_checkpoint(planner.stage_output(job, i), options=options)
        if latest is not None:
            record = fingerprint.recorded(storage.read_manifest(latest[1], options=options))
            rows.append(StageState(stage.name, stage.type, "partial", latest[0], None, (record or {}).get("digest"),
                                   [], record))
        else:
            rows.append(StageState(stage.name, stage.type, "pending"))
    return rows


def render(job: VLMTrainingJob, rows: list[StageState]) -> str:
    out = [f"job {job.name!r} (storage {job.spec.storage.uri}):"]
    for r in rows:
        when = time.strftime(" committed %Y-%m-%d %H:%M:%S UTC", time.gmtime(r.committed_at)) if r.committed_at else ""
        step = f" step {r.step}" if r.step is not None else ""
        digest = f" fingerprint {r.digest[:12]}" if r.digest else ""
        out.append(f"  {r.name:<12} {r.type:<9} {r.state:<12}{step}{when}{digest}")
        out.extend(f"      {c}" for c in r.changes)
    if any(r.state == "differs" for r in rows):
        first = next(r.name for r in rows if r.state == "differs")
        out.append(f"`vlmctl run <file> --rerun-from {first}` runs {first!r} and the stages after it again "
                   "(their outputs are kept aside); `-o json` shows what each stage was run with.")
    return "\n".join(out)
