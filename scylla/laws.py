"""Scaling-law fits with statsmodels: metric = intercept + slope * ln(x), and friends.

No SQL here: functions take arrays or DataFrames (scylla.store gives them).
Standard errors are HC3 (heteroskedasticity-robust, good at small n) with t
quantiles on the residual degrees of freedom: sweeps give 4-10 points per law,
where normal quantiles would make intervals too narrow.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import tokenize
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy.optimize import curve_fit

from scylla import ScyllaError, one_line
from scylla.options import AXES


# ---------------------------------------------------------------- the log-linear law


@dataclass
class LawFit:
    slope: float
    intercept: float
    r2: float
    n: int
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    slope_se: float
    p_value: float                       # H0: slope = 0
    loo_rel_err: float | None            # mean |y_i - yhat_(-i)| / |y_i|
    holdout_largest_rel_err: float | None  # fit without the largest x, predict it
    x_min: float
    x_max: float
    x: np.ndarray
    y: np.ndarray
    fitted: np.ndarray
    residuals: np.ndarray
    cov_type: str                        # 'HC3', or 'nonrobust' where HC3 is undefined
    result: Any = field(repr=False)

    def predict(self, x_new, alpha: float = 0.05) -> pd.DataFrame:
        """Mean and its confidence band, and the prediction band for a new observation."""
        x_new = np.atleast_1d(np.asarray(x_new, dtype=float))
        if not np.all(np.isfinite(x_new)) or np.any(x_new <= 0):
            raise ScyllaError("predict: x must be finite and > 0 (the law is in ln x)")
        exog = np.column_stack([np.ones_like(x_new), np.log(x_new)])
        frame = self.result.get_prediction(exog).summary_frame(alpha=alpha)
        return pd.DataFrame({
            "x": x_new, "mean": frame["mean"].to_numpy(),
            "conf_low": frame["mean_ci_lower"].to_numpy(), "conf_high": frame["mean_ci_upper"].to_numpy(),
            "pred_low": frame["obs_ci_lower"].to_numpy(), "pred_high": frame["obs_ci_upper"].to_numpy()})

    def to_json(self) -> dict:
        return jsonable({
            "slope": self.slope, "intercept": self.intercept, "r2": self.r2, "n": self.n,
            "slope_ci": list(self.slope_ci), "loo_rel_err": self.loo_rel_err,
            "x_min": self.x_min, "x_max": self.x_max,
            "model": "y = intercept + slope * ln(x)", "slope_se": self.slope_se,
            "intercept_ci": list(self.intercept_ci), "p_value": self.p_value,
            "holdout_largest_rel_err": self.holdout_largest_rel_err, "cov_type": self.cov_type,
        })


def fit_loglinear(x, y) -> LawFit:
    """OLS of y on ln(x) with HC3 standard errors, plus leave-one-out and hold-out errors."""
    x, y = check_xy(x, y)
    u = np.log(x)
    result, cov_type = ols_hc3(y, np.column_stack([np.ones_like(u), u]))
    intercept, slope = result.params
    ci = result.conf_int(alpha=0.05)
    return LawFit(
        slope=float(slope), intercept=float(intercept), r2=float(result.rsquared), n=len(x),
        slope_ci=(float(ci[1, 0]), float(ci[1, 1])), intercept_ci=(float(ci[0, 0]), float(ci[0, 1])),
        slope_se=float(result.bse[1]), p_value=float(result.pvalues[1]),
        loo_rel_err=mean_rel_err(y, loo_predictions(u, y)),
        holdout_largest_rel_err=holdout_largest_rel_err(u, y),
        x_min=float(x.min()), x_max=float(x.max()), x=x, y=y,
        fitted=np.asarray(result.fittedvalues), residuals=np.asarray(result.resid),
        cov_type=cov_type, result=result)


def check_xy(x, y) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(x, dtype=float).ravel()
        y = np.asarray(y, dtype=float).ravel()
    except (TypeError, ValueError):
        raise ScyllaError("x and y must be numbers") from None
    if len(x) != len(y):
        raise ScyllaError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) == 0:
        raise ScyllaError("no points to fit: the selection is empty")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ScyllaError("x or y contains NaN or infinite values")
    if len(x) < 3:
        raise ScyllaError(f"need at least 3 points to fit a law, got {len(x)}")
    if np.any(x <= 0):
        raise ScyllaError(f"the law is in ln(x): x must be > 0, got min x = {x.min():g}")
    if len(np.unique(x)) < 2:
        raise ScyllaError(f"all points share x = {x[0]:g}: need at least 2 distinct x values")
    return x, y


def ols_hc3(y, X):
    """OLS with HC3 errors and t quantiles; falls back to classical errors where HC3 is undefined
    (a point with leverage 1, e.g. the only point at its x among two x values)."""
    result = sm.OLS(y, X).fit(cov_type="HC3", use_t=True)
    if np.all(np.isfinite(result.bse)):
        return result, "HC3"
    return sm.OLS(y, X).fit(), "nonrobust"


def loo_predictions(u, y) -> np.ndarray:
    """Prediction of each y_i from the line fitted without it; NaN where that line is undefined."""
    n = len(u)
    preds = np.full(n, np.nan)
    for i in range(n):
        keep = np.arange(n) != i
        if len(np.unique(u[keep])) >= 2:
            slope, intercept = np.polyfit(u[keep], y[keep], 1)
            preds[i] = intercept + slope * u[i]
    return preds


def holdout_largest_rel_err(u, y) -> float | None:
    """Extrapolation check: fit without the points at the largest x, predict them."""
    held = u == u.max()
    if len(np.unique(u[~held])) < 2:
        return None
    slope, intercept = np.polyfit(u[~held], y[~held], 1)
    return mean_rel_err(y[held], intercept + slope * u[held])


def mean_rel_err(y, pred) -> float | None:
    """Mean |y - pred| / |y| over points with a prediction and y != 0."""
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    ok = np.isfinite(pred) & (y != 0)
    if not ok.any():
        return None
    return float(np.mean(np.abs(y[ok] - pred[ok]) / np.abs(y[ok])))


# ---------------------------------------------------------------- comparing groups

def compare_groups(df: pd.DataFrame, x_col: str, y_col: str, group_col: str) -> dict:
    """Do the groups share one slope? F-test of y ~ ln x + C(group) against y ~ ln x * C(group).

    The restricted model keeps a separate intercept per group, so the test is about
    the slopes alone. `F_any` / `p_value_any` test y ~ ln x (one line for all) against
    the full model: do the groups differ at all. Classical (non-robust) F-tests.
    """
    _need_columns(df, [x_col, y_col, group_col])
    data = df[[x_col, y_col, group_col]].dropna()
    x, y = check_xy(data[x_col], data[y_col])
    groups = data[group_col].astype(str).to_numpy()
    names = sorted(set(groups))
    if len(names) < 2:
        raise ScyllaError(f"need at least 2 groups in {group_col!r}, got {len(names)}")
    u = np.log(x)
    dummies = np.column_stack([(groups == g).astype(float) for g in names[1:]])
    ones = np.ones_like(u)
    pooled = sm.OLS(y, np.column_stack([ones, u])).fit()
    common_slope = sm.OLS(y, np.column_stack([ones, u, dummies])).fit()
    full = sm.OLS(y, np.column_stack([ones, u, dummies, dummies * u[:, None]])).fit()
    if full.df_resid < 1:
        raise ScyllaError(f"too few points ({len(y)}) for separate lines in {len(names)} groups")
    f_slope, p_slope, df_num = full.compare_f_test(common_slope)
    f_any, p_any, df_any = full.compare_f_test(pooled)
    slopes = {}
    for g in names:
        law = fit_loglinear(x[groups == g], y[groups == g])
        slopes[g] = {"slope": law.slope, "slope_ci": list(law.slope_ci), "intercept": law.intercept, "n": law.n}
    return jsonable({
        "test": "equal slopes: y ~ ln(x) + C(group) vs y ~ ln(x) * C(group)",
        "F": f_slope, "p_value": p_slope, "df_num": df_num, "df_den": full.df_resid,
        "F_any": f_any, "p_value_any": p_any, "df_num_any": df_any,
        "groups": names, "slopes": slopes, "n": len(y)})


# ---------------------------------------------------------------- shape: log-linear or saturating?

def saturating(x, a, b, c):
    """y = a - b * x**(-c): approaches the ceiling a as x grows (c > 0)."""
    return a - b * np.power(x, -c)


def fit_saturating(x, y) -> dict:
    """Least-squares fit of y = a - b * x**(-c), c in [1e-3, 10], from a few starts.

    x is divided by its minimum first (the tokens axis spans 1e6-1e9; x**-c would
    underflow the optimizer); b is reported for the original x.
    """
    x, y = check_xy(x, y)
    n = len(x)
    if n < 4:
        return {"converged": False, "reason": "needs at least 4 points (3 parameters)",
                "params": None, "aic": None, "sse": None, "n": n}
    scale = x.min()
    xs = x / scale
    rising = np.polyfit(np.log(xs), y, 1)[0] >= 0
    spread = max(np.ptp(y), 1e-12)
    a0 = y.max() + 0.1 * spread if rising else y.min() - 0.1 * spread
    best = None
    for c0 in (0.1, 0.5, 1.0, 2.0):
        try:
            p, _ = curve_fit(saturating, xs, y, p0=[a0, a0 - y[xs == 1].mean(), c0],
                             bounds=([-np.inf, -np.inf, 1e-3], [np.inf, np.inf, 10.0]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((y - saturating(xs, *p)) ** 2))
        if np.all(np.isfinite(p)) and np.isfinite(sse) and (best is None or sse < best[1]):
            best = (p, sse)
    if best is None:
        return {"converged": False, "reason": "curve_fit did not converge from any start",
                "params": None, "aic": None, "sse": None, "n": n}
    (a, b_scaled, c), sse = best
    return jsonable({
        "converged": True, "params": {"a": a, "b": b_scaled * scale ** c, "c": c},
        "ceiling": a, "c_at_bound": bool(c <= 1.001e-3 or c >= 9.99),
        "sse": sse, "aic": gaussian_aic(sse, n, 3), "n": n})


def gaussian_aic(sse: float, n: int, k: int) -> float:
    """AIC of a least-squares fit up to a constant shared by all models on the same data."""
    return n * math.log(max(sse, 1e-300) / n) + 2 * k


SHAPE_RULE = ("dAIC = AIC(log-linear) - AIC(saturating). The log-linear law is the c -> 0 limit "
              "of the saturating curve, so dAIC >= -2 up to optimizer error. dAIC > 2: "
              "'saturating' (the extra parameter more than pays for itself); dAIC < 0: "
              "'log-linear' (it does not pay at all); otherwise 'indistinguishable'.")


def compare_shapes(x, y) -> dict:
    """Log-linear vs saturating by AIC, with the rule in SHAPE_RULE."""
    x, y = check_xy(x, y)
    law = fit_loglinear(x, y)
    aic_log = gaussian_aic(float(np.sum(law.residuals ** 2)), len(x), 2)
    sat = fit_saturating(x, y)
    out = {"aic_loglinear": aic_log, "aic_saturating": sat["aic"], "saturating": sat, "rule": SHAPE_RULE}
    if not sat["converged"]:
        return jsonable({**out, "delta_aic": None, "verdict": "indistinguishable",
                         "reason": sat["reason"]})
    delta = aic_log - sat["aic"]
    verdict = "saturating" if delta > 2 else "log-linear" if delta < 0 else "indistinguishable"
    return jsonable({**out, "delta_aic": delta, "verdict": verdict})


# ---------------------------------------------------------------- joint law over the axes

@dataclass
class JointFit:
    metric: str
    terms: list[str]              # axes that vary in the data, each entering as ln(axis)
    n: int
    r2: float
    params: dict                  # 'intercept' and 'ln_<axis>'
    conf_int: dict
    ranges: dict                  # axis -> [min, max] seen in the data
    fixed: dict                   # axes present but constant -> their one value
    cov_type: str
    result: Any = field(repr=False)

    def predict(self, frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
        _need_columns(frame, self.terms)
        values = frame[self.terms].to_numpy(dtype=float)
        if np.any(~np.isfinite(values)) or np.any(values <= 0):
            raise ScyllaError(f"predict: {', '.join(self.terms)} must be finite and > 0")
        exog = np.column_stack([np.ones(len(frame)), np.log(values)])
        sf = self.result.get_prediction(exog).summary_frame(alpha=alpha)
        return pd.DataFrame({"mean": sf["mean"].to_numpy(),
                             "conf_low": sf["mean_ci_lower"].to_numpy(), "conf_high": sf["mean_ci_upper"].to_numpy(),
                             "pred_low": sf["obs_ci_lower"].to_numpy(), "pred_high": sf["obs_ci_upper"].to_numpy()},
                            index=frame.index)

    def to_json(self) -> dict:
        return jsonable({"metric": self.metric, "terms": self.terms, "n": self.n, "r2": self.r2,
                         "params": self.params, "conf_int": self.conf_int, "ranges": self.ranges,
                         "fixed": self.fixed, "cov_type": self.cov_type,
                         "model": f"{self.metric} = intercept + " + " + ".join(f"b_{t} * ln({t})" for t in self.terms)})


def fit_joint(df: pd.DataFrame, metric: str, axes=AXES) -> JointFit:
    """OLS metric ~ ln(axis) for every axis that varies in df (others are held where they are)."""
    _need_columns(df, [metric])
    present = [a for a in axes if a in df.columns]
    data = df[[metric, *present]].apply(pd.to_numeric, errors="coerce").dropna()
    terms = [a for a in present if data[a].nunique() > 1]
    if not terms:
        raise ScyllaError(f"no axis varies among the {len(data)} rows with {metric}: nothing to fit")
    if (data[terms] <= 0).any().any():
        raise ScyllaError(f"{', '.join(terms)} must be > 0 (they enter as logarithms)")
    if len(data) < len(terms) + 2:
        raise ScyllaError(f"{len(data)} rows are too few for {len(terms)} axes (need {len(terms) + 2})")
    X = np.column_stack([np.ones(len(data)), np.log(data[terms].to_numpy(dtype=float))])
    result, cov_type = ols_hc3(data[metric].to_numpy(dtype=float), X)
    names = ["intercept", *[f"ln_{t}" for t in terms]]
    ci = result.conf_int(alpha=0.05)
    return JointFit(
        metric=metric, terms=terms, n=len(data), r2=float(result.rsquared),
        params=dict(zip(names, map(float, result.params))),
        conf_int={nm: [float(lo), float(hi)] for nm, (lo, hi) in zip(names, ci)},
        ranges={t: [float(data[t].min()), float(data[t].max())] for t in terms},
        fixed={a: float(data[a].iloc[0]) for a in present if a not in terms},
        cov_type=cov_type, result=result)


# ---------------------------------------------------------------- the regression lab

FORMULA_KINDS = ("ols", "wls", "glm")
GLM_FAMILIES = {"gaussian": sm.families.Gaussian, "binomial": sm.families.Binomial,
                "poisson": sm.families.Poisson, "gamma": sm.families.Gamma}
# patsy evaluates formula terms as Python, so a formula may only name columns,
# patsy's helpers and a few numpy functions.
_FORMULA_NAMES = {"np", "C", "I", "Q", "center", "standardize", "scale", "bs", "cr", "cc", "te",
                  "Treatment", "Sum", "Poly", "Diff", "Helmert", "True", "False"}
_NP_FUNCS = {"log", "log2", "log10", "log1p", "exp", "expm1", "sqrt", "square", "abs", "power",
             "reciprocal", "clip", "minimum", "maximum", "sign", "floor", "ceil", "round", "tanh"}


def fit_formula(df: pd.DataFrame, formula: str, kind: str = "ols", weights_col: str | None = None,
                family: str = "gaussian", robust: bool = True) -> dict:
    """Fit a statsmodels formula (patsy syntax; `np` is available, e.g. y ~ np.log(tokens)).

    Returns JSON-able numbers plus `result` (the statsmodels results object, for plots).
    robust: HC3 errors for ols/wls (glm keeps its model-based errors).
    """
    if kind not in FORMULA_KINDS:
        raise ScyllaError(f"unknown model kind {kind!r}; choose one of {', '.join(FORMULA_KINDS)}")
    check_formula(formula, df.columns)
    data = df.copy()
    kwargs = {"data": data, "eval_env": {"np": np}}
    if kind == "wls":
        if not weights_col:
            raise ScyllaError("wls needs a weights column")
        _need_columns(df, [weights_col])
        data = data[pd.to_numeric(data[weights_col], errors="coerce") > 0]
        kwargs.update(data=data, weights=data[weights_col].astype(float).to_numpy())
    try:
        if kind == "ols":
            result = smf.ols(formula, **kwargs).fit(**({"cov_type": "HC3", "use_t": True} if robust else {}))
        elif kind == "wls":
            result = smf.wls(formula, **kwargs).fit(**({"cov_type": "HC3", "use_t": True} if robust else {}))
        else:
            if family not in GLM_FAMILIES:
                raise ScyllaError(f"unknown glm family {family!r}; choose one of {', '.join(GLM_FAMILIES)}")
            result = smf.glm(formula, family=GLM_FAMILIES[family](), **kwargs).fit()
    except ScyllaError:
        raise
    except Exception as e:           # patsy / statsmodels / numpy: shown to the user on one line
        raise ScyllaError(f"cannot fit {formula!r}: {_one_line(e)}") from None
    ci = result.conf_int()
    r2 = getattr(result, "rsquared", None) if kind != "glm" else _glm_pseudo_r2(result)
    return {**jsonable({
        "kind": kind, "formula": formula, "n": int(result.nobs), "r2": r2, "aic": result.aic,
        "params": result.params.to_dict(), "bse": result.bse.to_dict(), "pvalues": result.pvalues.to_dict(),
        "conf_int": {k: [lo, hi] for k, (lo, hi) in zip(ci.index, ci.to_numpy())},
        "fitted": np.asarray(result.fittedvalues), "residuals": np.asarray(result.resid_response
                                                                           if kind == "glm" else result.resid),
        "summary": str(result.summary())}), "result": result}


def check_formula(formula: str, columns) -> None:
    """Refuse names that are not columns, patsy helpers or np.<whitelisted function>."""
    if not isinstance(formula, str) or "~" not in formula:
        raise ScyllaError("a formula looks like 'y ~ np.log(tokens) + C(draft_kind)'")
    columns = {str(c) for c in columns}
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(formula).readline)
                  if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError, IndentationError) as e:
        raise ScyllaError(f"cannot read formula (unbalanced parentheses?): {e.args[0] if e.args else e}") from None
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1].string if i else None
        if tok.type == tokenize.OP and tok.string == "." and prev != "np":
            raise ScyllaError("only np.<function> may use '.' in a formula (quote odd column names with Q(\"...\"))")
        if tok.type != tokenize.NAME:
            continue
        if prev == ".":
            if tok.string not in _NP_FUNCS:
                raise ScyllaError(f"np.{tok.string} is not allowed; allowed: {', '.join(sorted(_NP_FUNCS))}")
        elif tok.string not in columns and tok.string not in _FORMULA_NAMES:
            raise ScyllaError(f"unknown name {tok.string!r} in formula; columns: {', '.join(sorted(columns))}")


def _glm_pseudo_r2(result) -> float | None:
    try:
        return float(result.pseudo_rsquared())
    except Exception:      # some families / statsmodels versions lack it; the number is optional
        return None


# ---------------------------------------------------------------- recommending a draft

# Cost model when no speedup was measured, in units of one plain target forward:
# a step costs 1 (verify) + c_verify per drafted token + c_draft per draft layer per
# drafted token. Defaults: one draft layer ~ one of SmolLM2's 30 layers plus its
# share of the LM head (~0.035); a verify forward over 8-16 tokens costs 1.5-2x a
# one-token forward (measured on the first CPU this ran on), i.e. ~0.06 per extra token.
DEFAULT_C_DRAFT = 0.035
DEFAULT_C_VERIFY = 0.06


def recommend(runs_df: pd.DataFrame, batch: int, budget_tokens: int,
              layer_choices=(1, 2, 3, 4), k_choices=tuple(range(2, 9))) -> dict:
    """Pick (layers, tokens <= budget, k) with the highest predicted speedup at `batch`.

    tau comes from a joint log-linear fit over the axes that vary in the runs (k
    included). Speedup comes from a joint fit of measured speedups when there are
    enough, else from tau and the cost model above. An axis the runs never varied
    is not extrapolated: its choices shrink to the value(s) measured.
    `best` has the columns of the predictions table (store.insert_prediction takes it).
    """
    axes = ("tokens", "layers", "batch", "k")
    _need_columns(runs_df, ["tau", *axes])
    if budget_tokens <= 0 or batch <= 0:
        raise ScyllaError("batch and budget_tokens must be > 0")
    data = runs_df.copy()
    for col in ("tau", "speedup", *axes):
        if col in data:
            data[col] = pd.to_numeric(data[col], errors="coerce")
    data = data.dropna(subset=["tau", *axes])
    if "category" in data:
        data = data[data["category"].isna() | (data["category"] == "all")]
    tau_law = fit_joint(data, "tau", axes)
    warnings = []

    def choices(axis, wanted):
        if axis in tau_law.terms:
            return sorted(set(wanted))
        seen = sorted(set(data[axis].tolist()))   # tolist: plain ints in the message, not np.int32(4)
        warnings.append(f"{axis} never varied in the runs: only {', '.join(f'{v:g}' for v in seen)} considered")
        return seen

    layer_opts = choices("layers", layer_choices)
    k_opts = choices("k", k_choices)
    if "tokens" in tau_law.terms:    # every measured volume within budget, and the budget itself
        token_opts = sorted({t for t in data["tokens"] if t <= budget_tokens} | {budget_tokens})
    else:
        token_opts = [t for t in choices("tokens", []) if t <= budget_tokens]
        if not token_opts:
            raise ScyllaError(f"every measured draft used more than {budget_tokens} tokens, "
                              "and the runs never varied tokens: nothing to recommend")
    if "batch" not in tau_law.terms and batch not in set(data["batch"]):
        warnings.append(f"batch never varied in the runs (all {tau_law.fixed['batch']:g}): "
                        f"predictions are for that batch, not {batch}")
    grid = pd.DataFrame(list(itertools.product(layer_opts, token_opts, k_opts)), columns=["layers", "tokens", "k"])
    grid["batch"] = batch
    tau = tau_law.predict(grid)
    cap = grid["k"] + 1.0                    # a chain of k drafts yields at most k + 1 tokens
    grid["predicted_tau"] = tau["mean"].clip(1.0, cap)
    grid["tau_low"] = tau["pred_low"].clip(1.0, cap)
    grid["tau_high"] = tau["pred_high"].clip(1.0, cap)

    speed_law, cost = None, None
    speed_rows = data.dropna(subset=["speedup"]) if "speedup" in data else data.iloc[:0]
    try:
        speed_law = fit_joint(speed_rows, "speedup", axes) if len(speed_rows) else None
    except ScyllaError as e:
        warnings.append(f"no speedup law ({e}); using the cost model")
    if speed_law is not None:
        method = "speedup-fit"
        speed = speed_law.predict(grid)
        grid["predicted_speedup"] = speed["mean"]
        grid["speedup_low"], grid["speedup_high"] = speed["pred_low"], speed["pred_high"]
    else:
        method = "cost-model"
        cost = cost_constants(data)
        step_cost = 1 + cost["c_draft"] * grid["layers"] * grid["k"] + cost["c_verify"] * grid["k"]
        grid["predicted_speedup"] = grid["predicted_tau"] / step_cost
        grid["speedup_low"], grid["speedup_high"] = grid["tau_low"] / step_cost, grid["tau_high"] / step_cost
    grid["extrapolated"] = [any(not lo <= row[t] <= hi for t, (lo, hi) in tau_law.ranges.items())
                            for _, row in grid.iterrows()]
    grid = grid.sort_values("predicted_speedup", ascending=False, kind="stable").reset_index(drop=True)
    best = grid.iloc[0]
    if best["extrapolated"]:
        warnings.append("the best choice lies outside the measured ranges: an extrapolation")
    return jsonable({
        "best": {"batch": batch, "budget_tokens": budget_tokens, "layers": best["layers"],
                 "tokens": best["tokens"], "k": best["k"],
                 **{c: best[c] for c in ("predicted_tau", "tau_low", "tau_high",
                                         "predicted_speedup", "speedup_low", "speedup_high")}},
        "method": method, "cost_model": cost, "tau_law": tau_law.to_json(),
        "speedup_law": speed_law.to_json() if speed_law else None,
        "candidates": grid.to_dict(orient="records"), "warnings": warnings,
        "inputs": {"batch": batch, "budget_tokens": budget_tokens, "layer_choices": list(layer_choices),
                   "k_choices": list(k_choices), "n_runs": len(data)},
        "interval": "95% prediction interval of tau; speedup bounds carry the tau band only "
                    "(cost constants taken as exact) unless a speedup law was fitted"})


def cost_constants(data: pd.DataFrame) -> dict:
    """c_draft, c_verify from measured per-step draft_ms / verify_ms, else the defaults.

    One plain forward takes 1000 * batch / baseline_tokens_per_s ms.
    """
    cols = ["draft_ms", "verify_ms", "baseline_tokens_per_s", "layers", "k", "batch"]
    if not all(c in data for c in cols):
        return {"c_draft": DEFAULT_C_DRAFT, "c_verify": DEFAULT_C_VERIFY, "origin": "defaults"}
    d = data[cols].apply(pd.to_numeric, errors="coerce").dropna()
    d = d[(d > 0).all(axis=1)]
    if d.empty:
        return {"c_draft": DEFAULT_C_DRAFT, "c_verify": DEFAULT_C_VERIFY, "origin": "defaults"}
    forward_ms = 1000.0 * d["batch"] / d["baseline_tokens_per_s"]
    c_draft = float(np.median(d["draft_ms"] / (forward_ms * d["layers"] * d["k"])))
    c_verify = float(np.median((d["verify_ms"] - forward_ms).clip(lower=0) / (forward_ms * d["k"])))
    return {"c_draft": c_draft, "c_verify": c_verify, "origin": f"median of {len(d)} measured runs"}


# ---------------------------------------------------------------- `scylla fit`

def fit_command(args) -> dict:
    """The `scylla fit` contract (its JSON keys are what other tools read): fit, return the JSON dict, write it to --json."""
    db, csv = getattr(args, "db", None), getattr(args, "csv", None)
    if bool(db) == bool(csv):
        raise ScyllaError("give exactly one of --db (with --axis, --metric) or --csv (with --x, --y)")
    filters = parse_filters(getattr(args, "filter", None) or [])
    if db:
        from scylla import store
        axis, metric = getattr(args, "axis", None), getattr(args, "metric", None)
        if not axis or not metric:
            raise ScyllaError(f"--db needs --axis ({'|'.join(store.AXES)}) and --metric ({'|'.join(store.METRICS)})")
        points = store.axis_points(db, axis, metric, filters)
        label = {"source": "db", "db": str(db), "axis": axis, "metric": metric}
        ids = points["id"].tolist() if "id" in points else []
    else:
        points, label = csv_points(csv, getattr(args, "x", None), getattr(args, "y", None), filters)
        ids = []
    if points.empty:
        raise ScyllaError(f"no points match the selection {filters or '(no filters)'}: nothing to fit")
    law = fit_loglinear(points["x"], points["y"])
    out = {**law.to_json(), **label, "filters": filters,
           "points": [[float(a), float(b)] for a, b in zip(points["x"], points["y"])],
           "shape": compare_shapes(law.x, law.y)}
    if ids:
        out["run_ids"] = ids
        out["mixed_settings"] = mixed_settings(points, axis, filters)
    if db:
        out["law_id"], out["law_not_stored"] = _store_law(db, out)
    out = jsonable(out)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, allow_nan=False)
    return out


# Settings that change tau or speedup on their own: a law over points that differ in
# one of them (besides its own axis) mixes two curves, e.g. T=0 and T=1 rows.
SETTINGS = ("target", "quant", "temperature", "top_p", "shape", "k", "batch", "fusion",
            "draft_vocab", "tokens", "layers", "prompt_set")


def mixed_settings(points: pd.DataFrame, axis: str, filters: dict) -> dict:
    """{column: distinct values} for each setting that varies among the fitted points."""
    mixed = {}
    for col in SETTINGS:
        if col == axis or col in filters or col not in points:
            continue
        values = sorted(points[col].dropna().unique().tolist())
        if len(values) > 1:
            mixed[col] = values
    return mixed


def parse_filters(items: list[str]) -> dict:
    if isinstance(items, str):
        items = [items]
    filters = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ScyllaError(f"bad filter {item!r}: expected key=value")
        filters[key.strip()] = value.strip()
    return filters


def csv_points(path, x_col, y_col, filters: dict) -> tuple[pd.DataFrame, dict]:
    """Rows of a CSV that match the filters, as columns x, y (rows with a missing x or y dropped).

    A filter on a numeric column compares numbers (batch_size=8 matches 8.0);
    on any other column it compares the stripped text.
    """
    if not x_col or not y_col:
        raise ScyllaError("--csv needs --x COLUMN and --y COLUMN")
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise ScyllaError(f"no such CSV file: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ScyllaError(f"cannot read CSV {path}: {_one_line(e)}") from None
    _need_columns(df, [x_col, y_col, *filters], where=str(path))
    keep = pd.Series(True, index=df.index)
    for key, value in filters.items():
        col = df[key]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            try:
                keep &= col == float(value)
            except ValueError:
                raise ScyllaError(f"filter {key}={value}: {key!r} holds numbers") from None
        else:
            keep &= col.astype(str).str.strip() == value
    rows = df[keep]
    x = pd.to_numeric(rows[x_col], errors="coerce")
    y = pd.to_numeric(rows[y_col], errors="coerce")
    ok = x.notna() & y.notna()
    points = pd.DataFrame({"x": x[ok].to_numpy(dtype=float), "y": y[ok].to_numpy(dtype=float)})
    return points, {"source": "csv", "csv": str(path), "x": x_col, "y": y_col,
                    "dropped_missing": int((~ok).sum())}


def _store_law(db, out: dict) -> tuple[str | None, str | None]:
    """Record the law in the store; a locked or read-only store skips it, not the fit."""
    from scylla import store
    try:
        law_id = store.insert_law(db, {
            "axis": out["axis"], "metric": out["metric"], "filters": out["filters"], "n": out["n"],
            "slope": out["slope"], "intercept": out["intercept"], "r2": out["r2"],
            "slope_ci": out["slope_ci"], "loo_rel_err": out["loo_rel_err"],
            "x_min": out["x_min"], "x_max": out["x_max"], "selection": out["points"]}, wait_s=2.0)
        return law_id, None
    except ScyllaError as e:
        return None, str(e)


# ---------------------------------------------------------------- helpers

def _need_columns(df: pd.DataFrame, cols, where: str = "the data") -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ScyllaError(f"no column {', '.join(map(repr, missing))} in {where}; "
                          f"columns: {', '.join(map(str, df.columns))}")


_one_line = one_line


def jsonable(obj):
    """numpy -> Python, NaN / inf -> None, tuples and arrays -> lists: safe for json.dump."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray | pd.Series):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
