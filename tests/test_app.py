"""Every page under streamlit.testing.v1.AppTest, against a temporary copy of the store.

The live page runs on a tiny random Llama with the real SmolLM2 tokenizer (fast,
layout only); the real target is exercised by the e2e test.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from scylla import store
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


# ---------------------------------------------------------------- fixtures

def store_copy(dest: Path) -> Path:
    """A copy of the committed results.duckdb (or a fresh store with the reference rows)."""
    db = dest / "results.duckdb"
    committed = ROOT / "results.duckdb"
    if committed.is_file():
        shutil.copy(committed, db)
    store.init_db(db)  # migrates a copy; creates a fresh file with reference rows otherwise
    return db


def synthetic_runs() -> list[dict]:
    """A small grid along tokens and layers (scylla drafts) plus ngram rows, by category."""
    runs = []
    for layers in (1, 2):
        for tokens in (1e6, 2e6, 4e6, 8e6, 16e6):
            for cat, shift in (("all", 0.0), ("qa", 0.15), ("coding", -0.1)):
                tau = 1.6 + 0.12 * math.log(tokens / 1e6) + 0.1 * layers + shift
                runs.append({"target": "SmolLM2-135M-Instruct", "quant": "none",
                             "draft": f"scylla-L{layers}-T{int(tokens)}", "draft_kind": "scylla",
                             "layers": layers, "tokens": int(tokens), "k": 6, "batch": 1,
                             "temperature": 0.0, "category": cat, "n_prompts": 8, "tau": tau,
                             "accept_rate": (tau - 1) / 6, "per_position_accept": [0.8, 0.6, 0.4],
                             "tokens_per_s": 20 * tau / 1.4, "baseline_tokens_per_s": 20.0,
                             "speedup": tau / 1.4, "prompt_set": "eval"})
    for cat, tau in (("all", 1.4), ("qa", 1.7), ("coding", 1.2)):
        runs.append({"target": "SmolLM2-135M-Instruct", "quant": "none", "draft": "ngram",
                     "draft_kind": "ngram", "k": 6, "batch": 1, "temperature": 0.0,
                     "category": cat, "n_prompts": 8, "tau": tau, "accept_rate": 0.3,
                     "speedup": tau / 1.2, "prompt_set": "eval"})
    return runs


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch, tmp_path):
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setenv("SCYLLA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SCYLLA_PREWARM", "0")  # the live page would load the real target in the background
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def ref_db(tmp_path, monkeypatch):
    """Store copy without measured runs: the state before any sweep lands."""
    db = tmp_path / "ref" / "results.duckdb"
    db.parent.mkdir()
    store.init_db(db)
    monkeypatch.setenv("SCYLLA_DB", str(db))
    return db


@pytest.fixture
def runs_db(tmp_path, monkeypatch):
    """A fresh store with the reference rows and the synthetic runs only (deterministic)."""
    db = tmp_path / "results.duckdb"
    store.init_db(db)
    store.write_runs_atomic(db, synthetic_runs())
    monkeypatch.setenv("SCYLLA_DB", str(db))
    return db


@pytest.fixture
def tiny_live(tiny_chat_target_dir, monkeypatch, ref_db):
    monkeypatch.setenv("SCYLLA_TARGET", str(tiny_chat_target_dir))
    return tiny_chat_target_dir


def app(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_specs(at: AppTest) -> list[str]:
    return [el.proto.spec for el in at.get("plotly_chart")]


def messages(elements) -> list[str]:
    return [e.value for e in elements]


# ---------------------------------------------------------------- every page on the committed store

@pytest.mark.parametrize("page", ["app.py", "pages/scaling_laws.py", "pages/regression_lab.py",
                                  "pages/runs_and_sweeps.py", "pages/live_decoding.py"])
def test_every_page_loads_on_a_copy_of_the_committed_store(page, tmp_path, monkeypatch):
    db = store_copy(tmp_path)
    monkeypatch.setenv("SCYLLA_DB", str(db))
    before = (ROOT / "results.duckdb").stat().st_mtime if (ROOT / "results.duckdb").is_file() else None
    at = app(page)
    assert not at.error, messages(at.error)
    if before is not None:
        assert (ROOT / "results.duckdb").stat().st_mtime == before


# ---------------------------------------------------------------- overview

def test_overview_shows_store_counts_and_links(ref_db):
    at = app("app.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["reference"] == "416" or int(metrics["reference"]) > 0
    assert metrics["runs"] == "0"
    links = [el.proto.page for el in at.get("page_link")]
    assert len(links) == 4 and any("Scaling_laws" in p for p in links)


def test_overview_plots_every_stored_run(runs_db):
    at = app("app.py")
    assert not at.exception
    assert any('"speedup = tau"' in spec for spec in chart_specs(at))


def test_overview_without_a_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SCYLLA_DB", str(tmp_path / "missing.duckdb"))
    at = app("app.py")
    assert any("No results store" in m for m in messages(at.info))


# ---------------------------------------------------------------- scaling laws

def test_laws_page_on_reference_data_draws_fit_and_bands(ref_db):
    at = app("pages/scaling_laws.py")
    assert at.radio(key="source").value == "Published reference"  # no runs yet
    specs = chart_specs(at)
    law = next(s for s in specs if '"prediction band"' in s)
    for name in ('"fit"', '"confidence band"', '"data"'):
        assert name in law
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["slope"]) < 0          # SGLang EAGLE-3: throughput ratio falls with batch
    assert 0.8 < float(metrics["R²"]) <= 1.0
    assert len(at.dataframe) >= 1               # coefficient table


def test_laws_page_groups_saturating_and_extrapolation(ref_db):
    at = app("pages/scaling_laws.py")
    at.multiselect(key="rf_method").set_value([])        # every method
    at.selectbox(key="ref_group").set_value("method")
    at.checkbox(key="saturating").check()
    at.run()
    assert not at.exception
    assert any("Group comparison" in m.value for m in at.markdown)
    assert any("Shape:" in m.value for m in at.markdown)
    at.select_slider(key="extrapolate").set_value(64.0 * 2 ** 6).run()   # data end at batch 64
    assert not at.exception
    assert any("predicts" in m for m in messages(at.info))
    assert '"extrapolation"' in chart_specs(at)[0]


def test_laws_page_measured_runs_fit_and_recommend(runs_db):
    at = app("pages/scaling_laws.py")
    assert at.radio(key="source").value == "Measured runs (store)"
    at.selectbox(key="axis").set_value("tokens")
    at.selectbox(key="metric").set_value("tau")
    at.selectbox(key="group").set_value("draft_kind")
    at.run()
    assert not at.exception
    assert any('"fit"' in s for s in chart_specs(at))
    labels = [m.label for m in at.metric]
    assert "predicted speedup" in labels, messages(at.info)


def test_laws_page_empty_selection_says_so(runs_db):
    at = app("pages/scaling_laws.py")
    at.selectbox(key="metric").set_value("throughput").run()   # no run measured throughput
    assert not at.exception
    assert any("No points match" in m for m in messages(at.info))


# ---------------------------------------------------------------- regression lab

def test_lab_refuses_drop_table_and_runs_a_select(runs_db):
    at = app("pages/regression_lab.py")
    assert len(at.get("plotly_chart")) == 2     # default query + formula: coefficients; residuals and QQ
    at.text_area(key="sql").set_value("DROP TABLE runs")
    at.button(key="run_sql").click().run()
    assert not at.exception
    assert any("not allowed" in m or "only" in m for m in messages(at.error)), messages(at.error)
    assert store.store_summary(runs_db)["counts"]["runs"] > 0   # still there

    at.text_area(key="sql").set_value("SELECT tokens, layers, tau, category FROM runs "
                                      "WHERE draft_kind = 'scylla'")
    at.text_input(key="formula").set_value("tau ~ np.log(tokens) + layers + C(category)")
    at.button(key="run_sql").click().run()
    assert not at.exception and not at.error, messages(at.error)
    frames = [d.value for d in at.dataframe]
    assert any(len(f) == 30 and "tau" in f.columns for f in frames)
    coefs = next(f for f in frames if "np.log(tokens)" in f.index)
    assert float(coefs.loc["np.log(tokens)", "coef"]) == pytest.approx(0.12, abs=1e-6)


def test_lab_bad_formula_and_wls_glm(runs_db):
    at = app("pages/regression_lab.py")
    at.text_input(key="formula").set_value("throughput_ratio ~ __import__('os')").run()
    assert not at.exception and at.error
    at.text_input(key="formula").set_value("throughput_ratio ~ np.log(batch_size)").run()
    at.radio(key="kind").set_value("glm").run()
    assert not at.exception and not at.error
    at.radio(key="kind").set_value("wls").run()
    at.selectbox(key="weights").set_value("batch_size").run()
    assert not at.exception and not at.error


# ---------------------------------------------------------------- runs and sweeps

def test_runs_page_lists_runs_and_compares_drafts(runs_db):
    at = app("pages/runs_and_sweeps.py")
    assert len(at.dataframe[0].value) == len(synthetic_runs())
    spec = chart_specs(at)[0]
    assert '"ngram"' in spec and '"scylla-L1-T1000000"' in spec
    at.multiselect(key="runs_f_draft_kind").set_value(["ngram"]).run()
    assert len(at.dataframe[0].value) == 3


def test_runs_page_without_runs(ref_db):
    at = app("pages/runs_and_sweeps.py")
    assert any("No measured runs" in m for m in messages(at.info))


# ---------------------------------------------------------------- live decoding (tiny model)

def test_live_page_streams_both_sides_with_charts(tiny_live):
    at = app("pages/live_decoding.py")
    at.selectbox(key="draft_kind").set_value("ngram")  # the shipped scylla draft fits the real target only
    at.slider(key="max_tokens").set_value(16)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error, messages(at.error)
    html = [m.value for m in at.markdown if "scylla-transcript" in m.value]
    assert len(html) == 2 and all("scylla-tok" in h for h in html)
    metrics = [(m.label, m.value) for m in at.metric]
    assert ("tokens", "16") in metrics
    assert {"tau", "speedup", "tokens/s"} <= {label for label, _ in metrics}
    specs = chart_specs(at)
    assert len(specs) == 4 and '"accepted"' in specs[0] and '"per_position_accept"' in specs[2]
    assert '"draft confidence"' in specs[2] and '"verify"' in specs[3]   # the time line
    assert any(label == "break-even tau" for label, _ in metrics)
    # rerun (e.g. a toggle) keeps the last result without generating again
    at.toggle(key="show_rejected").set_value(False).run()
    assert len([m for m in at.markdown if "scylla-transcript" in m.value]) == 2


def test_live_page_decodes_with_a_draft_tree(tiny_live):
    at = app("pages/live_decoding.py")
    at.selectbox(key="draft_kind").set_value("ngram").run()
    at.radio(key="shape").set_value("tree").run()
    at.slider(key="tree_depth").set_value(3)
    at.slider(key="tree_total").set_value(8)
    at.slider(key="max_tokens").set_value(16)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error, messages(at.error)
    assert ("tokens", "16") in [(m.label, m.value) for m in at.metric]


def test_live_page_refuses_a_tree_for_a_draft_that_only_chains(tiny_live):
    at = app("pages/live_decoding.py")
    at.selectbox(key="draft_kind").set_value("layerskip").run()
    at.number_input(key="skip_layers").set_value(1)
    at.radio(key="shape").set_value("tree").run()
    at.button(key="generate").click().run()
    assert not at.exception
    assert any("chains only" in m for m in messages(at.error)), messages(at.error)


@pytest.mark.parametrize("prompt, expected", [("   ", "empty"), ("x" * 5000, "too long")])
def test_live_page_rejects_bad_prompts(tiny_live, prompt, expected):
    at = app("pages/live_decoding.py")
    at.text_area(key="prompt").set_value(prompt)
    at.button(key="generate").click().run()
    assert not at.exception
    assert any(expected in m for m in messages(at.error)), messages(at.error)


def test_live_page_missing_draft_suggests_ngram(tiny_live, monkeypatch):
    import scylla.drafts

    def missing(spec, target):
        raise FileNotFoundError(f"no trained draft at assets/drafts/{spec}")

    monkeypatch.setattr(scylla.drafts, "make_draft", missing)
    at = app("pages/live_decoding.py")
    at.selectbox(key="draft_kind").set_value("scylla")
    at.button(key="generate").click().run()
    assert not at.exception
    assert any("ngram" in m and "scylla" in m for m in messages(at.error)), messages(at.error)


def test_runs_page_starts_a_background_sweep_and_shows_its_log(ref_db, monkeypatch):
    import sys

    from scylla import studio

    monkeypatch.setattr(studio, "sweep_available", lambda: (True, ""))
    script = "print('run 1/2', flush=True); print('run 2/2', flush=True)"
    monkeypatch.setattr(studio, "sweep_command", lambda config, db=None: [sys.executable, "-c", script])
    at = app("pages/runs_and_sweeps.py")
    submit = next(b for b in at.button if b.label == "Start sweep")
    submit.click().run()
    assert not at.exception and not at.error, messages(at.error)
    assert any("Sweep started" in m.value for m in at.success)
    folder = studio.list_sweeps()[0]
    assert wait_for(lambda: (folder / "rc").is_file())
    at.run()
    assert any("finished" in e.label for e in at.expander)
    assert any("run 2/2" in c.value for c in at.code)


def test_laws_page_overlays_published_figures_on_the_batch_axis(tmp_path, monkeypatch):
    db = tmp_path / "results.duckdb"
    store.init_db(db)
    store.write_runs_atomic(db, [
        {"target": "SmolLM2-135M-Instruct", "draft": "ngram", "draft_kind": "ngram", "k": 4,
         "batch": b, "category": "all", "tau": 1.5, "speedup": 1.6 - 0.12 * math.log(b)}
        for b in (1, 2, 4, 8, 16)])
    monkeypatch.setenv("SCYLLA_DB", str(db))
    at = app("pages/scaling_laws.py")
    at.selectbox(key="axis").set_value("batch")
    at.selectbox(key="metric").set_value("speedup").run()
    at.checkbox(key="overlay").check().run()
    assert not at.exception and not at.error
    spec = next(s for s in chart_specs(at) if '"fit"' in s)
    assert '"published reference"' in spec
    assert float({m.label: m.value for m in at.metric}["slope"]) == pytest.approx(-0.12, abs=1e-3)


def test_live_page_use_example_fills_the_prompt(tiny_live):
    at = app("pages/live_decoding.py")
    cats = at.selectbox(key="example_category").options
    at.selectbox(key="example_category").set_value(cats[-1]).run()
    chosen = at.selectbox(key="example_prompt").value
    at.button(key="use_example").click().run()
    assert at.text_area(key="prompt").value == chosen
