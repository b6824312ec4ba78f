"""Build the training corpora once and record their provenance (`scylla build-corpus`)."""
from __future__ import annotations

import gzip
import json
import shutil
import time
import zlib
from pathlib import Path

import random

from tqdm import tqdm

from scylla.data import code_sequences, self_distill, stdlib_docstrings, stdlib_functions, training_prompts
from scylla.models import cache_root


def corpus_dir() -> Path:
    return cache_root() / "corpora"


def corpus_path(name: str) -> Path:
    return corpus_dir() / f"{name}.json"


def build_selfdistill(target, n_prompts: int, max_new_tokens: int, batch: int, seed: int = 1) -> Path:
    """Target answers to generated prompts; written every batch so a kill loses little."""
    name = f"selfdistill-{n_prompts}-s{seed}"
    path = corpus_path(name)
    done = json.loads(path.read_text())["sequences"] if path.is_file() else []
    prompts = training_prompts(n_prompts, seed=seed)
    start = time.time()
    with tqdm(total=n_prompts, initial=len(done), desc="self-distill", unit="prompt") as bar:
        for i in range(len(done), n_prompts, batch):
            done += self_distill(target, prompts[i:i + batch], max_new_tokens, batch)
            write_corpus(path, name, done, {"kind": "self-distillation", "prompts": len(done),
                                            "max_new_tokens": max_new_tokens, "seed": seed,
                                            "source": "scylla.data.training_prompts (stdlib text + templates)",
                                            "wall_s_last_session": round(time.time() - start, 1)})
            bar.update(min(batch, n_prompts - i))
    return path


def build_realtext(target, max_tokens: int = 640) -> Path:
    """Real text in chat form: docstrings to explain and functions to write. The labels the
    draft learns are the target's own next-token choices on these contexts (distillation)."""
    name = "stdlib-chat"
    path = corpus_path(name)
    if path.is_file():
        return path
    seqs = [chat_pair(target, f"Explain this documentation in plain words.\n\n{doc}", doc, max_tokens)
            for doc in stdlib_docstrings()]
    seqs += [chat_pair(target, f"Write the Python function `{first_line(src)}`.", f"```python\n{src}\n```", max_tokens)
             for src in stdlib_functions()]
    order = random.Random(0).sample(range(len(seqs)), len(seqs))
    write_corpus(path, name, [seqs[i] for i in order],
                 {"kind": "real text, chat-formatted", "source": "Python standard-library docstrings and function sources"})
    return path


def chat_pair(target, user: str, answer: str, max_tokens: int) -> list[int]:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ids = target.tokenizer.apply_chat_template(messages, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)[:max_tokens]


def first_line(src: str) -> str:
    return src.strip().splitlines()[0].removeprefix("def ").rstrip(":")


def build_code(target) -> Path:
    name = "stdlib-code"
    path = corpus_path(name)
    if not path.is_file():
        seqs = code_sequences(target)
        write_corpus(path, name, seqs, {"kind": "real text", "source": "Python standard-library function sources"})
    return path


def write_corpus(path: Path, name: str, seqs: list[list[int]], provenance: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "provenance": provenance, "n_sequences": len(seqs),
              "n_tokens": sum(map(len, seqs)), "sequences": seqs}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def read_corpus(name: str) -> dict:
    return json.loads(corpus_path(name).read_text())


# ---------------------------------------------------------------- the target's own answers (v2)
# Prompts from three sources (scylla/sources.py), answered by the target on the lean engine in
# batches; one JSON line per answer, appended as batches finish, so a killed build resumes
# where it stopped. Every fourth answer is sampled at T = 1, the rest greedy, so that the
# draft meets both decoding modes.

ANSWERS = "answers-v2"
SHARES = {"magpie": 0.25, "template": 0.35, "longtext": 0.40}


def answers_dir() -> Path:
    return corpus_dir() / ANSWERS


SNAPSHOT = Path(__file__).resolve().parent.parent / "assets" / "corpora" / ANSWERS
SNAPSHOT_FILES = ("prompts.jsonl", "answers.jsonl", "provenance.json")


def save_snapshot(dest: Path | None = None) -> Path:
    """Copy the corpus built so far, gzipped, into the repository: a fresh machine resumes
    from it instead of from nothing (generation costs hours on a CPU)."""
    dest = dest or SNAPSHOT
    dest.mkdir(parents=True, exist_ok=True)
    for name in SNAPSHOT_FILES:
        src = answers_dir() / name
        if src.is_file():
            with src.open("rb") as fin, gzip.open(dest / f"{name}.gz", "wb", compresslevel=9) as fout:
                shutil.copyfileobj(fin, fout)
    return dest


def restore_snapshot(src: Path | None = None) -> bool:
    """Seed an empty corpus folder from the repository's snapshot; False when there is none
    or the folder already holds a build."""
    src = src or SNAPSHOT
    folder = answers_dir()
    if (folder / "prompts.jsonl").is_file() or not (src / "prompts.jsonl.gz").is_file():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for name in SNAPSHOT_FILES:
        packed = src / f"{name}.gz"
        if packed.is_file():
            with gzip.open(packed, "rb") as fin, (folder / name).open("wb") as fout:
                shutil.copyfileobj(fin, fout)
    return True


def build_prompt_set(target, n: int, seed: int = 0, shares: dict = SHARES, progress=None,
                     magpie_batch: int = 32, magpie_tokens: int = 96) -> list[dict]:
    """The training prompts (cached), about `n` of them: the first build draws each
    source's share with `seed`; asking for more than before appends a tranche drawn with the
    next seed, deduplicated against everything kept and the evaluation prompts. The record of
    provenance goes beside them."""
    restore_snapshot()
    path = answers_dir() / "prompts.jsonl"
    have = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    provenance = read_provenance()
    if have and n <= provenance.get("requested", len(have)):   # asked before: dedup may leave fewer
        return have
    tranche_seed = seed + len(provenance.get("tranches", []))
    added, drawn = draw_tranche(target, n - len(have), tranche_seed, have, shares, progress,
                                magpie_batch, magpie_tokens)
    prompts = have + added
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    tranche = {"seed": tranche_seed, "added": len(added),
               "sources": {name: {"generated": drawn[name], "kept": sum(p["source"].startswith(name) for p in added)}
                           for name in drawn}}
    write_provenance(provenance, tranche, len(prompts), n)
    for partial in answers_dir().glob("magpie-draw-*.jsonl"):   # the tranche is written: its draws are done
        partial.unlink()
    return prompts


def magpie_draw_path(seed: int) -> Path:
    """Where a tranche's Magpie draw keeps its requests batch by batch (resumed after a kill)."""
    folder = answers_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"magpie-draw-{seed}.jsonl"
    drop_cut_line(path)   # appends must start on a fresh line
    return path


def draw_tranche(target, n: int, seed: int, have: list[dict], shares: dict, progress,
                 magpie_batch: int, magpie_tokens: int) -> tuple[list[dict], dict]:
    """About `n` new prompts in the sources' shares, none near a kept or an evaluation prompt."""
    from scylla import sources

    want = {name: int(n * share * 1.15) + 8 for name, share in shares.items()}   # dedup drops some
    raw = {"template": sources.template_prompts(want["template"], seed),
           "longtext": sources.longtext_prompts(want["longtext"], seed),
           "magpie": sources.magpie_prompts(target, want["magpie"], seed, batch=magpie_batch,
                                            max_new_tokens=magpie_tokens, progress=progress,
                                            resume=magpie_draw_path(seed))}
    banned = sources.eval_shingles() + [sources.shingles(p["prompt"]) for p in have]
    known = {p["question_id"] for p in have}
    kept = {name: [p for p in sources.dedup(rows, banned) if p["question_id"] not in known][:int(n * shares[name]) + 1]
            for name, rows in raw.items()}
    added = sources.dedup([p for rows in kept.values() for p in rows], banned)
    drawn = {name: len(rows) for name, rows in raw.items()}
    short = n - len(added)
    if short > 0:   # a source ran dry (the templates repeat after a few thousand): Magpie fills the gap
        extra = sources.magpie_prompts(target, int(short * 1.15) + 8, seed + 1000, batch=magpie_batch,
                                       max_new_tokens=magpie_tokens, progress=progress,
                                       resume=magpie_draw_path(seed + 1000))
        drawn["magpie"] += len(extra)
        banned += [sources.shingles(p["prompt"]) for p in added]
        added += sources.dedup([p for p in extra if p["question_id"] not in known], banned)[:short]
    random.Random(seed).shuffle(added)
    return added, drawn


def read_provenance() -> dict:
    path = answers_dir() / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_provenance(provenance: dict, tranche: dict, total: int, requested: int) -> None:
    record = {"prompts": total, "requested": requested, "tranches": provenance.get("tranches", []) + [tranche],
              "dedup": "word 8-gram shingles, 50% of the smaller set (scylla/sources.py); near-duplicates "
                       "of kept or evaluation prompts dropped",
              "long_text": "Debian package descriptions, /usr/share/doc, Python docstrings and sources on this machine"}
    (answers_dir() / "provenance.json").write_text(json.dumps(record, indent=1))


def drop_cut_line(path: Path) -> None:
    """A kill mid-write leaves a last line without its newline: drop it before appending."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def done_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["question_id"])
        except (json.JSONDecodeError, KeyError):
            continue   # a line cut by a kill: that prompt is answered again
    return ids


def build_answers(target, n_prompts: int, max_new_tokens: int = 256, batch: int = 16, seed: int = 0,
                  max_prompt_tokens: int = 1792, capture_to: Path | None = None) -> Path:
    """Answer every prompt of the set; resumable; a progress bar with answer tokens/s. With
    `capture_to`, the draft's features of each answered sequence are kept there as it is
    generated (on the lean forward), which spares the feature cache a second forward."""
    from scylla.bulk import answers_with_features
    from scylla.data import save_captured
    from scylla.models import encode_prompt
    from scylla.train import stored_layers

    restore_snapshot()
    with tqdm(desc="magpie requests", unit="prompt") as magpie_bar:   # idle unless prompts are drawn
        prompts = build_prompt_set(target, n_prompts, seed,
                                   progress=lambda n: magpie_bar.update(n - magpie_bar.n))
    out = answers_dir() / "answers.jsonl"
    drop_cut_line(out)
    answered = done_ids(out)
    todo = [p for p in prompts if p["question_id"] not in answered]
    encoded = [(p, encode_prompt(target, p["prompt"])[-max_prompt_tokens:]) for p in todo]
    layers = stored_layers(target.model.config.num_hidden_layers) if capture_to else []
    start, made = time.time(), 0
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="answers", unit="prompt") as bar, \
            out.open("a") as sink:
        for chunk in length_sorted_batches(encoded, batch):
            temperature = 1.0 if zlib.crc32(chunk[0][0]["question_id"].encode()) % 4 == 0 else 0.0
            ids, seqs = answers_with_features(target, [e for _, e in chunk], max_new_tokens, layers,
                                              temperature, seed=seed)
            if capture_to and seqs:   # before the answers: a kill between leaves answers to re-extract, never the reverse
                save_captured({p["question_id"]: seq for (p, _), seq in zip(chunk, seqs)}, capture_to)
            for (p, enc), answer in zip(chunk, ids):
                sink.write(json.dumps({"question_id": p["question_id"], "source": p["source"],
                                       "category": p["category"], "temperature": temperature,
                                       "prompt_ids": enc, "answer_ids": answer}) + "\n")
                made += len(answer)
            sink.flush()
            bar.update(len(chunk))
            bar.set_postfix(answer_tok_s=f"{made / (time.time() - start):.0f}", tokens=made)
    return out


def length_sorted_batches(encoded: list, batch: int, window: int = 256) -> list[list]:
    """Batches of similar prompt lengths (less padding), keeping the prompt order coarsely."""
    out = []
    for i in range(0, len(encoded), window):
        block = sorted(encoded[i:i + window], key=lambda pe: len(pe[1]))
        out += [block[j:j + batch] for j in range(0, len(block), batch)]
    return out


def read_answers() -> list[dict]:
    restore_snapshot()
    path = answers_dir() / "answers.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
