"""Scaling-law fits: coefficients, intervals, tests, shapes, the `scylla fit` contract."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from scylla import ScyllaError
from scylla import laws, store

REFERENCE_CSV = Path(__file__).resolve().parents[1] / "scylla" / "reference_results.csv"
CONTRACT_KEYS = {"slope", "intercept", "r2", "n", "slope_ci", "loo_rel_err", "x_min", "x_max"}


def fit_args(**kw):
    base = {"db": None, "axis": None, "metric": None, "filter": [], "csv": None, "x": None, "y": None, "json": None}
    base.update(kw)
    return argparse.Namespace(**base)


def law_data(rng, slope=0.15, intercept=1.2, noise=0.03, n_each=2):
    x = np.repeat(np.geomspace(1e6, 1e9, 8), n_each)
    return x, intercept + slope * np.log(x) + rng.normal(0, noise, len(x))


# ---------------------------------------------------------------- fit_loglinear

def test_known_coefficients_recovered():
    x, y = law_data(np.random.default_rng(5))
    law = laws.fit_loglinear(x, y)
    assert law.n == 16 and law.x_min == 1e6 and law.x_max == 1e9
    assert law.slope_ci[0] < 0.15 < law.slope_ci[1]
    assert law.intercept_ci[0] < 1.2 < law.intercept_ci[1]
    assert law.slope == pytest.approx(0.15, abs=0.01) and law.r2 > 0.95
    assert law.cov_type == "HC3" and law.p_value < 1e-6
    assert np.allclose(law.fitted + law.residuals, y)
    pred = law.predict([1e7, 1e10])
    truth = 1.2 + 0.15 * np.log([1e7, 1e10])
    assert np.all((pred["conf_low"] < truth) & (truth < pred["conf_high"]))
    assert np.all(pred["pred_low"] < pred["conf_low"]) and np.all(pred["pred_high"] > pred["conf_high"])
    assert np.all(pred["conf_high"] - pred["conf_low"] > 0)
    out = law.to_json()
    assert CONTRACT_KEYS <= set(out) and len(out["slope_ci"]) == 2
    json.dumps(out, allow_nan=False)


def test_slope_interval_coverage_is_calibrated():
    """The 95% HC3 interval covers the true slope in ~95% of simulated sweeps."""
    rng = np.random.default_rng(1)
    trials = 200
    covered = sum(lo < 0.15 < hi for lo, hi in
                  (laws.fit_loglinear(*law_data(rng, n_each=1)).slope_ci for _ in range(trials)))
    misses = trials - covered
    assert stats.binom.ppf(0.001, trials, 0.05) <= misses <= stats.binom.ppf(0.999, trials, 0.05)


def test_loo_error_by_hand():
    # ln x = 0, 1, 2, 3 and y = 1, 2, 3, 5. Lines fitted without each point, by hand:
    #   without u=0: y = 1/3 + 3/2 u  -> predicts 1/3  at 0, |1 - 1/3| / 1 = 2/3
    #   without u=1: y = 6/7 + 9/7 u  -> predicts 15/7 at 1, |2 - 15/7| / 2 = 1/14
    #   without u=2: y = 6/7 + 19/14 u -> predicts 25/7 at 2, |3 - 25/7| / 3 = 4/21
    #   without u=3: y = 1 + u        -> predicts 4    at 3, |5 - 4| / 5    = 1/5
    x, y = np.exp([0.0, 1.0, 2.0, 3.0]), [1.0, 2.0, 3.0, 5.0]
    law = laws.fit_loglinear(x, y)
    assert law.loo_rel_err == pytest.approx((2 / 3 + 1 / 14 + 4 / 21 + 1 / 5) / 4, rel=1e-12)
    assert law.loo_rel_err == pytest.approx(237 / 840, rel=1e-12)
    assert law.holdout_largest_rel_err == pytest.approx(1 / 5, rel=1e-12)


@pytest.mark.parametrize("x, y, message", [
    ([1, 2], [1, 2], "at least 3 points"),
    ([], [], "empty"),
    ([1, 0, 2], [1, 2, 3], "x must be > 0"),
    ([1, -2, 2], [1, 2, 3], "x must be > 0"),
    ([4, 4, 4], [1, 2, 3], "2 distinct x"),
    ([1, 2, np.nan], [1, 2, 3], "NaN"),
    ([1, 2, 3], [1, np.nan, 3], "NaN"),
    ([1, 2, 3], [1, 2], "length"),
])
def test_bad_input_is_a_clear_error(x, y, message):
    with pytest.raises(ScyllaError, match=message):
        laws.fit_loglinear(x, y)


# ---------------------------------------------------------------- the `scylla fit` contract

SGLANG_FILTERS = ["method=EAGLE-3", "engine_or_device=SGLang", "metric=throughput_ratio_vs_no_spec"]


def test_fit_csv_reproduces_plain_ols_on_published_sglang_rows(tmp_path):
    out_path = tmp_path / "law.json"
    out = laws.fit_command(fit_args(csv=str(REFERENCE_CSV), x="batch_size", y="value",
                                    filter=SGLANG_FILTERS, json=str(out_path)))
    ref = pd.read_csv(REFERENCE_CSV)
    rows = ref[(ref.method == "EAGLE-3") & (ref.engine_or_device == "SGLang")
               & (ref.metric == "throughput_ratio_vs_no_spec")]
    plain = sm.OLS(rows["value"].to_numpy(), sm.add_constant(np.log(rows["batch_size"].to_numpy()))).fit()
    assert out["n"] == len(rows) == 9
    assert out["intercept"] == pytest.approx(plain.params[0], rel=1e-12)
    assert out["slope"] == pytest.approx(plain.params[1], rel=1e-12)
    assert out["r2"] == pytest.approx(plain.rsquared, rel=1e-12)
    assert out["slope"] < 0 and 0.85 < out["r2"] < 0.95            # the README's quick check
    robust = sm.OLS(rows["value"].to_numpy(), sm.add_constant(np.log(rows["batch_size"].to_numpy()))
                    ).fit(cov_type="HC3", use_t=True).conf_int()[1]
    assert out["slope_ci"] == pytest.approx(list(robust), rel=1e-12)
    assert out["slope_ci"][1] < 0                                    # the decline is not noise
    assert (out["x_min"], out["x_max"]) == (2, 64)
    assert out["loo_rel_err"] > 0 and out["shape"]["verdict"] in ("log-linear", "saturating", "indistinguishable")
    written = json.loads(out_path.read_text())
    assert CONTRACT_KEYS <= set(written) and written["slope"] == out["slope"]


def test_fit_csv_errors(tmp_path):
    with pytest.raises(ScyllaError, match="no points match"):
        laws.fit_command(fit_args(csv=str(REFERENCE_CSV), x="batch_size", y="value",
                                  filter=["method=nonexistent"]))
    with pytest.raises(ScyllaError, match="no column"):
        laws.fit_command(fit_args(csv=str(REFERENCE_CSV), x="batch", y="value"))
    with pytest.raises(ScyllaError, match="key=value"):
        laws.fit_command(fit_args(csv=str(REFERENCE_CSV), x="batch_size", y="value", filter=["method"]))
    with pytest.raises(ScyllaError, match="holds numbers"):
        laws.fit_command(fit_args(csv=str(REFERENCE_CSV), x="batch_size", y="value", filter=["batch_size=big"]))
    with pytest.raises(ScyllaError, match="no such CSV"):
        laws.fit_command(fit_args(csv=str(tmp_path / "none.csv"), x="a", y="b"))
    with pytest.raises(ScyllaError, match="exactly one"):
        laws.fit_command(fit_args(csv=str(REFERENCE_CSV), db="x.duckdb", x="a", y="b"))


def test_fit_csv_numeric_filter_matches_numbers():
    out = laws.fit_command(fit_args(csv=str(REFERENCE_CSV), x="batch_size", y="value",
                                    filter=[*SGLANG_FILTERS, "temperature=0.0"]))
    assert out["n"] == 9


def test_fit_db_stores_the_law(tmp_path):
    db = tmp_path / "r.duckdb"
    rng = np.random.default_rng(2)
    tokens = np.geomspace(1e6, 1e8, 5)
    runs = [{"tokens": int(t), "layers": 1, "tau": 1.0 + 0.2 * math.log(t / 1e6) + rng.normal(0, 0.02),
             "category": "all"} for t in tokens]
    runs += [{"tokens": int(t), "layers": 2, "tau": 5.0, "category": "all"} for t in tokens]
    store.write_runs_atomic(db, runs)
    out = laws.fit_command(fit_args(db=str(db), axis="tokens", metric="tau", filter=["layers=1"],
                                    json=str(tmp_path / "o.json")))
    assert out["n"] == 5 and out["slope"] == pytest.approx(0.2, abs=0.03)
    assert out["law_id"] and out["law_not_stored"] is None and len(out["run_ids"]) == 5
    stored = store.laws_frame(db)
    assert list(stored["id"]) == [out["law_id"]]
    assert json.loads(stored.iloc[0]["selection"]) == out["points"]
    assert json.loads(stored.iloc[0]["filters"]) == {"layers": "1"}
    assert stored.iloc[0]["slope"] == out["slope"]
    assert out["mixed_settings"] == {}


def test_fit_db_reports_mixed_settings(tmp_path):
    db = tmp_path / "r.duckdb"
    runs = [{"tokens": t, "layers": 1, "temperature": temp, "tau": 1.0 + 0.1 * math.log(t) + temp,
             "category": "all"} for t in (1024, 4096, 16384) for temp in (0.0, 1.0)]
    store.write_runs_atomic(db, runs)
    out = laws.fit_command(fit_args(db=str(db), axis="tokens", metric="tau"))
    assert out["mixed_settings"] == {"temperature": [0.0, 1.0]}
    out = laws.fit_command(fit_args(db=str(db), axis="tokens", metric="tau", filter=["temperature=0"]))
    assert out["mixed_settings"] == {} and out["n"] == 3


def test_fit_db_empty_selection_is_an_error(tmp_path):
    db = tmp_path / "r.duckdb"
    store.init_db(db)
    with pytest.raises(ScyllaError, match="no points match"):
        laws.fit_command(fit_args(db=str(db), axis="tokens", metric="tau"))
    with pytest.raises(ScyllaError, match="needs --axis"):
        laws.fit_command(fit_args(db=str(db), metric="tau"))
    with pytest.raises(ScyllaError, match="no store"):
        laws.fit_command(fit_args(db=str(tmp_path / "none.duckdb"), axis="tokens", metric="tau"))


# ---------------------------------------------------------------- comparing groups

def two_groups(rng, slope_a, slope_b, n=6, noise=0.05):
    x = np.geomspace(1, 64, n)
    return pd.DataFrame({
        "batch": np.concatenate([x, x]),
        "tau": np.concatenate([2.0 + slope_a * np.log(x), 3.0 + slope_b * np.log(x)]) + rng.normal(0, noise, 2 * n),
        "method": ["a"] * n + ["b"] * n})


def test_f_test_detects_a_planted_slope_difference():
    df = two_groups(np.random.default_rng(3), -0.10, -0.30, n=8)
    out = laws.compare_groups(df, "batch", "tau", "method")
    assert out["p_value"] < 0.01
    assert out["df_num"] == 1 and out["df_den"] == 16 - 4
    assert out["slopes"]["a"]["slope"] == pytest.approx(-0.10, abs=0.06)
    assert out["slopes"]["b"]["slope"] == pytest.approx(-0.30, abs=0.06)
    # with one numerator df the F-test is the interaction term's t-test of the formula API
    interaction = smf.ols("tau ~ np.log(batch) * C(method)", df).fit()
    assert out["p_value"] == pytest.approx(interaction.pvalues["np.log(batch):C(method)[T.b]"], rel=1e-9)


def test_f_test_false_alarm_rate_at_equal_slopes():
    """Equal slopes (different intercepts): p < 0.05 in about 5% of datasets, no more."""
    rng = np.random.default_rng(4)
    trials = 200
    alarms = sum(laws.compare_groups(two_groups(rng, -0.2, -0.2), "batch", "tau", "method")["p_value"] < 0.05
                 for _ in range(trials))
    assert stats.binom.ppf(0.001, trials, 0.05) <= alarms <= stats.binom.ppf(0.999, trials, 0.05)


def test_compare_groups_needs_two_groups():
    df = two_groups(np.random.default_rng(5), 0.1, 0.1)
    with pytest.raises(ScyllaError, match="2 groups"):
        laws.compare_groups(df[df.method == "a"], "batch", "tau", "method")
    with pytest.raises(ScyllaError, match="no column"):
        laws.compare_groups(df, "batch", "tau", "engine")


# ---------------------------------------------------------------- shape

def test_saturating_data_is_called_saturating():
    rng = np.random.default_rng(6)
    x = np.geomspace(1e6, 1e9, 10)
    y = 3.0 - 2.0 * (x / 1e6) ** -0.5 + rng.normal(0, 0.005, len(x))
    sat = laws.fit_saturating(x, y)
    assert sat["converged"] and not sat["c_at_bound"]
    assert sat["params"]["c"] == pytest.approx(0.5, abs=0.1)
    assert sat["ceiling"] == pytest.approx(3.0, abs=0.05)
    assert sat["params"]["b"] == pytest.approx(2.0 * 1e6 ** 0.5, rel=0.5)   # b in the original x units
    assert laws.compare_shapes(x, y)["verdict"] == "saturating"


def test_log_linear_data_is_not_called_saturating():
    rng = np.random.default_rng(7)
    x = np.geomspace(1e6, 1e9, 10)
    y = 1.0 + 0.1 * np.log(x) + rng.normal(0, 0.02, len(x))
    out = laws.compare_shapes(x, y)
    assert out["verdict"] in ("log-linear", "indistinguishable")
    assert out["delta_aic"] < 2


def test_saturating_needs_four_points():
    out = laws.compare_shapes([1, 2, 4], [1.0, 1.5, 1.8])
    assert out["verdict"] == "indistinguishable" and not out["saturating"]["converged"]


# ---------------------------------------------------------------- joint law and formulas

def sweep_frame(rng, with_speedup=False):
    rows = []
    for tokens in (1e6, 1e7, 1e8):
        for layers in (1, 2, 4):
            for k in (2, 4, 6):
                tau = 1.0 + 0.12 * math.log(tokens / 1e6) + 0.3 * math.log(layers) + 0.6 * math.log(k)
                rows.append({"tokens": tokens, "layers": layers, "batch": 1, "k": k, "category": "all",
                             "tau": tau + rng.normal(0, 0.02),
                             "speedup": (tau / (1 + 0.05 * layers * k + 0.05 * k)) if with_speedup else None})
    return pd.DataFrame(rows)


def test_fit_joint_recovers_planted_coefficients():
    law = laws.fit_joint(sweep_frame(np.random.default_rng(8)), "tau", axes=("tokens", "layers", "batch", "k"))
    assert law.terms == ["tokens", "layers", "k"] and law.fixed == {"batch": 1.0}
    for term, truth in (("ln_tokens", 0.12), ("ln_layers", 0.3), ("ln_k", 0.6)):
        lo, hi = law.conf_int[term]
        assert lo < truth < hi
    json.dumps(law.to_json(), allow_nan=False)
    with pytest.raises(ScyllaError, match="no axis varies"):
        laws.fit_joint(pd.DataFrame({"tau": [1, 2, 3], "tokens": [5, 5, 5]}), "tau")


def test_fit_formula_matches_the_law_and_refuses_code():
    x, y = law_data(np.random.default_rng(9))
    df = pd.DataFrame({"tokens": x, "tau": y, "w": 1.0, "kind": ["a", "b"] * 8})
    out = laws.fit_formula(df, "tau ~ np.log(tokens)")
    assert out["params"]["np.log(tokens)"] == pytest.approx(laws.fit_loglinear(x, y).slope, rel=1e-12)
    assert out["conf_int"]["np.log(tokens)"] == pytest.approx(list(laws.fit_loglinear(x, y).slope_ci), rel=1e-12)
    assert laws.fit_formula(df, "tau ~ np.log(tokens) + C(kind)", kind="wls", weights_col="w")["n"] == 16
    assert laws.fit_formula(df, "tau ~ np.log(tokens)", kind="glm")["params"]["np.log(tokens)"] == \
        pytest.approx(out["params"]["np.log(tokens)"], rel=1e-9)
    for bad, message in (("tau ~ nope", "unknown name 'nope'"),
                         ("tau ~ I(__import__('os').getcwd())", "unknown name"),
                         ("tau ~ np.load(tokens)", "np.load is not allowed"),
                         ("tau ~ tokens.real", "only np"),
                         ("tau ~ np.log(tokens", "formula"),
                         ("tau", "formula looks like")):
        with pytest.raises(ScyllaError, match=message):
            laws.fit_formula(df, bad)
    for breaks_in_patsy in ("tau ~ np.log(kind)", 'tau ~ Q("no such column")', "tau ~ tokens +"):
        with pytest.raises(ScyllaError, match="cannot fit"):
            laws.fit_formula(df, breaks_in_patsy)
    with pytest.raises(ScyllaError, match="unknown model kind"):
        laws.fit_formula(df, "tau ~ tokens", kind="svm")


# ---------------------------------------------------------------- recommend

def test_recommend_with_cost_model(tmp_path):
    runs = sweep_frame(np.random.default_rng(10))
    out = laws.recommend(runs, batch=1, budget_tokens=10**8, k_choices=(2, 4, 6))
    best = out["best"]
    assert out["method"] == "cost-model" and out["cost_model"]["origin"] == "defaults"
    assert best["tokens"] == 10**8                         # tau rises with tokens; spend the budget
    assert best["layers"] in (1, 2, 3, 4) and best["k"] in (2, 4, 6)
    assert best["predicted_speedup"] == max(c["predicted_speedup"] for c in out["candidates"])
    cost = 1 + laws.DEFAULT_C_DRAFT * best["layers"] * best["k"] + laws.DEFAULT_C_VERIFY * best["k"]
    assert best["predicted_speedup"] == pytest.approx(best["predicted_tau"] / cost)
    assert best["tau_low"] < best["predicted_tau"] < best["tau_high"]
    json.dumps(out, allow_nan=False)
    db = tmp_path / "r.duckdb"
    store.insert_prediction(db, best)                      # `best` has the predictions columns
    assert store.predictions_frame(db).iloc[0]["k"] == best["k"]


def test_recommend_prefers_a_speedup_law_and_respects_the_budget():
    runs = sweep_frame(np.random.default_rng(11), with_speedup=True)
    out = laws.recommend(runs, batch=1, budget_tokens=10**7, layer_choices=(1, 2), k_choices=(2, 4, 6))
    assert out["method"] == "speedup-fit" and out["speedup_law"]["n"] == len(runs)
    assert all(c["tokens"] <= 10**7 for c in out["candidates"])
    assert out["best"]["speedup_low"] < out["best"]["predicted_speedup"] < out["best"]["speedup_high"]


def test_recommend_does_not_invent_an_unmeasured_axis():
    runs = sweep_frame(np.random.default_rng(12))
    runs = runs[runs.layers == 2]
    out = laws.recommend(runs, batch=1, budget_tokens=10**8, layer_choices=(1, 2, 3, 4))
    assert {c["layers"] for c in out["candidates"]} == {2}
    assert any("layers never varied" in w for w in out["warnings"])
    assert not any("np." in w for w in out["warnings"])  # plain numbers for the user
