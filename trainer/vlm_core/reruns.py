"""Explicit reruns: which stages a rerun from a stage covers, and setting their previous outputs aside.

A rerun never deletes: each covered stage's output folder (`<storage.uri>/<job>/<stage>`: checkpoints,
final/, reports) moves to `<storage.uri>/<job>/.replaced/<stamp>/<stage>`, so the stages are pending again and
run with the job's settings. Both backends call this (`vlmctl run --rerun-from`, the operator on
`spec.runPolicy.rerunFrom`). Torch-free.
"""

from __future__ import annotations

import time

from vlm_core import contract, storage
from vlm_core.spec import VLMTrainingJob


def covered(job: VLMTrainingJob, stage: str, *, field: str = "spec.runPolicy.rerunFrom") -> list[int]:
    """The indices a rerun from `stage` covers: that stage and every stage after it. A name that is not a
    stage is a ValueError naming `field` and the job's stages."""
    names = [s.name for s in job.spec.stages]
    if stage not in names:
        raise ValueError(f"{field}: {stage!r} is not a stage of job {job.name!r}; one of: {', '.join(names)}")
    return list(range(names.index(stage), len(names)))


def stamp(now: float | None = None) -> str:
    """A sortable UTC folder name for one rerun, e.g. 20261207T212501Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def set_aside(job: VLMTrainingJob, indices: list[int], when: str, *,
              options: storage.Options | None = None) -> list[tuple[str, str]]:
    """Move each covered stage's output folder aside; (from, to) of those that existed."""
    moved = []
    for i in indices:
        name = job.spec.stages[i].name
        src = contract.stage_output(job.spec.storage.uri, job.name, name)
        dst = contract.replaced_output(job.spec.storage.uri, job.name, name, when)
        if storage.move(src, dst, options=options):
            moved.append((src, dst))
    return moved
