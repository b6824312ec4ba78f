"""How fast the corpus answers can be generated on this machine: the engine's batched path
(what `scylla build-corpus --answers` ran until now) against bulk.decode_group (one batched
forward and one batched argmax per step, finished rows leave the cache), at several batch sizes.

Usage: python scripts/corpus_speed.py [--prompts 64] [--max-new-tokens 192] [--rows 16 32 64]

Prompts: the first N already answered in the answers-v2 corpus (their stored prompt ids),
in the corpus's own length-sorted batches. Greedy, so both paths should give the same answers:
the share of identical answers is reported beside answer tokens/s.

--capture: at the largest row count, also the whole way to the feature cache: bulk answers
then the second forward over prompt + answer (data.features_of, what the cache did until now)
against answers with their features captured while decoding (bulk.answers_with_features),
with the largest feature difference between the two.
"""
from __future__ import annotations

import argparse
import json
import time

from scylla import bulk
from scylla.corpus import length_sorted_batches, read_answers
from scylla.data import features_of
from scylla.decoding import batch_generate_ids
from scylla.models import load_target
from scylla.train import stored_layers


def engine_answers(target, batches, max_new_tokens: int) -> list[list[int]]:
    out = []
    for chunk in batches:
        ids, _ = batch_generate_ids(target, None, [e for _, e in chunk], max_new_tokens=max_new_tokens,
                                    temperature=0.0)
        out += ids
    return out


def bulk_answers(target, batches, max_new_tokens: int) -> list[list[int]]:
    """What build-corpus now runs (bulk.plain_answers), greedy."""
    out = []
    for chunk in batches:
        out += bulk.plain_answers(target, [e for _, e in chunk], max_new_tokens)
    return out


def answers_then_features(target, batches, max_new_tokens: int) -> tuple[list, list]:
    """Answers, then the feature cache's second forward over each prompt + answer."""
    layers = stored_layers(target.model.config.num_hidden_layers)
    answers = bulk_answers(target, batches, max_new_tokens)
    prompts = [e for chunk in batches for _, e in chunk]
    return answers, [features_of(target, p + a, layers) for p, a in zip(prompts, answers)]


def answers_capturing(target, batches, max_new_tokens: int) -> tuple[list, list]:
    layers = stored_layers(target.model.config.num_hidden_layers)
    answers, seqs = [], []
    for chunk in batches:
        ids, kept = bulk.answers_with_features(target, [e for _, e in chunk], max_new_tokens, layers)
        answers += ids
        seqs += kept
    return answers, seqs


def capture_results(target, encoded, rows: int, max_new_tokens: int, reference) -> list[dict]:
    batches = length_sorted_batches(encoded, rows)
    (answers, second), two_pass_s = timed(answers_then_features, target, batches, max_new_tokens)
    (captured_answers, captured), capture_s = timed(answers_capturing, target, batches, max_new_tokens)
    diff = max(float((a["features"].float() - b["features"].float()).abs().max()) for a, b in zip(second, captured))
    labels = sum(int((a["labels"] == b["labels"]).sum()) for a, b in zip(second, captured)) / sum(
        len(a["labels"]) for a in second)
    out = []
    for path, made, secs in (("bulk+second pass", answers, two_pass_s), ("bulk capturing", captured_answers, capture_s)):
        tokens = sum(map(len, made))
        out.append({"path": path, "rows": rows, "wall_s": round(secs, 1), "answer_tokens": tokens,
                    "answer_tok_s": round(tokens / secs, 1),
                    "identical": round(sum(a == b for a, b in zip(made, reference)) / len(reference), 3)})
    out[-1].update(max_feature_diff=round(diff, 4), labels_equal=round(labels, 4))
    return out


def timed(fn, *args) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--capture", action="store_true", help="also answers + features: second pass vs captured")
    ap.add_argument("--json")
    args = ap.parse_args()
    target = load_target()
    encoded = [(row, row["prompt_ids"]) for row in read_answers()[:args.prompts]]
    prompt_tokens = sum(len(e) for _, e in encoded)
    reference, ref_s = timed(engine_answers, target, length_sorted_batches(encoded, 16), args.max_new_tokens)
    made = sum(map(len, reference))
    results = [{"path": "engine", "rows": 16, "wall_s": round(ref_s, 1), "answer_tokens": made,
                "answer_tok_s": round(made / ref_s, 1), "identical": 1.0}]
    for rows in args.rows:
        answers, secs = timed(bulk_answers, target, length_sorted_batches(encoded, rows), args.max_new_tokens)
        tokens = sum(map(len, answers))
        same = sum(a == b for a, b in zip(answers, reference)) / len(reference)
        results.append({"path": "bulk", "rows": rows, "wall_s": round(secs, 1), "answer_tokens": tokens,
                        "answer_tok_s": round(tokens / secs, 1), "identical": round(same, 3)})
    if args.capture:
        results += capture_results(target, encoded, max(args.rows), args.max_new_tokens, reference)
    report = {"prompts": len(encoded), "prompt_tokens": prompt_tokens, "max_new_tokens": args.max_new_tokens,
              "results": results}
    for r in results:
        print(f"{r['path']:16s} rows {r['rows']:3d}: {r['answer_tok_s']:6.1f} answer tok/s "
              f"({r['answer_tokens']} tokens, {r['wall_s']} s), identical to the engine {r['identical']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
