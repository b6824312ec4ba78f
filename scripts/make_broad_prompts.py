"""Write the `summarization` rows of assets/broad_prompts.jsonl from real long text.

The other eleven kinds of the broad prompt set are written by hand in that file and are
kept as they are; this script (re)builds only the fourteen summarization prompts. Their
documents are real text on this machine that the training corpora never use (those use
Python's own docstrings and sources, /usr/share/doc and Debian package descriptions):
manual pages rendered to plain text by man(1), and the long descriptions of two installed
Python packages (their dist-info METADATA). Each is cleaned (no examples, option lists,
tables, links or markup), cut at a paragraph boundary to 500-1,500 words, and wrapped in a
differently worded instruction, placed before or after it.

Usage: .venv/bin/python scripts/make_broad_prompts.py    (deterministic on one machine)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sysconfig
from pathlib import Path

from scylla.data import BROAD_PROMPTS

KINDS = ("conversation", "summarization", "rag", "qa", "math", "code", "translation", "extraction",
         "roleplay", "stem", "humanities", "writing")
# (source, target words): the document stops at the first paragraph end past the target
DOCUMENTS = [("man:7:boot", 900), ("man:7:unicode", 1000), ("man:7:time", 700), ("man:7:pipe", 1100),
             ("man:7:gitfaq", 1200), ("man:7:gitworkflows", 800), ("man:7:man-pages", 1300),
             ("man:7:symlink", 650), ("man:7:credentials", 1000), ("man:1:gzip", 600),
             ("man:5:core", 900), ("man:7:path_resolution", 800), ("metadata:h11", 900), ("metadata:torch", 590)]
INSTRUCTIONS = [  # (wording, placed before the document?)
    ("Summarize the following text in three or four sentences.", True),
    ("{doc}\n\nTL;DR please.", False),
    ("Can you give me a short summary of this? I don't have time to read all of it.", True),
    ("{doc}\n\nWrite a one-paragraph summary of the text above.", False),
    ("Summarize the main points of this document as a bulleted list of at most five items.", True),
    ("{doc}\n\nWhat is this text about? Answer in two sentences.", False),
    ("I need to explain this to my team tomorrow. Please summarize it in under 100 words.", True),
    ("{doc}\n\nSum this up in simple words, as if you were explaining it to a high school student.", False),
    ("Read the text below and write a brief summary, then one sentence on who would find it useful.", True),
    ("{doc}\n\nGive me the key takeaways from this, in bullet points.", False),
    ("Summarize:", True),
    ("{doc}\n\nCondense the passage above into a short abstract of about 80 words.", False),
    ("Please summarize this documentation, then list three terms from it that a beginner should look up.", True),
    ("{doc}\n\nI pasted this from some documentation. What are the most important things it says?", False),
]
STOP_SECTIONS = {"SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "COLOPHON", "REPORTING BUGS", "BUGS", "GIT",
                 "STANDARDS", "HISTORY", "VERSIONS", "FILES", "EXAMPLES", "EXAMPLE", "NOTES", "LICENSE"}
SKIP_SECTIONS = {"NAME", "SYNOPSIS", "OPTIONS"}


def render_man(section: str, page: str) -> str:
    env = dict(os.environ, MANWIDTH="4000", LC_ALL="C.UTF-8")   # one line per paragraph
    return subprocess.run(["man", "--nh", "--nj", "-P", "cat", section, page], capture_output=True,
                          text=True, env=env, check=True).stdout


def prose(block: str) -> str | None:
    """The block as one line of prose (after its own heading line, if it has one), or None
    for code, tables, option items and bare headings."""
    lines = [line for line in block.splitlines() if line.strip()]
    heading = ""
    if len(lines) > 1 and indent(lines[0]) < indent(lines[1]) and not lines[0].rstrip().endswith("."):
        heading = lines.pop(0).strip() + "\n"
    lines = [line.strip() for line in lines]
    text = " ".join(" ".join(lines).split())
    item = re.match(r"(\(\d+\)|\d+[.)]|\u2022) ", text)   # a list item may be short
    if len(text.split()) < (2 if item else 8) or text.startswith(("$", "#", "%", "-", "*", ">", "|")):
        return None
    if any(re.search(r"\S {3,}\S", line) for line in lines) or re.search(r"copyright|licen[cs]e", text, re.I):
        return None
    symbols = sum(c in "{}[]<>=|\\;$*&_`" for c in text) / len(text)
    ends = (".", "?", "!", ":", ")", '"', "\u201d")
    ok = symbols < 0.03 and (item or text.endswith(ends)) and heading[:1] != "-"
    return heading + text if ok else None


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def man_paragraphs(section: str, page: str) -> list[str]:
    """Prose paragraphs of a manual page, from the top of DESCRIPTION to the first
    reference section (SEE ALSO, NOTES, ...)."""
    lines = render_man(section, page).splitlines()[1:-1]   # no page header and footer
    out, skipping = [], False
    for block in re.split(r"\n\s*\n", "\n".join(lines)):
        rows = [row for row in block.splitlines() if row.strip()]
        while rows and not rows[0].startswith(" "):   # a section name opens the block
            name = rows.pop(0).strip()
            if name in STOP_SECTIONS:
                return tidy(out)
            skipping = name in SKIP_SECTIONS
        if rows and not skipping:
            out.append(prose("\n".join(rows)))
    return tidy(out)


def metadata_paragraphs(package: str) -> list[str]:
    """Prose paragraphs of an installed package's long description (reStructuredText or Markdown)."""
    site = Path(sysconfig.get_paths()["purelib"])
    meta = next(site.glob(f"{package}-*.dist-info/METADATA")).read_text(encoding="utf-8")
    body = meta.split("\n\n", 1)[1]
    body = re.sub(r"```.*?```|<!-- toc -->.*?<!-- tocstop -->", "", body, flags=re.S)   # code, contents
    body = re.sub(r"\n[-*] ", "\n\n\u2022 ", body)                      # list items: paragraphs
    body = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", body)               # rst links
    body = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", body)                  # markdown links
    body = re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: m.group(1) or m.group(2), body)
    body = re.sub(r"\*\*([^*]+)\*\*|\*([^*]+)\*", lambda m: m.group(1) or m.group(2), body)
    blocks = re.split(r"\n\s*\n", body)
    return tidy([None if b.startswith((" ", "..")) else prose(" ".join(b.split())) for b in blocks])


def tidy(paragraphs: list[str | None]) -> list[str]:
    """Drop removed blocks, and a paragraph ending in ':' whose example was removed."""
    out = []
    for text, following in zip(paragraphs, paragraphs[1:] + [None]):
        if text and not (text.endswith(":") and following is None):
            out.append(text)
    return out


def document(source: str, target_words: int) -> str:
    kind, *where = source.split(":")
    paragraphs = man_paragraphs(*where) if kind == "man" else metadata_paragraphs(where[0])
    kept, words = [], 0
    for text in paragraphs:
        if words >= target_words or words + len(text.split()) > 1450:
            break
        kept.append(text)
        words += len(text.split())
    if words < 520:
        raise SystemExit(f"{source}: only {words} words of prose")
    return "\n\n".join(kept)


def summarization_rows() -> list[dict]:
    rows = []
    for n, ((source, target), (wording, before)) in enumerate(zip(DOCUMENTS, INSTRUCTIONS), 1):
        doc = document(source, target)
        prompt = f"{wording}\n\n{doc}" if before else wording.format(doc=doc)
        rows.append({"question_id": f"summarization-{n}", "category": "summarization",
                     "split": "tune" if n % 2 else "report", "source": source, "turns": [prompt]})
    return rows


def main() -> None:
    rows = [json.loads(line) for line in BROAD_PROMPTS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["category"] != "summarization"] + summarization_rows()
    rows.sort(key=lambda r: KINDS.index(r["category"]))   # stable: each kind keeps its order
    BROAD_PROMPTS.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{BROAD_PROMPTS}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
