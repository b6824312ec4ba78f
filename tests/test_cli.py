"""The CLI contracts: one-line errors for bad input, and `scylla bench` JSON on the real target."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scylla.cli import main
from scylla.decoding import generate_ids
from scylla.drafts import make_draft
from scylla.models import encode_prompt

BENCH_KEYS = {"n_prompts", "tau", "accept_rate", "per_position_accept", "tokens_per_s", "baseline_tokens_per_s",
              "speedup", "exact_match_rate", "by_category", "target", "draft", "device", "batch_size", "temperature",
              "backend", "plain_tokens_per_s", "spec_gain", "forward_ms", "verify_cost_ratio"}


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args,needle", [
    (["bench", "--prompts", "missing.jsonl", "--json", "o.json"], "not found"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--max-new-tokens", "0"], "max_new_tokens"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--temperature", "-1"], "temperature"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--top-p", "1.5"], "top_p"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--draft", "magic"], "unknown --draft"),
    (["generate", "   ", "--draft", "ngram"], "empty prompt"),
    (["sweep", "missing.toml"], "not found"),
    (["recommend", "--config", "sweeps/tokens.toml", "--budget-tokens", "100", "--db", "missing.duckdb"], "no store"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--tree", "3,2"], "tree"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--tree", "3,2,600"], "tree"),
    (["fit", "--csv", "missing.csv", "--x", "a", "--y", "b"], "no such CSV file: missing.csv"),
    (["train-draft", "--tokens", "4096", "--align-tokens", "10"], "--align-tokens"),
    (["train-draft", "--tokens", "4096", "--layers", "9"], "--layers"),
    (["train-draft", "--tokens", "4096", "--recipe", "eagle2-style", "--fusion", "multi"], "--recipe eagle2-style"),
    (["compare-drafts", "--prompts", "assets/broad_prompts.jsonl", "--json", "o.json", "--drafts", "ngram,magic"], "unknown --draft"),
    (["compare-drafts", "--prompts", "assets/broad_prompts.jsonl", "--json", "o.json", "--drafts", " , "], "at least one"),
    (["compare-drafts", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--split", "tune"], "no prompts in split 'tune'"),
    (["bench", "--prompts", "assets/eval_prompts.jsonl", "--json", "o.json", "--draft", "layerskip:2", "--tree", "2,2,4"], "chains only"),
])
def test_bad_input_gives_one_line_and_exit_2(args, needle, capsys):
    code, err = run_cli(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("scylla: error:")
    assert needle in err[0]


def test_malformed_jsonl_line_is_named(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{not json}\n')
    code, err = run_cli(["bench", "--prompts", str(bad), "--json", str(tmp_path / "o.json")], capsys)
    assert code == 2 and ":2:" in err[0] and "malformed" in err[0]


def test_wrong_flag_is_a_usage_error_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "scylla.cli", "bench", "--prompts", "p.jsonl", "--json", "o.json", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unrecognized arguments" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.real
def test_bench_json_contract_on_the_real_target(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Translate to French: good morning"], "category": "translation", "question_id": "a"}\n'
                       '{"prompt": "Summarize: the cat sat on the mat. The cat sat on the mat.", "category": "sum"}\n')
    out = tmp_path / "o.json"
    code = main(["bench", "--prompts", str(prompts), "--max-new-tokens", "8", "--draft", "ngram", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert BENCH_KEYS <= set(report)
    assert report["n_prompts"] == 2 and set(report["by_category"]) == {"translation", "sum"}
    assert report["exact_match_rate"] == 1.0
    assert report["tau"] >= 1.0 and report["speedup"] > 0
    assert report["backend"] == "lean" and report["plain_tokens_per_s"] > 0
    assert report["spec_gain"] == pytest.approx(report["tokens_per_s"] / report["plain_tokens_per_s"], rel=1e-3)
    assert all({"n", "tau", "speedup", "spec_gain"} <= set(c) for c in report["by_category"].values())
    assert "1" in report["forward_ms"] or 1 in report["forward_ms"]
    assert report["verify_cost_ratio"] is None or 0.3 < report["verify_cost_ratio"] < 10
    code = main(["bench", "--prompts", str(prompts), "--limit", "1", "--max-new-tokens", "6", "--draft", "ngram",
                 "--temperature", "1.0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["exact_match_rate"] is None and report["temperature"] == 1.0


@pytest.mark.real
def test_real_target_greedy_equality_with_every_draft_kind(real_target):
    prompts = ["Summarize: The quick brown fox jumps over the lazy dog. The dog slept under the tree.",
               "Write a Python function that adds two numbers."]
    cases = [(prompts[0], "ngram"), (prompts[0], "scylla"), (prompts[1], "layerskip:20")]
    for text, spec in cases:
        ids = encode_prompt(real_target, text)
        base = real_target.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        want = base[0, len(ids):].tolist()
        got, _ = generate_ids(real_target, make_draft(spec, real_target), ids, max_new_tokens=24, k=4)
        assert got == want, spec


@pytest.mark.real
def test_batched_bench_and_tree_bench_on_the_real_target(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Summarize: the cat sat on the mat. The cat sat on the mat.", "category": "sum"}\n'
                       '{"prompt": "Name three colours.", "category": "qa"}\n'
                       '{"prompt": "Write a haiku about rain, then repeat it.", "category": "writing"}\n')
    out = tmp_path / "o.json"
    assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "10", "--draft", "ngram",
                 "--batch-size", "2", "--k", "auto", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert BENCH_KEYS <= set(report) and report["batch_size"] == 2 and report["n_prompts"] == 3
    assert report["exact_match_rate"] == 1.0 and report["k"] == "auto" and report["k_mean"] is not None
    assert 0 <= report["drafted_mean"] <= report["k_mean"]
    for batch in ("1", "2"):
        assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "10", "--draft", "scylla",
                     "--tree", "3,3,8", "--batch-size", batch, "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["shape"] == "tree:3,3,8" and report["exact_match_rate"] == 1.0


def test_the_cli_offers_exactly_the_training_recipes():
    from scylla.cli import build_parser
    from scylla.train import RECIPES

    train = build_parser()._subparsers._group_actions[0].choices["train-draft"]
    recipe = next(a for a in train._actions if a.dest == "recipe")
    assert list(recipe.choices) == list(RECIPES)


def test_a_named_draft_wins_over_the_package_folder_of_the_same_name(tmp_path, capsys, monkeypatch):
    """From the project root `scylla` is also a folder (the package); export must take the draft."""
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    out = tmp_path / "eagle3"
    code = main(["export-draft", "scylla", "--format", "eagle3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
