"""SpecError, and pydantic's validation errors as 'field.path: message' lines a user can act on."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from vlm_core.spec.base import BOUND_REASONS, STAGE_TAGS


class SpecError(ValueError):
    """A job file failed validation; `problems` holds one 'field.path: message' line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid VLMTrainingJob:\n" + "\n".join(f"  {p}" for p in problems))


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    prev: Any = None
    for part in loc:
        tag, prev = isinstance(prev, int) and part in STAGE_TAGS, part
        if isinstance(part, int):
            out += f"[{part}]"
        elif tag or str(part).startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


# Fields a release renamed or replaced: the unknown-field error says what to write instead.
REPLACED_FIELDS: dict[str, str] = {
    "nearDedup.hash": "replaced by `hashes`, a list (e.g. `hashes: [phash, dhash]`): every hash proposes candidates "
    "and `verify` confirms them; `maxDistance` is now the candidates' radius (`vlmctl curate calibrate` measures "
    "it on your images)",
}


def format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        path = _loc_to_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            replaced = next((why for f, why in REPLACED_FIELDS.items() if path.endswith(f)), None)
            msg = replaced or "unknown field (check the spelling; see `kubectl explain vlmjob.spec`)"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        elif e["type"] in ("less_than_equal", "less_than") and str(e["loc"][-1]) in BOUND_REASONS:
            msg = f"{msg} ({BOUND_REASONS[str(e['loc'][-1])]}), got {e.get('input')!r}"
        elif e["type"] in ("finite_number",):
            msg = f"must be a finite number, got {e.get('input')!r}"
        for line in msg.split("\n"):
            # Model-level rules name their own sub-field ("batch.globalSize: ..."); join it to the path.
            m = re.match(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+)*):\s(.*)$", line)
            full, text = path, line
            if m and e["type"] == "value_error":
                full, text = (f"{path}.{m.group(1)}" if path else m.group(1)), m.group(2)
            problems.append(f"{full}: {text}" if full else text)
    return problems
