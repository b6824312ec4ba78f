"""Corpus -> features -> draft, with every intermediate cached (used by train-draft and sweeps)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from scylla import ScyllaError
from scylla.corpus import corpus_path, read_corpus
from scylla.head import CONFIG, WEIGHTS
from scylla.data import CapturedFeatures, corpus_key, extract_features, load_feature_sequences
from scylla.models import cache_root, load_target
from scylla.train import TrainConfig, check_train_config, recipe_settings, stored_layers, train_head, training_row

# name -> {source corpus: share of tokens}. "mix" (the committed sweeps) keeps its
# original order: the few self-distilled answers spread over the stdlib text.
CORPORA = {"mix": {"selfdistill-960-s1": None, "stdlib-chat": None},
           "selfdistill": {"selfdistill-960-s1": 1.0},
           "stdlib": {"stdlib-chat": 1.0},
           # the target's own answers first (what the draft meets at decode time), then
           # real documentation and code so that rare code tokens are still seen
           "answers": {"selfdistill-960-s2": 0.4, "selfdistill-960-s1": 0.35, "stdlib-chat": 0.25},
           # only the target's own chat answers: the alignment stage's data
           "responses": {"selfdistill-960-s2": 0.5, "selfdistill-960-s1": 0.5}}
ANSWERS_CORPUS = "answers-v2"   # the target's own answers, full length (scylla/corpus.py)
FEATURE_BUDGET = {"answers": 280_000, "responses": 40_000}  # tokens of target features cached per corpus
DEFAULT_FEATURE_BUDGET = 150_000  # the 2^17 budget + held-out


def mixed_sequences(corpus: str, budget: int | None = None) -> list[list[int]]:
    """The corpus's sequences in training order, cut at `budget` tokens: every prefix
    (every token budget of a sweep) holds each source in its share."""
    shares = CORPORA.get(corpus)
    if shares is None:
        raise ScyllaError(f"unknown --corpus {corpus!r}; choose {', '.join([*CORPORA, ANSWERS_CORPUS])}")
    for name in shares:
        if not corpus_path(name).is_file():
            raise ScyllaError(f"corpus {name} is not built; run `scylla build-corpus` first")
    parts = [read_corpus(n)["sequences"] for n in shares]
    if None in shares.values():
        merged = interleave(parts)
    else:
        merged = interleave_by_share(parts, list(shares.values()))
    budget = budget or FEATURE_BUDGET.get(corpus, DEFAULT_FEATURE_BUDGET)
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


def interleave_by_share(parts: list[list[list[int]]], shares: list[float]) -> list[list[int]]:
    """Next sequence from the source furthest below its token share; an exhausted source
    drops out and the others fill in."""
    taken = [0] * len(parts)
    used = [0] * len(parts)
    out = []
    while True:
        live = [i for i, part in enumerate(parts) if taken[i] < len(part)]
        if not live:
            return out
        i = min(live, key=lambda j: used[j] / shares[j])
        seq = parts[i][taken[i]]
        out.append(seq)
        taken[i] += 1
        used[i] += len(seq)


def answer_sequences() -> tuple[list[list[int]], list[int], list[str]]:
    """The answers-v2 corpus (scylla build-corpus --answers): full sequences, prompt lengths
    and question ids."""
    from scylla.corpus import read_answers

    rows = read_answers()
    if not rows:
        raise ScyllaError("corpus answers-v2 is not built; run `scylla build-corpus --answers N` first")
    return ([r["prompt_ids"] + r["answer_ids"] for r in rows], [len(r["prompt_ids"]) for r in rows],
            [r["question_id"] for r in rows])


def feature_folder(target, corpus: str) -> Path:
    layers = stored_layers(target.model.config.num_hidden_layers)
    return cache_root() / "features" / f"{corpus}-{corpus_key(corpus, target.name, layers)}"


def captured_folder(target) -> Path:
    """Where build-corpus keeps the features of the answers it generates (bulk.FeatureCapture)."""
    return feature_folder(target, ANSWERS_CORPUS) / "captured"


def ensure_features(target, corpus: str) -> Path:
    layers = stored_layers(target.model.config.num_hidden_layers)
    folder = feature_folder(target, corpus)
    prompt_lens, captured = None, None
    if corpus == ANSWERS_CORPUS:
        seqs, prompt_lens, ids = answer_sequences()
        kept = CapturedFeatures(captured_folder(target))

        def captured(i: int, seq: list[int]) -> dict | None:
            return kept.get(ids[i], seq)
    elif (folder / "DONE").is_file():
        return folder
    else:
        seqs = mixed_sequences(corpus)
    if not reopen_for_growth(folder, len(seqs)):
        return folder
    total = sum(map(len, seqs))
    with tqdm(total=total, desc="target features", unit="tok") as bar:
        extract_features(target, seqs, layers, folder, progress=bar.update, prompt_lens=prompt_lens,
                         captured=captured)
    shutil.rmtree(folder / "captured", ignore_errors=True)   # now in the shards
    return folder


def reopen_for_growth(folder: Path, n_seqs: int) -> bool:
    """True when features must be (re)extracted. A corpus that grew since its features were
    cached (answers are only ever appended) reopens the cache: its last shard, cut short at the
    old end, goes; every earlier shard is kept, since shard boundaries depend only on what
    precedes them."""
    done = folder / "DONE"
    if not done.is_file():
        return True
    record = json.loads(done.read_text())
    if record["sequences"] >= n_seqs:
        return False
    done.unlink()
    (folder / f"shard-{record['shards'] - 1:04d}.safetensors").unlink(missing_ok=True)
    return True


def align_stage(target, record: dict, cfg: TrainConfig, out: Path, tokens: int) -> dict:
    """Second stage: continue the trained draft on the target's own chat answers only, at a
    third of the learning rate. `out` then holds the aligned draft, `out/pretrained` the first."""
    from dataclasses import replace

    seqs = load_feature_sequences(ensure_features(target, "responses"))
    stage = replace(cfg, tokens=tokens, lr=cfg.lr / 3, init_from=str(out))
    aligned = train_head(target, seqs, stage, out / "aligned", target.name)
    (out / "pretrained").mkdir(exist_ok=True)  # the first stage stays, to compare against
    for name in (WEIGHTS, CONFIG):
        (out / name).replace(out / "pretrained" / name)
        (out / "aligned" / name).replace(out / name)
    merged = {**record, "wall_s": round(record["wall_s"] + aligned["wall_s"], 1),
            "final_loss": aligned["final_loss"], "heldout_top1": aligned["heldout_top1"],
            "corpus": f"{record['corpus']}+align:responses:{tokens}", "name": out.name}
    (out / "training.json").write_text(json.dumps(merged, indent=2))
    return merged


def train_draft_from_args(args) -> dict:
    recipe = getattr(args, "recipe", None)
    name = args.name or recipe or "scylla"
    given = {"fusion": args.fusion, "draft_vocab": args.draft_vocab, "ttt_steps": args.ttt,
             "arch": getattr(args, "arch", None)}
    cfg = TrainConfig(tokens=args.tokens, layers=args.layers, **recipe_settings(recipe, given), lr=args.lr,
                      seed=args.seed, kind=name, max_len=getattr(args, "max_len", 2048),
                      prompt_weight=getattr(args, "prompt_weight", 0.1),
                      precision=getattr(args, "precision", "auto"), labels=getattr(args, "labels", "soft"))
    check_train_config(cfg)  # both stages' settings are refused before any work starts
    if getattr(args, "align_tokens", 0) and args.align_tokens < 256:
        raise ScyllaError(f"--align-tokens must be 0 or >= 256, got {args.align_tokens}")
    target = load_target()
    out = Path(args.out) if args.out else cache_root() / "drafts" / name
    feature_dir = ensure_features(target, args.corpus)
    seqs = load_feature_sequences(feature_dir)
    record = train_head(target, seqs, cfg, out, target.name)
    record["corpus"] = args.corpus
    if getattr(args, "align_tokens", 0):
        record = align_stage(target, record, cfg, out, args.align_tokens)
    if args.db:
        from scylla.store import insert_training
        insert_training(args.db, {**training_row(record), "target": target.name, "command": "scylla train-draft"})
    return record
