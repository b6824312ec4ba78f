"""Non-Streamlit logic behind the app's pages (other than live decoding, see live.py):
where the store is, filtering and reshaping frames for the law explorer, fitting and
tabulating for the regression lab, and background sweeps with their logs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scylla import ScyllaError, options
from scylla.store import METRICS  # noqa: F401  (the law explorer lists these)

REPO_ROOT = Path(__file__).resolve().parent.parent

AXES = dict(zip(options.AXES, ("draft pretraining tokens", "draft layers", "batch size")))   # axis: its label
RUN_FILTER_COLUMNS = ("command", "target", "quant", "draft", "draft_kind", "fusion", "category",
                      "prompt_set", "temperature", "shape", "k")
GROUP_COLUMNS = ("draft_kind", "draft", "category", "target", "fusion", "shape", "temperature")
REFERENCE_FILTER_COLUMNS = ("engine_or_device", "method", "target", "task", "temperature", "source")
REFERENCE_GROUP_COLUMNS = ("method", "engine_or_device", "target", "task")
# Which published metric can be drawn next to a measured (axis, metric) pair.
REFERENCE_OVERLAY = {("batch", "speedup"): "throughput_ratio_vs_no_spec",
                     ("batch", "throughput"): "throughput_ratio_vs_no_spec",
                     ("batch", "tau"): "tau"}


# What the pages import on their first visit (seconds each on this CPU): torch and
# transformers (live decoding), statsmodels and scipy (laws, lab).
PREWARM_MODULES = ("torch", "transformers", "statsmodels.formula.api", "scipy.optimize",
                   "scylla.laws", "scylla.decoding", "scylla.data")
_PREWARM_STARTED = threading.Event()


def prewarm_imports(modules=PREWARM_MODULES) -> bool:
    """Import what the other pages need in a background thread, once per process, so that
    a page's first visit does not pay for it. Off with SCYLLA_PREWARM=0."""
    if os.environ.get("SCYLLA_PREWARM", "1") == "0" or _PREWARM_STARTED.is_set():
        return False
    _PREWARM_STARTED.set()
    threading.Thread(target=_import_all, args=(modules,), daemon=True, name="scylla-imports").start()
    return True


def _import_all(modules) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the page that needs it reports the failure itself
            pass


def db_path() -> Path:
    """results.duckdb in the repo root, unless SCYLLA_DB names another file."""
    return Path(os.environ.get("SCYLLA_DB") or REPO_ROOT / "results.duckdb")


def store_version(path: Path) -> tuple[float, float]:
    """Changes whenever the store does: the file's mtime and its write-ahead log's (DuckDB
    writes there first), so page caches keyed on it never serve stale rows."""
    def mtime(p: Path) -> float:
        return p.stat().st_mtime if p.is_file() else 0.0
    return mtime(path), mtime(path.with_name(path.name + ".wal"))


def runs_dir() -> Path:
    return Path(os.environ.get("SCYLLA_RUNS_DIR") or REPO_ROOT / "runs")


# ---------------------------------------------------------------- frames

def filter_options(df: pd.DataFrame, columns) -> dict[str, list]:
    """Distinct non-null values of each column present and with more than one value."""
    out = {}
    for col in columns:
        if col in df.columns:
            values = sorted(df[col].dropna().unique().tolist(), key=lambda v: (str(type(v)), v))
            if len(values) > 1:
                out[col] = values
    return out


def default_run_filters(runs: pd.DataFrame, axis: str, min_points: int = 3) -> dict[str, list]:
    """What the law explorer opens on for an axis: the most recent sweep that varied it over
    at least `min_points` values, at T = 0 (pooling every sweep of an axis mixes corpora and
    recipes: the tokens axis pooled has R^2 0.86 over 34 points, its 2^10..2^22 sweep alone
    0.92). Empty when no sweep qualifies."""
    if not len(runs) or axis not in runs or "command" not in runs:
        return {}
    sweeps = runs[runs["command"].fillna("").str.startswith("scylla sweep") & runs[axis].notna()]
    spread = sweeps.groupby("command").agg(values=(axis, "nunique"), last=("created_at", "max"))
    complete = spread[spread["values"] >= min_points].sort_values("last")
    if not len(complete):
        return {}
    chosen = {"command": [complete.index[-1]]}
    if (sweeps.loc[sweeps["command"] == complete.index[-1], "temperature"] == 0.0).any():
        chosen["temperature"] = [0.0]
    return chosen


def apply_filters(df: pd.DataFrame, filters: dict | None) -> pd.DataFrame:
    """Keep rows whose column is in the chosen values (an empty choice keeps everything)."""
    for col, values in (filters or {}).items():
        if col in df.columns and values:
            values = values if isinstance(values, (list, tuple, set)) else [values]
            df = df[df[col].isin(list(values))]
    return df


def reference_points(ref: pd.DataFrame, metric: str = "throughput_ratio_vs_no_spec",
                     filters: dict | None = None, x_col: str = "batch_size") -> pd.DataFrame:
    """Published rows as law points: x = batch_size, y = value, with a readable label."""
    df = ref[ref["metric"] == metric] if "metric" in ref.columns else ref.iloc[0:0]
    df = apply_filters(df, filters)
    df = df[pd.to_numeric(df[x_col], errors="coerce") > 0].copy()
    df["x"] = pd.to_numeric(df[x_col]).astype(float)
    df["y"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    df = df.dropna(subset=["y"])
    df["label"] = (df["method"].astype(str) + " · " + df["engine_or_device"].fillna("").astype(str)
                   + " · " + df["task"].fillna("").astype(str)).str.replace(" ·  ·", " ·")
    return df.reset_index(drop=True)


def reference_overlay(ref: pd.DataFrame, axis: str, metric: str,
                      filters: dict | None = None) -> pd.DataFrame | None:
    """Published figures comparable with a measured (axis, metric) law, or None."""
    ref_metric = REFERENCE_OVERLAY.get((axis, metric))
    if ref_metric is None or ref is None or not len(ref):
        return None
    pts = reference_points(ref, ref_metric, filters)
    return pts if len(pts) else None


def usable_points(points: pd.DataFrame) -> pd.DataFrame:
    """Rows a log-linear fit can use: finite y, x > 0."""
    x = pd.to_numeric(points["x"], errors="coerce")
    y = pd.to_numeric(points["y"], errors="coerce")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    return points[keep]


# ---------------------------------------------------------------- law explorer

def law_analysis(points: pd.DataFrame, extrapolate_to: float | None = None,
                 alpha: float = 0.05, saturating: bool = False, group_col: str | None = None) -> dict:
    """Fit y = intercept + slope * ln(x) and gather everything the law page shows."""
    from scylla import laws
    from scylla.plots import log_grid

    points = usable_points(points)
    if len(points) < 3 or points["x"].nunique() < 2:
        raise ScyllaError(f"Need at least 3 points at 2 or more distinct x values to fit a law "
                          f"(have {len(points)} at {points['x'].nunique()}).")
    x = points["x"].to_numpy(float)
    y = points["y"].to_numpy(float)
    fit = laws.fit_loglinear(x, y)
    hi = max(float(x.max()), float(extrapolate_to or 0))
    grid = log_grid(float(x.min()), hi)
    out = {"fit": fit, "points": points, "prediction": fit.predict(grid, alpha=alpha),
           "coefficients": law_coefficients(fit), "headline": law_headline(fit),
           "saturating": None, "shapes": None, "groups": None, "group_fits": None,
           "extrapolation": None}
    if extrapolate_to and extrapolate_to > 0:
        out["extrapolation"] = fit.predict(np.array([float(extrapolate_to)]), alpha=alpha)
    if saturating:
        shapes = laws.compare_shapes(x, y)
        out["shapes"] = shapes
        out["saturating"] = saturating_curve(shapes.get("saturating"), grid)
    if group_col and group_col in points.columns and points[group_col].nunique() > 1:
        try:
            out["groups"] = laws.compare_groups(points, "x", "y", group_col)
            out["group_fits"] = group_lines(out["groups"], points, group_col)
        except ScyllaError as exc:
            out["groups_error"] = str(exc)
    return out


def group_lines(groups: dict, points: pd.DataFrame, group_col: str) -> pd.DataFrame:
    """Each group's own fitted line (from compare_groups) over that group's x range."""
    from scylla.plots import log_grid

    frames = []
    for name, law in groups["slopes"].items():
        xs = points.loc[points[group_col].astype(str) == name, "x"].astype(float)
        grid = log_grid(float(xs.min()), float(xs.max()), 30)
        frames.append(pd.DataFrame({"group": name, "x": grid,
                                    "mean": law["intercept"] + law["slope"] * np.log(grid)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["group", "x", "mean"])


def saturating_curve(sat: dict, x: np.ndarray) -> pd.DataFrame | None:
    """(x, mean) of a converged laws.fit_saturating result: y = a - b * x**(-c)."""
    if not sat or not sat.get("converged"):
        return None
    p = sat["params"]
    x = np.asarray(x, dtype=float)
    return pd.DataFrame({"x": x, "mean": p["a"] - p["b"] * np.power(x, -p["c"])})


def law_coefficients(fit) -> pd.DataFrame:
    """Intercept and slope (per ln x) with their 95% intervals and standard errors."""
    return pd.DataFrame([
        {"term": "slope (per ln x)", "estimate": fit.slope, "std_err": fit.slope_se,
         "ci_low": fit.slope_ci[0], "ci_high": fit.slope_ci[1], "p_value": fit.p_value},
        {"term": "intercept", "estimate": fit.intercept, "std_err": float(fit.result.bse[0]),
         "ci_low": fit.intercept_ci[0], "ci_high": fit.intercept_ci[1],
         "p_value": float(fit.result.pvalues[0])},
    ])


def extrapolation_options(x_max: float, steps: int = 7) -> list[float]:
    """x values for the extrapolation slider: the data's largest x, then doublings."""
    base = float(x_max) if x_max and x_max > 0 else 1.0
    return [base * 2 ** i for i in range(steps)]


def law_headline(fit) -> dict:
    return {"n": fit.n, "r2": fit.r2, "loo_rel_err": fit.loo_rel_err,
            "holdout_largest_rel_err": fit.holdout_largest_rel_err, "x_min": fit.x_min,
            "x_max": fit.x_max, "cov_type": fit.cov_type}


# ---------------------------------------------------------------- regression lab

def formula_table(out: dict) -> pd.DataFrame:
    """Coefficient table of a laws.fit_formula result: estimate, SE, p, 95% CI."""
    terms = list(out["params"])
    ci = out.get("conf_int", {})
    return pd.DataFrame({
        "coef": [out["params"][t] for t in terms],
        "std_err": [out["bse"].get(t) for t in terms],
        "p_value": [out["pvalues"].get(t) for t in terms],
        "ci_low": [ci.get(t, [None, None])[0] for t in terms],
        "ci_high": [ci.get(t, [None, None])[1] for t in terms],
    }, index=terms).astype(float)


LAB_DEFAULT_SQL = ("SELECT method, engine_or_device, batch_size, value AS throughput_ratio\n"
                   "FROM reference\nWHERE metric = 'throughput_ratio_vs_no_spec'\n"
                   "ORDER BY method, engine_or_device, batch_size")
LAB_DEFAULT_FORMULA = "throughput_ratio ~ np.log(batch_size) + C(method) + C(engine_or_device)"


# ---------------------------------------------------------------- sweeps

DEFAULT_SWEEP_CONFIG = {
    "name": "small-ngram-k",
    "target": "smollm2",
    "drafts": ["ngram"],
    "k": [2, 4, 6],
    "batch": [1],
    "temperature": [0.0],
    "limit": 4,
    "max_new_tokens": 32,
}



def default_sweep_config() -> dict:
    """The sweep module's own small example when it has one, else a tiny ngram grid."""
    try:
        from scylla import sweep

        for name in ("SMALL_CONFIG", "EXAMPLE_CONFIG", "DEFAULT_CONFIG"):
            value = getattr(sweep, name, None)
            if isinstance(value, dict):
                return value
    except Exception:  # noqa: BLE001 - no sweep module yet, or it fails to import
        pass
    return dict(DEFAULT_SWEEP_CONFIG)


_JOBS: dict[str, subprocess.Popen] = {}
_JOBS_LOCK = threading.Lock()


def sweep_available() -> tuple[bool, str]:
    """Whether `scylla sweep` can run in this build, and why not."""
    import importlib.util

    if importlib.util.find_spec("scylla.sweep") is None:
        return False, "Sweeps need scylla/sweep.py, which is not in this build yet."
    if importlib.util.find_spec("scylla.cli") is None:
        return False, "Sweeps need the `scylla` command (scylla/cli.py), which is not in this build yet."
    return True, ""


def sweep_command(config: Path, db: Path | None = None) -> list[str]:
    """`scylla sweep CONFIG --db DB` with the scylla launcher next to this Python."""
    tail = ["sweep", str(config), "--db", str(db or db_path())]
    exe = Path(sys.executable).parent / "scylla"
    if exe.is_file():
        return [str(exe), *tail]
    found = shutil.which("scylla")
    if found:
        return [found, *tail]
    return [sys.executable, "-c", "import sys; from scylla.cli import main; sys.exit(main())", *tail]


def start_sweep(config_text: str, suffix: str = ".json") -> Path:
    """Write the config, launch `scylla sweep CONFIG` in the background, return its folder.

    The process logs to sweep.log there; a watcher thread writes its exit code to rc."""
    ok, why = sweep_available()
    if not ok:
        raise ScyllaError(why)
    if not config_text or not config_text.strip():
        raise ScyllaError("The sweep config is empty.")
    if suffix == ".json":
        try:
            json.loads(config_text)
        except json.JSONDecodeError as exc:
            raise ScyllaError(f"The sweep config is not valid JSON: {exc}") from exc
    with _JOBS_LOCK:
        if any(p.poll() is None for p in _JOBS.values()):
            raise ScyllaError("A sweep is already running in this app; wait for it to finish.")
        folder = runs_dir() / "sweeps" / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while folder.exists():
            folder = folder.with_name(folder.name.split("_")[0] + f"_{n}")
            n += 1
        folder.mkdir(parents=True)
        config = folder / f"config{suffix}"
        config.write_text(config_text)
        log = open(folder / "sweep.log", "wb")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, PYTHONUNBUFFERED="1", SCYLLA_DB=str(db_path()))
        try:
            proc = subprocess.Popen(sweep_command(config), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env,
                                    start_new_session=True)
        except OSError as exc:
            log.close()
            raise ScyllaError(f"Could not start the sweep: {exc}") from exc
        finally:
            log.close()
        (folder / "pid").write_text(str(proc.pid))
        _JOBS[str(folder)] = proc
    threading.Thread(target=_watch, args=(proc, folder), daemon=True).start()
    return folder


def _watch(proc: subprocess.Popen, folder: Path) -> None:
    rc = proc.wait()
    (folder / "rc").write_text(str(rc))


def list_sweeps() -> list[Path]:
    root = runs_dir() / "sweeps"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir()), reverse=True)


def sweep_status(folder: Path) -> dict:
    """state (running | finished | failed | unknown), rc, log tail and progress fraction."""
    folder = Path(folder)
    proc = _JOBS.get(str(folder))
    rc_file = folder / "rc"
    rc = None
    if proc is not None and proc.poll() is None:
        state = "running"
    else:
        if proc is not None:
            rc = proc.returncode
        elif rc_file.is_file():
            try:
                rc = int(rc_file.read_text().strip())
            except ValueError:
                rc = None
        state = "unknown" if rc is None else ("finished" if rc == 0 else "failed")
    tail = read_log_tail(folder / "sweep.log")
    return {"state": state, "rc": rc, "log": tail, "progress": parse_progress(tail),
            "config": (next(folder.glob("config.*"), None))}


def read_log_tail(path: Path, lines: int = 30, max_bytes: int = 64_000) -> str:
    """The last lines of a log; tqdm's carriage-return updates count as lines."""
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - max_bytes))
        text = fh.read().decode("utf-8", errors="replace")
    parts = [p for p in re.split(r"[\r\n]+", text) if p.strip()]
    return "\n".join(parts[-lines:])


_PROGRESS = re.compile(r"(\d+)\s*/\s*(\d+)")


def parse_progress(text: str) -> float | None:
    """Fraction done from the last 'i/n' in the log (tqdm and 'run 3/12' styles)."""
    for line in reversed(text.splitlines()):
        for done, total in reversed(_PROGRESS.findall(line)):
            done, total = int(done), int(total)
            if 0 < total and 0 <= done <= total:
                return done / total
    return None


# ---------------------------------------------------------------- peers

PEER_COLUMNS = ["engine", "draft", "tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s", "tau",
                "per_position_accept", "exact_match_rate", "n_prompts", "prompt_set", "created_at", "notes"]


def peer_comparison(db: Path) -> pd.DataFrame:
    """The latest `scylla peers` run from the store: one row per engine and draft (empty
    when none is stored). A run's rows share their `notes` (its run id)."""
    from scylla import store

    runs = store.runs_frame(str(db), {"command": "scylla peers"})
    if not len(runs) or "engine" not in runs:
        return pd.DataFrame(columns=PEER_COLUMNS)
    latest = runs.sort_values("created_at").iloc[-1]["notes"]
    frame = runs[runs["notes"] == latest]
    return frame[[c for c in PEER_COLUMNS if c in frame]].reset_index(drop=True)


def peer_acceptance(frame: pd.DataFrame) -> dict[str, list[float]]:
    """Acceptance by position of every drafted row that has it (this engine's chain and the
    same draft exported to vLLM), keyed as the figure names its traces."""
    out = {}
    for _, row in frame.iterrows():
        values = row.get("per_position_accept")
        if row["draft"] != "none" and isinstance(values, list | tuple | np.ndarray) and len(values):
            out[f"{row['engine']} | {row['draft']}"] = [float(v) for v in values]
    return out
