"""Build the training corpora once and record their provenance (`scylla build-corpus`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

import random

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
