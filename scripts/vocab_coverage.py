"""How much of the target's answer text a reduced draft vocabulary can draft at all.

Usage: python scripts/vocab_coverage.py [--sizes 4096,8192,12288,16384,24576]

The vocabulary is the most frequent answer tokens of 90% of the answers-v2 corpus (by a hash
of each prompt's id); coverage is the share of answer tokens of the other 10% inside it, by
prompt source. A token outside the vocabulary can never be drafted, so coverage caps the
acceptance rate; the head's cost grows with the size (576 x size weights per drafted token).
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scylla.corpus import read_answers  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,8192,12288,16384,24576")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = read_answers()
    held = [r for r in rows if zlib.crc32(r["question_id"].encode()) % 10 == 0]
    train = [r for r in rows if zlib.crc32(r["question_id"].encode()) % 10 != 0]
    counts = Counter(t for r in train for t in r["answer_ids"])
    ranked = [t for t, _ in counts.most_common()]
    out = {"train_answers": len(train), "heldout_answers": len(held), "coverage": {}}
    for size in (int(x) for x in args.sizes.split(",")):
        vocab = set(ranked[:size])
        by_source = defaultdict(lambda: [0, 0])
        for r in held:
            source = r["source"].split(":")[0]
            by_source[source][0] += sum(t in vocab for t in r["answer_ids"])
            by_source[source][1] += len(r["answer_ids"])
        total = sum(a for a, _ in by_source.values()) / max(sum(b for _, b in by_source.values()), 1)
        out["coverage"][size] = {"all": round(total, 4),
                                 **{s: round(a / max(b, 1), 4) for s, (a, b) in sorted(by_source.items())}}
        print(size, json.dumps(out["coverage"][size]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
