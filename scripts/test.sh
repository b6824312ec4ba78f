#!/usr/bin/env bash
# Set up, install Debian's Chromium (browser tests) and g++ (the compiled q4 stack) when missing,
# run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v g++ >/dev/null 2>&1 || missing="$missing g++"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
