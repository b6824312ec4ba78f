"""Sweeps: config errors before any work, and resume after a kill without loss or duplicates."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scylla import ScyllaError
from scylla.models import bundled_cache_dir
from scylla.store import init_db, runs_frame
from scylla.sweep import draft_key, grid_points, load_config, local_order, point_id
from tests.conftest import tiny_llama


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_local_sweep_measures_each_draft_at_all_its_points_before_training_the_next(tmp_path):
    cfg = load_config(write(tmp_path, "[grid]\ntokens = [1024, 4096]\ntemperature = [0.0, 1.0]"))
    order = [(p["tokens"], p["temperature"]) for p in local_order(cfg, grid_points(cfg))]
    assert order == [(1024, 0.0), (1024, 1.0), (4096, 0.0), (4096, 1.0)]
    assert len({draft_key(cfg, p) for p in grid_points(cfg)}) == 2


@pytest.mark.parametrize("text,needle", [
    ('bogus = 1\n[grid]\ndraft = ["ngram"]', "unknown key"),
    ('[grid]\ndraft = []', "non-empty"),
    ('[grid]\ntokens = [10]', "impossible"),
    ('[grid]\nlayers = [1]', "needs `tokens`"),
    ('[grid]\ndraft = ["ngram"]\nbatch = [0]', "impossible"),
    ('[grid\n', "invalid config"),
    ('prompts = "nope.jsonl"\n[grid]\ndraft = ["ngram"]', "not found"),
    ('[grid]\ntokens = [1024]\n[train]\nprecision = "fp8"', "precision must be"),
    ('[grid]\ntokens = [1024]\n[train]\nlabels = "fuzzy"', "labels must be"),
])
def test_config_errors_are_reported_before_any_work(tmp_path, text, needle):
    with pytest.raises(ScyllaError, match=needle):
        load_config(write(tmp_path, text))


def test_grid_and_ids_are_deterministic(tmp_path):
    cfg = load_config(write(tmp_path, '[grid]\ndraft = ["ngram"]\nk = [2, 4]'))
    points = grid_points(cfg)
    assert len(points) == 2 and {p["k"] for p in points} == {2, 4}
    assert point_id(cfg, points[0]) == point_id(load_config(write(tmp_path, '[grid]\ndraft = ["ngram"]\nk = [2, 4]', "b.toml")), points[0])


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    """A tiny random Llama with the bundled tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-target")
    model = tiny_llama(vocab=49152, hidden=32, layers=2, max_pos=2048, eos=2).float()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = bundled_cache_dir() / name
        if src.is_file():
            shutil.copy(src, folder / name)
    return folder


# The sweep SIGKILLs itself right after its second point is stored: a kill mid-sweep at a known place,
# whatever the machine's speed (a timed kill raced a sweep that finished first).
KILLED_AFTER_TWO_POINTS = """
import os, signal, sys
import scylla.store as store
write = store.write_runs_atomic
stored = []
def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    stored.append(1)
    if len(stored) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
store.write_runs_atomic = write_then_die
from scylla.cli import main
sys.exit(main(["sweep", sys.argv[1], "--db", sys.argv[2]]))
"""


def test_sweep_resumes_after_a_kill_without_loss_or_duplicates(tmp_path, tiny_target_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w} twice.", "category": c}) + "\n"
                               for w, c in [("hello", "a"), ("world", "b")]))
    config = write(tmp_path, f'target = "{tiny_target_dir}"\nprompts = "{prompts}"\nlimit = 2\nmax_new_tokens = 3\n'
                             '[grid]\ndraft = ["ngram", "layerskip:1"]\nk = [1, 2, 3]\n')
    db = str(tmp_path / "r.duckdb")
    init_db(db)
    cmd = [sys.executable, "-m", "scylla.cli", "sweep", config, "--db", db]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_POINTS, config, db], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-500:]
    first = runs_frame(db)
    assert first["id"].str.endswith("-all").sum() == 2  # killed mid-sweep, two points done
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-500:]
    runs = runs_frame(db)
    overall = runs[runs["category"] == "all"]
    assert len(overall) == 6 and runs["id"].is_unique
    assert set(first["id"]) <= set(runs["id"])  # nothing finished before the kill was lost
    assert (overall["exact_match_rate"] == 1.0).all()
    # speculation's gain over the engine's own plain decoding, stored beside it
    gain = overall["tokens_per_s"] / overall["plain_tokens_per_s"]
    assert overall["spec_gain"].notna().all() and ((gain - overall["spec_gain"]).abs() < 1e-3).all()
    assert runs.loc[runs["category"] != "all", "spec_gain"].notna().all()


def test_a_retrained_draft_gets_new_run_ids(tmp_path):
    folder = tmp_path / "mydraft"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"first weights")
    cfg = load_config(write(tmp_path, f'[grid]\ndraft = ["{folder}", "ngram"]\nk = [4]'))
    points = grid_points(cfg)
    before = [point_id(cfg, p) for p in points]
    assert before == [point_id(cfg, p) for p in points]
    (folder / "model.safetensors").write_bytes(b"retrained weights")
    after = [point_id(cfg, p) for p in points]
    changed = {p["draft"]: a != b for p, a, b in zip(points, before, after)}
    assert changed == {str(folder): True, "ngram": False}


def test_stored_rows_name_a_trained_draft_by_its_folder_not_its_path(tmp_path):
    from scylla.sweep import draft_label

    assert draft_label(str(tmp_path / "drafts" / "sweep-38c27b0e8ded")) == "sweep-38c27b0e8ded"
    assert draft_label("scylla+ngram") == "scylla+ngram" and draft_label("layerskip:4") == "layerskip:4"
