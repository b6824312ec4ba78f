"""Scaling laws: metric = intercept + slope * ln(x) along tokens, layers or batch."""
import pandas as pd
import streamlit as st

from scylla import ScyllaError, laws, plots, store, studio

st.set_page_config(page_title="Scaling laws · Scylla Studio", layout="wide")
st.title("Scaling laws")
st.caption("The paper's claim: along each axis (draft pretraining **tokens**, draft **layers**, "
           "decoding **batch**) the metric is log-linear, metric = intercept + slope · ln(x). "
           "Fits are OLS with HC3 errors; bands are 95% (confidence: the mean; prediction: a new run).")


@st.cache_data(ttl=60, show_spinner=False)
def load(path: str, version: tuple):  # version: studio.store_version
    return store.runs_frame(path), store.reference_frame(path)


@st.cache_data(ttl=60, max_entries=64, show_spinner=False)
def axis_points(path: str, version: tuple, axis: str, metric: str, filters: dict):
    return store.axis_points(path, axis, metric, filters)


# cache_resource, not cache_data: the analysis holds statsmodels results (not worth
# pickling); the page only reads them. Reruns with the same selection reuse the fit.
@st.cache_resource(max_entries=64, show_spinner=False)
def analysis_of(points: pd.DataFrame, extrapolate_to, saturating: bool, group_col):
    return studio.law_analysis(points, extrapolate_to=extrapolate_to, saturating=saturating,
                               group_col=group_col)


@st.cache_resource(max_entries=32, show_spinner=False)
def recommendation(path: str, version: tuple, batch: int, budget: int):
    runs, _ = load(path, version)
    return laws.recommend(runs, batch, budget)


db = studio.db_path()
version = studio.store_version(db)
try:
    runs, ref = load(str(db), version)
except ScyllaError as exc:
    st.error(str(exc))
    st.stop()

MEASURED, PUBLISHED = "Measured runs (store)", "Published reference"
has_runs = len(runs) > 0 and any(runs[a].notna().any() for a in studio.AXES if a in runs)
source = st.radio("Data source", [MEASURED, PUBLISHED], index=0 if has_runs else 1,
                  horizontal=True, key="source",
                  help="Published reference: figures from the EAGLE-3 paper and Spec-Bench, "
                       "e.g. batched throughput with speculation over without, vs batch size.")

c1, c2, c3 = st.columns(3)
overlay = None
if source == MEASURED:
    axis = c1.selectbox("Axis", list(studio.AXES), format_func=lambda a: f"{a} ({studio.AXES[a]})",
                        key="axis")
    metric = c2.selectbox("Metric", studio.METRICS, key="metric")
    groups = ["(none)"] + [g for g in studio.GROUP_COLUMNS if g in runs.columns]
    group = c3.selectbox("Group by", groups, key="group")
    options = studio.filter_options(runs, studio.RUN_FILTER_COLUMNS)
    opening = studio.default_run_filters(runs, axis)
    filters = {}
    with st.expander("Filters (opens on the axis's latest complete sweep, T = 0)", expanded=False):
        for col, values in options.items():
            default = [v for v in opening.get(col, []) if v in values]
            chosen = st.multiselect(col, values, default=default, key=f"f_{col}_{axis}")
            if chosen:
                filters[col] = chosen
    try:
        points = axis_points(str(db), version, axis, metric, filters)
    except ScyllaError as exc:
        st.error(str(exc))
        st.stop()
    x_label, y_label = studio.AXES[axis], metric
    if (axis, metric) in studio.REFERENCE_OVERLAY and len(ref):
        ref_metric = studio.REFERENCE_OVERLAY[(axis, metric)]
        if st.checkbox(f"Overlay published reference ({ref_metric})", value=False, key="overlay"):
            methods = sorted(ref.loc[ref["metric"] == ref_metric, "method"].dropna().unique())
            picked = st.multiselect("Reference methods", methods, default=methods[:2], key="overlay_m")
            overlay = studio.reference_overlay(ref, axis, metric, {"method": picked})
else:
    metric_opts = [m for m in ref["metric"].dropna().unique()
                   if ref.loc[ref["metric"] == m, "batch_size"].nunique() > 1] if len(ref) else []
    if not metric_opts:
        st.info("The store holds no published figures that vary with batch size.")
        st.stop()
    default_metric = metric_opts.index("throughput_ratio_vs_no_spec") \
        if "throughput_ratio_vs_no_spec" in metric_opts else 0
    metric = c1.selectbox("Metric", metric_opts, index=default_metric, key="ref_metric")
    c2.selectbox("Axis", ["batch"], format_func=lambda a: "batch (batch_size)", key="ref_axis")
    group = c3.selectbox("Group by", ["(none)", *studio.REFERENCE_GROUP_COLUMNS], key="ref_group")
    rows = ref[ref["metric"] == metric]
    options = studio.filter_options(rows, studio.REFERENCE_FILTER_COLUMNS)
    defaults = {"engine_or_device": ["SGLang"], "method": ["EAGLE-3"]}
    filters = {}
    with st.expander("Filters", expanded=True):
        fcols = st.columns(max(1, len(options)))
        for i, (col, values) in enumerate(options.items()):
            default = [v for v in defaults.get(col, []) if v in values]
            chosen = fcols[i].multiselect(col, values, default=default, key=f"rf_{col}")
            if chosen:
                filters[col] = chosen
    points = studio.reference_points(ref, metric, filters)
    x_label, y_label = "batch size", metric

group_col = None if group == "(none)" else group
if points.empty:
    st.info("No points match this selection: widen the filters, pick another axis or metric, "
            "or switch the data source to the published reference.")
    st.stop()

usable = studio.usable_points(points)
o1, o2 = st.columns(2)
saturating = o1.checkbox("Also fit the saturating alternative  y = a − b·x^(−c)", key="saturating")
x_max = float(usable["x"].max()) if len(usable) else 1.0
extrap = o2.select_slider("Extrapolate to x", options=studio.extrapolation_options(x_max),
                          value=x_max, format_func=lambda v: f"{v:,.4g}", key="extrapolate")

try:
    analysis = analysis_of(points, extrap if extrap > x_max else None, saturating, group_col)
except ScyllaError as exc:
    st.warning(f"No law fitted: {exc}")
    st.plotly_chart(plots.law_figure(usable, x_label=x_label, y_label=y_label, group_col=group_col,
                                     reference=overlay), width="stretch")
    st.stop()

fit = analysis["fit"]
fig = plots.law_figure(analysis["points"], analysis["prediction"], x_label=x_label, y_label=y_label,
                       group_col=group_col, reference=overlay, saturating=analysis["saturating"],
                       extrapolation=analysis["extrapolation"],
                       group_fits=analysis["group_fits"],
                       title=f"{y_label} = {fit.intercept:.3g} {fit.slope:+.3g} · ln({x_label})")
st.plotly_chart(fig, width="stretch", key="law_chart")

m1, m3, m4, m5 = st.columns(4)
m1.metric("slope", f"{fit.slope:+.4g}", help="change in the metric per e-fold of x")
m3.metric("R²", f"{fit.r2:.3f}")
m4.metric("LOO error", "-" if fit.loo_rel_err is None else f"{fit.loo_rel_err:.1%}",
          help="mean absolute relative error of leave-one-out predictions")
m5.metric("n", fit.n)
st.caption(f"slope 95% CI [{fit.slope_ci[0]:.4g}, {fit.slope_ci[1]:.4g}] ({fit.cov_type}), "
           f"p = {fit.p_value:.3g} for slope = 0")
if analysis["extrapolation"] is not None:
    e = analysis["extrapolation"].iloc[0]
    st.info(f"At x = {e['x']:,.4g} the law predicts {y_label} = {e['mean']:.3f} "
            f"(95% prediction interval {e['pred_low']:.3f} to {e['pred_high']:.3f}; "
            f"mean CI {e['conf_low']:.3f} to {e['conf_high']:.3f}). The data end at x = {fit.x_max:,.4g}.")

left, right = st.columns(2)
with left:
    st.markdown("**Coefficients**")
    number = st.column_config.NumberColumn(format="%.4g")
    st.dataframe(analysis["coefficients"], hide_index=True, width="stretch",
                 column_config={c: number for c in ("estimate", "std_err", "ci_low", "ci_high",
                                                    "p_value")})
    head = analysis["headline"]
    hold = head["holdout_largest_rel_err"]
    st.caption(f"Standard errors: {head['cov_type']}. Hold out the largest x and predict it: "
               f"{'-' if hold is None else f'{hold:.1%}'} relative error.")
    if analysis["shapes"] is not None:
        shapes = analysis["shapes"]
        d_aic = shapes.get("delta_aic")
        st.markdown(f"**Shape:** {shapes['verdict']}"
                    + (f" (ΔAIC = {d_aic:.2f})" if d_aic is not None else ""))
        st.caption(shapes.get("reason") or shapes["rule"])
    if analysis["groups"] is not None:
        g = analysis["groups"]
        st.markdown(f"**Group comparison ({group_col}):** equal slopes F = {g['F']:.3g}, "
                    f"p = {g['p_value']:.3g}; any difference F = {g['F_any']:.3g}, "
                    f"p = {g['p_value_any']:.3g}")
        st.dataframe(pd.DataFrame(g["slopes"]).T, width="stretch")
    elif analysis.get("groups_error"):
        st.caption(f"Group comparison not possible: {analysis['groups_error']}")
with right:
    st.plotly_chart(plots.residual_figure(fit.fitted, fit.residuals), width="stretch",
                    key="residual_chart")

if source == MEASURED:
    st.subheader("Scylla's recommendation")
    r1, r2 = st.columns(2)
    batch = r1.number_input("Batch size", 1, 1024, 1, key="rec_batch")
    budget = r2.number_input("Draft pretraining budget (tokens)", 1, 10**12, 10**7, step=10**6,
                             key="rec_budget")
    try:
        rec = recommendation(str(db), version, int(batch), int(budget))
    except ScyllaError as exc:
        st.info(f"No recommendation yet: {exc}")
    else:
        best = rec["best"]
        b1, b2, b3, b4 = st.columns(4)
        b1.metric("layers", best["layers"])
        b2.metric("tokens", f"{best['tokens']:,.0f}")
        b3.metric("k", best["k"])
        b4.metric("predicted speedup", f"{best['predicted_speedup']:.2f}x",
                  help=f"{best['speedup_low']:.2f} to {best['speedup_high']:.2f} ({rec['method']})")
        st.caption(f"predicted tau {best['predicted_tau']:.2f} "
                   f"({best['tau_low']:.2f} to {best['tau_high']:.2f}). {rec['interval']}")
        for w in rec["warnings"]:
            st.warning(w)

with st.expander("Points used"):
    cols = [c for c in ["x", "y", group_col, "label", "draft", "category", "target", "id"]
            if c and c in analysis["points"].columns]
    st.dataframe(analysis["points"][list(dict.fromkeys(cols))], hide_index=True, width="stretch")
