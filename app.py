"""Scylla Studio: overview and navigation. Run with `streamlit run app.py`.

Navigation is st.navigation over the files in pages/ (never Streamlit's automatic pages/
listing), so the overview is labelled "Overview" however one arrives, by URL included.
"""
from pathlib import Path

import streamlit as st

from scylla import ScyllaError, live, plots, studio

PAGES_DIR = Path(__file__).resolve().parent / "pages"


def overview() -> None:
    st.title("Scylla Studio")
    st.markdown(
        "A speculative decoding engine and the **scaling laws of draft models** "
        "(Yan et al., 2025, *Scaling Laws for Speculative Decoding*, arXiv 2505.07858), "
        "made something you can run, see and question. A cheap **draft** proposes tokens, the "
        "**target** verifies them in one forward per **step**; **tau** is the tokens produced per "
        "step, **accept_rate** the share of drafted tokens accepted, **speedup** the tokens/s over "
        "plain decoding. The paper claims log-linear laws along three axes: the draft's pretraining "
        "**tokens**, its **layers**, and the decoding **batch**.")

    st.subheader("Pages")
    captions = {
        "live": "Plain and speculative decoding side by side, token by token, and why one wins.",
        "laws": "Fit the log-linear laws with confidence and prediction bands.",
        "lab": "SQL over the results and OLS / WLS / GLM formulas.",
        "runs": "Browse runs, compare drafts, start a small sweep.",
    }
    for col, (name, caption) in zip(st.columns(4), captions.items()):
        col.page_link(PAGES[name])
        col.caption(caption)

    st.subheader("Loaded in this app")
    loaded = live.loaded_summary()
    if loaded["targets"]:
        st.dataframe(loaded["targets"], hide_index=True)
        st.write("Drafts loaded:", ", ".join(loaded["drafts"]) or "none yet")
    else:
        name = "SmolLM2-135M-Instruct" if live.target_spec() == "smollm2" else live.target_spec()
        st.write(f"Target: **{name}**, quantization **{live.DEFAULT_QUANT}** ({live.QUANT_KERNELS[live.DEFAULT_QUANT]}), "
                 f"on the CPU; it loads on the first live run. Default draft: **{live.default_draft(live.DEFAULT_QUANT)}**.")

    st.subheader("Against the engines you know")
    peer_rows = studio.peer_comparison(studio.db_path()) if studio.db_path().is_file() else None
    if peer_rows is None or not len(peer_rows):
        st.info("No peer comparison stored yet: `scylla peers --prompts assets/sweep_prompts.jsonl "
                "--engines scylla,llamacpp,vllm --db results.duckdb` measures llama.cpp and vLLM CPU "
                "on the same prompts and token ids as this engine.")
    else:
        st.caption(f"`scylla peers` on {peer_rows['prompt_set'].iloc[0]} ({int(peer_rows['n_prompts'].iloc[0])} "
                   "prompts, same token ids for every engine, one prompt at a time), from the store.")
        st.plotly_chart(plots.peers_figure(peer_rows), width="stretch", key="peers")
        accept = studio.peer_acceptance(peer_rows)
        if accept:
            st.plotly_chart(plots.peer_acceptance_figure(accept), width="stretch", key="peer_accept")
        st.dataframe(peer_rows.drop(columns=["notes", "per_position_accept"], errors="ignore"), hide_index=True)

    st.subheader("What the store holds")
    db = studio.db_path()
    st.caption(f"Store: `{db}` (set SCYLLA_DB to use another file)")
    if not db.is_file():
        st.info("No results store yet: run `scylla sweep` or `scylla bench` to create one.")
    else:
        try:
            from scylla import store

            summary = store.store_summary(str(db))
        except ScyllaError as exc:
            st.error(str(exc))
        else:
            counts = summary.get("counts", {})
            cols = st.columns(max(1, len(counts)))
            for col, (table, n) in zip(cols, counts.items()):
                col.metric(table, n)
            axes = summary.get("axes", {})
            covered = {a: v for a, v in axes.items() if v}
            if covered:
                st.markdown("**Axes covered by runs:** " + "; ".join(
                    f"{a}: {', '.join(f'{x:,}' if isinstance(x, (int, float)) else str(x) for x in v)}"
                    for a, v in covered.items()))
            elif counts.get("runs", 0) == 0:
                st.info("No measured runs yet: the Scaling laws page starts on the published "
                        "reference figures (e.g. EAGLE-3 throughput vs batch size in SGLang).")
            runs = store.runs_frame(str(db))
            if len(runs):
                st.plotly_chart(plots.runs_overview_figure(runs), width="stretch", key="runs_overview")
            with st.expander("Store details"):
                st.json(summary)


st.set_page_config(page_title="Scylla Studio", layout="wide")
PAGES = {
    "live": st.Page(PAGES_DIR / "live_decoding.py", title="Live decoding", icon=":material/bolt:",
                    url_path="Live_decoding"),
    "laws": st.Page(PAGES_DIR / "scaling_laws.py", title="Scaling laws", icon=":material/show_chart:",
                    url_path="Scaling_laws"),
    "lab": st.Page(PAGES_DIR / "regression_lab.py", title="Regression lab", icon=":material/science:",
                   url_path="Regression_lab"),
    "runs": st.Page(PAGES_DIR / "runs_and_sweeps.py", title="Runs and sweeps",
                    icon=":material/table_view:", url_path="Runs_and_sweeps"),
}
navigation = st.navigation([st.Page(overview, title="Overview", icon=":material/home:", default=True),
                            *PAGES.values()])
try:
    navigation.run()
finally:
    studio.prewarm_imports()  # after the page is drawn: the other pages' first visits get faster
