"""The results store: schema, migrations, bound parameters, the SQL sandbox, concurrency."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from scylla import ScyllaError
from scylla import store

REPO = Path(__file__).resolve().parents[1]
EVIL = "x'); DROP TABLE runs; --"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "results.duckdb"
    store.init_db(path)
    return path


def a_run(**over):
    run = {"target": "smollm2-135m", "draft": "head:1l", "draft_kind": "head", "layers": 1,
           "tokens": 10_000_000, "temperature": 0.0, "k": 4, "batch": 1, "category": "all",
           "n_prompts": 8, "tau": 2.5, "accept_rate": 0.4, "per_position_accept": [0.7, 0.5, 0.3],
           "speedup": 1.3, "shape": "chain:4"}
    run.update(over)
    return run


def test_init_insert_read_back(db):
    run_id = store.insert_run(db, a_run())
    runs = store.runs_frame(db)
    assert list(runs["id"]) == [run_id]
    row = runs.iloc[0]
    assert row["tau"] == 2.5 and row["layers"] == 1 and row["shape"] == "chain:4"
    assert list(row["per_position_accept"]) == [0.7, 0.5, 0.3]
    assert row["source"] == "measured"                      # column default
    assert row["host"] and row["created_at"] is not None     # filled in by the store
    summary = store.store_summary(db)
    assert summary["schema_version"] == store.SCHEMA_VERSION
    assert summary["counts"]["runs"] == 1
    assert summary["counts"]["reference"] == 416             # every packaged published figure
    assert summary["axes"]["tokens"] == [10_000_000]


def test_reference_rows_match_packaged_csv(db):
    ref = store.reference_frame(db, {"method": "EAGLE-3", "engine_or_device": "SGLang",
                                     "metric": "throughput_ratio_vs_no_spec"})
    assert sorted(ref["batch_size"]) == [2, 4, 8, 16, 24, 32, 48, 56, 64]
    assert set(ref["table_name"]) == {"T3 (SGLang) / T5 (vLLM)"}
    packaged = (REPO / "scylla" / "reference_results.csv").read_bytes()
    shared = REPO.parent / "shared" / "reference" / "published_results.csv"
    if shared.exists():
        assert packaged == shared.read_bytes()


def test_init_db_twice_keeps_one_copy_of_reference(db):
    store.init_db(db)
    assert store.store_summary(db)["counts"]["reference"] == 416


def test_unknown_field_refused_and_batch_is_atomic(db):
    with pytest.raises(ScyllaError, match="unknown runs field.*bogus"):
        store.insert_run(db, a_run(bogus=1))
    with pytest.raises(ScyllaError):
        store.write_runs_atomic(db, [a_run(id="good"), a_run(id="bad", bogus=1)])
    assert store.runs_frame(db).empty                        # the good one was rolled back too
    store.write_runs_atomic(db, [a_run(id="r1"), a_run(id="r2")])
    with pytest.raises(ScyllaError, match="store write failed"):
        store.write_runs_atomic(db, [a_run(id="r3"), a_run(id="r1")])   # duplicate id
    assert sorted(store.runs_frame(db)["id"]) == ["r1", "r2"]


def test_bound_parameters_survive_injection(db):
    run_id = store.insert_run(db, a_run(draft=EVIL, notes=EVIL))
    found = store.runs_frame(db, {"draft": EVIL})
    assert list(found["id"]) == [run_id]
    assert found.iloc[0]["notes"] == EVIL
    assert store.runs_frame(db, {"draft": "x"}).empty
    with pytest.raises(ScyllaError, match="unknown runs column"):
        store.runs_frame(db, {"draft = 'x' OR 1=1; --": "y"})
    with pytest.raises(ScyllaError, match="unknown runs field"):
        store.insert_run(db, {'tau") VALUES (1); DROP TABLE runs; --': 1.0})
    assert len(store.runs_frame(db)) == 1


def test_filters_cast_to_column_types(db):
    store.insert_run(db, a_run(id="a", layers=2))
    store.insert_run(db, a_run(id="b", layers=3))
    assert list(store.runs_frame(db, {"layers": "2"})["id"]) == ["a"]   # CLI filters arrive as text
    assert list(store.runs_frame(db, {"layers": [3, 4]})["id"]) == ["b"]
    with pytest.raises(ScyllaError):
        store.runs_frame(db, {"layers": "two"})


def test_axis_points(db):
    store.write_runs_atomic(db, [
        a_run(id="t1", tokens=1_000_000, tau=2.0),
        a_run(id="t2", tokens=4_000_000, tau=2.3),
        a_run(id="t3", tokens=16_000_000, tau=None),            # no metric: dropped
        a_run(id="t4", tokens=16_000_000, tau=2.6, layers=2),
        a_run(id="c1", tokens=1_000_000, tau=9.0, category="coding"),  # per-category repeat
    ])
    pts = store.axis_points(db, "tokens", "tau")
    assert list(pts.columns[:2]) == ["x", "y"] and "draft" in pts.columns
    assert list(pts["id"]) == ["t1", "t2", "t4"]
    assert list(pts["x"]) == [1e6, 4e6, 16e6] and list(pts["y"]) == [2.0, 2.3, 2.6]
    assert list(store.axis_points(db, "tokens", "tau", {"layers": "1"})["id"]) == ["t1", "t2"]
    assert list(store.axis_points(db, "tokens", "tau", {"category": "coding"})["id"]) == ["c1"]
    with pytest.raises(ScyllaError, match="unknown axis"):
        store.axis_points(db, "tokens; DROP TABLE runs", "tau")
    with pytest.raises(ScyllaError, match="unknown metric"):
        store.axis_points(db, "tokens", "wall_s")


def test_laws_predictions_trainings_round_trip(db):
    points = [[1e6, 2.0000000000000004], [4e6, 2.1234567890123457], [16e6, 2.5]]
    law_id = store.insert_law(db, {"axis": "tokens", "metric": "tau", "filters": {"layers": "1"},
                                   "n": 3, "slope": 0.1, "intercept": 0.5, "r2": 0.9,
                                   "slope_ci": [0.05, 0.15], "loo_rel_err": 0.02,
                                   "x_min": 1e6, "x_max": 16e6, "selection": points})
    laws = store.laws_frame(db)
    assert list(laws["id"]) == [law_id]
    assert json.loads(laws.iloc[0]["selection"]) == points       # full precision
    assert (laws.iloc[0]["slope_low"], laws.iloc[0]["slope_high"]) == (0.05, 0.15)
    store.insert_prediction(db, {"batch": 1, "budget_tokens": 10**8, "layers": 2, "tokens": 10**8,
                                 "k": 5, "predicted_tau": 3.1, "tau_low": 2.8, "tau_high": 3.4})
    assert store.predictions_frame(db).iloc[0]["k"] == 5
    store.insert_training(db, {"target": "smollm2", "draft_kind": "head", "layers": 2,
                               "tokens": 10**8, "final_loss": 2.1, "path": "assets/x"})
    trainings = store.trainings_frame(db)
    assert trainings.iloc[0]["tokens"] == 10**8 and trainings.iloc[0]["host"]
    with pytest.raises(ScyllaError):
        store.insert_training(db, {"tau": 1.0})


@pytest.mark.parametrize("sql", [
    "DROP TABLE runs",
    "INSERT INTO runs (id) VALUES ('x')",
    "UPDATE runs SET tau = 0",
    "DELETE FROM runs",
    "CREATE TABLE t AS SELECT 1",
    "ATTACH 'other.duckdb' AS other",
    "COPY runs TO 'out.csv'",
    "PRAGMA database_list",
    "SET threads = 1",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPORT DATABASE 'dump'",
    "CALL pragma_version()",
    "SELECT 1; DROP TABLE runs",
    "SELECT 1; SELECT 2",
    "/* a comment */ DROP TABLE runs",
    "-- a comment\nDELETE FROM runs",
    "SELECT 1 /* ; */ ; ATTACH 'x' AS y",
    "DESCRIBE runs",
    "WITH a AS (SELECT 1) INSERT INTO runs (id) SELECT 'x' FROM a",
    "",
])
def test_read_only_query_refuses(db, sql):
    with pytest.raises(ScyllaError):
        store.check_select_only(sql)                        # refused before any connection opens
    with pytest.raises(ScyllaError) as refused:
        store.read_only_query(db, sql)
    assert "\n" not in str(refused.value)                  # the CLI and the app show one line
    assert store.store_summary(db)["counts"]["reference"] == 416


def test_read_only_query_runs_select(db):
    store.insert_run(db, a_run(draft=EVIL))
    out = store.read_only_query(db, "-- how many?\nSELECT count(*) AS n FROM reference /* all */;")
    assert out["n"].tolist() == [416] and out.attrs["truncated"] is False
    # forbidden words inside literals and quoted names are data, not statements
    out = store.read_only_query(db, "SELECT 'DROP TABLE runs; --' AS \"set\", draft FROM runs WHERE draft = 'x''); DROP TABLE runs; --'")
    assert out.iloc[0].tolist() == ["DROP TABLE runs; --", EVIL]
    out = store.read_only_query(db, "WITH r AS (SELECT * FROM range(100)) SELECT * FROM r", max_rows=10)
    assert len(out) == 10 and out.attrs["truncated"] is True
    with pytest.raises(ScyllaError, match="query failed"):
        store.read_only_query(db, "SELECT nope FROM runs")
    with pytest.raises(ScyllaError):                      # no file access from the sandbox
        store.read_only_query(db, "SELECT * FROM read_csv('/etc/hostname')")


def test_read_only_query_time_limit(db):
    start = time.monotonic()
    with pytest.raises(ScyllaError, match="time limit"):
        store.read_only_query(db, "SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b",
                              timeout_s=0.3)
    assert time.monotonic() - start < 10


def test_migration_from_v1_file(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    assert store.migrate(con, target=1) == 1
    con.execute("INSERT INTO runs (id, tokens, tau) VALUES (?, ?, ?)", ["old", 1000, 1.5])
    assert "notes" not in store.table_columns(con, "runs")
    con.close()
    store.init_db(path)
    con = duckdb.connect(str(path), read_only=True)
    assert store.schema_version(con) == store.SCHEMA_VERSION == 5
    assert {"notes", "draft_ms", "verify_ms", "plain_tokens_per_s", "spec_gain", "engine", "engine_settings",
            "decode_tokens_per_s", "prefill_tokens_per_s"} <= set(store.table_columns(con, "runs"))
    assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 5
    con.close()
    store.insert_run(path, a_run(id="new", notes="after v2", draft_ms=3.0))
    runs = store.runs_frame(path).set_index("id")
    assert sorted(runs.index) == ["new", "old"] and runs.loc["old", "tau"] == 1.5
    assert runs.loc["new", "notes"] == "after v2"
    assert store.store_summary(path)["counts"]["reference"] == 416


def test_a_v2_file_gains_spec_gain_and_keeps_its_runs(tmp_path):
    path = tmp_path / "v2.duckdb"
    con = duckdb.connect(str(path))
    assert store.migrate(con, target=2) == 2
    con.execute("INSERT INTO runs (id, batch, tau, speedup) VALUES (?, ?, ?, ?)", ["v2", 4, 1.7, 2.3])
    con.close()
    store.insert_run(path, a_run(id="v3", batch=4, spec_gain=1.31, plain_tokens_per_s=52.0))
    runs = store.runs_frame(path).set_index("id")
    assert runs.loc["v3", "spec_gain"] == 1.31 and runs.loc["v3", "plain_tokens_per_s"] == 52.0
    assert runs.loc["v2", "speedup"] == 2.3 and pd.isna(runs.loc["v2", "spec_gain"])
    assert "spec_gain" in store.METRICS


def test_v4_names_sweep_drafts_by_their_folder_not_a_machine_path(tmp_path):
    path = tmp_path / "v3.duckdb"
    con = duckdb.connect(str(path))
    assert store.migrate(con, target=3) == 3
    con.executemany("INSERT INTO runs (id, draft) VALUES (?, ?)",
                    [["swept", "/root/.cache/scylla/drafts/sweep-38c27b0e8ded"], ["named", "scylla+ngram"],
                     ["relative", "runs/drafts/mine"]])
    con.close()
    store.init_db(path)
    drafts = store.runs_frame(path).set_index("id")["draft"]
    assert drafts.to_dict() == {"swept": "sweep-38c27b0e8ded", "named": "scylla+ngram", "relative": "runs/drafts/mine"}


def test_newer_schema_refused(db):
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO schema_version VALUES (99, now())")
    con.close()
    with pytest.raises(ScyllaError, match="newer than this code"):
        store.insert_run(db, a_run())


def test_missing_file_read_only(tmp_path):
    with pytest.raises(ScyllaError, match="no store at"):
        store.runs_frame(tmp_path / "nope.duckdb")
    assert not (tmp_path / "nope.duckdb").exists()


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lock_held_by_other_process_gives_clear_error(db):
    holder = _python(f"""
        import duckdb, time
        con = duckdb.connect({str(db)!r})
        print("ready", flush=True)
        time.sleep(20)
    """)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ScyllaError, match="locked by a running sweep; try again"):
            store.connect(db, read_only=True, wait_s=0.3)
        with pytest.raises(ScyllaError, match="locked"):
            store.insert_run(db, a_run(), wait_s=0.3)
    finally:
        holder.kill()
        holder.wait()
    store.insert_run(db, a_run())                         # free again once the writer is gone


def test_read_while_a_sweep_writes(db):
    # A real sweep spends seconds per run between writes; with only a few ms
    # between writes a backing-off reader can miss every gap on a loaded machine.
    n = 12
    writer = _python(f"""
        import time
        from scylla.store import insert_run
        for i in range({n}):
            insert_run({str(db)!r}, {{"id": f"w{{i:03d}}", "tokens": 1000 * (i + 1), "tau": 2.0, "category": "all"}})
            time.sleep(0.25)
        print("done", flush=True)
    """)
    seen, sizes = 0, set()
    while writer.poll() is None:
        frame = store.runs_frame(db)          # must not raise: retries ride out the writer's lock
        assert frame["id"].is_unique
        assert len(frame) >= seen             # never goes backwards
        seen = len(frame)
        sizes.add(seen)
        time.sleep(0.02)                      # an app polls; a tight loop would starve the writer
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert any(0 < size < n for size in sizes)   # some reads really happened mid-sweep
    ids = store.runs_frame(db)["id"].tolist()
    assert sorted(ids) == [f"w{i:03d}" for i in range(n)]


def test_merge_store(tmp_path, db):
    sweep = tmp_path / "sweep.duckdb"
    store.write_runs_atomic(sweep, [a_run(id="a"), a_run(id="b")])
    store.insert_training(sweep, {"id": "t1", "layers": 1})
    store.insert_run(db, a_run(id="a", tau=9.9))           # dst already has "a": kept as is
    assert store.merge_store(sweep, db) == {"runs": 1, "trainings": 1}
    runs = store.runs_frame(db).set_index("id")
    assert sorted(runs.index) == ["a", "b"] and runs.loc["a", "tau"] == 9.9
    assert store.merge_store(sweep, db) == {"runs": 0, "trainings": 0}
    with pytest.raises(ScyllaError):
        store.merge_store(db, db)


def test_merge_from_v1_file(tmp_path, db):
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    store.migrate(con, target=1)
    con.execute("INSERT INTO runs (id, tau) VALUES (?, ?)", ["v1run", 1.7])
    con.close()
    assert store.merge_store(old, db)["runs"] == 1
    row = store.runs_frame(db).iloc[0]
    assert row["id"] == "v1run" and row["tau"] == 1.7 and row["notes"] is None
