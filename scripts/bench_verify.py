"""What one speculative step costs on this machine, and the tau a draft needs to pay for it.

Usage: python scripts/bench_verify.py [--kmax 8] [--draft scylla] [--json OUT]

1. The target's forward of w = 1..kmax+1 tokens over a 128-token cache (the verify of k = w-1
   drafts), median of repeats, as a ratio to w = 1 (a plain decoding step): on the engine's
   lean forward and on the transformers forward (--backend hf), interleaved in one run; and
   a 16-node draft tree (width 17, tree mask) on the lean forward.
2. The same for one bare matrix product of the target's shapes (hidden -> MLP width, and
   hidden -> vocabulary): is the cost in the BLAS kernel or around it?
3. The draft's milliseconds per drafted token, from a short decode with it.
4. Break-even tau for each k: (T(verify of k) + k * draft ms) / T(1). A chain of k drafts
   pays only when its measured tau exceeds that.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataclasses import replace  # noqa: E402

from scylla.budget import measure_verify_costs  # noqa: E402
from scylla.decoding import DraftTree, speculative_generate  # noqa: E402
from scylla.drafts import make_draft  # noqa: E402
from scylla.models import encode_prompt, load_target  # noqa: E402

PROMPT = "Explain in three sentences how a hash table handles collisions, with an example."


def matmul_ms(rows: int, inner: int, outer: int, repeats: int = 30) -> float:
    weight, x = torch.randn(outer, inner), torch.randn(rows, inner)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def draft_ms_per_token(target, spec: str, k: int = 4) -> float:
    draft = make_draft(spec, target)
    ids = encode_prompt(target, PROMPT)
    steps = list(speculative_generate(target, draft, ids, max_new_tokens=48, k=k))[1:]
    return statistics.median(s.draft_ms / max(s.k, 1) for s in steps)


@torch.inference_mode()
def tree16_ms(target, repeats: int) -> float:
    """One verify of a 16-node tree (4 branches of depth 4) over a 128-token cache."""
    fwd = target.forward
    cache = fwd.new_cache(1, 160)
    fwd.forward(torch.randint(3, 1000, (1, 128)), cache)
    cache.keep(0, list(range(128)))
    tree = DraftTree(list(range(100, 116)), [-1, 0, 1, 2, -1, 4, 5, 6, -1, 8, 9, 10, -1, 12, 13, 14])
    ids = torch.tensor([[7] + tree.tokens])
    offsets = torch.tensor([[0] + tree.depths])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fwd.forward(ids, cache, offsets, tree.block_mask()[None])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kmax", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--draft", default="scylla")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    target = load_target(quant="none")   # the fp32 rows in docs/results.md
    hf_target = replace(target, backend="hf", _forward=None)
    cfg = target.model.config
    forward = measure_verify_costs(target, 1, args.kmax, 128, args.repeats)
    hf_forward = measure_verify_costs(hf_target, 1, args.kmax, 128, args.repeats)
    tree16 = tree16_ms(target, args.repeats)
    widths = list(range(1, args.kmax + 2))
    mlp = {w: matmul_ms(w, cfg.hidden_size, cfg.intermediate_size) for w in widths}
    head = {w: matmul_ms(w, cfg.hidden_size, cfg.vocab_size, repeats=9) for w in widths}
    per_token = draft_ms_per_token(target, args.draft)
    rows = []
    for w, ms in zip(widths, forward):
        k = w - 1
        rows.append({"width": w, "k": k, "forward_ms": round(ms, 1), "forward_ratio": round(ms / forward[0], 2),
                     "hf_forward_ms": round(hf_forward[w - 1], 1),
                     "hf_forward_ratio": round(hf_forward[w - 1] / hf_forward[0], 2),
                     "mlp_matmul_ratio": round(mlp[w] / mlp[1], 2), "head_matmul_ratio": round(head[w] / head[1], 2),
                     "break_even_tau": round((ms + k * per_token) / forward[0], 2)})
    print(f"threads {torch.get_num_threads()}; draft {args.draft}: {per_token:.2f} ms per drafted token; "
          f"lean forward ({target.kernels}); 16-node tree {tree16:.1f} ms = {tree16 / forward[0]:.2f} x plain")
    print(f"{'k':>2} {'width':>5} {'lean ms':>8} {'x plain':>7} {'hf ms':>7} {'hf x':>5} {'MLP matmul x':>12} "
          f"{'head matmul x':>13} {'break-even tau':>14}")
    for r in rows:
        print(f"{r['k']:>2} {r['width']:>5} {r['forward_ms']:>8} {r['forward_ratio']:>7} {r['hf_forward_ms']:>7} "
              f"{r['hf_forward_ratio']:>5} {r['mlp_matmul_ratio']:>12} {r['head_matmul_ratio']:>13} "
              f"{r['break_even_tau']:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "draft": args.draft,
                                               "kernels": target.kernels, "draft_ms_per_token": round(per_token, 2),
                                               "tree16_ms": round(tree16, 2),
                                               "tree16_ratio": round(tree16 / forward[0], 2), "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
