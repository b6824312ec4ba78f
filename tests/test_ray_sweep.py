"""Sweeps on Ray: the same rows as in-process, workers that die mid-point lose only their
point, the driver alone writes the store, and bad --executor/--address are one line."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import ray  # a hard dependency: a broken install must fail here, not skip

from scylla import ScyllaError, sweep
from scylla.store import runs_frame
from tests.conftest import wait_for
from tests.test_sweep import tiny_target_dir, write  # noqa: F401  (a module-scoped fixture)

ROOT = Path(__file__).resolve().parent.parent
SAME = ["id", "category", "draft", "k", "batch", "n_prompts", "tau", "accept_rate", "exact_match_rate"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for this module (the sweep joins it rather than starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture
def config(tmp_path, tiny_target_dir):  # noqa: F811
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w} twice.", "category": c}) + "\n"
                               for w, c in [("hello", "a"), ("world", "b")]))
    return write(tmp_path, f'target = "{tiny_target_dir}"\nprompts = "{prompts}"\nlimit = 2\nmax_new_tokens = 3\n'
                           '[grid]\ndraft = ["ngram", "layerskip:1"]\nk = [1, 2]\n')


def sweep_args(config, db, executor="ray", **extra):
    return argparse.Namespace(config=config, db=str(db), dry_run=False, executor=executor,
                              address=None, cpus_per_point=1, **extra)


def stored(db):
    runs = runs_frame(db)
    return runs[SAME].sort_values("id").reset_index(drop=True)


def test_ray_sweep_stores_the_same_rows_as_in_process(local_ray, config, tmp_path):
    assert sweep.sweep_command(sweep_args(config, tmp_path / "local.duckdb", executor="local")) == 0
    assert sweep.sweep_command(sweep_args(config, tmp_path / "ray.duckdb")) == 0
    local, on_ray = stored(tmp_path / "local.duckdb"), stored(tmp_path / "ray.duckdb")
    assert len(on_ray[on_ray["category"] == "all"]) == 4 and on_ray["id"].is_unique
    assert local.equals(on_ray)
    # finished points are skipped: a rerun submits nothing and changes nothing
    assert sweep.sweep_command(sweep_args(config, tmp_path / "ray.duckdb")) == 0
    assert stored(tmp_path / "ray.duckdb").equals(on_ray)


def stalling_task(pid_file: str, victim_k: int):
    """point_task, except that the first attempt at the victim point writes its worker's pid
    and stalls there, so that the test can kill that worker mid-point."""
    def task(cfg, point, config_path):
        import os
        import time

        from scylla import sweep as worker_sweep

        if point["k"] == victim_k and point["draft"] == "layerskip:1" and not os.path.exists(pid_file):
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(pid_file + ".tmp", pid_file)
            time.sleep(300)
        return worker_sweep.point_task(cfg, point, config_path)
    return task


def kill_when_stalled(pid_file: Path) -> threading.Thread:
    def killer():
        assert wait_for(pid_file.exists, timeout_s=240, every_s=0.1)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a Ray worker this test started
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def test_a_worker_killed_mid_point_is_retried_and_nothing_is_lost_or_doubled(local_ray, config, tmp_path,
                                                                             monkeypatch):
    pid_file = tmp_path / "victim.pid"
    monkeypatch.setattr(sweep, "point_task", stalling_task(str(pid_file), victim_k=2))
    killer = kill_when_stalled(pid_file)
    db = tmp_path / "r.duckdb"
    assert sweep.sweep_command(sweep_args(config, db)) == 0
    killer.join(timeout=5)
    runs = stored(db)
    assert not pid_alive(int(pid_file.read_text()))  # the worker did die mid-point
    assert len(runs[runs["category"] == "all"]) == 4 and runs["id"].is_unique


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"   # a zombie is dead


def test_a_point_whose_worker_dies_again_is_reported_and_a_rerun_finishes_it(local_ray, config, tmp_path,
                                                                             monkeypatch):
    pid_file = tmp_path / "victim.pid"
    monkeypatch.setattr(sweep, "RAY_RETRIES", 0)
    monkeypatch.setattr(sweep, "point_task", stalling_task(str(pid_file), victim_k=1))
    killer = kill_when_stalled(pid_file)
    db = tmp_path / "r.duckdb"
    with pytest.raises(ScyllaError, match="1 of 4 point.*failed.*rerun") as err:
        sweep.sweep_command(sweep_args(config, db))
    killer.join(timeout=5)
    assert "\n" not in str(err.value)
    first = stored(db)
    assert len(first[first["category"] == "all"]) == 3  # every other point is stored
    monkeypatch.undo()
    assert sweep.sweep_command(sweep_args(config, db)) == 0
    runs = stored(db)
    assert len(runs[runs["category"] == "all"]) == 4 and runs["id"].is_unique
    assert set(first["id"]) <= set(runs["id"])


def test_points_declare_cpus_and_a_gpu_only_when_they_train_on_a_cluster_with_one():
    assert sweep.point_resources({"draft": "ngram", "k": 2}, 2, 8) == {"num_cpus": 2, "num_gpus": 0}
    assert sweep.point_resources({"tokens": 4096, "k": 2}, 1, 8) == {"num_cpus": 1, "num_gpus": 1}
    assert sweep.point_resources({"tokens": 4096, "k": 2}, 1, 0) == {"num_cpus": 1, "num_gpus": 0}


def scylla(*args):
    return subprocess.run([sys.executable, "-m", "scylla.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_executor_and_unreachable_address_are_one_line_and_write_nothing(config, tmp_path):
    db = tmp_path / "never.duckdb"
    bad = scylla("sweep", config, "--db", str(db), "--executor", "dask")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "executor" in bad.stderr
    away = scylla("sweep", config, "--db", str(db), "--executor", "ray", "--address", f"127.0.0.1:{free_port()}")
    assert away.returncode == 2 and away.stderr.count("\n") == 1, away.stderr[-500:]
    assert "no Ray cluster answers" in away.stderr
    odd = scylla("sweep", config, "--db", str(db), "--executor", "ray", "--address", "nowhere")
    assert odd.returncode == 2 and odd.stderr.count("\n") == 1 and "HOST:PORT" in odd.stderr
    local = scylla("sweep", config, "--db", str(db), "--address", "127.0.0.1:6379")
    assert local.returncode == 2 and local.stderr.count("\n") == 1 and "--executor ray" in local.stderr
    assert not db.exists()


def test_points_that_train_one_draft_queue_behind_each_other(tmp_path):
    cfg = sweep.load_config(write(tmp_path, '[grid]\ntokens = [4096, 8192]\nk = [2, 4]\nbatch = [1, 2]\n'))
    queues = sweep.draft_queues(cfg, sweep.grid_points(cfg))
    assert sorted(len(q) for q in queues) == [4, 4]
    assert all(len({p["tokens"] for p in q}) == 1 for q in queues)
    untrained = sweep.load_config(write(tmp_path, '[grid]\ndraft = ["ngram"]\nk = [2, 4]\n', "u.toml"))
    assert [len(q) for q in sweep.draft_queues(untrained, sweep.grid_points(untrained))] == [1, 1]
