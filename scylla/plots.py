"""Pure figure functions: data in, plotly Figure out. No Streamlit, no I/O.

Trace names are part of the interface (tests and pages look them up), so they are
short, fixed strings: "data", "fit", "confidence band", "prediction band", ...
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# One palette for the token kinds everywhere (the live page's HTML uses the same).
COLORS = {
    "accepted": "#2e7d32",   # draft token the target accepted
    "bonus": "#1565c0",      # the target's own token after the accepted prefix
    "rejected": "#c62828",   # draft token the target refused
    "plain": "#455a64",      # plain decoding / prefill token
    "fit": "#e65100",
    "band": "rgba(230, 81, 0, 0.25)",
    "pred": "rgba(230, 81, 0, 0.10)",
    "reference": "#6a1b9a",
    "saturating": "#00838f",
}
GROUP_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _layout(fig: go.Figure, title: str, x: str, y: str, log_x: bool = False) -> go.Figure:
    # No explicit template: plotly applies its default (Streamlit's theme in the app) for
    # free, while validating a named template costs ~25-40 ms per figure on every rerun.
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y,
                      margin=dict(l=50, r=20, t=50, b=45), legend=dict(orientation="h", y=-0.2))
    if log_x:
        fig.update_xaxes(type="log")
    return fig


# ---------------------------------------------------------------- scaling laws

def law_figure(points: pd.DataFrame, prediction: pd.DataFrame | None = None, *,
               x_label: str = "x", y_label: str = "y", group_col: str | None = None,
               reference: pd.DataFrame | None = None, saturating: pd.DataFrame | None = None,
               extrapolation: pd.DataFrame | None = None,
               group_fits: pd.DataFrame | None = None, fit_label: str = "fit",
               title: str = "") -> go.Figure:
    """Scatter of points (x, y[, group]) on a log x axis with the fitted log-linear law.

    prediction: LawFit.predict(...) output (x, mean, conf_low, conf_high, pred_low,
    pred_high) over a grid, possibly extended past the data (extrapolation).
    reference: published figures (x, y, label) drawn as open markers.
    saturating: (x, mean) of an alternative saturating fit.
    extrapolation: predict() rows at chosen x values, drawn with their prediction interval.
    group_fits: (group, x, mean) of each group's own line, dotted in the group's colour.
    """
    fig = go.Figure()
    if prediction is not None and len(prediction):
        p = prediction.sort_values("x")
        xs = list(p["x"]) + list(p["x"])[::-1]
        fig.add_trace(go.Scatter(x=xs, y=list(p["pred_high"]) + list(p["pred_low"])[::-1],
                                 fill="toself", fillcolor=COLORS["pred"], line=dict(width=0),
                                 hoverinfo="skip", name="prediction band"))
        fig.add_trace(go.Scatter(x=xs, y=list(p["conf_high"]) + list(p["conf_low"])[::-1],
                                 fill="toself", fillcolor=COLORS["band"], line=dict(width=0),
                                 hoverinfo="skip", name="confidence band"))
        fig.add_trace(go.Scatter(x=p["x"], y=p["mean"], mode="lines", name="fit",
                                 line=dict(color=COLORS["fit"], width=2),
                                 hovertemplate=f"{fit_label}<br>x=%{{x:.4g}}<br>y=%{{y:.4g}}<extra></extra>"))
    if group_col and group_col in points.columns:
        for i, (name, g) in enumerate(points.groupby(group_col, sort=True, dropna=False)):
            color = GROUP_COLORS[i % len(GROUP_COLORS)]
            fig.add_trace(go.Scatter(x=g["x"], y=g["y"], mode="markers", name=f"data: {name}",
                                     legendgroup=str(name), marker=dict(size=9, color=color)))
            if group_fits is not None and len(group_fits):
                line = group_fits[group_fits["group"].astype(str) == str(name)].sort_values("x")
                if len(line):
                    fig.add_trace(go.Scatter(x=line["x"], y=line["mean"], mode="lines",
                                             name=f"fit: {name}", legendgroup=str(name),
                                             line=dict(color=color, dash="dot", width=1.5)))
    else:
        fig.add_trace(go.Scatter(x=points["x"], y=points["y"], mode="markers", name="data",
                                 marker=dict(size=9, color="#263238")))
    if saturating is not None and len(saturating):
        s = saturating.sort_values("x")
        fig.add_trace(go.Scatter(x=s["x"], y=s["mean"], mode="lines", name="saturating fit",
                                 line=dict(color=COLORS["saturating"], dash="dash")))
    if extrapolation is not None and len(extrapolation):
        e = extrapolation
        fig.add_trace(go.Scatter(
            x=e["x"], y=e["mean"], mode="markers", name="extrapolation",
            marker=dict(size=12, symbol="star", color=COLORS["fit"]),
            error_y=dict(type="data", symmetric=False, array=e["pred_high"] - e["mean"],
                         arrayminus=e["mean"] - e["pred_low"], color=COLORS["fit"]),
            hovertemplate="x=%{x:.4g}<br>predicted %{y:.4g}<extra>extrapolation</extra>"))
    if reference is not None and len(reference):
        text = reference["label"] if "label" in reference.columns else None
        fig.add_trace(go.Scatter(x=reference["x"], y=reference["y"], mode="markers",
                                 name="published reference", text=text,
                                 marker=dict(size=10, symbol="diamond-open",
                                             color=COLORS["reference"], line=dict(width=2)),
                                 hovertemplate="%{text}<br>x=%{x}<br>y=%{y}<extra></extra>"))
    return _layout(fig, title, x_label, y_label, log_x=True)


def residual_figure(fitted: Sequence[float], residuals: Sequence[float],
                    title: str = "Residuals vs fitted") -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(fitted), y=list(residuals), mode="markers", name="residuals",
                             marker=dict(size=8, color="#37474f")))
    fig.add_hline(y=0, line=dict(color=COLORS["fit"], dash="dash"))
    return _layout(fig, title, "fitted", "residual")


def qq_figure(residuals: Sequence[float], title: str = "Normal Q-Q") -> go.Figure:
    """Sample quantiles of standardized residuals against normal quantiles."""
    from scipy import stats

    r = np.asarray(list(residuals), dtype=float)
    r = r[np.isfinite(r)]
    fig = go.Figure()
    if len(r) >= 2:
        (theo, ordered), (slope, intercept, _) = stats.probplot(r, dist="norm")
        fig.add_trace(go.Scatter(x=theo, y=ordered, mode="markers", name="residuals",
                                 marker=dict(size=8, color="#37474f")))
        line_x = np.array([theo.min(), theo.max()])
        fig.add_trace(go.Scatter(x=line_x, y=intercept + slope * line_x, mode="lines",
                                 name="normal line", line=dict(color=COLORS["fit"], dash="dash")))
    return _layout(fig, title, "theoretical quantile", "sample quantile")


def diagnostics_figure(fitted: Sequence[float], residuals: Sequence[float],
                       title: str = "Diagnostics") -> go.Figure:
    """Residuals vs fitted and the normal Q-Q plot side by side, in one figure (one chart
    renders faster than two in the browser)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Residuals vs fitted", "Normal Q-Q"),
                        horizontal_spacing=0.12)
    for trace in residual_figure(fitted, residuals).data:
        fig.add_trace(trace, row=1, col=1)
    for trace in qq_figure(residuals).data:
        fig.add_trace(trace.update(showlegend=trace.name == "normal line"), row=1, col=2)
    fig.add_hline(y=0, line=dict(color=COLORS["fit"], dash="dash"), row=1, col=1)
    _layout(fig, title, "fitted", "residual")
    fig.update_xaxes(title_text="theoretical quantile", row=1, col=2)
    return fig.update_yaxes(title_text="sample quantile", row=1, col=2)


def coefficient_figure(table: pd.DataFrame, title: str = "Coefficients (95% CI)") -> go.Figure:
    """table: index = term, columns coef, ci_low, ci_high."""
    fig = go.Figure(go.Scatter(
        x=table["coef"], y=[str(i) for i in table.index], mode="markers", name="coef",
        error_x=dict(type="data", symmetric=False, array=table["ci_high"] - table["coef"],
                     arrayminus=table["coef"] - table["ci_low"]),
        marker=dict(size=9, color=COLORS["fit"])))
    fig.add_vline(x=0, line=dict(color="#9e9e9e", dash="dot"))
    return _layout(fig, title, "estimate", "term")


# ---------------------------------------------------------------- live decoding

def step_accept_figure(accepted: Sequence[int], k: int | None = None,
                       bonus: Sequence[int] | None = None,
                       title: str = "Accepted draft tokens per step") -> go.Figure:
    """One bar per step (prefill excluded): accepted drafts, with the target's own token (the
    bonus after a verified draft, or the plain token when nothing was drafted) stacked on top."""
    steps = list(range(1, len(accepted) + 1))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=steps, y=list(accepted), name="accepted",
                         marker_color=COLORS["accepted"]))
    if bonus is not None:
        fig.add_trace(go.Bar(x=steps, y=list(bonus), name="bonus / target token",
                             marker_color=COLORS["bonus"]))
    fig.update_layout(barmode="stack", bargap=0.1)
    if k:
        fig.add_hline(y=k, line=dict(color="#9e9e9e", dash="dot"),
                      annotation_text=f"k = {k}", annotation_position="top left")
    return _layout(fig, title, "step", "tokens")


def accept_hist_figure(accepted: Sequence[int], k: int | None = None,
                       title: str = "Histogram of accepted lengths") -> go.Figure:
    top = max(list(accepted) + [k or 0, 0])
    counts = np.bincount(np.asarray(list(accepted), dtype=int), minlength=top + 1) if len(accepted) \
        else np.zeros(top + 1, dtype=int)
    fig = go.Figure(go.Bar(x=list(range(top + 1)), y=counts.tolist(), name="steps",
                           marker_color=COLORS["accepted"]))
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "accepted draft tokens in a step", "steps")


def per_position_figure(per_position: Sequence[float],
                        title: str = "Per-position acceptance") -> go.Figure:
    """per_position_accept[i] = P(draft token i accepted | tokens < i accepted)."""
    pos = list(range(1, len(per_position) + 1))
    fig = go.Figure(go.Bar(x=pos, y=list(per_position), name="per_position_accept",
                           marker_color=COLORS["accepted"],
                           hovertemplate="position %{x}<br>P(accept)=%{y:.2f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "draft position", "P(accept | earlier accepted)")


def throughput_figure(plain_tps: float, spec_tps: float, title: str = "Tokens/s") -> go.Figure:
    fig = go.Figure(go.Bar(x=["plain", "speculative"], y=[plain_tps, spec_tps], name="tokens/s",
                           marker_color=[COLORS["plain"], COLORS["accepted"]],
                           text=[f"{plain_tps:.1f}", f"{spec_tps:.1f}"], textposition="auto"))
    return _layout(fig, title, "", "tokens/s")


# ---------------------------------------------------------------- runs

def draft_category_figure(runs: pd.DataFrame, metric: str = "tau",
                          title: str | None = None) -> go.Figure:
    """Mean metric per category, one bar group per draft."""
    fig = go.Figure()
    if len(runs) and metric in runs.columns:
        frame = runs.copy()
        frame["category"] = frame.get("category", pd.Series(index=frame.index)).fillna("all")
        frame["draft"] = frame["draft"].fillna("none").map(short_draft)
        agg = frame.groupby(["draft", "category"], dropna=False)[metric].mean().reset_index()
        for i, (draft, g) in enumerate(agg.groupby("draft", sort=True)):
            fig.add_trace(go.Bar(x=g["category"], y=g[metric], name=str(draft),
                                 marker_color=GROUP_COLORS[i % len(GROUP_COLORS)]))
    fig.update_layout(barmode="group")
    return _layout(fig, title or f"{metric} by category and draft", "category", metric)


def runs_overview_figure(runs: pd.DataFrame, title: str = "Every stored run: speedup against tau") -> go.Figure:
    """One point per run (all categories pooled), coloured by draft; speedup = 1 marked.
    A speedup can never exceed tau, so the gap to the diagonal is what the draft costs."""
    fig = go.Figure()
    frame = runs if not len(runs) or "category" not in runs else runs[runs["category"].fillna("all") == "all"]
    frame = frame.dropna(subset=["tau", "speedup"]) if len(frame) else frame
    if len(frame):
        for i, (draft, g) in enumerate(frame.groupby(frame["draft"].fillna("none").map(short_draft), sort=True)):
            fig.add_trace(go.Scatter(x=g["tau"], y=g["speedup"], mode="markers", name=str(draft),
                                     marker=dict(color=GROUP_COLORS[i % len(GROUP_COLORS)], size=9),
                                     text=g["shape"].astype(str) + ", batch " + g["batch"].astype(str)
                                     + ", T " + g["temperature"].astype(str),
                                     hovertemplate="tau %{x:.3f}<br>speedup %{y:.2f}<br>%{text}"))
        top = float(max(frame["tau"].max(), 1.0))
        fig.add_trace(go.Scatter(x=[1.0, top], y=[1.0, top], mode="lines", name="speedup = tau",
                                 line=dict(color="#888", dash="dot")))
        fig.add_hline(y=1.0, line=dict(color="#bbb", dash="dash"))
    return _layout(fig, title, "tau (tokens per target forward)", "speedup over plain decoding")


def short_draft(draft: str) -> str:
    """Sweep drafts live in cache folders: show the folder name, not the whole path."""
    return str(draft).rstrip("/").rsplit("/", 1)[-1]


def log_grid(x_min: float, x_max: float, n: int = 60) -> np.ndarray:
    """Points evenly spaced in log x (x must be > 0)."""
    lo, hi = math.log(max(x_min, 1e-12)), math.log(max(x_max, x_min, 1e-12))
    if hi <= lo:
        hi = lo + 1e-6
    return np.exp(np.linspace(lo, hi, n))


# ---------------------------------------------------------------- live decoding: why it wins or loses

PART_COLORS = {"prefill": "#90a4ae", "forward": COLORS["plain"], "draft": "#f9a825",
               "verify": COLORS["bonus"], "bookkeeping": "#bdbdbd"}


def timeline_figure(frame: pd.DataFrame, title: str = "Compute clock, step by step") -> go.Figure:
    """Each side's compute as consecutive bars on one ms axis (live.timeline's frame): plain
    spends one forward per token; speculative drafts, then verifies, per step. The label at
    each lane's end gives its tokens and total ms."""
    fig = go.Figure()
    sides = ["speculative", "plain"]
    if frame is not None and len(frame):
        for part, color in PART_COLORS.items():
            rows = frame[frame["part"] == part]
            if not len(rows):
                continue
            fig.add_trace(go.Bar(
                y=rows["side"], x=rows["ms"], base=rows["start_ms"], orientation="h", name=part,
                marker=dict(color=color, line=dict(width=0.5, color="white")),
                customdata=rows[["step", "tokens", "total_tokens"]].to_numpy(),
                hovertemplate=(f"{part}, step %{{customdata[0]}}: %{{x:.1f}} ms<br>"
                               "+%{customdata[1]} tokens (%{customdata[2]} so far)<extra></extra>")))
        for side in sides:
            lane = frame[frame["side"] == side]
            if len(lane):
                end = float((lane["start_ms"] + lane["ms"]).max())
                fig.add_annotation(x=end, y=side, xanchor="left", showarrow=False,
                                   text=f" {int(lane['total_tokens'].max())} tokens, {end:,.0f} ms")
    fig.update_yaxes(categoryorder="array", categoryarray=sides)
    _layout(fig, title, "compute ms (each side's own clock)", "")
    return fig.update_layout(barmode="overlay", bargap=0.35, height=300, margin=dict(l=50, r=20, t=80, b=45),
                             legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"))


def confidence_figure(frame: pd.DataFrame,
                      title: str = "Confidence vs acceptance by position") -> go.Figure:
    """Bars: per_position_accept; lines: the draft's mean confidence (q) and the target's
    mean probability (p) of the drafted tokens at each position (live.confidence_by_position)."""
    fig = go.Figure()
    if frame is not None and len(frame):
        pos = frame["position"]
        fig.add_trace(go.Bar(x=pos, y=frame["per_position_accept"], name="per_position_accept",
                             marker_color=COLORS["accepted"], customdata=frame["reached"],
                             hovertemplate="position %{x}<br>accepted %{y:.2f} of %{customdata} "
                                           "reached<extra></extra>"))
        fig.add_trace(go.Scatter(x=pos, y=frame["draft_confidence"], mode="lines+markers",
                                 name="draft confidence", line=dict(color="#f9a825", width=2)))
        fig.add_trace(go.Scatter(x=pos, y=frame["target_prob"], mode="lines+markers",
                                 name="target probability",
                                 line=dict(color=COLORS["bonus"], width=2, dash="dot")))
    fig.update_yaxes(range=[0, 1.05])
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "draft position", "probability")


# ---------------------------------------------------------------- peers

def peers_figure(frame: pd.DataFrame, title: str = "Against the engines you know: tokens/s, one prompt at a time") -> go.Figure:
    """frame: studio.peer_comparison (one row per engine and draft). Traces "end to end" and
    "decode only" (prefill and first token excluded)."""
    labels = [f"{e} | {d}" for e, d in zip(frame["engine"], frame["draft"])]
    fig = go.Figure()
    for column, name, color in (("tokens_per_s", "end to end", COLORS["plain"]),
                                ("decode_tokens_per_s", "decode only", COLORS["accepted"])):
        fig.add_trace(go.Bar(y=labels, x=frame[column], name=name, orientation="h", marker_color=color,
                             text=[f"{v:.1f}" for v in frame[column]], textposition="auto"))
    fig.update_layout(barmode="group", height=120 + 50 * len(labels))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, "tokens/s", "")


def peer_acceptance_figure(rows: dict[str, Sequence[float]],
                           title: str = "The same draft, acceptance by position") -> go.Figure:
    """rows: {engine and draft: per_position_accept}; one trace each, named by its key."""
    fig = go.Figure()
    for i, (name, values) in enumerate(rows.items()):
        fig.add_trace(go.Bar(x=list(range(1, len(values) + 1)), y=list(values), name=name,
                             marker_color=GROUP_COLORS[i % len(GROUP_COLORS)]))
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "draft position", "P(accept | earlier accepted)")
