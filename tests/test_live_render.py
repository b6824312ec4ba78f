"""Issue 17: the live page renders any output as literal text, and explains the race.

Pure functions first (scylla.live, scylla.plots, no Streamlit), then the page under AppTest
with a scripted target (tests/live_stub.py) that writes every hostile string. The browser
checks of the same live in test_live_browser.py.
"""
from __future__ import annotations

import html as html_lib
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from scylla import live, plots
from scylla.trace import Step, per_position_accept
from tests import live_stub

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = [
    "```python\ndef f():\n    return 1\n```", "\n\n", "a\n\nb", "<", ">", "&", "&amp;", "|", "| a | b |\n|---|---|",
    "$x^2$", "$$", "\\", "\\\\(a\\)", "*em* **strong** _u_ __v__ ~~s~~", "`tick`", "<b>bold</b>",
    "<script>alert(1)</script>", '<img src=x onerror="alert(1)">', "</div></span>", "# h1",
    "> quote", "    indented", "[l](http://x)", ":smile: :red[x] :material/home:", "\r\n", "\t",
    "=" * 300, " " * 40, "héllo wörld ✓ 😀", "\x00\x07", "\"quotes\" 'single'", "<!-- c -->",
]
FORBIDDEN_IN_TEXT = ("<span", "scylla-tok", "<|im_end|>", "<|endoftext|>", "<|im_start|>")


class TextOf(HTMLParser):
    """The text a browser shows for an HTML fragment (attributes, such as titles, left out)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.titles += [v for k, v in attrs if k == "title" and v is not None]

    def handle_data(self, data):
        self.parts.append(data)


def parsed(fragment: str) -> TextOf:
    p = TextOf()
    p.feed(fragment)
    p.close()
    return p


def shown_text(fragment: str) -> str:
    return "".join(parsed(fragment).parts)


def one_html_block(fragment: str) -> bool:
    """Markdown passes a fragment through untouched when it is one HTML block: it opens
    with a tag and holds no line end (a blank line would close the block)."""
    return fragment.startswith("<") and "\n" not in fragment and "\r" not in fragment


SAFE = re.compile(r"(?:[^\W_]| |&#\d+;)*")


# ---------------------------------------------------------------- escaping

@pytest.mark.parametrize("text", HOSTILE)
def test_escape_text_is_inert_and_reads_back_literally(text):
    out = live.escape_text(text)
    assert SAFE.fullmatch(out), out          # letters, digits, spaces and numeric references only
    expected = text.replace("\r\n", "\n").replace("\x00", "\ufffd").replace("\x07", "\ufffd")
    assert html_lib.unescape(out) == expected
    assert shown_text(f"<span>{out}</span>") == expected
    assert parsed(f'<span title="{out}">x</span>').titles == [expected]


def test_escaped_text_passes_a_commonmark_renderer_untouched():
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark", {"html": True})
    for text in HOSTILE:
        fragment = f'<div>{live.escape_text(text)}</div>'
        assert md.render(fragment).rstrip("\n") == fragment, text   # one HTML block, passed through


class SpecialTokenizer:
    """Ids decode to WORDS; 9 is a special end token."""

    WORDS = {1: "Hi", 2: "\n\n", 3: "<b>", 4: "```", 5: "|", 9: "<|im_end|>"}
    all_special_ids = [9]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.WORDS[i] for i in ids)


def special_run() -> list[Step]:
    return [Step(index=0, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=3.0),
            Step(index=1, drafted=[2, 3, 9], accepted=2, bonus=4, emitted=[2, 3, 4],
                 p_draft=[0.9, 0.8, 0.1], q_draft=[0.7, 0.6, 0.9], draft_ms=1, verify_ms=4),
            Step(index=2, drafted=[5, 2], accepted=0, bonus=9, emitted=[9],
                 p_draft=[0.1, 0.2], q_draft=[0.5, 0.5], draft_ms=1, verify_ms=4)]


def transcript(steps, tokenizer=None, speculative=True) -> live.Transcript:
    tr = live.Transcript(tokenizer or SpecialTokenizer(), speculative=speculative)
    for s in steps:
        tr.add(s, 0.01)
    return tr


def test_special_tokens_show_as_an_end_marker_everywhere():
    tr = transcript(special_run())
    assert [t.special for t in tr.tokens] == [False, False, False, False, True]
    assert tr.text == "Hi\n\n<b>```"           # what the model wrote, the end token left out
    for fragment in (tr.html(True), tr.html(False), tr.grid_html(), live.legend_html()):
        assert one_html_block(fragment)
        page = parsed(fragment)
        assert not any(bad in "".join(page.parts) + "".join(page.titles) for bad in FORBIDDEN_IN_TEXT)
    assert shown_text(tr.html(False)) == "Hi\n\n<b>```" + live.END_MARKER
    assert shown_text(tr.html(True)).count(live.END_MARKER) == 2   # the rejected draft too
    hover = " ".join(parsed(tr.html(False)).titles)
    assert f"rejected: {live.END_MARKER}" in hover and "rejected: |\n\n" in hover
    assert live.END_MARKER in shown_text(tr.grid_html())


def test_a_tokenizer_without_special_ids_or_with_unknown_ids_never_raises():
    class Odd:
        all_special_ids = None

        def decode(self, ids, skip_special_tokens=False):
            raise KeyError(ids)

    tr = transcript([Step(index=0, drafted=[], accepted=0, bonus=5, emitted=[5])], Odd())
    assert tr.specials == frozenset() and shown_text(tr.html()) == "\ufffd"


def test_the_stub_output_renders_literally_on_both_sides():
    tok = live_stub.tokenizer()
    prompt = live_stub.encode(tok, "Session 7: pears")
    out = live_stub.script(tok, prompt)
    plain = transcript(live_stub.plain_steps(out), tok, speculative=False)
    spec = transcript(live_stub.speculative_steps(out, live_stub.rejected_ids(tok)), tok)
    expected = live_stub.expected_text(tok, out, live.END_MARKER)
    assert expected.endswith(live.END_MARKER) and "```python" in expected and "=" * 200 in expected
    for tr in (plain, spec):
        assert one_html_block(tr.html(False)) and shown_text(tr.html(False)) == expected
    inline = shown_text(spec.html(True))     # rejected drafts struck through, inline
    assert not any(bad in inline for bad in FORBIDDEN_IN_TEXT)
    assert len(inline) > len(expected)
    titles = "".join(parsed(spec.html(True)).titles + parsed(spec.grid_html()).titles)
    assert "\n\n" in titles and "<|im_end|>" not in titles


# ---------------------------------------------------------------- why it wins or loses

def run(plain_ms: float, draft_ms: float, verify_ms: float, accepted: list[int], overhead_ms=0.0):
    plain = [Step(index=0, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=50.0)]
    plain += [Step(index=i, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=plain_ms)
              for i in range(1, 9)]
    spec = [Step(index=0, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=50.0)]
    spec += [Step(index=i + 1, drafted=[7] * 4, accepted=a, bonus=1, emitted=[7] * a + [1],
                  p_draft=[0.9] * 4, q_draft=[0.8] * 4, draft_ms=draft_ms, verify_ms=verify_ms,
                  overhead_ms=overhead_ms, tree_size=4, k=4)
             for i, a in enumerate(accepted)]
    return plain, spec


def test_break_even_tau_is_the_spec_step_cost_in_plain_steps():
    plain, spec = run(plain_ms=10.0, draft_ms=6.0, verify_ms=18.0, accepted=[1, 0, 2, 1], overhead_ms=1.0)
    be = live.break_even(plain, spec)
    assert be.break_even_tau == pytest.approx((6 + 18 + 1) / 10)
    assert be.tau == pytest.approx((2 + 1 + 3 + 2) / 4)          # the prefill is left out
    assert be.expected_speedup == pytest.approx(2.0 / 2.5) and be.verify_cost == pytest.approx(1.8)
    assert be.drafted == 4 and be.n_steps == 4
    assert live.outcome(be) == "loses"
    line = live.verdict(be, "chain:4")
    for figure in ("loses", "tau 2.00", "break-even tau 2.50", "chain:4", "0.80x", "25.0 ms", "10.0 ms"):
        assert figure in line, (figure, line)


@pytest.mark.parametrize("accepted, expected", [([4, 4, 3, 4], "wins"), ([1, 2, 1, 2], "ties"),
                                                ([0, 0, 0, 0], "loses")])
def test_outcome_follows_tau_against_break_even(accepted, expected):
    plain, spec = run(plain_ms=10.0, draft_ms=5.0, verify_ms=20.0, accepted=accepted)   # break-even 2.5
    be = live.break_even(plain, spec)
    assert live.outcome(be) == expected
    assert live.verdict(be).startswith(f"Speculative decoding {expected}")


@pytest.mark.parametrize("plain, spec", [
    ([], []),
    ([Step(index=0, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=5)],
     [Step(index=0, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=5)]),
    ([Step(index=1, drafted=[], accepted=0, bonus=1, emitted=[1])],                 # no timings
     [Step(index=1, drafted=[2], accepted=1, bonus=1, emitted=[2, 1])]),
    ([Step(index=1, drafted=[], accepted=0, bonus=1, emitted=[1], verify_ms=float("nan"))],
     [Step(index=1, drafted=[2], accepted=1, bonus=1, emitted=[2, 1], verify_ms=-3)]),
])
def test_too_little_to_judge_is_a_sentence_not_a_traceback(plain, spec):
    assert live.break_even(plain, spec) is None
    assert live.outcome(None) == "unknown" and "Too few steps" in live.verdict(None)


def test_timeline_lays_each_side_on_its_own_clock():
    plain, spec = run(plain_ms=10.0, draft_ms=6.0, verify_ms=18.0, accepted=[1, 0], overhead_ms=1.0)
    frame = live.timeline(plain, spec)
    assert list(frame.columns) == list(live.TIMELINE_COLUMNS)
    lanes = {side: g for side, g in frame.groupby("side")}
    assert list(lanes["plain"]["part"]) == ["prefill"] + ["forward"] * 8
    assert list(lanes["speculative"]["part"]) == ["prefill"] + ["draft", "verify", "bookkeeping"] * 2
    for g in lanes.values():   # consecutive: each stretch starts where the last ended
        assert list(g["start_ms"])[1:] == pytest.approx(list((g["start_ms"] + g["ms"]))[:-1])
    assert float((lanes["speculative"]["ms"]).sum()) == pytest.approx(50 + 2 * 25)
    assert int(lanes["speculative"]["total_tokens"].max()) == 1 + 2 + 1
    assert live.timeline([], []).empty


def test_confidence_by_position_matches_per_position_accept():
    steps = special_run()[1:] + [
        Step(index=3, drafted=[1, 1, 1], accepted=3, bonus=1, emitted=[1] * 4,
             p_draft=[1.0, 1.0, 1.0], q_draft=[0.9, 0.9]),               # one q missing
        Step(index=4, drafted=[1, 1], accepted=1, bonus=1, emitted=[1, 1],
             p_draft=[0.5, float("nan")], q_draft=[0.4, 0.2])]
    frame = live.confidence_by_position(steps)
    assert list(frame["per_position_accept"]) == pytest.approx(per_position_accept(steps))
    assert list(frame["reached"]) == [4, 3, 2]
    assert frame.loc[0, "draft_confidence"] == pytest.approx((0.7 + 0.5 + 0.9 + 0.4) / 4)
    assert frame.loc[0, "rejected_confidence"] == pytest.approx(0.5)    # step 2 refused position 1
    assert frame.loc[1, "target_prob"] == pytest.approx((0.8 + 1.0) / 2)   # nan left out
    assert frame.loc[2, "rejected_confidence"] == pytest.approx(0.9)
    assert math.isnan(frame.loc[1, "rejected_confidence"]) is False
    assert live.confidence_by_position([]).empty


def test_confidence_note_names_where_the_draft_loses_and_its_calibration():
    over = live.confidence_by_position(run(10, 5, 20, [0, 0, 1, 0])[1])   # q 0.8, accept ~0.25
    note = live.confidence_note(over)
    assert "loses most at position 2" in note and "over-confident" in note, note
    plain, spec = run(10, 5, 20, [4, 4, 4, 4])
    for s in spec:
        s.q_draft = [1.0] * len(s.drafted)
    assert "tracks acceptance" in live.confidence_note(live.confidence_by_position(spec))
    assert "No draft tokens" in live.confidence_note(live.confidence_by_position([]))


def test_timeline_and_confidence_figures():
    plain, spec = run(plain_ms=10.0, draft_ms=6.0, verify_ms=18.0, accepted=[1, 0, 2], overhead_ms=1.0)
    fig = plots.timeline_figure(live.timeline(plain, spec))
    assert {t.name for t in fig.data} == {"prefill", "forward", "draft", "verify", "bookkeeping"}
    assert all(t.orientation == "h" for t in fig.data)
    assert any("tokens" in a.text for a in fig.layout.annotations)
    fig = plots.confidence_figure(live.confidence_by_position(spec))
    assert [t.name for t in fig.data] == ["per_position_accept", "draft confidence", "target probability"]
    assert not plots.timeline_figure(live.timeline([], [])).data
    assert not plots.confidence_figure(live.confidence_by_position([])).data


# ---------------------------------------------------------------- the page, under AppTest, on the stub

@pytest.fixture
def stub_page(monkeypatch, tmp_path):
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("SCYLLA_PREWARM", "0")
    monkeypatch.setenv("SCYLLA_RUNS_DIR", str(tmp_path / "runs"))
    target = live_stub.install(monkeypatch.setattr)
    at = AppTest.from_file(str(ROOT / "pages" / "live_decoding.py"), default_timeout=120)
    at.run()
    yield at, target
    st.cache_resource.clear()


def generate(at: AppTest, prompt: str, show_rejected: bool = True) -> AppTest:
    at.text_area(key="prompt").set_value(prompt)
    at.slider(key="max_tokens").set_value(256)
    at.toggle(key="show_rejected").set_value(show_rejected)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def transcripts(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if "scylla-transcript" in m.value]


def test_the_page_renders_every_hostile_string_as_text(stub_page):
    at, target = stub_page
    from scylla.models import encode_prompt

    prompt = "Session 3: write code with <tags> & | pipes $"
    generate(at, prompt, show_rejected=False)
    out = live_stub.script(target.tokenizer, encode_prompt(target, prompt))
    expected = live_stub.expected_text(target.tokenizer, out, live.END_MARKER)
    sides = transcripts(at)
    assert len(sides) == 2 and all(one_html_block(s) for s in sides)
    assert [shown_text(s) for s in sides] == [expected, expected]
    for m in at.markdown:                                 # legend, transcripts, step grid
        if m.value.startswith("<"):
            assert one_html_block(m.value)
            assert not any(bad in shown_text(m.value) for bad in FORBIDDEN_IN_TEXT), m.value[:200]
    grid = next(m.value for m in at.markdown if "scylla-grid" in m.value)
    assert shown_text(grid).count(live.END_MARKER) >= 2    # the end token: emitted and refused
    at.toggle(key="show_rejected").set_value(True).run()  # rejected drafts inline, still text
    assert not at.exception
    inline = shown_text(transcripts(at)[1])
    assert not any(bad in inline for bad in FORBIDDEN_IN_TEXT) and len(inline) > len(expected)


def test_the_page_explains_the_race_with_the_runs_own_figures(stub_page):
    at, _ = stub_page
    generate(at, "Session 4: why?")
    metrics = {m.label: m.value for m in at.metric}
    spec_ms = live_stub.DRAFT_MS + live_stub.VERIFY_MS + live_stub.OVERHEAD_MS
    plain_ms = live_stub.PLAIN_MS + live_stub.OVERHEAD_MS
    assert metrics["break-even tau"] == f"{spec_ms / plain_ms:.2f}"
    tau = float(metrics["tau per step"])
    expected = "wins" if tau > spec_ms / plain_ms * (1 + live.TIE) else "loses"
    boxes = [b.value for b in (at.success if expected == "wins" else at.warning)]
    verdict = next(b for b in boxes if b.startswith("Speculative decoding"))
    assert f"Speculative decoding {expected}" in verdict
    assert f"break-even tau {metrics['break-even tau']}" in verdict and f"tau {tau:.2f}" in verdict
    specs = [el.proto.spec for el in at.get("plotly_chart")]
    assert any('"draft"' in s and '"verify"' in s and '"forward"' in s for s in specs)   # time line
    assert any('"draft confidence"' in s for s in specs)
    assert any("over-confident" in c.value for c in at.caption)   # q 0.7 where rejected
