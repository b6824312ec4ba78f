#!/usr/bin/env bash
# Refresh the README's screenshots (assets/screenshots/) from a real browser run of the app.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SCYLLA_SCREENSHOTS="$PWD/assets/screenshots" exec .venv/bin/python -m pytest -q tests/test_e2e.py "$@"
