"""Runs and sweeps: browse measured runs, compare drafts by category, start a small sweep."""
import json

import streamlit as st

from scylla import ScyllaError, plots, store, studio

st.set_page_config(page_title="Runs and sweeps · Scylla Studio", layout="wide")
st.title("Runs and sweeps")


@st.cache_data(ttl=60, show_spinner=False)
def load(path: str, version: tuple):  # version: studio.store_version
    return store.runs_frame(path), store.trainings_frame(path)


db = studio.db_path()
runs = trainings = None
if not db.is_file():
    st.info(f"No results store at {db} yet; a sweep creates it.")
else:
    try:
        runs, trainings = load(str(db), studio.store_version(db))
    except ScyllaError as exc:
        st.error(str(exc))

st.subheader("Runs")
if runs is not None and len(runs):
    options = studio.filter_options(runs, studio.RUN_FILTER_COLUMNS)
    filters = {}
    if options:
        fcols = st.columns(min(4, len(options)))
        for i, (col, values) in enumerate(options.items()):
            chosen = fcols[i % len(fcols)].multiselect(col, values, key=f"runs_f_{col}")
            if chosen:
                filters[col] = chosen
    shown = studio.apply_filters(runs, filters)
    main_cols = [c for c in ("created_at", "target", "quant", "draft", "draft_kind", "layers",
                             "tokens", "k", "batch", "temperature", "category", "n_prompts", "tau",
                             "accept_rate", "tokens_per_s", "speedup", "spec_gain", "throughput",
                             "exact_match_rate", "id") if c in shown.columns]
    all_cols = st.toggle("Show every column", key="all_cols")
    st.caption(f"{len(shown)} of {len(runs)} runs")
    st.dataframe(shown if all_cols else shown[main_cols], hide_index=True, width="stretch",
                 height=300, key="runs_table")

    st.subheader("Drafts by category")
    metrics = [m for m in ("tau", "accept_rate", "speedup", "spec_gain", "tokens_per_s") if m in shown.columns]
    metric = st.selectbox("Metric", metrics, key="cat_metric")
    per_cat = shown[shown["category"].notna() & (shown["category"] != "all")] \
        if "category" in shown.columns else shown
    st.plotly_chart(plots.draft_category_figure(per_cat if len(per_cat) else shown, metric),
                    width="stretch", key="category_chart")
else:
    st.info("No measured runs in the store yet. Start a small sweep below, or use the "
            "published reference on the Scaling laws page.")

if trainings is not None and len(trainings):
    with st.expander(f"Draft trainings ({len(trainings)})"):
        st.dataframe(trainings, hide_index=True, width="stretch")

st.subheader("Start a small sweep")
ok, why = studio.sweep_available()
if not ok:
    st.info(why)
with st.form("sweep_form"):
    config_text = st.text_area("Sweep config (JSON)", json.dumps(studio.default_sweep_config(),
                                                                   indent=2),
                               height=220, key="sweep_config")
    submitted = st.form_submit_button("Start sweep", disabled=not ok)
if submitted:
    try:
        folder = studio.start_sweep(config_text)
        st.success(f"Sweep started in the background: {folder}")
    except ScyllaError as exc:
        st.error(str(exc))


active = submitted or any(studio.sweep_status(f)["state"] == "running"
                          for f in studio.list_sweeps()[:5])
REFRESH_S = 2 if active else 15


@st.fragment(run_every=REFRESH_S)
def sweep_progress():
    folders = studio.list_sweeps()[:5]
    if not folders:
        st.caption("No sweeps started from this checkout yet.")
        return
    for i, folder in enumerate(folders):
        status = studio.sweep_status(folder)
        label = f"{folder.name}: {status['state']}" + (
            f" (exit {status['rc']})" if status["rc"] not in (None, 0) else "")
        with st.expander(label, expanded=i == 0):
            if status["progress"] is not None:
                st.progress(status["progress"], text=f"{status['progress']:.0%}")
            st.code(status["log"] or "(no output yet)", language=None)


st.markdown(f"**Sweep progress** (refreshes every {REFRESH_S} s)")
sweep_progress()
