#!/usr/bin/env bash
# checkov (the security scan the chart and rendered stage objects must pass) in a venv of its own:
# its many pins fight the project's. Idempotent: an existing install of the pinned version is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-checkov
VERSION=3.3.30
PY=${PY:-python3}
if [ -x "$VENV/bin/checkov" ] && [ "$(cat "$VENV/.installed" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "checkov==$VERSION"
echo "$VERSION" > "$VENV/.installed"
