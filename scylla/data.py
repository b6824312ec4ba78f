"""Prompts, corpora and the target-feature cache.

Evaluation prompts live in assets/eval_prompts.jsonl and are never used for
training. Training prompts are generated here from templates over real text that
ships with every Python install (standard-library docstrings and sources), so no
data is downloaded and the two sets cannot overlap.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import sysconfig
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scylla import ScyllaError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EVAL_PROMPTS = ASSETS / "eval_prompts.jsonl"
SWEEP_PROMPTS = ASSETS / "sweep_prompts.jsonl"
BROAD_PROMPTS = ASSETS / "broad_prompts.jsonl"   # 12 kinds of use, each split into tune and report halves
ROLES = ("user", "assistant", "system")


# ---------------------------------------------------------------- prompt files

def load_prompts(path: str | Path, limit: int | None = None, split: str | None = None) -> list[dict]:
    """Read a JSONL prompt file: each line has `turns` (first = the prompt), `prompt`, or a
    conversation's `messages`. split: only the rows of that half (`tune` or `report`)."""
    path = Path(path)
    if not path.is_file():
        raise ScyllaError(f"prompts file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        row = parse_prompt_line(line, path, number)
        if split is None or row["split"] == split:
            rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ScyllaError(f"{path}: no prompts" + (f" in split {split!r}" if split else ""))
    return rows


def parse_prompt_line(line: str, path: Path, number: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ScyllaError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ScyllaError(f"{path}:{number}: each line must be a JSON object")
    messages = obj.get("messages")
    if messages is not None and not valid_messages(messages):
        raise ScyllaError(f"{path}:{number}: `messages` must be a list of {{role, content}} with roles "
                          "user/assistant/system, non-empty text, the last one from the user")
    turns = obj.get("turns")
    text = turns[0] if isinstance(turns, list) and turns else obj.get("prompt")
    text = messages[-1]["content"] if messages else text
    if not isinstance(text, str) or not text.strip():
        raise ScyllaError(f"{path}:{number}: needs a non-empty `turns` list or `prompt` string")
    row = {"prompt": text, "category": str(obj.get("category", "all")),
           "question_id": str(obj.get("question_id", number)), "split": str(obj.get("split", "all"))}
    if messages:
        row["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    return row


def valid_messages(messages) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    and m["content"].strip() for m in messages)
            and messages[-1]["role"] == "user")


def eval_prompts(limit: int | None = None) -> list[dict]:
    return load_prompts(EVAL_PROMPTS, limit)


def broad_prompts(split: str | None = None) -> list[dict]:
    """The broad set (assets/broad_prompts.jsonl), or only its `tune` or `report` half."""
    return load_prompts(BROAD_PROMPTS, split=split)


# ---------------------------------------------------------------- real text on this machine

def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__")
    files = [p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(skip)]
    return sorted(files)


def stdlib_docstrings(min_chars: int = 200, max_chars: int = 1500) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed order."""
    return list(_stdlib_docstrings(min_chars, max_chars))


def stdlib_functions(max_lines: int = 30) -> list[str]:
    """Short function sources from the standard library, for the code domain."""
    return list(_stdlib_functions(max_lines))


@functools.lru_cache(maxsize=4)  # parsing the whole standard library takes seconds
def _stdlib_docstrings(min_chars: int, max_chars: int) -> tuple[str, ...]:
    out = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and min_chars <= len(doc) <= max_chars:
                    out.append(doc.strip())
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _stdlib_functions(max_lines: int) -> tuple[str, ...]:
    out = []
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno < max_lines:
                src = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if 120 <= len(src) <= 1500:
                    out.append(src)
    return tuple(out)


# ---------------------------------------------------------------- training prompts

TOPICS = ["gardening", "budget travel", "learning a language", "running a marathon", "baking bread",
          "saving money", "starting a podcast", "keeping a journal", "adopting a dog", "time management",
          "public speaking", "moving abroad", "home workouts", "photography", "chess", "cooking rice",
          "volunteering", "camping", "learning guitar", "writing a novel", "caring for houseplants",
          "recycling", "first aid", "birdwatching", "remote work", "painting with watercolors",
          "planning a wedding", "buying a used car", "meditation", "cycling to work"]
NOUNS = ["a robot", "an old lighthouse", "a lost cat", "a busy market", "the first snow", "a library at midnight",
         "a small island", "a violin", "a train journey", "a forgotten letter", "the desert", "a city park"]
LANGS = ["French", "Spanish", "German", "Italian", "Portuguese"]
PHRASES = ["I usually take the bus to work.", "The museum opens at ten in the morning.",
           "Could you help me carry these bags?", "We had dinner with our grandparents.",
           "The children are playing in the garden.", "Please close the window, it is cold.",
           "I have been learning to cook this year.", "The meeting was moved to Thursday.",
           "She bought fresh bread at the bakery.", "Our flight leaves early tomorrow.",
           "He forgot his umbrella at the office.", "The river is very calm today."]
TASKS = ["reverses a list", "finds the largest number in a list", "counts the vowels in a string",
         "checks whether a number is prime", "merges two sorted lists", "computes the factorial of n",
         "converts Celsius to Fahrenheit", "flattens a nested list", "returns the median of a list",
         "validates an email address with a regular expression", "sorts a dictionary by value",
         "reads a CSV file and sums a column", "computes the greatest common divisor",
         "splits a list into chunks of size n", "capitalizes every word in a sentence"]
QUESTIONS = ["How does {} work?", "What are the benefits of {}?", "What are common mistakes in {}?",
             "Explain {} to a beginner.", "Give me three tips for {}."]


def math_problem(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(1, 30)
    forms = [f"A farmer has {a} rows of trees with {b} trees in each row. {c} trees are cut down. How many trees are left?",
             f"A ticket costs {b} dollars. How much do {a} tickets cost, and how much change is left from {a * b + c} dollars?",
             f"A car uses {b} liters of fuel per 100 km. How much fuel does it need for {a * 10} km?",
             f"There are {a} students and each needs {b} notebooks. Notebooks come in packs of {max(c, 2)}. How many packs are needed?",
             f"What is {a} percent of {b * 50}?",
             f"A tank holds {a * 10} liters and fills at {b} liters per minute. How long does it take to fill?"]
    return rng.choice(forms)


def training_prompts(n: int, seed: int = 0) -> list[dict]:
    """A varied, deterministic prompt set over eight kinds of use (never the eval file)."""
    rng = random.Random(seed)
    docs = stdlib_docstrings()
    funcs = stdlib_functions()
    makers = {
        "conversation": lambda: rng.choice(["I'm interested in {}. Where should I start?",
                                            "My friend and I argue about {}. What do you think?",
                                            "Can we chat about {}? I'm a complete beginner."]).format(rng.choice(TOPICS)),
        "writing": lambda: rng.choice(["Write a short story about {}.", "Write a poem about {}.",
                                       "Write a blog post introduction about {}."]).format(rng.choice(NOUNS + TOPICS)),
        "summarization": lambda: f"Summarize the following text.\n\n{rng.choice(docs)}",
        "qa": lambda: rng.choice(QUESTIONS).format(rng.choice(TOPICS)),
        "math": lambda: math_problem(rng),
        "code": lambda: rng.choice([f"Write a Python function that {rng.choice(TASKS)}.",
                                    f"Explain what this Python function does:\n\n{rng.choice(funcs)}",
                                    f"Add comments to this code:\n\n{rng.choice(funcs)}"]),
        "translation": lambda: f"Translate to {rng.choice(LANGS)}: {rng.choice(PHRASES)}",
        "rag": lambda: (f"Answer the question using only the context.\n\nContext: {rng.choice(docs)}\n\n"
                        f"Question: {rng.choice(['What does this describe?', 'What is the main purpose?', 'What are the parameters or options mentioned?', 'What does it return?'])}"),
    }
    kinds = list(makers)
    return [{"prompt": makers[kinds[i % len(kinds)]](), "category": kinds[i % len(kinds)],
             "question_id": f"train-{i}"} for i in range(n)]


# ---------------------------------------------------------------- corpora

@torch.inference_mode()
def self_distill(target, prompts: list[dict], max_new_tokens: int = 160, batch: int = 8,
                 progress=None) -> list[list[int]]:
    """The target's own greedy answers (EAGLE-3 regenerates its data the same way)."""
    from scylla.models import encode_prompt

    tok = target.tokenizer
    tok.padding_side = "left"
    seqs = []
    for start in range(0, len(prompts), batch):
        chunk = [encode_prompt(target, p["prompt"])[-768:] for p in prompts[start:start + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        out = target.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
        for c, row in zip(chunk, out[:, width:].tolist()):
            answer = trim_after_eos(row, target.eos_ids)
            seqs.append(c + answer)
        if progress:
            progress(len(chunk))
    return seqs


def trim_after_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i + 1]
    return row


def code_sequences(target, max_tokens: int = 512) -> list[list[int]]:
    """Standard-library function sources as plain text (real code, no chat template)."""
    return [target.tokenizer(src)["input_ids"][:max_tokens] for src in stdlib_functions()]


# ---------------------------------------------------------------- feature cache

def corpus_key(name: str, target_name: str, layers: list[int]) -> str:
    raw = json.dumps([name, target_name, layers])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@torch.inference_mode()
def extract_features(target, seqs: list[list[int]], layers: list[int], out_dir: Path,
                     shard_tokens: int = 16384, progress=None, prompt_lens: list[int] | None = None,
                     captured=None) -> Path:
    """Teacher-force each sequence through the target; store the chosen hidden layers (fp16),
    the tokens and the target's greedy next token at every position, in safetensors shards.
    `captured(i, seq)`: sequence i's features kept while it was generated, or None."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {int(p.stem.split("-")[1]) for p in out_dir.glob("shard-*.safetensors")}
    shard, buf, count = 0, [], 0
    for i, seq in enumerate(seqs):
        if shard not in done:
            buf.append((captured and captured(i, seq)) or features_of(target, seq, layers))
            buf[-1]["prompt_len"] = prompt_lens[i] if prompt_lens else 0
        count += len(seq)
        if count >= shard_tokens or i == len(seqs) - 1:
            if shard not in done:
                save_shard(buf, out_dir / f"shard-{shard:04d}.safetensors")
            shard, buf, count = shard + 1, [], 0
        if progress:
            progress(len(seq))
    (out_dir / "DONE").write_text(json.dumps({"sequences": len(seqs), "shards": shard}))
    return out_dir


def features_of(target, seq: list[int], layers: list[int]) -> dict:
    """One forward of the engine's own (lean) forward over the whole sequence."""
    fwd = target.forward
    ids = torch.tensor([seq])
    logits, feats = fwd.forward(ids, fwd.new_cache(1, len(seq) + 1), features=tuple(layers))
    return {"tokens": ids[0], "features": feats[0].half().cpu(), "labels": logits[0].argmax(-1).cpu()}


def save_shard(items: list[dict], path: Path) -> None:
    lengths = torch.tensor([len(x["tokens"]) for x in items])
    tensors = {"lengths": lengths,
               "prompt_lens": torch.tensor([int(x.get("prompt_len", 0)) for x in items]),
               "tokens": torch.cat([x["tokens"] for x in items]),
               "features": torch.cat([x["features"] for x in items]),
               "labels": torch.cat([x["labels"] for x in items])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def save_captured(seqs: dict[str, dict], folder: Path) -> None:
    """Features kept while answers were generated (bulk.FeatureCapture), one file per batch,
    keyed by question id; extract_features takes them instead of a second forward."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{qid}|{key}": value.contiguous() for qid, seq in seqs.items() for key, value in seq.items()}
    name = hashlib.sha256("".join(seqs).encode()).hexdigest()[:16]
    tmp = folder / f"{name}.tmp"
    save_file(tensors, str(tmp))
    tmp.rename(folder / f"{name}.safetensors")


class CapturedFeatures:
    """Lookup of captured sequences by question id; a sequence whose tokens differ from the
    corpus's (a prompt answered again after a kill) is not used."""

    def __init__(self, folder: Path):
        self.where: dict[str, Path] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                self.where.update({key.split("|")[0]: path for key in f.keys()})

    def get(self, qid: str, tokens: list[int]) -> dict | None:
        path = self.where.get(qid)
        if path is None:
            return None
        with safe_open(str(path), "pt") as f:
            seq = {key: f.get_tensor(f"{qid}|{key}") for key in ("tokens", "features", "labels")}
        return seq if seq["tokens"].tolist() == tokens else None


def load_feature_sequences(feature_dir: Path) -> list[dict]:
    """All cached sequences, in corpus order: dicts of tokens, features, labels."""
    seqs = []
    for path in sorted(Path(feature_dir).glob("shard-*.safetensors")):
        shard = load_file(str(path))
        offsets = [0] + shard["lengths"].cumsum(0).tolist()
        prompt_lens = shard.get("prompt_lens", torch.zeros(len(offsets) - 1, dtype=torch.long)).tolist()
        for a, b, plen in zip(offsets[:-1], offsets[1:], prompt_lens):
            seq = {k: shard[k][a:b] for k in ("tokens", "features", "labels")}
            if plen:
                seq["prompt_len"] = plen
            seqs.append(seq)
    return seqs
