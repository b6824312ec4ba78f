"""Issue 17 in a real Chromium: `streamlit run app.py` with the scripted target of
tests/live_stub.py (patched into the server process before Streamlit starts), so the page
shows every hostile string; the navigation by URL; several sessions generating at once.
"""
from __future__ import annotations

import sys
import time

import pytest

from scylla import live
from tests import live_stub
from tests.conftest import streamlit_process
from tests.test_e2e import NEW_TOKEN_JS, check_no_exception, wait_idle

pytestmark = pytest.mark.e2e
FORBIDDEN = ("<span", "scylla-tok", "<|im_end|>", "<|endoftext|>", "<|im_start|>")
PATHS = ("/", "/Live_decoding", "/Scaling_laws", "/Regression_lab", "/Runs_and_sweeps")


@pytest.fixture(scope="module")
def stub_server(e2e_db, tmp_path_factory):
    """The app with the stub engine; yields the base URL."""
    with streamlit_process([sys.executable, "-c", live_stub.BOOT], e2e_db,
                           tmp_path_factory.mktemp("stub-server"), SCYLLA_PREWARM="0") as url:
        yield url


def open_live(page, base: str) -> None:
    page.goto(base + "/Live_decoding")
    page.get_by_role("button", name="Generate").wait_for()
    wait_idle(page)


def set_prompt(page, text: str) -> None:
    box = page.locator('[data-testid="stTextArea"]').filter(has_text="Prompt").locator("textarea")
    box.fill(text)
    box.press("Control+Enter")
    wait_idle(page)


def most_tokens(page) -> None:
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="Max new tokens").get_by_role("slider")
    slider.focus()
    slider.press("End")
    page.locator('[data-testid="stSlider"]').filter(has_text="Max new tokens").locator(
        '[data-testid="stSliderThumbValue"]').filter(has_text="256").wait_for()
    wait_idle(page)


def rejected_off(page) -> None:
    page.get_by_text("Show rejected drafts inline").click()
    wait_idle(page)


def wait_done(page, timeout_s: float = 300) -> None:
    """The run is over when the verdict is drawn and the script is idle."""
    page.get_by_text("Why it wins or loses").wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)


def transcript_texts(page) -> list[str]:
    return page.locator(".scylla-transcript").all_inner_texts()


def expected_for(prompt: str) -> str:
    from scylla.models import encode_prompt

    tok = live_stub.tokenizer()
    out = live_stub.script(tok, encode_prompt(live_stub.StubTarget(tok), prompt))
    return live_stub.expected_text(tok, out, live.END_MARKER)


def nav_items(page) -> list[str]:
    page.locator('[data-testid="stSidebarNav"]').wait_for()
    text = page.locator('[data-testid="stSidebarNav"]').inner_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("path", PATHS)
def test_the_overview_is_listed_as_overview_however_one_arrives(page, stub_server, path):
    page.goto(stub_server + path)
    wait_idle(page)
    items = nav_items(page)
    assert "Overview" in items and "app" not in items, items
    assert {"Live decoding", "Scaling laws", "Regression lab", "Runs and sweeps"} <= set(items)


def test_hostile_output_renders_as_literal_text(page, stub_server):
    prompt = "Session 1: code with <tags>, & and | pipes, $money$ and \\backslashes"
    open_live(page, stub_server)
    set_prompt(page, prompt)
    most_tokens(page)
    rejected_off(page)
    page.get_by_role("button", name="Generate").click()
    wait_done(page)
    check_no_exception(page)
    expected = expected_for(prompt)
    assert transcript_texts(page) == [expected, expected]
    main = page.locator('[data-testid="stMain"]').inner_text()
    assert not [bad for bad in FORBIDDEN if bad in main], [bad for bad in FORBIDDEN if bad in main]
    titles = page.locator(".scylla-transcript .scylla-tok").evaluate_all("els => els.map(e => e.title)")
    assert any("rejected: \n\n" in t for t in titles) and not any("<|im_end|>" in t for t in titles)
    # the long run of '=' wraps: nothing is wider than its column
    widths = page.locator(".scylla-transcript").evaluate_all(
        "els => els.map(e => e.scrollWidth - e.clientWidth)")
    assert max(widths) <= 1, widths

    page.get_by_text("Step grid (speculative)").click()
    grid = page.locator(".scylla-grid")
    grid.wait_for()
    assert live.END_MARKER in grid.inner_text()
    assert not [bad for bad in FORBIDDEN if bad in page.locator('[data-testid="stMain"]').inner_text()]

    breakeven = page.locator('[data-testid="stMetric"]').filter(has_text="break-even tau")
    value = breakeven.locator('[data-testid="stMetricValue"]').inner_text().strip()
    spec_ms = live_stub.DRAFT_MS + live_stub.VERIFY_MS + live_stub.OVERHEAD_MS
    assert value == f"{spec_ms / (live_stub.PLAIN_MS + live_stub.OVERHEAD_MS):.2f}"
    verdict = page.locator('[data-testid="stAlert"]').filter(has_text="Speculative decoding").inner_text()
    assert f"break-even tau {value}" in verdict, verdict


def test_sessions_generating_at_once_each_get_their_own_transcript(chromium, stub_server):
    n = 4
    contexts = [chromium.new_context(viewport={"width": 1300, "height": 900}) for _ in range(n)]
    pages = [c.new_page() for c in contexts]
    try:
        for i, pg in enumerate(pages):
            pg.set_default_timeout(180_000)
            open_live(pg, stub_server)
            set_prompt(pg, f"Session {i} asks about fruit number {i}")
            most_tokens(pg)
        olds = [transcript_texts(pg) or ["", ""] for pg in pages]
        start = time.perf_counter()
        for pg in pages:
            pg.get_by_role("button", name="Generate").click()
        for pg, old in zip(pages, olds):
            pg.wait_for_function(NEW_TOKEN_JS, arg=[1, old], timeout=300_000)
            wait_done(pg)
            check_no_exception(pg)
        print(f"\n[e2e] {n} sessions generating at once: {time.perf_counter() - start:.1f} s")
        for i, pg in enumerate(pages):
            texts = transcript_texts(pg)
            assert len(texts) == 2
            for text in texts:
                assert f"Session {i} asks" in text
                assert not [j for j in range(n) if j != i and f"Session {j} asks" in text]
    finally:
        for c in contexts:
            c.close()


def test_a_page_opened_by_its_url_in_a_new_server_shows_no_page_not_found(e2e_db, tmp_path, page):
    """The first run of a new server went through Streamlit's older pages/ layout, which did
    not know `/Live_decoding`, and left a "Page not found" dialog over the page (scylla.serve)."""
    with streamlit_process([sys.executable, "-m", "scylla.serve"], e2e_db, tmp_path, SCYLLA_PREWARM="0") as url:
        page.goto(url + "/Live_decoding")
        page.get_by_role("button", name="Generate").wait_for()
        wait_idle(page)
        time.sleep(1.0)   # the dialog came with the first run's messages
        assert page.get_by_text("Page not found").count() == 0
        assert page.get_by_role("dialog").count() == 0
        assert page.locator("h1").first.inner_text() == "Live decoding"
