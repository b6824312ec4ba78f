"""Where a plain decoding step's time goes, piece by piece, on the target as loaded.

Each piece is timed alone, as many times as a one-token forward runs it (30 layers' worth),
on the same shapes and weights, then the forward and the whole step (forward + picking the
token + the engine's bookkeeping) are timed as they run. Medians of repeated runs in one
process; the machine is shared, so compare rows of one run.

    .venv/bin/python scripts/profile_step.py [--quant q4|none] [--context 256] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scylla.decoding import generate_ids  # noqa: E402
from scylla.lean import apply_rope_signed  # noqa: E402
from scylla.models import load_target  # noqa: E402


def median_ms(fn, repeats: int = 60) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def pieces(target, context: int) -> dict[str, float]:
    fwd, stack = target.forward, target.forward.stack
    hidden, layers = stack.hidden, stack.layers
    cache = fwd.new_cache(1, context + 64)
    fwd.forward(torch.randint(3, 1000, (1, context)), cache)
    cache.keep(0, list(range(context)))
    x = torch.randn(1, hidden)
    inner = torch.randn(1, target.model.config.intermediate_size)
    qk = torch.randn(1, stack.heads + stack.kv_heads, 1, stack.head_dim)
    cos, sin = stack.cos[context][None, None, None], stack.sin_signed[context][None, None, None]
    q = torch.randn(1, stack.heads, 1, stack.head_dim)
    span = context + 1
    gate_up = torch.randn(1, 2 * inner.shape[-1])

    def linears():
        for p in layers:
            p.qkv(x), p.o(x), p.gate_up(x), p.down(inner)

    def head():
        fwd.logits(x)

    def attention():
        for i in range(len(layers)):
            stack.attend(q, cache.keys[i], cache.values[i], span, None)

    def norms():
        for p in layers:
            torch.rms_norm(x, (hidden,), p.n1, stack.eps), torch.rms_norm(x, (hidden,), p.n2, stack.eps)

    def rope():
        for _ in layers:
            apply_rope_signed(qk, cos, sin)

    def mlp_and_residuals():
        for _ in layers:
            g, u = gate_up.chunk(2, -1)
            _ = x + x
            _ = x + (F.silu(g) * u)[:, :hidden]

    return {"layer linears (30 x qkv, o, gate_up, down)": median_ms(linears), "LM head": median_ms(head),
            "attention over the cache (30 layers)": median_ms(attention), "RMSNorm (61)": median_ms(norms),
            "RoPE (30)": median_ms(rope), "SiLU, gating, residual adds (30)": median_ms(mlp_and_residuals)}


def whole(target, context: int) -> dict[str, float]:
    fwd = target.forward
    cache = fwd.new_cache(1, context + 64)
    fwd.forward(torch.randint(3, 1000, (1, context)), cache)
    cache.keep(0, list(range(context)))
    one = torch.tensor([[5]])

    def forward():
        cache.set_length(0, context)
        fwd.forward(one, cache)

    prompt = torch.randint(3, 1000, (context,)).tolist()
    generate_ids(target, None, prompt, max_new_tokens=8)
    start = time.perf_counter()
    out, steps = generate_ids(target, None, prompt, max_new_tokens=64)
    total = (time.perf_counter() - start) * 1e3 - steps[0].verify_ms
    return {"one-token forward": median_ms(forward), "plain step (forward + token + bookkeeping)": total / (len(out) - 1)}


def prefill_s(target, n: int) -> float:
    """Best of 3: one forward of n random ids on a fresh cache, logits at the last only."""
    fwd, ids, best = target.forward, torch.randint(3, 40000, (1, n)), float("inf")
    for _ in range(3):
        cache = fwd.new_cache(1, n + 16)
        start = time.perf_counter()
        fwd.forward(ids, cache, logits_at=torch.tensor([[n - 1]]))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--prefill", type=int, default=0, help="also time the forward of a prompt this long")
    args = ap.parse_args()
    target = load_target(quant=args.quant)
    if args.prefill:
        print(f"prompt of {args.prefill} tokens: {prefill_s(target, args.prefill):.3f} s to the first token's logits")
    parts, full = pieces(target, args.context), whole(target, args.context)
    rest = full["one-token forward"] - sum(parts.values())
    rows = {**parts, "the rest of the forward (views, casts, cache writes, Python)": rest, **full}
    print(f"| piece ({target.kernels}; {torch.get_num_threads()} threads; context {args.context}) | ms |")
    print("|---|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"quant": target.quant, "kernels": target.kernels,
                                               "context": args.context, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()
