"""The lean int8 target against fp32: speed, greedy agreement and perplexity, in one run.

Usage: python scripts/int8_quality.py [--limit 16] [--max-new-tokens 64] [--json OUT]

On the evaluation prompts: fp32 greedy answers are decoded first; then, teacher-forced on
prompt + that answer, the share of answer positions where int8's argmax equals fp32's (a
token-level agreement that one early difference cannot hide), whether int8's own greedy
answer is identical, and both models' perplexity of the answer text. Tokens/s of plain
decoding on each, interleaved per prompt.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scylla.data import eval_prompts  # noqa: E402
from scylla.decoding import generate_ids  # noqa: E402
from scylla.models import encode_prompt, load_target  # noqa: E402


@torch.inference_mode()
def teacher_forced(target, ids: list[int], answer_start: int):
    fwd = target.forward
    logits, _ = fwd.forward(torch.tensor([ids]), fwd.new_cache(1, len(ids) + 1))
    logits = logits[0, answer_start - 1:-1].float()
    labels = torch.tensor(ids[answer_start:])
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    return logits.argmax(-1), nll


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    fp32 = load_target(quant="none")
    int8 = replace(fp32, quant="int8", _forward=None)
    rows = eval_prompts()[::max(1, len(eval_prompts()) // args.limit)][:args.limit]
    agree = total = same = 0
    nll = {"fp32": 0.0, "int8": 0.0}
    secs = {"fp32": 0.0, "int8": 0.0}
    made = {"fp32": 0, "int8": 0}
    for row in rows:
        ids = encode_prompt(fp32, row["prompt"])
        outs = {}
        for name, target in (("fp32", fp32), ("int8", int8)):
            start = time.perf_counter()
            outs[name], _ = generate_ids(target, None, ids, max_new_tokens=args.max_new_tokens)
            secs[name] += time.perf_counter() - start
            made[name] += len(outs[name])
        same += outs["int8"] == outs["fp32"]
        full = ids + outs["fp32"]
        ref, n32 = teacher_forced(fp32, full, len(ids))
        got, n8 = teacher_forced(int8, full, len(ids))
        nll["fp32"] += n32
        nll["int8"] += n8
        agree += int((got == ref).sum())
        total += len(outs["fp32"])
    report = {"prompts": len(rows), "max_new_tokens": args.max_new_tokens, "kernels": int8.kernels,
              "token_agreement": round(agree / total, 4), "identical_greedy_outputs": same,
              "perplexity_fp32": round(math.exp(nll["fp32"] / total), 3),
              "perplexity_int8": round(math.exp(nll["int8"] / total), 3),
              "tokens_per_s_fp32": round(made["fp32"] / secs["fp32"], 2),
              "tokens_per_s_int8": round(made["int8"] / secs["int8"], 2)}
    report["int8_over_fp32_speed"] = round(report["tokens_per_s_int8"] / report["tokens_per_s_fp32"], 3)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
