#!/usr/bin/env bash
# Train the answers-corpus draft, diagnose it, bench it on the sweep prompts.
set -x
cd /work/main && source .venv/bin/activate
D=$HOME/.cache/scylla/drafts/scylla-answers
scylla train-draft --name scylla-answers --corpus answers --tokens 262144 --layers 1 --fusion multi \
  --draft-vocab 8192 --ttt 3 --align-tokens 32768 --db results.duckdb || exit 1
python scripts/draft_top1.py --draft $D > logs/top1_scylla_answers.txt 2>/dev/null
python scripts/draft_top1.py --draft $D/pretrained > logs/top1_scylla_answers_stage1.txt 2>/dev/null
scylla bench --prompts assets/sweep_prompts.jsonl --draft $D --k 4 --max-new-tokens 48 --json logs/bench_answers_t0.json
echo ALLDONE
