"""Training prompts from three sources, deduplicated and kept apart from the evaluation prompts.

- `magpie`: the target writes user turns itself when given only the chat template's opening
  of a user message (the Magpie method, arXiv 2406.08464), filtered for length, language and
  near-duplicates;
- `template`: the generator in scylla/data.py (eight kinds of use over the standard library);
- `longtext`: real long text that ships with this machine (Debian package descriptions,
  files under /usr/share/doc, Python's documentation strings and sources) turned into the
  long-context kinds: summarise, answer from the passage, extract, translate, rewrite.

Dedup rule: prompts are compared on the word 8-grams of their normalised text (lower case,
one space; the first 400 words; a prompt of fewer than 8 words is its own key). Two prompts
are near-duplicates when they share at least half of the smaller one's 8-grams, so a shared
instruction line is not enough but a shared passage or question is. The first one met is
kept. Evaluation prompts are keyed the same way, and every training prompt near one of them
is dropped.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
from pathlib import Path

import torch

from scylla.data import (SWEEP_PROMPTS, broad_prompts, eval_prompts, load_prompts, stdlib_docstrings,
                         stdlib_functions, training_prompts)

SHINGLE = 8
MAGPIE_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LONG_TASKS = {
    "summarization": ["Summarize the following text in a few sentences.\n\n{text}",
                      "Give a short summary of this:\n\n{text}",
                      "{text}\n\nSummarize the text above for a busy reader."],
    "rag": ["Answer the question using only the passage.\n\nPassage: {text}\n\nQuestion: What is this about, and what is it used for?",
            "Read the passage and answer.\n\n{text}\n\nQuestion: What are the main points?",
            "Context:\n{text}\n\nBased on the context, who would find this useful and why?"],
    "extraction": ["List the key terms, names and numbers in this text.\n\n{text}",
                   "Extract the main facts from the text below as a bulleted list.\n\n{text}"],
    "translation": ["Translate into {lang}:\n\n{short}", "Translate the following to {lang}: {short}"],
    "rewrite": ["Rewrite this in simpler words.\n\n{text}", "Rewrite the following text as a friendly email.\n\n{text}"],
}
LANGS = ["French", "Spanish", "German", "Italian", "Portuguese"]


# ---------------------------------------------------------------- dedup and disjointness

def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str) -> set[str]:
    words = normalise(text).split()[:400]
    if len(words) < SHINGLE:
        return {" ".join(words)}
    return {" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def eval_shingles() -> list[set[str]]:
    """Keys of every evaluation prompt (the eval, sweep and broad sets): training stays away."""
    rows = eval_prompts() + load_prompts(SWEEP_PROMPTS) + broad_prompts()
    return [shingles(prompt_text(row)) for row in rows]


def prompt_text(row: dict) -> str:
    """A prompt's whole text: every turn of a conversation, else the prompt."""
    return "\n\n".join(m["content"] for m in row.get("messages", ())) or row["prompt"]


def near_duplicate(keys: set[str], index: dict[str, list[int]], sizes: list[int], share: float = 0.5) -> bool:
    """Do `keys` share at least `share` of the smaller shingle set with an indexed prompt?
    (A shared instruction line is not enough; a shared passage or question is.)"""
    hits: dict[int, int] = {}
    for key in keys:
        for other in index.get(key, ()):
            hits[other] = hits.get(other, 0) + 1
    return any(n >= share * min(len(keys), sizes[other]) for other, n in hits.items())


def dedup(prompts: list[dict], banned: list[set[str]]) -> list[dict]:
    """Keep the first of near-duplicates; drop any prompt near a `banned` (evaluation) prompt."""
    index: dict[str, list[int]] = {}
    sizes: list[int] = []

    def add(keys):
        for key in keys:
            index.setdefault(key, []).append(len(sizes))
        sizes.append(len(keys))

    for keys in banned:
        add(keys)
    kept = []
    for p in prompts:
        keys = shingles(p["prompt"])
        if near_duplicate(keys, index, sizes):
            continue
        add(keys)
        kept.append(p)
    return kept


# ---------------------------------------------------------------- long text on this machine

def debian_descriptions(min_chars: int = 200) -> list[str]:
    """Long package descriptions from `apt-cache dumpavail` (empty where apt has no lists)."""
    try:
        raw = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for block in raw.split("\n\n"):
        match = re.search(r"^Description(?:-en)?: (.*(?:\n .*)*)", block, re.M)
        if not match:
            continue
        lines = [line[1:] if line.startswith(" ") else line for line in match.group(1).splitlines()]
        text = "\n".join("" if line.strip() == "." else line for line in lines).strip()
        if len(text) >= min_chars:
            out.append(text)
    return sorted(set(out))


def doc_files(root: Path = Path("/usr/share/doc"), limit: int = 4000) -> list[str]:
    """Plain-text README, NEWS and similar files under /usr/share/doc (gzip too), as paragraphs
    of 400-6000 characters."""
    out = []
    for path in sorted(root.rglob("*"))[:200000]:
        name = path.name.lower()
        if not path.is_file() or not any(k in name for k in ("readme", "news", "changes", "faq", "txt")):
            continue
        try:
            data = gzip.open(path).read() if name.endswith(".gz") else path.read_bytes()
            text = data[:20000].decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        out += passages(text)
        if len(out) >= limit:
            break
    return out[:limit]


def passages(text: str, low: int = 400, high: int = 6000) -> list[str]:
    """Split on blank lines and join paragraphs into passages of low..high characters."""
    out, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        if len(current) + len(para) > high:
            if len(current) >= low:
                out.append(current.strip())
            current = ""
        current += para + "\n\n"
    if len(current.strip()) >= low:
        out.append(current.strip()[:high])
    return out


def long_texts() -> list[tuple[str, str]]:
    """(source, text) pairs from every long-text source on this machine."""
    texts = [("debian-descriptions", t) for t in debian_descriptions()]
    texts += [("usr-share-doc", t) for t in doc_files()]
    texts += [("python-docstrings", t) for t in stdlib_docstrings(min_chars=400, max_chars=6000)]
    texts += [("python-sources", t) for t in stdlib_functions(max_lines=80)]
    return texts


def first_sentences(text: str, n: int = 2) -> str:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return " ".join(parts[:n])[:400]


def longtext_prompts(n: int, seed: int = 0, texts: list[tuple[str, str]] | None = None) -> list[dict]:
    rng = random.Random(seed)
    texts = texts if texts is not None else long_texts()
    if not texts:
        return []
    by_source: dict[str, list[str]] = {}
    for source, text in texts:
        by_source.setdefault(source, []).append(text)
    names = sorted(by_source)
    kinds = list(LONG_TASKS)
    out = []
    for i in range(n):
        source = names[rng.randrange(len(names))]   # each source equally, whatever its size
        text = rng.choice(by_source[source])
        kind = kinds[i % len(kinds)]
        form = rng.choice(LONG_TASKS[kind])
        prompt = form.format(text=text, short=first_sentences(text), lang=rng.choice(LANGS))
        out.append({"prompt": prompt, "category": kind, "source": f"longtext:{source}",
                    "question_id": f"long-{seed}-{i}"})
    return out


# ---------------------------------------------------------------- the target writes the prompts

def magpie_opening(tokenizer) -> list[int]:
    """The chat template up to the start of a user turn's text."""
    text = f"<|im_start|>system\n{MAGPIE_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    return tokenizer(text)["input_ids"]


def usable_request(text: str) -> bool:
    """Length, language (mostly ASCII letters) and not an echo of the template."""
    text = text.strip()
    if not 20 <= len(text) <= 1200 or "<|im_" in text:
        return False
    letters = sum(c.isascii() and c.isalpha() for c in text)
    return letters >= 0.6 * len(text)


@torch.inference_mode()
def magpie_prompts(target, n: int, seed: int = 0, batch: int = 32, max_new_tokens: int = 96,
                   progress=None, resume: Path | None = None) -> list[dict]:
    """n user requests written by the target itself (T = 1, top-p 0.95), filtered. With
    `resume`, each batch's kept requests are appended there, and a later call picks up after
    the last recorded batch: a kill loses one batch, not the draw (each batch's sampling seed
    depends only on its index, so the result is the same as an uninterrupted draw)."""
    from scylla.bulk import plain_answers

    opening = magpie_opening(target.tokenizer)
    texts, attempt = read_magpie_draw(resume)
    while len(texts) < n and attempt < 4 * n // batch + 4:
        ids = plain_answers(target, [opening] * batch, max_new_tokens, temperature=1.0, top_p=0.95,
                            seed=seed * 100003 + attempt)
        kept = finished_requests(target, ids)
        texts += kept
        if resume is not None:
            with resume.open("a") as sink:
                sink.write(json.dumps({"attempt": attempt, "kept": kept}) + "\n")
        attempt += 1
        if progress:
            progress(len(texts))
    return [{"prompt": text, "category": "magpie", "source": "magpie", "question_id": f"magpie-{seed}-{i}"}
            for i, text in enumerate(texts[:n])]


def finished_requests(target, ids: list[list[int]]) -> list[str]:
    """The sampled user turns that ended (EOS) and pass `usable_request`."""
    texts = [target.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    return [text.strip() for text, row in zip(texts, ids) if usable_request(text) and row[-1] in target.eos_ids]


def read_magpie_draw(path: Path | None) -> tuple[list[str], int]:
    """The requests kept so far and the next batch's index; a line cut by a kill is dropped."""
    texts, attempt = [], 0
    for line in path.read_text().splitlines() if path is not None and path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        texts += record["kept"]
        attempt = record["attempt"] + 1
    return texts, attempt


def template_prompts(n: int, seed: int = 0) -> list[dict]:
    return [{**p, "source": "template"} for p in training_prompts(n, seed=seed + 1000)]
