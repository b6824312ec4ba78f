"""Unpack what scripts/device_train.py brought back and record it.

    python scripts/store_device_run.py FILES_DIR --dest runs/device-v3 --db results.duckdb [--ship]

FILES_DIR holds drafts.tar.part-*, report.json (and corpus files when the run saved them).
The drafts land in DEST/drafts/NAME; each training goes into the store's trainings table;
--ship copies the drafts (float16 already) into assets/drafts/NAME.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scylla import ScyllaError  # noqa: E402
from scylla.head import shipped_dir  # noqa: E402
from scylla.store import insert_training  # noqa: E402
from scylla.train import training_row  # noqa: E402

STORE_SKIPS = ("in_vocab",)   # training.json keeps it; the trainings table has no column for it


def unpack(files: Path, dest: Path) -> list[Path]:
    parts = sorted(files.glob("drafts.tar.part-*"))
    if not parts:
        raise ScyllaError(f"{files}: no drafts.tar.part-* files")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar xf - -C {dest}", shell=True, check=True)
    for name in ("report.json", "log.txt", "corpus_tokens.npz", "corpus_meta.jsonl.gz"):
        if (files / name).is_file():
            shutil.copy(files / name, dest / name)
    return sorted(p for p in (dest / "drafts").iterdir() if p.is_dir())


def store(folder: Path, db: str) -> str:
    record = json.loads((folder / "training.json").read_text())
    row = {k: v for k, v in training_row(record).items() if k not in STORE_SKIPS}
    return insert_training(db, {**row, "target": "SmolLM2-135M-Instruct", "host": "lent accelerator",
                                "command": "python scripts/device_train.py"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files")
    p.add_argument("--dest", required=True)
    p.add_argument("--db")
    p.add_argument("--ship", action="store_true")
    args = p.parse_args(argv)
    try:
        for folder in unpack(Path(args.files), Path(args.dest)):
            if args.db:
                print(f"{folder.name}: training {store(folder, args.db)}")
            if args.ship:
                target = shipped_dir() / folder.name
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(folder, target)
                print(f"{folder.name}: shipped to {target}")
    except (ScyllaError, OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
