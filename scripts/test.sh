#!/usr/bin/env bash
# Set up, install Debian's Chromium for the browser tests when missing, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
