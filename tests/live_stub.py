"""A scripted target and draft for the live page: the engine's generators replaced by ones
that replay fixed Steps, so the page shows exactly the hostile text chosen here, with
known timings. The real SmolLM2 tokenizer decodes it (its chat template, its special ids).

install(setattr) patches the modules in this process (AppTest passes monkeypatch.setattr);
an e2e server runs `python -c BOOT run app.py ...` so that its own process is patched.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from scylla.trace import Step

# What a model may write that markup would eat: code fences and blank lines, tags, entities,
# table pipes, LaTeX, backslashes, Markdown emphasis, shortcodes, and one very long token run.
HOSTILE = (
    "Here is the code:\n\n```python\ndef lca(a, b):\n    return a if a < b else b  # a > b && c\n```\n\n"
    "<b>bold?</b> <script>alert(1)</script> <img src=x onerror=alert(1)> </div>\n\n"
    "| a | b |\n|---|---|\n| 1 | 2 |\n\n"
    "**strong** _em_ `tick` ~~strike~~ $x^2$ \\(a\\) \\\\ &amp; &lt;tag&gt; [link](http://x) :smile: :red[red]\n"
    "# heading\n> quote\n    indented\n\n"
    + "=" * 240
)
# Drafts the target refuses: they show on hover (and struck through), so hostile text too.
REJECTED = ("\n\n", "<", "```", "|", "$", "\\", "<|im_end|>", "&amp;")
PLAIN_MS, DRAFT_MS, VERIFY_MS, OVERHEAD_MS, PREFILL_MS = 2.0, 1.0, 4.0, 0.5, 3.0
ACCEPTED_CYCLE = (2, 0, 3, 1)       # accepted drafts per speculative step, in turn
P_ACCEPTED, P_REJECTED, Q_ACCEPTED, Q_REJECTED = 0.9, 0.05, 0.8, 0.7


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    from scylla.models import ensure_bundled_cached

    return AutoTokenizer.from_pretrained(ensure_bundled_cached())


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def end_id(tok) -> int:
    return int(tok.convert_tokens_to_ids("<|im_end|>"))


def script(tok, prompt_ids: list[int]) -> list[int]:
    """The output: HOSTILE, then the prompt's own words (so that each session's transcript
    is its own), then the end-of-turn special token."""
    specials = set(tok.all_special_ids)
    echo = [t for t in prompt_ids if t not in specials]
    return encode(tok, HOSTILE + "\n") + echo + [end_id(tok)]


def rejected_ids(tok) -> list[int]:
    return [encode(tok, r)[0] if r != "<|im_end|>" else end_id(tok) for r in REJECTED]


def plain_steps(out: list[int]) -> list[Step]:
    steps = [Step(index=0, drafted=[], accepted=0, bonus=out[0], emitted=[out[0]], verify_ms=PREFILL_MS)]
    for i, t in enumerate(out[1:], start=1):
        steps.append(Step(index=i, drafted=[], accepted=0, bonus=t, emitted=[t],
                          verify_ms=PLAIN_MS, overhead_ms=OVERHEAD_MS, k=1))
    return steps


def speculative_steps(out: list[int], refused: list[int], k: int = 6) -> list[Step]:
    """Each step accepts ACCEPTED_CYCLE[i] drafts, then a refused draft, then the bonus."""
    steps = [Step(index=0, drafted=[], accepted=0, bonus=out[0], emitted=[out[0]], verify_ms=PREFILL_MS)]
    j, index = 1, 1
    while j < len(out):
        a = min(ACCEPTED_CYCLE[(index - 1) % len(ACCEPTED_CYCLE)], len(out) - j - 1)
        drafted = out[j:j + a] + [refused[(index - 1) % len(refused)]]
        steps.append(Step(index=index, drafted=drafted, accepted=a, bonus=out[j + a],
                          emitted=out[j:j + a + 1], p_draft=[P_ACCEPTED] * a + [P_REJECTED],
                          q_draft=[Q_ACCEPTED] * a + [Q_REJECTED], draft_ms=DRAFT_MS,
                          verify_ms=VERIFY_MS, overhead_ms=OVERHEAD_MS, tree_size=len(drafted), k=k))
        j, index = j + a + 1, index + 1
    return steps


def replay(steps: list[Step], max_new_tokens: int):
    """Yield the steps as an engine would: taking their time, cut at the token budget."""
    made = 0
    for s in steps:
        if made >= max_new_tokens:
            return
        time.sleep((s.draft_ms + s.verify_ms + s.overhead_ms) / 1e3)
        room = max_new_tokens - made
        if len(s.emitted) > room:    # cut at the budget: the bonus is never reached
            s = Step(**{**s.to_dict(), "emitted": s.emitted[:room], "accepted": min(s.accepted, room),
                        "bonus": None})
        made += len(s.emitted)
        yield s


@dataclass
class StubTarget:
    tokenizer: object
    name: str = "stub-target"
    quant: str = "none"
    device: str = "cpu"
    model: object = field(default_factory=lambda: SimpleNamespace(
        config=SimpleNamespace(max_position_embeddings=8192)))


def stub_prefill(target, prompt_ids, need_hidden=True, capacity=None):
    return SimpleNamespace(prompt_ids=list(prompt_ids), verify_ms=PREFILL_MS)


def stub_plain(target, prompt_ids, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=None,
               shared_prefill=None):
    yield from replay(plain_steps(script(target.tokenizer, prompt_ids)), max_new_tokens)


def stub_speculative(target, draft, prompt_ids, max_new_tokens=128, k=6, temperature=0.0,
                     top_p=1.0, seed=None, tree=None, shared_prefill=None):
    tok = target.tokenizer
    steps = speculative_steps(script(tok, prompt_ids), rejected_ids(tok), k)
    yield from replay(steps, max_new_tokens)


def install(set_attr=setattr) -> StubTarget:
    """Point the live page at the stub: its target, its draft and the engine's generators."""
    import scylla.decoding
    import scylla.live

    target = StubTarget(tokenizer())
    set_attr(scylla.live, "live_target", lambda quant="none": target)
    set_attr(scylla.live, "load_live_draft", lambda spec, target: SimpleNamespace(spec=spec))
    set_attr(scylla.decoding, "prefill_prompt", stub_prefill)
    set_attr(scylla.decoding, "plain_generate", stub_plain)
    set_attr(scylla.decoding, "speculative_generate", stub_speculative)
    return target


def expected_text(tok, ids: list[int], marker: str) -> str:
    """What a transcript of `ids` must read as: the decoded text, special tokens as marker."""
    specials = set(tok.all_special_ids)
    out, run = [], []
    for t in ids + [None]:
        if t is None or t in specials:
            out.append(tok.decode(run, skip_special_tokens=False) if run else "")
            run = []
            if t is not None:
                out.append(marker)
        else:
            run.append(t)
    return "".join(out)


# `python -c BOOT run app.py ...`: the e2e server process, patched before Streamlit starts.
BOOT = ("import sys; import tests.live_stub as s; s.install(); "
        "from scylla.serve import main; main()")
