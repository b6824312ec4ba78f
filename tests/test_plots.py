"""scylla.plots: every function returns a plotly Figure with the traces the pages rely on."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from scylla import plots
from scylla.laws import fit_loglinear


def names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data]


def law_points(groups: bool = False) -> pd.DataFrame:
    x = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    y = 2.0 - 0.15 * np.log(x) + np.array([0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.005])
    df = pd.DataFrame({"x": x, "y": y})
    if groups:
        df["method"] = ["a", "b"] * 3 + ["a"]
    return df


def test_law_figure_has_data_fit_and_both_bands_on_log_x():
    pts = law_points()
    fit = fit_loglinear(pts["x"], pts["y"])
    pred = fit.predict(plots.log_grid(1, 256), alpha=0.05)
    extra = fit.predict(np.array([256.0]))
    ref = pd.DataFrame({"x": [2, 4], "y": [1.8, 1.7], "label": ["EAGLE-3", "EAGLE-3"]})
    sat = pd.DataFrame({"x": [1, 10, 100], "mean": [2.0, 1.7, 1.5]})
    fig = plots.law_figure(pts, pred, x_label="batch size", y_label="ratio", reference=ref,
                           saturating=sat, extrapolation=extra)
    assert isinstance(fig, go.Figure)
    assert names(fig) == ["prediction band", "confidence band", "fit", "data", "saturating fit",
                          "extrapolation", "published reference"]
    assert fig.layout.xaxis.type == "log"
    band = fig.data[0]
    assert len(band.x) == 2 * len(pred)  # closed polygon: upper edge then lower edge back
    # the prediction band contains the confidence band
    assert np.all(pred["pred_high"] >= pred["conf_high"]) and np.all(pred["pred_low"] <= pred["conf_low"])


def test_law_figure_groups_and_points_only():
    pts = law_points(groups=True)
    fig = plots.law_figure(pts, None, group_col="method")
    assert names(fig) == ["data: a", "data: b"]
    assert sum(len(t.x) for t in fig.data) == len(pts)
    lines = pd.DataFrame({"group": ["a", "a", "b", "b"], "x": [1, 64, 2, 32], "mean": [2, 1.4, 1.9, 1.5]})
    fig = plots.law_figure(pts, None, group_col="method", group_fits=lines)
    assert names(fig) == ["data: a", "fit: a", "data: b", "fit: b"]


def test_residual_and_qq_figures():
    r = np.array([0.1, -0.2, 0.05, 0.0, 0.3, -0.1])
    fig = plots.residual_figure(np.arange(6.0), r)
    assert names(fig) == ["residuals"] and list(fig.data[0].y) == list(r)
    qq = plots.qq_figure(r)
    assert names(qq) == ["residuals", "normal line"]
    assert sorted(qq.data[0].y) == sorted(r)
    assert names(plots.qq_figure([1.0])) == []  # too few points: an empty figure, no error


def test_diagnostics_figure_holds_residuals_and_qq_in_one_chart():
    fig = plots.diagnostics_figure([1.0, 2.0, 3.0, 4.0], [0.1, -0.2, 0.05, 0.05])
    assert [t.xaxis for t in fig.data] == ["x", "x2", "x2"]
    assert list(fig.data[0].y) == [0.1, -0.2, 0.05, 0.05]
    assert fig.layout.xaxis.title.text == "fitted" and fig.layout.xaxis2.title.text == "theoretical quantile"


def test_coefficient_figure():
    table = pd.DataFrame({"coef": [1.0, -0.2], "ci_low": [0.8, -0.3], "ci_high": [1.2, -0.1]},
                         index=["Intercept", "np.log(x)"])
    fig = plots.coefficient_figure(table)
    assert names(fig) == ["coef"] and list(fig.data[0].y) == ["Intercept", "np.log(x)"]


def test_live_figures():
    accepted, bonus = [0, 2, 6, 1], [1, 1, 1, 0]
    fig = plots.step_accept_figure(accepted, k=6, bonus=bonus)
    assert names(fig) == ["accepted", "bonus / target token"] and list(fig.data[0].x) == [1, 2, 3, 4]
    hist = plots.accept_hist_figure(accepted, k=6)
    assert names(hist) == ["steps"]
    assert list(hist.data[0].y) == [1, 1, 1, 0, 0, 0, 1]
    assert list(plots.accept_hist_figure([], k=3).data[0].y) == [0, 0, 0, 0]
    pos = plots.per_position_figure([0.9, 0.7, 0.5])
    assert names(pos) == ["per_position_accept"] and list(pos.data[0].x) == [1, 2, 3]
    tps = plots.throughput_figure(20.0, 35.0)
    assert list(tps.data[0].x) == ["plain", "speculative"]


def test_draft_category_figure():
    runs = pd.DataFrame({"draft": ["ngram", "ngram", "scylla", "/c/drafts/sweep-ab12"],
                         "category": ["qa", "coding", "qa", "coding"], "tau": [1.5, 1.2, 2.5, 2.0]})
    fig = plots.draft_category_figure(runs, "tau")
    assert names(fig) == ["ngram", "scylla", "sweep-ab12"]
    assert names(plots.draft_category_figure(runs.iloc[0:0], "tau")) == []


def test_runs_overview_figure_pools_categories_and_names_drafts():
    runs = pd.DataFrame({"draft": ["ngram", "ngram", "/c/drafts/sweep-ab12", "scylla"],
                         "category": ["all", "qa", "all", "all"], "tau": [1.1, 1.4, 1.2, 1.3],
                         "speedup": [1.0, 1.2, 0.5, 0.6], "shape": ["chain:4"] * 4, "batch": [1] * 4,
                         "temperature": [0.0] * 4})
    fig = plots.runs_overview_figure(runs)
    assert names(fig) == ["ngram", "scylla", "sweep-ab12", "speedup = tau"]
    assert list(fig.data[0].y) == [1.0]      # the per-category row is not a run of its own
    assert names(plots.runs_overview_figure(runs.iloc[0:0])) == []


def test_log_grid():
    g = plots.log_grid(1, 1000, n=4)
    assert np.allclose(g, [1, 10, 100, 1000])
