"""Regression lab: read-only SQL over the results store, then OLS / WLS / GLM formulas."""
import pandas as pd
import streamlit as st

from scylla import ScyllaError, laws, plots, store, studio

st.set_page_config(page_title="Regression lab · Scylla Studio", layout="wide")
st.title("Regression lab")
st.caption("Query the store with one read-only SELECT (tables: runs, trainings, reference, laws, "
           "predictions), then fit a formula to the result: patsy syntax, e.g. "
           "`tau ~ np.log(tokens) + C(draft_kind)`.")


@st.cache_data(ttl=60, max_entries=32, show_spinner=False)
def query(path: str, version: tuple, sql: str):
    # keyed on the store's version: a sweep that writes to it invalidates the entry
    return store.read_only_query(path, sql)


db = studio.db_path()
if not db.is_file():
    st.info(f"No results store at {db} yet.")
    st.stop()
version = studio.store_version(db)

with st.expander("Tables and columns"):
    try:
        schema = query(
            str(db), version, "SELECT table_name, column_name, data_type FROM information_schema.columns "
                     "WHERE table_name IN ('runs', 'trainings', 'reference', 'laws', 'predictions') "
                     "ORDER BY table_name, ordinal_position")
        st.dataframe(schema, hide_index=True, width="stretch", height=240)
    except ScyllaError as exc:
        st.caption(str(exc))

sql = st.text_area("SQL (one read-only SELECT)", value=studio.LAB_DEFAULT_SQL, height=140, key="sql")
run_clicked = st.button("Run query", type="primary", key="run_sql")
if run_clicked or "lab_df" not in st.session_state:
    try:
        st.session_state["lab_df"] = query(str(db), version, sql)
        st.session_state["lab_error"] = None
    except ScyllaError as exc:
        st.session_state.setdefault("lab_df", None)   # keep the last good result
        st.session_state["lab_error"] = str(exc)

df = st.session_state.get("lab_df")
if st.session_state.get("lab_error"):
    st.error(f"Query refused or failed: {st.session_state['lab_error']}"
             + (" (showing the previous result)" if df is not None else ""))
if df is None:
    st.stop()

st.markdown(f"**Result:** {len(df)} rows × {df.shape[1]} columns"
            + (" (truncated to the first rows)" if df.attrs.get("truncated") else ""))
st.dataframe(df, hide_index=True, width="stretch", height=260, key="lab_result")
st.download_button("Download CSV", df.to_csv(index=False).encode(), "query.csv", "text/csv",
                   key="download_csv")

st.subheader("Formula")
numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
formula = st.text_input("Formula", value=studio.LAB_DEFAULT_FORMULA, key="formula")
f1, f2, f3 = st.columns(3)
kind = f1.radio("Model", laws.FORMULA_KINDS, horizontal=True, key="kind",
                format_func=str.upper)
weights_col, family = None, "gaussian"
if kind == "wls":
    if not numeric:
        st.error("WLS needs a numeric weights column in the query result.")
        st.stop()
    weights_col = f2.selectbox("Weights column", numeric, key="weights")
if kind == "glm":
    family = f2.selectbox("Family", list(laws.GLM_FAMILIES), key="family")
robust = f3.checkbox("HC3 robust errors (OLS/WLS)", value=True, key="robust", disabled=kind == "glm")

if df.empty:
    st.info("The query returned no rows: nothing to fit.")
    st.stop()
try:
    out = laws.fit_formula(df, formula, kind=kind, weights_col=weights_col, family=family,
                           robust=robust)
except ScyllaError as exc:
    st.error(str(exc))
    st.stop()

h1, h2, h3 = st.columns(3)
h1.metric("n", out["n"])
h2.metric("R²" if kind != "glm" else "pseudo R²", "-" if out["r2"] is None else f"{out['r2']:.3f}")
h3.metric("AIC", "-" if out["aic"] is None else f"{out['aic']:.2f}")
table = studio.formula_table(out)
number = st.column_config.NumberColumn(format="%.4g")
st.dataframe(table, width="stretch", key="coef_table",
             column_config={c: number for c in table.columns})
c1, c2 = st.columns([3, 2])
c1.plotly_chart(plots.coefficient_figure(table), width="stretch", key="coef_chart")
with c2.expander("statsmodels summary", expanded=False):
    st.code(out["summary"], language=None)

st.subheader("Diagnostics")
st.plotly_chart(plots.diagnostics_figure(out["fitted"], out["residuals"]), width="stretch",
                key="diagnostics_chart")
