"""Why a trained draft is accepted as often as it is: teacher-forced top-1 on the target's answers.

Usage: python scripts/draft_top1.py [--draft scylla] [--prompts assets/sweep_prompts.jsonl]
                                    [--limit 16] [--max-new-tokens 48]

For each prompt the target answers greedily; then the draft, fed the target's true
features, predicts every next token of prompt and answer in one pass. Reported: top-1
over all positions and over answer positions only (what decoding meets: the first
drafted token of a step is accepted exactly when it is right), and the share of answer
tokens inside the draft's reduced vocabulary (a token outside it can never be drafted).
"""
from __future__ import annotations

import argparse
import collections

import torch

from scylla.data import features_of, load_prompts
from scylla.decoding import generate_ids
from scylla.drafts import make_draft
from scylla.models import encode_prompt, load_target
from scylla.train import collate, feature_columns, stored_layers


@torch.inference_mode()
def answer_hits(target, head, prompt: str, max_new_tokens: int) -> dict:
    ids = encode_prompt(target, prompt)
    answer, _ = generate_ids(target, None, list(ids), max_new_tokens=max_new_tokens, k=1)
    item = features_of(target, list(ids) + answer, stored_layers(target.model.config.num_hidden_layers))
    batch = collate([item], feature_columns(head.cfg.fusion, head.cfg.target_hidden))
    feats = batch["features"][:, :-1].to(next(head.parameters()).dtype)
    hidden = head(head.step_inputs(feats, batch["tokens"][:, 1:], fused=False))
    pred = head.to_target_ids(head.logits(hidden).argmax(-1))[0]
    labels = batch["labels"][0, 1:]
    hits = pred == labels
    in_answer = slice(len(ids) - 1, len(ids) - 1 + len(answer) - 1)
    vocab = set(head.d2t.tolist()) if head.head is not None else None
    answer_labels = labels[in_answer].tolist()
    return {"all": (hits.sum().item(), hits.numel()),
            "answer": (hits[in_answer].sum().item(), len(answer_labels)),
            "in_vocab": (sum(t in vocab for t in answer_labels) if vocab else len(answer_labels), len(answer_labels))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="scylla")
    ap.add_argument("--prompts", default="assets/sweep_prompts.jsonl")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    target = load_target()
    draft = make_draft(args.draft, target)
    if not hasattr(draft, "head"):
        raise SystemExit(f"{args.draft} is not a trained feature head")
    totals = collections.defaultdict(lambda: collections.Counter())
    for p in load_prompts(args.prompts, args.limit):
        for key, (hit, n) in answer_hits(target, draft.head, p["prompt"], args.max_new_tokens).items():
            for group in ("all", p.get("category", "?")):
                totals[group][key + "_hit"] += hit
                totals[group][key + "_n"] += n
    print(f"{'group':14} {'top1 all':>9} {'top1 answer':>12} {'answer in vocab':>16}")
    for group, c in sorted(totals.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        rate = {k: c[k + "_hit"] / max(c[k + "_n"], 1) for k in ("all", "answer", "in_vocab")}
        print(f"{group:14} {rate['all']:9.3f} {rate['answer']:12.3f} {rate['in_vocab']:16.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
