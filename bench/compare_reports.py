"""Compare two quickstart `report.json` files: every figure that is not a time or a rate, to 3 decimals.

    python bench/compare_reports.py BEFORE.json AFTER.json

Prints each figure that differs and a count; exits 1 when any differs (a refactor must not move them).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any

# wall times, throughput and paths change run to run; quality figures must not
SKIP = re.compile(r"(wall|seconds|_s$|tok|per_s|throughput|duration|time|elapsed|data_wait|mfu|samples_per|uri|path|dir)",
                  re.I)


def flat(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from flat(v, f"{prefix}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, d


def main(before: str, after: str) -> int:
    with open(before) as f:
        a = dict(flat(json.load(f)))
    with open(after) as f:
        b = dict(flat(json.load(f)))
    same = differ = 0
    for key in sorted(set(a) | set(b)):
        if SKIP.search(key):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, float) or isinstance(vb, float):
            equal = va is not None and vb is not None and round(va, 3) == round(vb, 3)
        else:
            equal = va == vb
        if equal:
            same += 1
        else:
            differ += 1
            print(f"DIFF {key}: {va!r} -> {vb!r}")
    print(f"{same} equal (3 decimals), {differ} different")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
