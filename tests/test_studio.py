"""The app's non-Streamlit logic: scylla.live (transcript, race, checks) and scylla.studio."""
from __future__ import annotations

import html as html_lib
import importlib
import json
import sys
import threading
import time
from importlib import resources

import pandas as pd
import pytest

from scylla import ScyllaError, live, studio
from scylla.trace import Step
from tests.conftest import wait_for


class FakeTokenizer:
    """Token id i decodes to WORDS[i]; enough for the transcript logic."""

    WORDS = {0: "<s>", 1: " Hello", 2: ",", 3: " world", 4: "!", 5: " foo", 6: " bar", 7: "<b>"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.WORDS[i] for i in ids)


def steps() -> list[Step]:
    return [
        Step(index=0, drafted=[], accepted=0, bonus=1, emitted=[1]),
        Step(index=1, drafted=[2, 3, 5], accepted=2, bonus=4, emitted=[2, 3, 4],
             p_draft=[0.9, 0.8, 0.1], q_draft=[1.0, 1.0, 1.0]),
        Step(index=2, drafted=[], accepted=0, bonus=7, emitted=[7]),
        Step(index=3, drafted=[6, 6], accepted=2, bonus=5, emitted=[6, 6, 5]),
    ]


def test_transcript_kinds_stats_and_html():
    tr = live.Transcript(FakeTokenizer(), speculative=True)
    for s in steps():
        tr.add(s, 0.1)
    assert tr.text == " Hello, world!<b> bar bar foo"
    assert [t.kind for t in tr.tokens] == ["plain", "accepted", "accepted", "bonus", "plain",
                                           "accepted", "accepted", "bonus"]
    assert [t.text for t in tr.rejected[1]] == [" foo"]
    stats = tr.stats()
    assert stats["n_tokens"] == 8 and stats["n_steps"] == 4 and stats["tau"] == 2.0
    assert stats["accept_rate"] == pytest.approx(4 / 5)
    assert stats["per_position_accept"] == [1.0, 1.0, 0.0]
    assert stats["tokens_per_s"] == pytest.approx(8 / 0.4)
    assert tr.accepted_lengths() == [2, 0, 2] and tr.bonus_counts() == [1, 1, 1]
    html = tr.html(show_rejected=True)
    assert html.count("scylla-rejected") == 1 and "line-through" in html
    assert "&#60;b&#62;" in html and "<b>" not in html      # token text is escaped
    assert "scylla-rejected" not in tr.html(show_rejected=False)
    assert "rejected:  foo" in html_lib.unescape(tr.html(show_rejected=False))  # still on hover
    grid = tr.grid_html()
    assert grid.count("<tr>") == 1 + len(steps()) and grid.count("scylla-rejected") == 1
    assert grid.count("scylla-accepted") == 4 and "prefill" in grid


def test_plain_transcript_is_all_target_tokens():
    tr = live.Transcript(FakeTokenizer(), speculative=False)
    for s in steps():
        tr.add(s)
    assert {t.kind for t in tr.tokens} == {"plain"}


def test_rejected_drafts_unknown_when_cut_at_budget():
    cut = Step(index=1, drafted=[2, 3, 5], accepted=1, bonus=None, emitted=[2])
    assert live.rejected_drafts(cut) == []


def test_escape_text_keeps_markdown_latex_and_html_literal():
    out = live.escape_text("<script>$x$ *a* _b_ `c`\n\nnext")
    for bad in ("<script>", "$", "*", "`", "\n"):
        assert bad not in out
    assert out.count("&#10;") == 2 and html_lib.unescape(out) == "<script>$x$ *a* _b_ `c`\n\nnext"
    assert "scylla-accepted" in live.token_span("x", "accepted")
    assert all(k in live.legend_html() for k in ("plain", "accepted", "bonus", "rejected"))


def test_race_advances_the_side_with_less_engine_time(monkeypatch):
    def fake_timed(items, head_start_s=0.0):
        for step, seconds in items:
            yield step, seconds

    monkeypatch.setattr(live, "timed", fake_timed)
    plain = [("p0", 1.0), ("p1", 1.0), ("p2", 1.0), ("p3", 1.0)]
    spec = [("s0", 1.5), ("s1", 2.5)]
    order = [step for _, step, _ in live.race(plain, spec)]
    assert order == ["p0", "s0", "p1", "s1", "p2", "p3"]  # clocks: p 1,2,3,4; s 1.5,4


def test_timed_measures_each_step():
    def slow():
        time.sleep(0.02)
        yield "a"
        yield "b"

    out = list(live.timed(slow()))
    assert [s for s, _ in out] == ["a", "b"] and out[0][1] >= 0.015


def test_a_shared_prefill_is_charged_to_the_first_step_of_each_side():
    out = list(live.timed(iter(["a", "b"]), head_start_s=0.5))
    assert out[0][1] >= 0.5 and out[1][1] < 0.5
    sides = list(live.race(iter(["p0", "p1"]), iter(["s0"]), shared_prefill_s=0.25))
    firsts = {side: seconds for side, step, seconds in sides if step in ("p0", "s0")}
    assert firsts["plain"] >= 0.25 and firsts["speculative"] >= 0.25


def test_generation_slot_serialises_sessions():
    held, release = threading.Event(), threading.Event()

    def other_session():
        with live.generation_slot():
            held.set()
            release.wait(5)

    t = threading.Thread(target=other_session)
    t.start()
    held.wait(5)
    waited = []
    with pytest.raises(ScyllaError, match="Another session"):
        with live.generation_slot(timeout_s=0.05, on_wait=lambda: waited.append(1)):
            pass
    assert waited == [1]
    release.set()
    t.join()
    with live.generation_slot(timeout_s=1):
        assert live.GENERATION_LOCK.locked()
    assert not live.GENERATION_LOCK.locked()


class FakeTarget:
    class model:
        class config:
            max_position_embeddings = 20

    class tokenizer:
        chat_template = None

        def __call__(self, text):
            return {"input_ids": list(range(len(text.split())))}

    tokenizer = tokenizer()


def test_check_prompt_text_messages():
    with pytest.raises(ScyllaError, match="empty"):
        live.check_prompt_text("  \n", FakeTarget(), 8)
    with pytest.raises(ScyllaError, match="too long"):
        live.check_prompt_text("a" * (live.MAX_PROMPT_CHARS + 1), FakeTarget(), 8)
    with pytest.raises(ScyllaError, match="context of 20"):
        live.check_prompt_text("one two three four five", FakeTarget(), 16)
    assert live.check_prompt_text("one two three", FakeTarget(), 8) == [0, 1, 2]


def test_load_live_draft_explains_and_suggests_ngram(monkeypatch):
    import scylla.drafts

    def boom(spec, target):
        raise FileNotFoundError("assets/drafts/scylla/model.safetensors")

    monkeypatch.setattr(scylla.drafts, "make_draft", boom)
    with pytest.raises(ScyllaError, match="choose 'ngram'"):
        live.load_live_draft("scylla", None)
    assert live.draft_spec("layerskip", 6) == "layerskip:6" and live.draft_spec("ngram") == "ngram"


def test_example_prompts_by_category():
    ex = live.example_prompts()
    assert ex and all(isinstance(v, list) and v and all(isinstance(p, str) and p for p in v)
                      for v in ex.values())


# ---------------------------------------------------------------- studio

def reference() -> pd.DataFrame:
    with resources.files("scylla").joinpath("reference_results.csv").open() as f:
        return pd.read_csv(f).rename(columns={"table": "table_name"})


def test_reference_points_and_the_published_batch_law():
    pts = studio.reference_points(reference(), "throughput_ratio_vs_no_spec",
                                  {"engine_or_device": ["SGLang"], "method": ["EAGLE-3"]})
    assert len(pts) == 9 and pts["x"].min() == 2 and pts["x"].max() == 64
    out = studio.law_analysis(pts, extrapolate_to=256, saturating=True)
    fit = out["fit"]
    assert fit.slope < 0 and 0.85 < fit.r2 < 0.95          # README's quick check
    assert list(out["coefficients"]["term"]) == ["slope (per ln x)", "intercept"]
    assert out["prediction"]["x"].max() == pytest.approx(256)
    e = out["extrapolation"].iloc[0]
    assert e["pred_low"] < e["mean"] < e["pred_high"]
    assert out["shapes"]["verdict"] in ("log-linear", "saturating", "indistinguishable")


def test_law_analysis_groups_and_too_few_points():
    pts = studio.reference_points(reference(), "throughput_ratio_vs_no_spec")
    out = studio.law_analysis(pts, group_col="method")
    assert set(out["groups"]["groups"]) == {"EAGLE", "EAGLE-3"}
    assert set(out["group_fits"]["group"]) == {"EAGLE", "EAGLE-3"}
    with pytest.raises(ScyllaError, match="at least 3 points"):
        studio.law_analysis(pd.DataFrame({"x": [1.0, 2.0], "y": [1.0, 2.0]}))
    with pytest.raises(ScyllaError):
        studio.law_analysis(pd.DataFrame({"x": [4.0] * 5, "y": [1.0, 2, 3, 4, 5]}))


def test_reference_overlay_only_where_it_fits():
    ref = reference()
    assert studio.reference_overlay(ref, "tokens", "tau") is None
    over = studio.reference_overlay(ref, "batch", "speedup", {"method": ["EAGLE-3"]})
    assert len(over) == 17 and set(over.columns) >= {"x", "y", "label"}


def test_filters():
    df = pd.DataFrame({"a": [1, 2, 2, None], "b": ["x", "x", "x", "x"]})
    assert studio.filter_options(df, ["a", "b", "c"]) == {"a": [1.0, 2.0]}
    assert len(studio.apply_filters(df, {"a": [2]})) == 2
    assert len(studio.apply_filters(df, {"a": []})) == 4


def test_log_tail_and_progress(tmp_path):
    log = tmp_path / "sweep.log"
    log.write_text("start\nrun 1/4 ok\n 40%|####  | 2/5 [00:01<00:02]\r 60%|###### | 3/5 [00:02<00:01]")
    tail = studio.read_log_tail(log, lines=2)
    assert tail.splitlines()[-1].strip().startswith("60%")
    assert studio.parse_progress(tail) == pytest.approx(0.6)
    assert studio.parse_progress("nothing here") is None
    assert studio.read_log_tail(tmp_path / "missing.log") == ""


def test_start_sweep_runs_in_background_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("SCYLLA_RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(studio, "sweep_available", lambda: (True, ""))
    script = "import time; print('run 1/2', flush=True); time.sleep(0.3); print('run 2/2')"
    monkeypatch.setattr(studio, "sweep_command", lambda config, db=None: [sys.executable, "-c", script])
    with pytest.raises(ScyllaError, match="not valid JSON"):
        studio.start_sweep("{not json")
    folder = studio.start_sweep(json.dumps({"drafts": ["ngram"]}))
    assert studio.list_sweeps() == [folder]
    assert studio.sweep_status(folder)["state"] in ("running", "finished")
    with pytest.raises(ScyllaError, match="already running"):
        studio.start_sweep("{}")
    deadline = time.time() + 20
    while not (folder / "rc").is_file() and time.time() < deadline:
        time.sleep(0.05)
    status = studio.sweep_status(folder)
    assert status["state"] == "finished" and status["rc"] == 0
    assert status["progress"] == 1.0 and "run 2/2" in status["log"]


def test_sweep_unavailable_is_a_message(monkeypatch):
    monkeypatch.setattr(studio, "sweep_available", lambda: (False, "Sweeps need scylla/sweep.py"))
    with pytest.raises(ScyllaError, match="sweep.py"):
        studio.start_sweep("{}")


def test_default_draft_is_scylla_only_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("SCYLLA_CACHE", str(tmp_path))
    shipped = live.Path(live.__file__).resolve().parent.parent / "assets" / "drafts" / "scylla"
    expected = "scylla+ngram" if (shipped / "config.json").is_file() else "ngram"
    assert live.default_draft() == expected   # fp32: the head with copying, measured best there
    (tmp_path / "drafts" / "scylla").mkdir(parents=True)
    (tmp_path / "drafts" / "scylla" / "config.json").write_text("{}")
    assert live.default_draft() == "scylla+ngram"
    assert live.default_draft("q4") == "ngram"   # measured best on the q4 target
    assert live.default_shape("scylla", "q4") == "chain" and live.default_auto_k("q4")
    assert live.default_shape("scylla", "none") == "tree" and not live.default_auto_k("none")


def test_chart_throttle_fires_at_most_once_per_interval():
    now = [0.0]
    throttle = live.Throttle(every_s=0.5, clock=lambda: now[0])
    fired = []
    for step in range(20):  # one step every 0.125 s (exact in binary)
        fired.append(throttle.due())
        now[0] += 0.125
    assert [i for i, f in enumerate(fired) if f] == [0, 4, 8, 12, 16]


def test_prewarm_loads_the_target_once_while_a_click_waits_for_it(monkeypatch):
    calls = []

    def slow_load(quant):
        calls.append(quant)
        time.sleep(0.3)
        return f"target-{quant}"

    monkeypatch.setattr(live, "load_live_target", slow_load)
    monkeypatch.setenv("SCYLLA_TARGET", "prewarm-test-target")
    monkeypatch.setenv("SCYLLA_PREWARM", "1")
    assert live.prewarm_prefill("none", "Hello", 8) is True
    time.sleep(0.05)  # the warm-up thread holds the load now
    assert live.live_target("none") == "target-none"  # waits for it, does not load again
    assert calls == ["none"]
    monkeypatch.setenv("SCYLLA_PREWARM", "0")
    assert live.prewarm_prefill("int8", "Hello", 8) is False and calls == ["none"]


def test_the_prompt_on_screen_is_prefilled_in_the_background_and_reused(monkeypatch, tiny):
    from scylla.decoding import generate_ids

    prompt = [5, 6, 7, 8, 9]
    monkeypatch.setattr(live, "live_target", lambda quant="none": tiny)
    monkeypatch.setattr(live, "check_prompt_text", lambda text, target, n: list(prompt))
    monkeypatch.setenv("SCYLLA_PREWARM", "1")
    assert live.prewarm_prefill("none", "five tokens", 8) is True
    assert wait_for(lambda: live.has_prefill(tiny, prompt))
    state = live.prompt_prefill(tiny, prompt)
    assert live.prompt_prefill(tiny, prompt) is state  # reused, not run again
    assert state.verify_ms > 0  # its time is charged to both sides
    own, _ = generate_ids(tiny, None, prompt, max_new_tokens=8, k=1)
    for _ in range(2):  # decoders copy the cached KV cache: a second run from it is the same
        shared, _ = generate_ids(tiny, None, prompt, max_new_tokens=8, k=1, shared_prefill=state)
        assert shared == own


def test_a_background_prefill_waits_for_no_one_and_keeps_few(monkeypatch, tiny):
    monkeypatch.setattr(live, "live_target", lambda quant="none": tiny)
    monkeypatch.setattr(live, "check_prompt_text", lambda text, target, n: [int(t) for t in text.split()])
    with live.generation_slot():  # another session generating: the warm-up must not compete
        live._prefill_quietly("none", "3 4 5", 8)
    assert not live.has_prefill(tiny, [3, 4, 5])
    for n in range(live.PREFILLS_KEPT + 2):
        live._prefill_quietly("none", f"3 4 {10 + n}", 8)
    kept = [n for n in range(live.PREFILLS_KEPT + 2) if live.has_prefill(tiny, [3, 4, 10 + n])]
    assert kept == list(range(2, live.PREFILLS_KEPT + 2))  # the newest few


def test_prewarm_imports_runs_once_per_process(monkeypatch):
    imported = []
    monkeypatch.setattr(studio, "_PREWARM_STARTED", threading.Event())
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name))
    monkeypatch.setenv("SCYLLA_PREWARM", "1")
    assert studio.prewarm_imports(("json", "no_such_module_xyz")) is True
    assert studio.prewarm_imports(("json",)) is False
    assert wait_for(lambda: len(imported) == 2)
    assert imported == ["json", "no_such_module_xyz"]


def test_the_store_version_changes_with_every_write(tmp_path):
    import duckdb

    db = tmp_path / "results.duckdb"
    assert studio.store_version(db) == (0.0, 0.0)  # no store yet
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    before = studio.store_version(db)
    time.sleep(0.01)
    with duckdb.connect(str(db)) as con:
        con.execute("INSERT INTO t VALUES (1)")
    assert studio.store_version(db) != before


def test_the_law_explorer_opens_on_each_axis_latest_complete_sweep():
    """Pooled across corpora the tokens axis fits worse (R^2 0.86 over 34 points) than its
    2^10..2^22 sweep alone (0.92): the page opens on the latest sweep of each axis, at T = 0."""
    from scylla import store
    from scylla.laws import fit_loglinear

    runs = store.runs_frame("results.duckdb")
    opening = {a: studio.default_run_filters(runs, a) for a in ("tokens", "layers", "batch")}
    assert opening["tokens"] == {"command": ["scylla sweep sweeps/tokens_v3.toml"], "temperature": [0.0]}
    assert opening["layers"]["command"] == ["scylla sweep sweeps/layers_v4.toml"]
    assert opening["batch"]["command"] == ["scylla sweep sweeps/batch_v2.toml"]
    sweep = store.axis_points("results.duckdb", "tokens", "tau", opening["tokens"])
    pooled = store.axis_points("results.duckdb", "tokens", "tau", {"temperature": [0.0]})
    assert len(sweep) == 13 and len(pooled) > len(sweep)
    assert fit_loglinear(sweep["x"], sweep["y"]).r2 > fit_loglinear(pooled["x"], pooled["y"]).r2
    assert studio.default_run_filters(runs.iloc[0:0], "tokens") == {}
