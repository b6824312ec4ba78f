#!/usr/bin/env bash
# Chains against EAGLE-2 draft trees on the 16 sweep prompts, greedy, 32 new tokens, one torch
# thread (so it can share the machine); JSON reports land in runs/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/bench
run() { OMP_NUM_THREADS=1 .venv/bin/scylla bench --prompts assets/sweep_prompts.jsonl --max-new-tokens 32 "$@"; }
run --draft ngram --k 4 --json runs/bench/ngram-chain4.json
run --draft ngram --tree 4,4,16 --json runs/bench/ngram-tree4-4-16.json
run --draft scylla --tree 4,4,16 --json runs/bench/scylla-tree4-4-16.json
run --draft ngram --tree 4,4,16 --batch-size 4 --json runs/bench/ngram-tree4-4-16-b4.json
