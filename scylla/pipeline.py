"""Corpus -> features -> draft, with every intermediate cached (used by train-draft and sweeps)."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from scylla import ScyllaError
from scylla.corpus import corpus_path, read_corpus
from scylla.data import corpus_key, extract_features, load_feature_sequences
from scylla.models import cache_root, load_target
from scylla.train import TrainConfig, stored_layers, train_head, training_row

CORPORA = {"mix": ["selfdistill-960-s1", "stdlib-chat"], "selfdistill": ["selfdistill-960-s1"],
           "stdlib": ["stdlib-chat"]}
FEATURE_BUDGET = 150_000  # tokens of target features cached per corpus (the 2^17 budget + held-out)


def mixed_sequences(corpus: str, budget: int = FEATURE_BUDGET) -> list[list[int]]:
    """The corpus's sequences, the self-distilled ones spread evenly through the first `budget`
    tokens so that every prefix (every token budget) holds both kinds."""
    names = CORPORA.get(corpus)
    if names is None:
        raise ScyllaError(f"unknown --corpus {corpus!r}; choose {', '.join(CORPORA)}")
    for name in names:
        if not corpus_path(name).is_file():
            raise ScyllaError(f"corpus {name} is not built; run `scylla build-corpus` first")
    parts = [read_corpus(n)["sequences"] for n in names]
    merged = interleave(parts)
    out, total = [], 0
    for seq in merged:
        if total >= budget:
            break
        out.append(seq)
        total += len(seq)
    return out


def interleave(parts: list[list[list[int]]]) -> list[list[int]]:
    if len(parts) == 1:
        return parts[0]
    small, big = sorted(parts, key=len)
    every = max(1, len(big) // max(len(small), 1) // 4)  # spread the small part over ~1/4 of the big one
    out, j = [], 0
    for i, seq in enumerate(big):
        if i % every == 0 and j < len(small):
            out.append(small[j])
            j += 1
        out.append(seq)
    return out


def ensure_features(target, corpus: str) -> Path:
    layers = stored_layers(target.model.config.num_hidden_layers)
    folder = cache_root() / "features" / f"{corpus}-{corpus_key(corpus, target.name, layers)}"
    if (folder / "DONE").is_file():
        return folder
    seqs = mixed_sequences(corpus)
    total = sum(map(len, seqs))
    with tqdm(total=total, desc="target features", unit="tok") as bar:
        extract_features(target, seqs, layers, folder, progress=bar.update)
    return folder


def train_draft_from_args(args) -> dict:
    target = load_target()
    cfg = TrainConfig(tokens=args.tokens, layers=args.layers, fusion=args.fusion,
                      draft_vocab=args.draft_vocab, ttt_steps=args.ttt, lr=args.lr,
                      seed=args.seed, kind=args.name)
    out = Path(args.out) if args.out else cache_root() / "drafts" / args.name
    feature_dir = ensure_features(target, args.corpus)
    seqs = load_feature_sequences(feature_dir)
    record = train_head(target, seqs, cfg, out, target.name)
    record["corpus"] = args.corpus
    if args.db:
        from scylla.store import insert_training
        insert_training(args.db, {**training_row(record), "target": target.name, "command": "scylla train-draft"})
    return record
