#!/usr/bin/env bash
# Set up, then start the Streamlit app on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m scylla.serve run app.py "$@"
