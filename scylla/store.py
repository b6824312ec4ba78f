"""The results store: every SQL statement of the project lives here (DuckDB).

Values are always bound as parameters. Identifiers (table and column names) are
never taken from the caller as-is: they are checked against the table's own
columns (read from the catalog) or against fixed constants, then quoted.

DuckDB lets one process write a file, and a writer excludes readers in other
processes. So every function here opens the file, does one short job (one
transaction for writes) and closes it at once; a lock conflict is retried with
backoff for a few seconds before it becomes a clear ScyllaError. That is what
lets the app read while a sweep writes.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from scylla import ScyllaError, one_line
from scylla.options import AXES

SCHEMA_VERSION = 5
LOCK_WAIT_S = 5.0            # how long a connect retries a lock conflict before giving up
METRICS = ("tau", "accept_rate", "speedup", "spec_gain", "throughput")
TABLES = ("runs", "trainings", "reference", "laws", "predictions")

# New files are written in a storage format DuckDB >= 1.1 can read (the committed
# results.duckdb must open with any duckdb the project allows).
_CREATE_CONFIG = {"storage_compatibility_version": "v1.1.0"}
# Every read-only connection uses the same config: DuckDB refuses two connections
# to one file with different configs in one process. No file access beyond the store.
_READ_CONFIG = {"enable_external_access": False}

# ---------------------------------------------------------------- schema

_V1 = [
    """CREATE TABLE runs (
        id VARCHAR PRIMARY KEY, created_at TIMESTAMP, git_commit VARCHAR, command VARCHAR,
        host VARCHAR, device VARCHAR, target VARCHAR, quant VARCHAR, draft VARCHAR,
        draft_kind VARCHAR, layers INTEGER, fusion VARCHAR, draft_vocab INTEGER,
        tokens BIGINT, train_seed INTEGER, temperature DOUBLE, top_p DOUBLE, shape VARCHAR,
        k INTEGER, batch INTEGER, prompt_set VARCHAR, category VARCHAR, n_prompts INTEGER,
        tau DOUBLE, accept_rate DOUBLE, per_position_accept DOUBLE[], tokens_per_s DOUBLE,
        baseline_tokens_per_s DOUBLE, speedup DOUBLE, throughput DOUBLE,
        exact_match_rate DOUBLE, wall_s DOUBLE, source VARCHAR DEFAULT 'measured')""",
    """CREATE TABLE trainings (
        id VARCHAR PRIMARY KEY, created_at TIMESTAMP, git_commit VARCHAR, command VARCHAR,
        host VARCHAR, device VARCHAR, target VARCHAR, draft_kind VARCHAR, layers INTEGER,
        fusion VARCHAR, draft_vocab INTEGER, tokens BIGINT, ttt_steps INTEGER, seed INTEGER,
        wall_s DOUBLE, final_loss DOUBLE, heldout_top1 DOUBLE, corpus VARCHAR, path VARCHAR)""",
    """CREATE TABLE reference (
        source VARCHAR, table_name VARCHAR, engine_or_device VARCHAR, target VARCHAR,
        method VARCHAR, task VARCHAR, temperature DOUBLE, batch_size INTEGER,
        metric VARCHAR, value DOUBLE, confidence VARCHAR)""",
    """CREATE TABLE laws (
        id VARCHAR PRIMARY KEY, created_at TIMESTAMP, axis VARCHAR, metric VARCHAR,
        filters VARCHAR, n INTEGER, slope DOUBLE, intercept DOUBLE, r2 DOUBLE,
        slope_low DOUBLE, slope_high DOUBLE, loo_rel_err DOUBLE, x_min DOUBLE, x_max DOUBLE,
        selection VARCHAR)""",
    """CREATE TABLE predictions (
        id VARCHAR PRIMARY KEY, created_at TIMESTAMP, batch INTEGER, budget_tokens BIGINT,
        layers INTEGER, tokens BIGINT, k INTEGER, predicted_tau DOUBLE, tau_low DOUBLE,
        tau_high DOUBLE, predicted_speedup DOUBLE, speedup_low DOUBLE, speedup_high DOUBLE,
        measured_tau DOUBLE, measured_speedup DOUBLE, run_id VARCHAR)""",
]

# v2: free-text notes, and the mean per-step draft / verify times that the
# recommender's cost model needs (milliseconds per step).
_V2 = [
    "ALTER TABLE runs ADD COLUMN notes VARCHAR",
    "ALTER TABLE runs ADD COLUMN draft_ms DOUBLE",
    "ALTER TABLE runs ADD COLUMN verify_ms DOUBLE",
]

# v3: the engine's own plain decoding in the same run, and speculation's gain over it
# (`speedup` is over transformers `generate()`, which mixes the engine's speed into the gain).
_V3 = [
    "ALTER TABLE runs ADD COLUMN plain_tokens_per_s DOUBLE",
    "ALTER TABLE runs ADD COLUMN spec_gain DOUBLE",
]

# v4: a sweep's trained draft is named by its cache folder (sweep-<key>), never by a path
# on the machine that trained it (sweeps stored the absolute folder until then)
_V4 = [
    "UPDATE runs SET draft = regexp_extract(draft, '[^/]+$') WHERE draft LIKE '/%'",
]

# v5: peers in the loop (`scylla peers`): which engine ran (name and version; NULL: this
# engine, as every earlier row), its settings, and decode-only / prefill speeds
_V5 = [
    "ALTER TABLE runs ADD COLUMN engine VARCHAR",
    "ALTER TABLE runs ADD COLUMN engine_settings VARCHAR",
    "ALTER TABLE runs ADD COLUMN decode_tokens_per_s DOUBLE",
    "ALTER TABLE runs ADD COLUMN prefill_tokens_per_s DOUBLE",
]

MIGRATIONS = {1: _V1, 2: _V2, 3: _V3, 4: _V4, 5: _V5}


def schema_version(con) -> int:
    """0 for a file without a schema_version table."""
    # fetchall, not fetchone, everywhere: duckdb 2 keeps a half-read result open and
    # refuses some later calls on the connection (register) until it is drained.
    found = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = 'schema_version' AND table_catalog = current_database()").fetchall()[0][0]
    if not found:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]


def migrate(con, target: int = SCHEMA_VERSION) -> int:
    """Apply the migrations above the file's version, each in its own transaction."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP NOT NULL)")
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise ScyllaError(f"store schema v{current} is newer than this code (v{SCHEMA_VERSION}); upgrade scylla")
    for version in range(current + 1, target + 1):
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in MIGRATIONS[version]:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _now()])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return max(current, target)


def load_reference(con) -> int:
    """Copy the packaged published figures into `reference` when it is empty."""
    if con.execute("SELECT count(*) FROM reference").fetchall()[0][0]:
        return 0
    with resources.files("scylla").joinpath("reference_results.csv").open("r") as f:
        ref = pd.read_csv(f)
    ref = ref.rename(columns={"table": "table_name"})
    con.register("reference_csv", ref)
    try:
        con.execute(
            "INSERT INTO reference SELECT source, table_name, engine_or_device, target, method, task, "
            "temperature, batch_size, metric, value, confidence FROM reference_csv")
    finally:
        con.unregister("reference_csv")
    return len(ref)


# ---------------------------------------------------------------- connections

def connect(path, read_only: bool = False, wait_s: float = LOCK_WAIT_S):
    """Open the store; lock conflicts are retried for wait_s, then a one-line ScyllaError."""
    path = str(path)
    if read_only and not os.path.exists(path):
        raise ScyllaError(f"no store at {path} (create one with `scylla.store.init_db` or a sweep)")
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            return _open(path, read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if not _is_lock_error(e):
                raise ScyllaError(f"cannot open store {path}: {_one_line(e)}") from None
            if time.monotonic() + delay > deadline:
                who = "a running sweep" if read_only else "another process (a sweep or the app)"
                raise ScyllaError(f"store {path} is locked by {who}; try again") from None
            time.sleep(delay * random.uniform(0.5, 1.5))   # jitter: two waiters must not retry in step
            delay = min(delay * 2, 0.25)


def _open(path: str, read_only: bool):
    if read_only:
        return duckdb.connect(path, read_only=True, config=_READ_CONFIG)
    if os.path.exists(path):
        return duckdb.connect(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(path, config=_CREATE_CONFIG)
    except duckdb.InvalidInputException:      # a duckdb without that setting
        return duckdb.connect(path)


def _is_lock_error(e: Exception) -> bool:
    text = str(e)
    # "Could not set lock on file": another process. "different configuration": a
    # read-only and a writable connection to one file in this process at once.
    return "Could not set lock" in text or "different configuration" in text


_one_line = one_line


@contextmanager
def _reading(path, wait_s: float = LOCK_WAIT_S):
    con = connect(path, read_only=True, wait_s=wait_s)
    try:
        yield con
    except duckdb.Error as e:
        raise ScyllaError(f"store read failed: {_one_line(e)}") from None
    finally:
        con.close()


@contextmanager
def _writing(path, wait_s: float = LOCK_WAIT_S):
    """A short-lived writable connection holding one transaction."""
    con = connect(path, wait_s=wait_s)
    try:
        migrate(con)
        load_reference(con)
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except duckdb.Error as e:
        raise ScyllaError(f"store write failed: {_one_line(e)}") from None
    finally:
        con.close()


def init_db(path) -> str:
    """Create the file if needed, migrate it to SCHEMA_VERSION, load the reference rows."""
    with _writing(path):
        pass
    return str(path)


# ---------------------------------------------------------------- writes

def insert_run(path, run: dict, wait_s: float = LOCK_WAIT_S) -> str:
    return write_runs_atomic(path, [run], wait_s=wait_s)[0]


def write_runs_atomic(path, runs: list[dict], wait_s: float = LOCK_WAIT_S) -> list[str]:
    """Insert all runs in one transaction (all or none); returns their ids."""
    rows = [_stamp(r, provenance=True) for r in _check_records(runs, "run")]
    with _writing(path, wait_s) as con:
        _insert_rows(con, "runs", rows)
    return [r["id"] for r in rows]


def insert_training(path, rec: dict, wait_s: float = LOCK_WAIT_S) -> str:
    row = _stamp(_check_records([rec], "training")[0], provenance=True)
    with _writing(path, wait_s) as con:
        _insert_rows(con, "trainings", [row])
    return row["id"]


def insert_law(path, law: dict, wait_s: float = LOCK_WAIT_S) -> str:
    """A fitted law; `slope_ci` may stand for slope_low/slope_high, filters/selection may be objects."""
    row = dict(_check_records([law], "law")[0])
    if "slope_ci" in row:
        row["slope_low"], row["slope_high"] = row.pop("slope_ci")
    for key in ("filters", "selection"):
        if key in row and not isinstance(row[key], str | None):
            row[key] = json.dumps(_plain(row[key]))     # repr floats: full precision
    row = _stamp(row, provenance=False)
    with _writing(path, wait_s) as con:
        _insert_rows(con, "laws", [row])
    return row["id"]


def insert_prediction(path, rec: dict, wait_s: float = LOCK_WAIT_S) -> str:
    row = _stamp(_check_records([rec], "prediction")[0], provenance=False)
    with _writing(path, wait_s) as con:
        _insert_rows(con, "predictions", [row])
    return row["id"]


def merge_store(src_path, dst_path, wait_s: float = LOCK_WAIT_S) -> dict:
    """Copy the runs and trainings of src that dst lacks (by id), in one transaction."""
    if not os.path.exists(str(src_path)):
        raise ScyllaError(f"no store at {src_path}")
    if os.path.abspath(str(src_path)) == os.path.abspath(str(dst_path)):
        raise ScyllaError("merge_store: source and destination are the same file")
    init_db(dst_path)
    con = connect(dst_path, wait_s=wait_s)
    try:
        con.execute("ATTACH ? AS merge_src (READ_ONLY)", [str(src_path)])
        try:
            con.execute("BEGIN TRANSACTION")
            added = {}
            for table in ("runs", "trainings"):
                # BY NAME: a source file of an older schema lacks some columns; they stay NULL
                added[table] = con.execute(
                    f"INSERT INTO {table} BY NAME SELECT * FROM merge_src.{table} "
                    f"WHERE id NOT IN (SELECT id FROM {table})").fetchall()[0][0]
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.execute("DETACH merge_src")
    except duckdb.Error as e:
        raise ScyllaError(f"merge failed: {_one_line(e)}") from None
    finally:
        con.close()
    return added


def _check_records(records, what: str) -> list[dict]:
    if not isinstance(records, list | tuple) or not all(isinstance(r, dict) for r in records):
        raise ScyllaError(f"a {what} record must be a dict")
    return list(records)


def _stamp(rec: dict, provenance: bool) -> dict:
    """Fill the fields a caller need not know: id, time, and for runs/trainings where it ran."""
    row = dict(rec)
    if row.get("id") is None:
        row["id"] = uuid.uuid4().hex[:16]
    if row.get("created_at") is None:
        row["created_at"] = _now()
    if provenance:
        if row.get("git_commit") is None:
            row["git_commit"] = git_commit()
        if row.get("host") is None:
            row["host"] = socket.gethostname()
    return row


def _insert_rows(con, table: str, rows: list[dict]) -> None:
    columns = table_columns(con, table)
    for row in rows:
        unknown = sorted(set(row) - set(columns))
        if unknown:
            raise ScyllaError(f"unknown {table} field(s): {', '.join(unknown)}")
        names = list(row)
        sql = (f"INSERT INTO {table} ({', '.join(_quote(n) for n in names)}) "
               f"VALUES ({', '.join('?' for _ in names)})")
        con.execute(sql, [_sql_value(row[n]) for n in names])


def _sql_value(v):
    """numpy scalars and arrays to Python; NaN to NULL (missing, not a number to average)."""
    if isinstance(v, np.ndarray | tuple):
        v = list(v)
    if isinstance(v, list):
        return [_sql_value(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_plain(v) for v in obj]
    return _sql_value(obj)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)    # TIMESTAMP columns hold UTC


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, read from .git (no git binary)."""
    for d in Path(__file__).resolve().parents:
        git = d / ".git"
        if git.is_dir():
            return _read_head(git)
    return None


def _read_head(git: Path) -> str | None:
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip() or None
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        pass
    return None          # an unborn branch or an unreadable checkout


# ---------------------------------------------------------------- reads

def table_columns(con, table: str) -> dict[str, str]:
    """Column name -> type, from the catalog: the whitelist for every identifier."""
    if table not in TABLES:
        raise ScyllaError(f"unknown table {table!r}")
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = ? AND table_catalog = current_database() ORDER BY ordinal_position",
        [table]).fetchall()
    return dict(rows)


# Fixed statements; the only text ever appended is _where's clause (catalog-checked,
# quoted column names and ? placeholders), and every value is bound.
_SELECT_RUNS = ("SELECT * FROM runs", " ORDER BY created_at, id")
_SELECT_REFERENCE = ("SELECT * FROM reference", "")
_COUNT_ROWS = {t: "SELECT count(*) FROM " + t for t in TABLES}
_AXIS_VALUES = {a: "SELECT DISTINCT " + a + " FROM runs WHERE " + a + " IS NOT NULL ORDER BY 1" for a in AXES}
_METRIC_COUNTS = {m: "SELECT count(" + m + ") FROM runs" for m in METRICS}


def _filtered(con, table: str, statement: tuple[str, str], filters: dict | None) -> pd.DataFrame:
    head, tail = statement
    where, params = _where(con, table, filters)
    return con.execute(head + where + tail, params).df()


def runs_frame(path, filters: dict | None = None) -> pd.DataFrame:
    with _reading(path) as con:
        return _filtered(con, "runs", _SELECT_RUNS, filters)


def reference_frame(path, filters: dict | None = None) -> pd.DataFrame:
    with _reading(path) as con:
        return _filtered(con, "reference", _SELECT_REFERENCE, filters)


def trainings_frame(path) -> pd.DataFrame:
    with _reading(path) as con:
        return con.execute("SELECT * FROM trainings ORDER BY created_at, id").df()


def laws_frame(path) -> pd.DataFrame:
    """filters and selection stay JSON text (json.loads them to use them)."""
    with _reading(path) as con:
        return con.execute("SELECT * FROM laws ORDER BY created_at, id").df()


def predictions_frame(path) -> pd.DataFrame:
    with _reading(path) as con:
        return con.execute("SELECT * FROM predictions ORDER BY created_at, id").df()


def store_summary(path) -> dict:
    """Row counts per table and the distinct values each axis covers in runs."""
    with _reading(path) as con:
        counts = {t: con.execute(sql).fetchall()[0][0] for t, sql in _COUNT_ROWS.items()}
        axes = {a: [v for (v,) in con.execute(sql).fetchall()] for a, sql in _AXIS_VALUES.items()}
        metrics = {m: con.execute(sql).fetchall()[0][0] for m, sql in _METRIC_COUNTS.items()}
        return {"path": str(path), "schema_version": schema_version(con), "counts": counts,
                "axes": axes, "metric_counts": metrics}


def axis_points(path, axis: str, metric: str, filters: dict | None = None) -> pd.DataFrame:
    """Columns x (the axis, as a double), y (the metric), then every runs column.

    Without a `category` filter only the overall rows are used (category 'all' or
    NULL): per-category rows repeat the same run and would count it twice.
    """
    if axis not in AXES:
        raise ScyllaError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    if metric not in METRICS:
        raise ScyllaError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    filters = dict(filters or {})
    with _reading(path) as con:
        where, params = _where(con, "runs", filters)
        clauses = [f"{axis} IS NOT NULL", f"{metric} IS NOT NULL"]
        if "category" not in filters:
            clauses.append("(category = 'all' OR category IS NULL)")
        where = (where + " AND " if where else " WHERE ") + " AND ".join(clauses)
        sql = f"SELECT CAST({axis} AS DOUBLE) AS x, CAST({metric} AS DOUBLE) AS y, * FROM runs{where} ORDER BY x, created_at, id"
        return con.execute(sql, params).df()


def _where(con, table: str, filters: dict | None) -> tuple[str, list]:
    """WHERE clause for key=value filters: keys checked against the table's columns, values bound."""
    if not filters:
        return "", []
    columns = table_columns(con, table)
    clauses, params = [], []
    for key, value in filters.items():
        if key not in columns:
            raise ScyllaError(f"unknown {table} column {key!r} in filter; columns: {', '.join(columns)}")
        if value is None:
            clauses.append(f"{_quote(key)} IS NULL")
        elif isinstance(value, list | tuple | set):
            values = list(value)
            if not values:
                raise ScyllaError(f"empty value list for filter {key!r}")
            clauses.append(f"{_quote(key)} IN ({', '.join('?' for _ in values)})")
            params.extend(_sql_value(v) for v in values)
        else:
            clauses.append(f"{_quote(key)} = ?")
            params.append(_sql_value(value))
    return " WHERE " + " AND ".join(clauses), params


def _quote(identifier: str) -> str:
    # only ever called on names read from the catalog; quoting keeps odd-but-valid names working
    return '"' + identifier.replace('"', '""') + '"'


# ---------------------------------------------------------------- ad-hoc SQL (regression lab)

_FORBIDDEN = re.compile(
    r"\b(ATTACH|DETACH|COPY|INSTALL|LOAD|PRAGMA|SET|RESET|EXPORT|IMPORT|CALL|CREATE|DROP|ALTER|"
    r"INSERT|UPDATE|DELETE|TRUNCATE|VACUUM|CHECKPOINT|USE|BEGIN|COMMIT|ROLLBACK)\b", re.IGNORECASE)


def check_select_only(sql: str) -> str:
    """Refuse anything but one SELECT / WITH query; returns the query without comments."""
    code, bare = _strip_comments(sql)
    code = code.strip().rstrip(";").strip()
    if not code:
        raise ScyllaError("empty query")
    first = re.match(r"\(*\s*(\w+)", code)
    if not first or first.group(1).upper() not in ("SELECT", "WITH"):
        raise ScyllaError("only a single SELECT or WITH query is allowed")
    word = _FORBIDDEN.search(bare)
    if word:
        raise ScyllaError(f"{word.group(1).upper()} is not allowed here: read-only SELECT queries only")
    try:
        statements = _sql_parser().extract_statements(sql)
    except duckdb.Error as e:
        raise ScyllaError(f"SQL error: {_one_line(e)}") from None
    if len(statements) != 1:
        raise ScyllaError(f"one statement only, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise ScyllaError(f"only SELECT queries are allowed, got {statements[0].type.name}")
    return code


_PARSERS = threading.local()


def _sql_parser():
    """An empty in-memory DuckDB per thread, only to parse SQL: opening one costs ~35 ms,
    which every query in the app would pay. (A connection must not be shared by threads.)"""
    if not hasattr(_PARSERS, "con"):
        _PARSERS.con = duckdb.connect(":memory:")
    return _PARSERS.con


def read_only_query(path, sql: str, max_rows: int = 5000, timeout_s: float = 10.0) -> pd.DataFrame:
    """Run one SELECT on a read-only connection with a row cap and a time limit.

    More than max_rows rows: the first max_rows come back with attrs['truncated'] = True.
    """
    check_select_only(sql)
    con = connect(path, read_only=True)
    timer = threading.Timer(timeout_s, _interrupt, args=(con,))
    timer.start()
    try:
        result = con.execute(sql)
        columns = [d[0] for d in result.description]
        rows = result.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        raise ScyllaError(f"query stopped: over the {timeout_s:g} s time limit") from None
    except duckdb.Error as e:
        raise ScyllaError(f"query failed: {_one_line(e)}") from None
    finally:
        timer.cancel()
        con.close()
    frame = pd.DataFrame(rows[:max_rows], columns=columns)
    frame.attrs["truncated"] = len(rows) > max_rows
    return frame


def _interrupt(con) -> None:
    try:
        con.interrupt()
    except duckdb.Error:
        pass              # the query finished and the connection closed meanwhile


def _strip_comments(sql: str) -> tuple[str, str]:
    """(sql without comments, the same with string literals and quoted names blanked)."""
    code, bare, i, n = [], [], 0, len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            code.append(" "), bare.append(" ")
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            code.append(" "), bare.append(" ")
        elif c in "'\"":
            j = i + 1
            while j < n and not (sql[j] == c and not sql.startswith(c * 2, j)):
                j += 2 if sql.startswith(c * 2, j) else 1
            code.append(sql[i:j + 1]), bare.append(" ")
            i = j + 1
        else:
            code.append(c), bare.append(c)
            i += 1
    return "".join(code), "".join(bare)
