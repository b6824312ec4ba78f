"""Time every page of the app in a real headless Chromium against `streamlit run`.

Usage: python scripts/bench_pages.py [--repeats 3] [--json OUT]

For each page: "cold" is the first visit after the server starts (imports, first
store read); "warm" is the median of later visits by sidebar navigation from the
overview (what a user does: the Streamlit frontend stays loaded) and "reload" the
median of full page loads, both measured once the server is idle again (the target
loaded in the background by the cold visits). A page counts as rendered when its title
is visible, the script run is over and every Plotly chart on it is drawn.

Then the live page's time to the first token on each side, from the click on Generate,
with the default (scylla) and the n-gram draft: the first run loads the target, the
later ones (median) are what a user sees after that. The page prefills the prompt on
screen in the background, so a last case types a new prompt and clicks at once (no
time for that).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
IDLE_JS = ("() => document.querySelector('[data-testid=\"stApp\"]')"
           "?.getAttribute('data-test-script-state') === 'notRunning'")
PAGES = [("overview", "/", "Overview"), ("live", "/Live_decoding", "Live decoding"),
         ("laws", "/Scaling_laws", "Scaling laws"), ("lab", "/Regression_lab", "Regression lab"),
         ("runs", "/Runs_and_sweeps", "Runs and sweeps")]
READY = '[data-testid="stMainBlockContainer"] h1'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, SCYLLA_DB=str(db), TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("streamlit did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_server_idle(proc: subprocess.Popen, quiet_s: float = 2.0, timeout_s: float = 300) -> float:
    """Wait until the server's background work (imports, the target load, the prompt
    prefill) is over: less than 5% of a core used over `quiet_s`. Seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        before = cpu_seconds(proc.pid)
        time.sleep(quiet_s)
        if cpu_seconds(proc.pid) - before < 0.05 * quiet_s:
            break
    return time.perf_counter() - start


CHARTS_DRAWN_JS = ("() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
                   ".every(c => c.querySelector('.main-svg'))")


def settle(page) -> float:
    start = time.perf_counter()
    page.locator(READY).first.wait_for(state="visible", timeout=300_000)
    page.wait_for_function(IDLE_JS, timeout=300_000)
    page.wait_for_function(CHARTS_DRAWN_JS, timeout=300_000)
    return time.perf_counter() - start


def visit(page, base: str, path: str) -> float:
    start = time.perf_counter()
    page.goto(base + path)
    settle(page)
    return time.perf_counter() - start


def navigate(page, label: str) -> float:
    start = time.perf_counter()
    page.locator('[data-testid="stSidebarNav"] a', has_text=label).first.click()
    page.wait_for_timeout(50)
    settle(page)
    return time.perf_counter() - start


def choose(page, label: str, option: str) -> None:
    box = page.locator('[data-testid="stSelectbox"]').filter(has=page.get_by_text(label, exact=True))
    box.first.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_function(IDLE_JS, timeout=60_000)


NEW_TOKEN_JS = """([side, old]) => {
    const t = document.querySelectorAll('.scylla-transcript')[side];
    return !!t && !!t.querySelector('.scylla-tok') && t.innerText !== old[side];
}"""


def first_tokens(page) -> dict:
    """Click Generate; seconds to the first token on each side and to the end of the run.
    The last run's transcripts stay until replaced (React may update them in place), so a
    side has started when its text changes and shows a token."""
    old = page.locator(".scylla-transcript").all_inner_texts() or ["", ""]
    start = time.perf_counter()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(NEW_TOKEN_JS, arg=[0, old], timeout=600_000)
    plain = time.perf_counter() - start
    page.wait_for_function(NEW_TOKEN_JS, arg=[1, old], timeout=600_000)
    spec = time.perf_counter() - start
    page.get_by_text("Time to first token").wait_for(timeout=600_000)
    page.wait_for_function(IDLE_JS, timeout=600_000)
    return {"plain": plain, "speculative": spec, "done": time.perf_counter() - start}


def typed_prompt_first_tokens(page, n: int) -> dict:
    """Type a new prompt and click Generate at once: the page has had no time to prefill it
    in the background, so this is the worst case a user sees."""
    box = page.get_by_label("Prompt", exact=True)
    box.fill(f"In two sentences, why do cats purr? (variant {n})")
    return first_tokens(page)


def live_first_tokens(page, base: str, repeats: int) -> dict:
    out = {}
    visit(page, base, "/Live_decoding")
    for draft in ("scylla", "ngram"):
        choose(page, "Draft", draft)
        runs = [first_tokens(page) for _ in range(repeats + (1 if not out else 0))]
        if not out:
            out["cold (loads the target)"] = runs.pop(0)
        out[draft] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    runs = [typed_prompt_first_tokens(page, n) for n in range(repeats)]
    out["ngram, prompt typed just before"] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "results.duckdb"
        db.write_bytes((ROOT / "results.duckdb").read_bytes())
        port = free_port()
        proc = start_server(db, port)
        base = f"http://127.0.0.1:{port}"
        result = {}
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for name, path, _ in PAGES:
                    result[name] = {"cold": visit(page, base, path)}
                # The 2 s is "after the model is cached": let the background load end.
                print(f"server busy in the background for {wait_server_idle(proc):.1f} s more")
                for name, path, label in PAGES:
                    result[name]["reload"] = statistics.median(visit(page, base, path) for _ in range(args.repeats))
                for name, path, label in PAGES:
                    warm = []
                    for _ in range(args.repeats):
                        visit(page, base, "/" if name != "overview" else "/Runs_and_sweeps")
                        warm.append(navigate(page, label))
                    result[name]["warm"] = statistics.median(warm)
                ttft = live_first_tokens(page, base, args.repeats)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{'page':10} {'cold s':>7} {'reload s':>9} {'warm s':>7}")
    for name, t in result.items():
        print(f"{name:10} {t['cold']:7.2f} {t['reload']:9.2f} {t['warm']:7.2f}")
    print(f"\n{'live run':32} {'first plain s':>13} {'first spec s':>12} {'done s':>7}")
    for name, t in ttft.items():
        print(f"{name:32} {t['plain']:13.2f} {t['speculative']:12.2f} {t['done']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"pages": result, "first_tokens": ttft}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
