"""The prepared accelerator run (scripts/device_train.py), end to end on a tiny random target
with the real tokenizer, on the CPU: every phase runs and what comes back is usable."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scylla.head import load_head
from scylla.models import ensure_bundled_cached, load_target

ROOT = Path(__file__).resolve().parent.parent


def device_script():
    spec = importlib.util.spec_from_file_location("device_train", ROOT / "scripts" / "device_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real
def test_device_run_builds_trains_packs_and_measures(tmp_path, monkeypatch):
    tokenizer_dir = ensure_bundled_cached()          # before the cache moves to tmp
    monkeypatch.setenv("SCYLLA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCYLLA_WORK", str(tmp_path / "work"))
    out = tmp_path / "out"
    code = device_script().main(["--out", str(out), "--seconds", "240", "--tiny-from", str(tokenizer_dir),
                                 "--magpie", "16", "--longtext", "0", "--template", "6", "--max-new-tokens", "8",
                                 "--tokens", "3000", "--batch-tokens", "2048", "--eval-prompts", "2",
                                 "--eval-tokens", "8"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["corpus"]["sequences"] > 4000              # the committed answers-v2 rows and the new ones
    assert report["training"]["answer_positions"] > 0 and report["training"]["steps"] >= 1
    assert set(report["training"]["drafts"]) == {"scylla", "eagle3-style", "eagle2-style"}
    assert {"scylla@T0", "scylla@T1"} <= set(report["eval"]) and "eval_error" not in report
    assert (out / "corpus_tokens.npz").is_file() and (out / "corpus_meta.jsonl.gz").is_file()
    parts = sorted(out.glob("drafts.tar.part-*"))
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar xf - -C {unpacked}", shell=True, check=True)
    tiny = load_target(str(tmp_path / "work" / "tiny-target"))
    for name in ("scylla", "eagle3-style", "eagle2-style"):
        folder = unpacked / "drafts" / name
        record = json.loads((folder / "training.json").read_text())
        assert record["tokens"] == report["training"]["answer_positions"]
        assert str(tmp_path) not in (folder / "training.json").read_text()   # no machine path
        head = load_head(folder, tiny.model)
        assert head.cfg.tokens == record["tokens"] and head.cfg.max_positions == 2048


def test_device_run_refuses_a_bad_flag():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_train.py"), "--out", "x",
                           "--gen-dtype", "fp8"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
