"""Build the training corpora once and record their provenance (`scylla build-corpus`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from scylla.data import code_sequences, self_distill, training_prompts
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
