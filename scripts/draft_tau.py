"""Tau of several drafts on the same prompts, batched through the engine (no timing: use
`scylla bench` for speed). Compares recipes cheaply, at both temperatures.

    python scripts/draft_tau.py --drafts scylla,eagle3-style,eagle2-style --k 4 \
        --temperatures 0,1 --max-new-tokens 128 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scylla import ScyllaError  # noqa: E402
from scylla.data import load_prompts  # noqa: E402
from scylla.bench import draft_taus  # noqa: E402
from scylla.drafts import make_draft  # noqa: E402
from scylla.models import encode_prompt, load_target  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drafts", required=True, help="comma-separated names or folders")
    p.add_argument("--prompts", default="assets/eval_prompts.jsonl")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tree", help="draft trees of this shape (D,K,N) instead of chains of k")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    try:
        target = load_target()
        rows = load_prompts(Path(args.prompts))
        prompts = [encode_prompt(target, r["prompt"]) for r in rows]
        out = {"prompts": args.prompts, "n": len(prompts), "k": args.k, "tree": args.tree,
               "max_new_tokens": args.max_new_tokens, "results": {}}
        for temperature in map(float, args.temperatures.split(",")):
            for spec in args.drafts.split(","):
                start = time.time()
                taus = draft_taus(target, make_draft(spec, target), prompts, args.k, temperature,
                              args.max_new_tokens, args.batch, tree=args.tree)
                by_cat: dict[str, list[float]] = {}
                for r, t in zip(rows, taus):
                    by_cat.setdefault(r["category"], []).append(t)
                out["results"][f"{spec}@T{temperature:g}"] = {
                    "tau": round(sum(taus) / len(taus), 4), "wall_s": round(time.time() - start, 1),
                    "by_category": {c: round(sum(v) / len(v), 3) for c, v in sorted(by_cat.items())}}
                print(f"{spec} T={temperature:g}: tau {out['results'][f'{spec}@T{temperature:g}']['tau']}", flush=True)
                Path(args.json).write_text(json.dumps(out, indent=1))
    except ScyllaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
