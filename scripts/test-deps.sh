#!/usr/bin/env bash
# System parts the integration tests run for real: a Prometheus server (Debian), the Grafana schema
# type-checker (npm) and checkov (its own venv). Idempotent; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ -f tests/dashboard_check/package.json ] && [ ! -d tests/dashboard_check/node_modules ]; then
  npm ci --prefix tests/dashboard_check --no-audit --no-fund --loglevel=error
fi
# checkov in a venv of its own (tests/integration/test_security_scan.py); cached across runs.
bash scripts/checkov-venv.sh
