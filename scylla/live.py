"""What the live decoding page needs, without Streamlit: loading (with clear errors),
prompt checks, a fair side-by-side race of plain and speculative decoding, and the
token-coloured transcript (HTML) with its statistics.

One model object is shared by every session of the app process; GENERATION_LOCK
serialises generation on it so that concurrent sessions never interleave forwards
(the KV caches are per call, but the CPU is not, and timings would mix).
"""
from __future__ import annotations

import html
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from scylla import ScyllaError
from scylla.plots import COLORS
from scylla.trace import Step, per_position_accept

GENERATION_LOCK = threading.Lock()
MAX_PROMPT_CHARS = 4000
LIVE_DRAFTS = ("scylla", "eagle3-style", "eagle2-style", "ngram", "layerskip")
QUANTS = ("none", "int8", "nf4")

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


def load_live_target(quant: str = "none", device: str = "auto"):
    from scylla.models import load_target

    if quant not in QUANTS:
        raise ScyllaError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    try:
        target = load_target(target_spec(), quant=quant, device=device)
    except ScyllaError:
        raise
    except Exception as exc:  # noqa: BLE001 - bitsandbytes / accelerate missing or failing
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScyllaError(f"Cannot load the target with quantization {quant!r}: {first}. "
                          f"Try quantization 'none'.") from exc
    with _LOADED_LOCK:
        _LOADED["targets"][quant] = {"target": target.name, "quant": target.quant,
                                     "device": target.device}
    return target


_TARGETS: dict = {}
_TARGET_LOCKS: dict = {}


def live_target(quant: str = "none"):
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


def default_draft() -> str:
    """The Scylla draft when one is shipped or trained, else ngram.

    Looks where scylla.head.named_draft_dir looks, without importing it: that import
    pulls in torch and transformers (seconds), and the page should render first."""
    cache = Path(os.environ.get("SCYLLA_CACHE", Path.home() / ".cache" / "scylla"))
    shipped = Path(__file__).resolve().parent.parent / "assets" / "drafts"
    for root in (shipped, cache / "drafts"):
        if (root / "scylla" / "config.json").is_file():
            return "scylla"
    return "ngram"


def draft_spec(kind: str, layers: int = 8) -> str:
    return f"layerskip:{int(layers)}" if kind == "layerskip" else kind


SHAPES = ("chain", "tree")


def tree_spec(shape: str, depth: int, topk: int, total: int) -> str | None:
    """The engine's tree option for the page's shape widgets (None: a chain)."""
    return f"tree:{depth},{topk},{total}" if shape == "tree" else None


def load_live_draft(spec: str, target):
    """make_draft with a clear message (and the ngram suggestion) when a draft is missing."""
    from scylla.drafts import make_draft

    try:
        draft = make_draft(spec, target)
    except Exception as exc:  # noqa: BLE001 - missing files, missing module, bad spec
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScyllaError(f"Draft {spec!r} could not be loaded ({first}). Trained drafts "
                          f"(scylla, eagle3-style, eagle2-style) appear once they are trained "
                          f"and shipped; choose 'ngram' meanwhile: it needs no training.") from exc
    with _LOADED_LOCK:
        if spec not in _LOADED["drafts"]:
            _LOADED["drafts"].append(spec)
    return draft


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
    this often (and once more at the end); the text streams on every step."""

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


# ---------------------------------------------------------------- transcript

@dataclass
class Token:
    text: str
    kind: str               # plain | accepted | bonus | rejected
    step: int
    p_target: float | None = None
    q_draft: float | None = None


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

    def add(self, step: Step, seconds: float = 0.0) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        for j, tok in enumerate(step.emitted):
            self.ids.append(tok)
            kind = self._kind(step, j)
            p = step.p_draft[j] if kind == "accepted" and j < len(step.p_draft) else None
            q = step.q_draft[j] if kind == "accepted" and j < len(step.q_draft) else None
            self.tokens.append(Token(self._piece(len(self.ids) - 1), kind, step.index, p, q))
        refused = rejected_drafts(step)
        if refused:
            self.rejected[step.index] = [
                Token(self.decode_one(t), "rejected", step.index,
                      step.p_draft[i] if i < len(step.p_draft) else None,
                      step.q_draft[i] if i < len(step.q_draft) else None)
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
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _piece(self, i: int) -> str:
        """Text that token i adds, decoded with a few tokens of left context (byte-level BPE
        tokens may be partial characters, and leading spaces depend on the neighbour)."""
        lo = max(0, i - 6)
        prefix = self.tokenizer.decode(self.ids[lo:i], skip_special_tokens=False)
        full = self.tokenizer.decode(self.ids[lo:i + 1], skip_special_tokens=False)
        return full[len(prefix):] if full.startswith(prefix) else self.decode_one(self.ids[i])

    # ---- numbers
    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

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

    def step_table(self) -> pd.DataFrame:
        """One row per step: what was drafted, kept, refused, and the timings."""
        rows = []
        for s, sec in zip(self.steps, self.seconds):
            rows.append({
                "step": s.index,
                "drafted": "".join(self.decode_one(t) for t in s.drafted),
                "n_drafted": len(s.drafted),
                "accepted": s.accepted,
                "rejected": "".join(t.text for t in self.rejected.get(s.index, [])),
                "bonus": self.decode_one(s.bonus) if s.bonus is not None else "",
                "emitted": len(s.emitted),
                "draft_ms": round(s.draft_ms, 2),
                "verify_ms": round(s.verify_ms, 2),
                "step_ms": round(sec * 1e3, 2),
            })
        return pd.DataFrame(rows)

    # ---- HTML
    def html(self, show_rejected: bool = True) -> str:
        """Coloured spans; rejected drafts are struck through inline (or only on hover)."""
        parts = []
        for i, tok in enumerate(self.tokens):
            is_last_of_step = i + 1 == len(self.tokens) or self.tokens[i + 1].step != tok.step
            refused = self.rejected.get(tok.step, []) if is_last_of_step else []
            if refused and show_rejected:
                parts.append(token_span("".join(r.text for r in refused), "rejected",
                                        f"step {tok.step}: rejected draft tokens"))
            title = f"step {tok.step}: {tok.kind}"
            if tok.p_target is not None:
                title += f" (target p={tok.p_target:.2f})"
            if refused:
                title += " | rejected: " + "".join(r.text for r in refused)
            parts.append(token_span(tok.text, tok.kind, title))
        return ('<div class="scylla-transcript" style="white-space: pre-wrap; line-height: 1.7; '
                'font-family: ui-monospace, monospace; font-size: 0.9rem">'
                + "".join(parts) + "</div>")


def rejected_drafts(step: Step) -> list[int]:
    """Drafted tokens the target refused (only known when the step ended with a bonus)."""
    if step.bonus is None or step.accepted >= len(step.drafted):
        return []
    return list(step.drafted[step.accepted:])


_STYLE = {
    "plain": f"color: {COLORS['plain']}",
    "accepted": f"background: {COLORS['accepted']}26; color: {COLORS['accepted']}; "
                f"border-bottom: 2px solid {COLORS['accepted']}",
    "bonus": f"background: {COLORS['bonus']}26; color: {COLORS['bonus']}; "
             f"border-bottom: 2px solid {COLORS['bonus']}",
    "rejected": f"color: {COLORS['rejected']}; text-decoration: line-through; opacity: 0.75; "
                f"font-size: 0.8em",
}


def escape_text(text: str) -> str:
    """HTML-escape token text so it stays literal inside st.markdown: no tags, no markdown
    (one HTML block: no blank lines), no LaTeX ($), no emphasis (* _ `)."""
    out = html.escape(text, quote=True)
    for ch, ent in (("$", "&#36;"), ("*", "&#42;"), ("_", "&#95;"), ("`", "&#96;"),
                    ("\\", "&#92;"), ("~", "&#126;"), ("[", "&#91;"), ("]", "&#93;")):
        out = out.replace(ch, ent)
    return out.replace("\r", "").replace("\n", "<br>")


def token_span(text: str, kind: str, title: str = "") -> str:
    return (f'<span class="scylla-tok scylla-{kind}" style="{_STYLE[kind]}" '
            f'title="{html.escape(title, quote=True)}">{escape_text(text)}</span>')


def legend_html() -> str:
    items = [("plain", "target token"), ("accepted", "accepted draft token"),
             ("bonus", "bonus token"), ("rejected", "rejected draft token")]
    return " ".join(token_span(label, kind, label) for kind, label in items)
