"""What the live decoding page needs, without Streamlit: loading (with clear errors),
prompt checks, a fair side-by-side race of plain and speculative decoding, and the
token-coloured transcript (HTML) with its statistics.

One model object is shared by every session of the app process; GENERATION_LOCK
serialises generation on it so that concurrent sessions never interleave forwards
(the KV caches are per call, but the CPU is not, and timings would mix).
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import threading
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from scylla import ScyllaError, one_line
from scylla.plots import COLORS
from scylla.trace import Step, per_position_accept
from scylla.options import DEFAULT_QUANT, QUANTS  # noqa: F401  (the page's choices)

GENERATION_LOCK = threading.Lock()
MAX_PROMPT_CHARS = 4000
LIVE_DRAFTS = ("scylla", "scylla+ngram", "eagle3-style", "eagle2-style", "ngram", "layerskip")

_LOADED: dict = {"targets": {}, "drafts": []}
_LOADED_LOCK = threading.Lock()


# ---------------------------------------------------------------- prompts

def example_prompts(per_category: int = 3) -> dict[str, list[str]]:
    """Example prompts by category, from the project's evaluation prompts."""
    from scylla.data import eval_prompts

    grouped: dict[str, list[str]] = {}
    for row in eval_prompts():
        bucket = grouped.setdefault(row["category"], [])
        if len(bucket) < per_category:
            bucket.append(row["prompt"])
    return grouped


def check_prompt_text(text: str, target, max_new_tokens: int) -> list[int]:
    """Token ids of a valid prompt, or ScyllaError with a message for the user."""
    from scylla.models import encode_prompt

    if not text or not text.strip():
        raise ScyllaError("The prompt is empty: type a question or pick an example.")
    if len(text) > MAX_PROMPT_CHARS:
        raise ScyllaError(f"The prompt is too long ({len(text)} characters; the live demo takes "
                          f"at most {MAX_PROMPT_CHARS}).")
    ids = encode_prompt(target, text)
    limit = int(target.model.config.max_position_embeddings)
    if len(ids) + max_new_tokens > limit:
        raise ScyllaError(f"The prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens exceeds "
                          f"the target's context of {limit} tokens.")
    return ids


# ---------------------------------------------------------------- loading

def target_spec() -> str:
    """The live target: the bundled SmolLM2 unless SCYLLA_TARGET names a model folder."""
    return os.environ.get("SCYLLA_TARGET", "smollm2")


def load_live_target(quant: str = DEFAULT_QUANT, device: str = "auto"):
    from scylla.models import load_target

    if quant not in QUANTS:
        raise ScyllaError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    try:
        target = load_target(target_spec(), quant=quant, device=device)
    except ScyllaError:
        raise
    except Exception as exc:  # noqa: BLE001 - bitsandbytes / accelerate missing or failing
        first = one_line(exc)
        raise ScyllaError(f"Cannot load the target with quantization {quant!r}: {first}. "
                          f"Try quantization 'none'.") from exc
    target.drop_reference_weights()   # the app decodes on the engine's forward only
    with _LOADED_LOCK:
        _LOADED["targets"][quant] = {"target": target.name, "quant": target.quant,
                                     "device": target.device, "kernels": getattr(target, "kernels", None)}
    return target


_TARGETS: dict = {}
_TARGET_LOCKS: dict = {}


def live_target(quant: str = DEFAULT_QUANT):
    """The live target, loaded once per process and quantization. Thread-safe: the page's
    warm-up thread and a click on Generate may ask at the same moment; one loads, the
    other waits for it."""
    key = (target_spec(), quant)
    with _LOADED_LOCK:
        lock = _TARGET_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _TARGETS:
            _TARGETS[key] = load_live_target(quant)
        return _TARGETS[key]


def default_draft(quant: str = "none") -> str:
    """The best measured draft on this target. On q4, ngram: on the broad set's tune half
    spec_gain 1.21 against 0.98 for the shipped head and 1.04 for scylla+ngram (a wider int4
    verify and the head's own forward cost more than its acceptance gains). On fp32, the
    shipped head with copying (scylla+ngram) when a Scylla draft is shipped or trained:
    1.50 against 1.34 (scylla) and 1.22 (ngram) on the 48 older evaluation prompts, and
    1.53 / 1.37 / 1.38 on the broad set's report half. Else ngram.

    Looks where scylla.head.named_draft_dir looks, without importing it: that import
    pulls in torch and transformers (seconds), and the page should render first."""
    if quant == "q4":
        return "ngram"
    cache = Path(os.environ.get("SCYLLA_CACHE", Path.home() / ".cache" / "scylla"))
    shipped = Path(__file__).resolve().parent.parent / "assets" / "drafts"
    for root in (shipped, cache / "drafts"):
        if (root / "scylla" / "config.json").is_file():
            return "scylla+ngram"
    return "ngram"


def draft_spec(kind: str, layers: int = 8) -> str:
    return f"layerskip:{int(layers)}" if kind == "layerskip" else kind


SHAPES = ("chain", "tree")


def default_shape(kind: str, quant: str = DEFAULT_QUANT) -> str:
    """The CLI's default shape for this draft (drafts.default_shape), as the page's radio."""
    from scylla.drafts import default_shape as cli_default

    return "tree" if cli_default(kind, None, None, 0.0, 1, quant)[1] else "chain"


def default_auto_k(quant: str = DEFAULT_QUANT, kind: str = "ngram") -> bool:
    """Whether the CLI would choose the chain's length per step for this draft."""
    from scylla.drafts import default_shape as cli_default

    return cli_default(kind, None, None, 0.0, 1, quant)[0] == "auto"


def chart_k(k) -> int:
    """The charts' draft-length axis: k, or the most `auto` may choose."""
    from scylla.decoding import KMAX

    return KMAX if k == "auto" else int(k)


def default_tree(temperature: float = 0.0) -> tuple[int, int, int]:
    """(depth, top-k, nodes) of the heads' default tree at this temperature."""
    from scylla.drafts import head_tree
    from scylla.proposals import TreeShape

    shape = TreeShape.parse(head_tree(temperature))
    return shape.depth, shape.topk, shape.total


def tree_spec(shape: str, depth: int, topk: int, total: int) -> str | None:
    """The engine's tree option for the page's shape widgets (None: a chain)."""
    return f"tree:{depth},{topk},{total}" if shape == "tree" else None


def load_live_draft(spec: str, target):
    """make_draft with a clear message (and the ngram suggestion) when a draft is missing."""
    from scylla.drafts import make_draft

    try:
        draft = make_draft(spec, target)
    except Exception as exc:  # noqa: BLE001 - missing files, missing module, bad spec
        first = one_line(exc)
        raise ScyllaError(f"Draft {spec!r} could not be loaded ({first}). Trained drafts "
                          f"(scylla, eagle3-style, eagle2-style) appear once they are trained "
                          f"and shipped; choose 'ngram' meanwhile: it needs no training.") from exc
    with _LOADED_LOCK:
        if spec not in _LOADED["drafts"]:
            _LOADED["drafts"].append(spec)
    return draft


QUANT_KERNELS = {
    "q4": "the GGUF's own Q4_1 blocks on PyTorch's int4 CPU kernel (bf16 activations; its Q8_0 "
          "embedding and head too), the default",
    "none": "the fp32 reference: the same file dequantized, on oneDNN-prepacked fp32 linears",
    "int8": "PyTorch's dynamic int8 linears on CPU (66% token agreement with fp32 here); bitsandbytes on CUDA",
    "nf4": "bitsandbytes nf4 on the transformers forward",
}
AGREEMENT_FILE = Path(__file__).resolve().parent.parent / "assets" / "bench" / "v12_q4_plain.json"


def quant_help() -> str:
    """The quantization box's help: which kernels each choice runs, and how far q4's output
    is from fp32's, as last measured by `scylla bench --draft none` (its committed JSON)."""
    lines = [f"{name}: {text}." for name, text in QUANT_KERNELS.items()]
    try:
        bench = json.loads(AGREEMENT_FILE.read_text())
    except (OSError, ValueError):
        return "\n\n".join(lines)
    rate, first = bench.get("plain_exact_match_rate"), bench.get("plain_first_diff_median")
    if rate is not None:
        lines.append(f"Measured: q4's greedy output equals fp32 generate()'s on {rate:.0%} of "
                     f"{bench['n_prompts']} prompts ({bench['max_new_tokens']} tokens); where they "
                     f"differ, the first difference falls at token {first} (median).")
    return "\n\n".join(lines)


def kernels_caption(target) -> str:
    """Which forward and kernels the target runs on (a target without the engine's forward,
    such as a scripted one, says so)."""
    kernels = getattr(target, "kernels", None) or "its own forward"
    return f"Target forward on {getattr(target, 'device', 'cpu')}: {kernels}."


def loaded_summary() -> dict:
    """What this app process has loaded so far (for the overview page)."""
    with _LOADED_LOCK:
        return {"targets": list(_LOADED["targets"].values()), "drafts": list(_LOADED["drafts"])}


@contextmanager
def generation_slot(timeout_s: float = 300.0, on_wait=None):
    """Hold the shared model for one generation; ScyllaError if another session keeps it.
    on_wait() is called once when the model is busy and this session has to queue."""
    acquired = GENERATION_LOCK.acquire(blocking=False)
    if not acquired and on_wait is not None:
        on_wait()
    if not acquired and not GENERATION_LOCK.acquire(timeout=timeout_s):
        raise ScyllaError("Another session is generating on the shared model; try again shortly.")
    try:
        yield
    finally:
        GENERATION_LOCK.release()


# ---------------------------------------------------------------- racing

def timed(steps: Iterable[Step], head_start_s: float = 0.0) -> Iterator[tuple[Step, float]]:
    """Each step with the wall seconds the engine spent producing it (rendering excluded);
    head_start_s (a prefill computed before, shared) is charged to the first step."""
    it = iter(steps)
    extra = head_start_s
    while True:
        start = time.perf_counter()
        try:
            step = next(it)
        except StopIteration:
            return
        yield step, time.perf_counter() - start + extra
        extra = 0.0


def race(plain: Iterable[Step], speculative: Iterable[Step],
         shared_prefill_s: float = 0.0) -> Iterator[tuple[str, Step, float]]:
    """Interleave two decoders on one compute clock: always advance the one that has used
    less engine time so far. What is on screen at any moment is what each produced in the
    same compute time, so the visible race matches the measured speedup. A prefill the two
    share (shared_prefill_s) is computed once but charged to both."""
    its = {"plain": timed(plain, shared_prefill_s), "speculative": timed(speculative, shared_prefill_s)}
    clock = {name: 0.0 for name in its}
    while its:
        side = min(its, key=lambda name: clock[name])
        try:
            step, seconds = next(its[side])
        except StopIteration:
            del its[side]
            continue
        clock[side] += seconds
        yield side, step, seconds


class Throttle:
    """due() is True at most once per `every_s`. Redrawing three Plotly charts on every step
    costs the browser far more than decoding the step, so the live page redraws them only
    this often (and once more at the end); the transcripts, every 0.1 s at most."""

    def __init__(self, every_s: float = 0.6, clock=time.monotonic):
        self.every_s, self.clock, self.last = every_s, clock, None

    def due(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return False
        self.last = now
        return True


_PREFILLS: dict[tuple, tuple] = {}     # (id(target), prompt ids) -> (target, PromptPrefill)
_PREFILL_LOCK = threading.Lock()
PREFILLS_KEPT = 2


def prompt_prefill(target, prompt_ids: list[int]):
    """The prompt's forward once for both sides of the race, with the hidden states any draft
    reads. The last few are kept: the page computes the prompt on screen while the user reads
    it (prewarm_prefill), so Generate starts decoding at once. Each decoder copies the cache,
    and the prefill's measured time is still charged to both sides' clocks."""
    from scylla.decoding import prefill_prompt

    key = (id(target), tuple(prompt_ids))
    with _PREFILL_LOCK:
        hit = _PREFILLS.get(key)
    if hit is not None and hit[0] is target:   # `is`: an id can be reused by a new object
        return hit[1]
    state = prefill_prompt(target, prompt_ids, need_hidden=True)
    with _PREFILL_LOCK:
        _PREFILLS.pop(key, None)
        _PREFILLS[key] = (target, state)
        while len(_PREFILLS) > PREFILLS_KEPT:
            _PREFILLS.pop(next(iter(_PREFILLS)))
    return state


def has_prefill(target, prompt_ids: list[int]) -> bool:
    with _PREFILL_LOCK:
        hit = _PREFILLS.get((id(target), tuple(prompt_ids)))
    return hit is not None and hit[0] is target


def prewarm_prefill(quant: str, text: str, max_new_tokens: int) -> bool:
    """In the background: load the target, then run the forward of the prompt on screen, so a
    click on Generate finds it done. False when nothing was started (SCYLLA_PREWARM=0)."""
    if os.environ.get("SCYLLA_PREWARM", "1") == "0":
        return False
    threading.Thread(target=_prefill_quietly, args=(quant, text, max_new_tokens), daemon=True,
                     name="scylla-prefill").start()
    return True


def _prefill_quietly(quant: str, text: str, max_new_tokens: int) -> None:
    try:
        target = live_target(quant)
        ids = check_prompt_text(text, target, max_new_tokens)
        if has_prefill(target, ids) or not GENERATION_LOCK.acquire(blocking=False):
            return   # done already, or a generation runs: never disturb its timings
        try:
            prompt_prefill(target, ids)
        finally:
            GENERATION_LOCK.release()
    except Exception:  # noqa: BLE001 - a bad prompt is reported by the click on Generate
        pass


# ---------------------------------------------------------------- text: literal, whatever the model writes

END_MARKER = "∎"          # what a special token (<|im_end|>, <|endoftext|>, ...) shows as
END_TITLE = "end of text (a special token)"
TITLE_CHARS = 160          # hover titles clip long rejected drafts


@functools.lru_cache(maxsize=8192)   # a transcript re-renders on every step
def escape_text(text: str) -> str:
    """Token text as literal, inert HTML for st.markdown(unsafe_allow_html=True), in element
    text and attribute values alike (the one escaping function of the live page).

    Letters, digits and spaces stay; every other character becomes a numeric reference
    (< is &#60;), so no tag, entity, Markdown emphasis, code fence, table pipe, LaTeX $ or
    backslash escape can form. A newline becomes &#10;: a line break under white-space:
    pre-wrap (and in a tooltip), never a real line end, which could close the HTML block
    that Markdown passes through. Control characters become U+FFFD."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n")
    return "".join(_escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    if ch == " " or ch.isalnum():
        return ch
    if ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cs"):
        return "&#65533;"
    return f"&#{ord(ch)};"


def clip(text: str, limit: int = TITLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special token ids (none for a tokenizer that has no such list)."""
    try:
        return frozenset(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ()))
    except (TypeError, ValueError):
        return frozenset()


# ---------------------------------------------------------------- transcript

@dataclass
class Token:
    text: str
    kind: str               # plain | accepted | bonus | rejected
    step: int
    p_target: float | None = None
    q_draft: float | None = None
    special: bool = False   # shown as END_MARKER, never as its raw text

    @property
    def shown(self) -> str:
        return END_MARKER if self.special else self.text


@dataclass
class Transcript:
    """The tokens of one decoding run, coloured by how they were produced."""

    tokenizer: object
    speculative: bool = True
    steps: list[Step] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    rejected: dict[int, list[Token]] = field(default_factory=dict)
    specials: frozenset = field(default=frozenset(), init=False)

    def __post_init__(self):
        self.specials = special_ids(self.tokenizer)

    def add(self, step: Step, seconds: float = 0.0) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        for j, tok in enumerate(step.emitted):
            self.ids.append(tok)
            kind = self._kind(step, j)
            p = step.p_draft[j] if kind == "accepted" and j < len(step.p_draft) else None
            q = step.q_draft[j] if kind == "accepted" and j < len(step.q_draft) else None
            self.tokens.append(Token(self._piece(len(self.ids) - 1), kind, step.index, p, q,
                                     tok in self.specials))
        refused = rejected_drafts(step)
        if refused:
            self.rejected[step.index] = [
                Token(self.decode_one(t), "rejected", step.index,
                      step.p_draft[i] if i < len(step.p_draft) else None,
                      step.q_draft[i] if i < len(step.q_draft) else None, t in self.specials)
                for i, t in zip(range(step.accepted, len(step.drafted)), refused)]

    def _kind(self, step: Step, j: int) -> str:
        if not self.speculative or step.index == 0:
            return "plain"
        if j < step.accepted:
            return "accepted"
        # the bonus: the target's own token after a verified draft (a step that drafted
        # nothing is just a plain target forward)
        if step.drafted and step.bonus is not None and j == len(step.emitted) - 1:
            return "bonus"
        return "plain"

    def decode_one(self, tok: int) -> str:
        try:
            return self.tokenizer.decode([tok], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - an id the tokenizer lacks shows as a replacement mark
            return "\ufffd"

    def _piece(self, i: int) -> str:
        """Text that token i adds, decoded with a few tokens of left context (byte-level BPE
        tokens may be partial characters, and leading spaces depend on the neighbour)."""
        lo = max(0, i - 6)
        try:
            prefix = self.tokenizer.decode(self.ids[lo:i], skip_special_tokens=False)
            full = self.tokenizer.decode(self.ids[lo:i + 1], skip_special_tokens=False)
        except Exception:  # noqa: BLE001
            return self.decode_one(self.ids[i])
        return full[len(prefix):] if full.startswith(prefix) else self.decode_one(self.ids[i])

    # ---- numbers
    @property
    def text(self) -> str:
        """What the model wrote, special tokens left out."""
        return "".join(t.text for t in self.tokens if not t.special)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def wall_s(self) -> float:
        return float(sum(self.seconds))

    @property
    def ttft_s(self) -> float | None:
        return self.seconds[0] if self.seconds else None

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def accepted_lengths(self) -> list[int]:
        return [s.accepted for s in self.steps if s.index > 0]

    def bonus_counts(self) -> list[int]:
        return [int(s.bonus is not None) for s in self.steps if s.index > 0]

    def stats(self) -> dict:
        drafted = sum(len(s.drafted) for s in self.steps)
        accepted = sum(s.accepted for s in self.steps)
        n_steps = len(self.steps)
        return {
            "n_tokens": self.n_tokens,
            "n_steps": n_steps,
            "tau": self.n_tokens / n_steps if n_steps else 0.0,
            "accept_rate": accepted / drafted if drafted else None,
            "per_position_accept": per_position_accept(self.steps),
            "tokens_per_s": self.tokens_per_s,
            "wall_s": self.wall_s,
            "ttft_s": self.ttft_s,
        }

    # ---- HTML (one line, no raw newline: Markdown keeps it one HTML block)
    def html(self, show_rejected: bool = True) -> str:
        """Coloured spans; rejected drafts are struck through inline (or only on hover)."""
        parts = []
        for i, tok in enumerate(self.tokens):
            is_last_of_step = i + 1 == len(self.tokens) or self.tokens[i + 1].step != tok.step
            refused = self.rejected.get(tok.step, []) if is_last_of_step else []
            if refused and show_rejected:
                parts.extend(token_span(r.text, "rejected", f"step {tok.step}: rejected draft token",
                                        r.special) for r in refused)
            title = f"step {tok.step}: {tok.kind}"
            if tok.p_target is not None:
                title += f" (target p={tok.p_target:.2f})"
            if refused:
                title += " | rejected: " + clip("".join(r.shown for r in refused))
            parts.append(token_span(tok.text, tok.kind, title, tok.special))
        return f'<div class="scylla-transcript" style="{_BOX_STYLE}">' + "".join(parts) + "</div>"

    def grid_html(self) -> str:
        """The step grid: per step, each drafted token (accepted, rejected, or unjudged when
        the budget cut the step), the target's own token, and the step's timings."""
        head = "".join(f'<th style="{_CELL_STYLE}; white-space: nowrap">{escape_text(h)}</th>'
                       for h in GRID_COLUMNS)
        rows = "".join(self._grid_row(s, sec) for s, sec in zip(self.steps, self.seconds))
        return (f'<div class="scylla-grid" style="overflow-x: auto; max-height: 28rem">'
                f'<table style="border-collapse: collapse; font-size: 0.85rem; width: 100%">'
                f'<tr>{head}</tr>{rows}</table></div>')

    def _grid_row(self, s: Step, seconds: float) -> str:
        refused_from = s.accepted if rejected_drafts(s) else len(s.drafted)
        chips = []
        for i, tok in enumerate(s.drafted):
            kind = "accepted" if i < s.accepted else "rejected" if i >= refused_from else "plain"
            q = f", draft confidence {s.q_draft[i]:.2f}" if i < len(s.q_draft) else ""
            p = f", target p {s.p_draft[i]:.2f}" if i < len(s.p_draft) else ""
            chips.append(token_span(self.decode_one(tok), kind, f"position {i + 1}: {kind}{q}{p}",
                                    tok in self.specials))
        own = ""
        if s.bonus is not None:
            kind = "bonus" if s.drafted and s.index > 0 else "plain"
            own = token_span(self.decode_one(s.bonus), kind, f"step {s.index}: the target's token",
                             s.bonus in self.specials)
        cells = ["prefill" if s.index == 0 else str(s.index), " ".join(chips), own,
                 f"{s.draft_ms:.1f}", f"{s.verify_ms:.1f}", f"{seconds * 1e3:.1f}"]
        escaped = [escape_text(cells[0])] + cells[1:3] + [escape_text(c) for c in cells[3:]]
        styles = [_NUMBER_CELL, _TEXT_CELL, _TEXT_CELL] + [_NUMBER_CELL] * 3
        return "<tr>" + "".join(f'<td style="{st}">{c}</td>' for st, c in zip(styles, escaped)) + "</tr>"


GRID_COLUMNS = ("step", "drafted", "target token", "draft ms", "verify ms", "step ms")


def rejected_drafts(step: Step) -> list[int]:
    """Drafted tokens the target refused (only known when the step ended with a bonus)."""
    if step.bonus is None or step.accepted >= len(step.drafted):
        return []
    return list(step.drafted[step.accepted:])


# Long tokens (a run of '=' or spaces) wrap instead of widening the column.
_BOX_STYLE = ("white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; "
              "line-height: 1.7; font-family: ui-monospace, monospace; font-size: 0.9rem")
_CELL_STYLE = ("border-bottom: 1px solid #8883; padding: 2px 6px; vertical-align: top; "
               "font-family: ui-monospace, monospace")
_TEXT_CELL = _CELL_STYLE + "; white-space: pre-wrap; overflow-wrap: anywhere"
_NUMBER_CELL = _CELL_STYLE + "; white-space: nowrap; text-align: right"
_STYLE = {
    "plain": f"color: {COLORS['plain']}",
    "accepted": f"background: {COLORS['accepted']}26; color: {COLORS['accepted']}; "
                f"border-bottom: 2px solid {COLORS['accepted']}",
    "bonus": f"background: {COLORS['bonus']}26; color: {COLORS['bonus']}; "
             f"border-bottom: 2px solid {COLORS['bonus']}",
    "rejected": f"color: {COLORS['rejected']}; text-decoration: line-through; opacity: 0.75; "
                f"font-size: 0.8em",
}
_END_STYLE = "; font-size: 0.7em; opacity: 0.8; padding: 0 2px; border: 1px solid currentColor; border-radius: 3px"


def token_span(text: str, kind: str, title: str = "", special: bool = False) -> str:
    """One token as a coloured span; a special token shows as END_MARKER."""
    if special:
        title = f"{title} · {END_TITLE}" if title else END_TITLE
    body = escape_text(END_MARKER if special else text)
    style = _STYLE.get(kind, _STYLE["plain"]) + (_END_STYLE if special else "")
    end = " scylla-end" if special else ""
    return (f'<span class="scylla-tok scylla-{kind}{end}" style="{style}" '
            f'title="{escape_text(title)}">{body}</span>')


def legend_html() -> str:
    items = [("plain", "target token"), ("accepted", "accepted draft token"),
             ("bonus", "bonus token"), ("rejected", "rejected draft token")]
    spans = [token_span(label, kind, label) for kind, label in items]
    spans.append(token_span("", "plain", "", special=True) + escape_text(" end of text"))
    return f'<div class="scylla-legend">{" ".join(spans)}</div>'


# ---------------------------------------------------------------- why it wins or loses
# All from Step lists: each step's own draft / verify / bookkeeping ms, measured in this run.

def _ms(value) -> float:
    """A step's milliseconds; missing, negative or non-finite figures count as 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def step_ms(step: Step) -> float:
    return _ms(step.draft_ms) + _ms(step.verify_ms) + _ms(step.overhead_ms)


def decode_steps(steps: Iterable[Step]) -> list[Step]:
    """Steps after the prefill (the prefill is one shared forward, charged to both sides)."""
    return [s for s in steps if s.index > 0]


def step_parts(step: Step, side: str) -> list[tuple[str, float]]:
    """Where one step's compute went: plain, one forward per token; speculative, the draft
    and then one verify forward; both, the engine's bookkeeping."""
    if step.index == 0:
        return [("prefill", step_ms(step))]
    if side == "plain":
        return [("forward", _ms(step.verify_ms)), ("bookkeeping", _ms(step.draft_ms) + _ms(step.overhead_ms))]
    return [("draft", _ms(step.draft_ms)), ("verify", _ms(step.verify_ms)), ("bookkeeping", _ms(step.overhead_ms))]


TIMELINE_COLUMNS = ("side", "step", "part", "start_ms", "ms", "tokens", "total_tokens")


def timeline(plain: Iterable[Step], speculative: Iterable[Step]) -> pd.DataFrame:
    """One row per stretch of compute on each side's clock, in order: side, step, part
    (prefill | forward | draft | verify | bookkeeping), start_ms, ms, the tokens the step
    emitted, and the side's tokens so far once the step ends."""
    rows = []
    for side, steps in (("plain", plain), ("speculative", speculative)):
        clock, total = 0.0, 0
        for s in steps:
            total += len(s.emitted)
            for part, ms in step_parts(s, side):
                if ms > 0:
                    rows.append({"side": side, "step": s.index, "part": part, "start_ms": clock,
                                 "ms": ms, "tokens": len(s.emitted), "total_tokens": total})
                    clock += ms
    return pd.DataFrame(rows, columns=list(TIMELINE_COLUMNS))


@dataclass
class BreakEven:
    """Speculation pays when a step makes more tokens than a step costs plain steps.
    break_even_tau = ms of one speculative step (draft + verify + bookkeeping) / ms of one
    plain step (its forward + bookkeeping), both the means of this run's decoding steps."""

    tau: float               # tokens per speculative decoding step (prefill excluded)
    break_even_tau: float
    plain_step_ms: float
    spec_step_ms: float
    draft_ms: float          # mean per speculative step
    verify_ms: float
    overhead_ms: float
    drafted: float           # mean tokens verified per step (tree nodes, or chain length)
    n_steps: int             # speculative decoding steps

    @property
    def expected_speedup(self) -> float:
        """tau / break_even_tau: the speculative side's tokens/s over the plain side's."""
        return self.tau / self.break_even_tau

    @property
    def verify_cost(self) -> float:
        """One verify forward, in plain steps."""
        return self.verify_ms / self.plain_step_ms


def break_even(plain: Iterable[Step], speculative: Iterable[Step]) -> BreakEven | None:
    """The run's break-even tau and what it is made of; None until both sides have
    decoded at least one step after the prefill, or when the steps carry no timings."""
    plain_steps, spec_steps = decode_steps(plain), decode_steps(speculative)
    if not plain_steps or not spec_steps:
        return None
    plain_ms = statistics.fmean(step_ms(s) for s in plain_steps)
    spec_ms = statistics.fmean(step_ms(s) for s in spec_steps)
    if plain_ms <= 0 or spec_ms <= 0:
        return None
    return BreakEven(
        tau=sum(len(s.emitted) for s in spec_steps) / len(spec_steps),
        break_even_tau=spec_ms / plain_ms,
        plain_step_ms=plain_ms,
        spec_step_ms=spec_ms,
        draft_ms=statistics.fmean(_ms(s.draft_ms) for s in spec_steps),
        verify_ms=statistics.fmean(_ms(s.verify_ms) for s in spec_steps),
        overhead_ms=statistics.fmean(_ms(s.overhead_ms) for s in spec_steps),
        drafted=statistics.fmean(max(s.tree_size, len(s.drafted)) for s in spec_steps),
        n_steps=len(spec_steps),
    )


TIE = 0.03    # within 3% of break-even: a tie, not a verdict either way


def outcome(be: BreakEven | None) -> str:
    """wins | loses | ties | unknown."""
    if be is None:
        return "unknown"
    ratio = be.expected_speedup
    return "ties" if abs(ratio - 1) <= TIE else "wins" if ratio > 1 else "loses"


def verdict(be: BreakEven | None, shape: str = "") -> str:
    """One line: measured tau against break-even tau, and the step costs behind it."""
    result = outcome(be)
    if result == "unknown":
        return "Too few steps to judge yet: the verdict needs a decoding step on each side."
    compare = {"wins": "above", "loses": "below", "ties": "at"}[result]
    where = f" for {shape}" if shape else ""
    return (f"Speculative decoding {result}: tau {be.tau:.2f} tokens per step is {compare} the "
            f"break-even tau {be.break_even_tau:.2f}{where} on this machine. One speculative step "
            f"drafts for {be.draft_ms:.1f} ms, verifies {be.drafted:.1f} tokens in "
            f"{be.verify_ms:.1f} ms and keeps books for {be.overhead_ms:.1f} ms: "
            f"{be.spec_step_ms:.1f} ms, the cost of {be.break_even_tau:.2f} plain steps of "
            f"{be.plain_step_ms:.1f} ms. From its steps it runs at {be.expected_speedup:.2f}x.")


CONFIDENCE_COLUMNS = ("position", "reached", "per_position_accept", "draft_confidence",
                      "target_prob", "rejected_confidence")


def confidence_by_position(steps: Iterable[Step]) -> pd.DataFrame:
    """Per draft position (1 = first drafted token), over the steps that reached it (every
    earlier token accepted): how often it was accepted (per_position_accept), the draft's
    mean confidence (q_draft), the target's mean probability (p_draft), and the draft's mean
    confidence in the tokens rejected there. Confidence well above acceptance: over-confident."""
    by_pos: list[dict] = []
    for s in decode_steps(steps):
        for i in range(min(len(s.drafted), s.accepted + 1)):
            if i == len(by_pos):
                by_pos.append({"reached": 0, "passed": 0, "q": [], "p": [], "q_rejected": []})
            cell = by_pos[i]
            cell["reached"] += 1
            cell["passed"] += int(i < s.accepted)
            q = _prob(s.q_draft, i)
            p = _prob(s.p_draft, i)
            if q is not None:
                cell["q"].append(q)
                if i >= s.accepted:
                    cell["q_rejected"].append(q)
            if p is not None:
                cell["p"].append(p)
    rows = [{"position": i + 1, "reached": c["reached"],
             "per_position_accept": c["passed"] / c["reached"],
             "draft_confidence": _mean(c["q"]), "target_prob": _mean(c["p"]),
             "rejected_confidence": _mean(c["q_rejected"])} for i, c in enumerate(by_pos)]
    return pd.DataFrame(rows, columns=list(CONFIDENCE_COLUMNS))


def _prob(values, i: int) -> float | None:
    try:
        value = float(values[i])
    except (IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


OVERCONFIDENT = 0.1   # confidence this far above acceptance at a position: over-confident


def confidence_note(frame: pd.DataFrame) -> str:
    """One line on the draft's calibration: where it loses, and whether it saw it coming."""
    if frame is None or not len(frame):
        return "No draft tokens were judged yet."
    weakest = frame.loc[frame["per_position_accept"].idxmin()]
    where = (f"The draft loses most at position {int(weakest['position'])} "
             f"({weakest['per_position_accept']:.0%} accepted of {int(weakest['reached'])} reached).")
    known = frame.dropna(subset=["draft_confidence"])
    if not len(known):
        return where
    gap = known["draft_confidence"] - known["per_position_accept"]
    worst = known.loc[gap.idxmax()]
    if gap.max() > OVERCONFIDENT:
        return (f"{where} It is over-confident: at position {int(worst['position'])} its mean "
                f"confidence is {worst['draft_confidence']:.2f}, yet {worst['per_position_accept']:.0%} "
                f"of its tokens are accepted.")
    if gap.min() < -OVERCONFIDENT:
        low = known.loc[gap.idxmin()]
        return (f"{where} It is under-confident: at position {int(low['position'])} its mean "
                f"confidence is {low['draft_confidence']:.2f}, yet {low['per_position_accept']:.0%} "
                f"of its tokens are accepted.")
    return f"{where} Its confidence tracks acceptance within {OVERCONFIDENT:.1f} at every position."
