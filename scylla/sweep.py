"""`scylla sweep CONFIG.toml`: a grid of draft trainings and evaluations into the store.

Each grid point has a deterministic id (a hash of its config), trains the draft it
needs (cached by config hash), benchmarks it against the baseline interleaved per
prompt, and writes its rows (overall + per category) in one transaction. Killing
the sweep loses at most the point in flight; rerunning skips finished points.

With `--executor ray` each point is a Ray task that declares its resources and returns
its rows; this process alone writes the store (DuckDB keeps one writer). A worker that
dies loses only its point: Ray runs it once more, and a point that still fails is
reported (the sweep exits 2) while every other point is stored; a rerun retries it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import socket
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from scylla import ScyllaError
from scylla.options import QUANTS

GRID_KEYS = {"tokens", "layers", "batch", "temperature", "k", "draft", "tree"}
TOP_KEYS = {"name", "target", "quant", "prompts", "limit", "max_new_tokens", "seed", "grid", "train"}
TRAIN_KEYS = {"fusion", "draft_vocab", "ttt", "seed", "corpus", "lr", "arch", "precision", "labels"}


@dataclass
class SweepConfig:
    name: str
    prompts: str
    limit: int
    max_new_tokens: int
    seed: int
    grid: dict
    train: dict = field(default_factory=dict)
    target: str = "smollm2"
    # every stored sweep ran the fp32 target; a sweep keeps it unless its file says `quant`,
    # so that a resumed sweep never mixes two targets' points
    quant: str = "none"


# What the app's sweep form starts from: untrained drafts, a few prompts, quick.
SMALL_CONFIG = {"name": "small-untrained", "prompts": "assets/eval_prompts.jsonl", "limit": 4,
                "max_new_tokens": 32, "grid": {"draft": ["ngram"], "k": [3, 6]}}


def read_raw_config(path: str) -> dict:
    """TOML, or JSON when the file ends in .json (the app writes JSON)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ScyllaError(f"sweep config not found: {path}") from None
    try:
        raw = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ScyllaError(f"{path}: invalid config ({exc})") from None
    if not isinstance(raw, dict):
        raise ScyllaError(f"{path}: the config must be a table/object")
    return raw


def load_config(path: str) -> SweepConfig:
    raw = read_raw_config(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ScyllaError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    grid = raw.get("grid", {})
    train = raw.get("train", {})
    check_grid(grid, path)
    if set(train) - TRAIN_KEYS:
        raise ScyllaError(f"{path}: unknown [train] key(s) {sorted(set(train) - TRAIN_KEYS)}")
    check_train_arch(train, grid, path)
    check_train_choices(train, path)
    cfg = SweepConfig(name=str(raw.get("name", Path(path).stem)),
                      prompts=str(raw.get("prompts", "assets/eval_prompts.jsonl")),
                      limit=int(raw.get("limit", 16)), max_new_tokens=int(raw.get("max_new_tokens", 64)),
                      seed=int(raw.get("seed", 0)), grid=grid, train=train,
                      target=str(raw.get("target", "smollm2")), quant=str(raw.get("quant", "none")))
    if cfg.quant not in QUANTS:
        raise ScyllaError(f"{path}: unknown quant {cfg.quant!r}; choose one of {', '.join(QUANTS)}")
    if cfg.limit < 1 or cfg.max_new_tokens < 1:
        raise ScyllaError(f"{path}: limit and max_new_tokens must be >= 1")
    if not Path(cfg.prompts).is_file():
        raise ScyllaError(f"{path}: prompts file not found: {cfg.prompts}")
    return cfg


def check_grid(grid: dict, path: str) -> None:
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ScyllaError(f"{path}: unknown [grid] key(s) {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ScyllaError(f"{path}: [grid] {key} must be a non-empty list")
    checks = {"tokens": lambda v: isinstance(v, int) and v >= 256, "layers": lambda v: isinstance(v, int) and 1 <= v <= 8,
              "batch": lambda v: isinstance(v, int) and 1 <= v <= 64, "temperature": lambda v: isinstance(v, (int, float)) and 0 <= v <= 2,
              "k": lambda v: v == "auto" or (isinstance(v, int) and 1 <= v <= 16),
              "tree": is_tree_shape, "draft": lambda v: isinstance(v, str)}
    for key, values in grid.items():
        bad = [v for v in values if not checks[key](v)]
        if bad:
            raise ScyllaError(f"{path}: impossible [grid] {key} value(s) {bad}")
    if "draft" not in grid and "tokens" not in grid:
        raise ScyllaError(f"{path}: the grid needs `tokens` (trained drafts) or `draft` (untrained kinds)")


def check_train_arch(train: dict, grid: dict, path: str) -> None:
    """[train] arch = "eagle3" trains EAGLE-3 drafts (one layer, multi fusion, a draft vocabulary)."""
    from types import SimpleNamespace

    from scylla.head import check_arch

    if "arch" not in train or "tokens" not in grid:
        return
    for layers in grid.get("layers", [1]):
        probe = SimpleNamespace(arch=train["arch"], layers=layers, fusion=train.get("fusion", "multi"),
                                draft_vocab=train.get("draft_vocab", 8192))
        try:
            check_arch(probe)
        except ScyllaError as exc:
            raise ScyllaError(f"{path}: [train] {exc}") from None


def check_train_choices(train: dict, path: str) -> None:
    """[train] precision and labels take one of their named values."""
    from scylla.train import LABELS, PRECISIONS

    for key, allowed in (("precision", PRECISIONS), ("labels", LABELS)):
        if key in train and train[key] not in allowed:
            raise ScyllaError(f"{path}: [train] {key} must be one of {', '.join(allowed)}, "
                              f"got {train[key]!r}")


def is_tree_shape(value) -> bool:
    from scylla.decoding import TreeShape

    try:
        TreeShape.parse(str(value))
    except ScyllaError:
        return False
    return True


def grid_points(cfg: SweepConfig) -> list[dict]:
    defaults = {"layers": [1], "batch": [1], "temperature": [0.0], "k": [5]}
    axes = {**defaults, **cfg.grid}
    keys = sorted(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_id(cfg: SweepConfig, point: dict) -> str:
    ident = [cfg.prompts, cfg.limit, cfg.max_new_tokens, cfg.seed, cfg.train, point]
    if cfg.target != "smollm2":  # ids of runs on the default target stay as they were
        ident.append(cfg.target)
    if cfg.quant != "none":
        ident.append(cfg.quant)
    weights = trained_draft_weights(point.get("draft"))
    if weights:  # a retrained named draft is a new run, not one already done
        ident.append(weights)
    raw = json.dumps(ident, sort_keys=True)
    return "sweep-" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def trained_draft_weights(spec: str | None) -> str | None:
    """sha256 (16 hex) of a named or folder draft's weights; None for untrained kinds."""
    from scylla.drafts import NAMED_DRAFTS
    from scylla.head import WEIGHTS, named_draft_dir

    if not spec or spec in ("none", "ngram") or spec.startswith("layerskip"):
        return None
    folder = named_draft_dir(spec) if spec in NAMED_DRAFTS else Path(spec)
    path = folder / WEIGHTS
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def draft_folder(cfg: SweepConfig, point: dict) -> Path:
    from scylla.models import cache_root

    return cache_root() / "drafts" / draft_key(cfg, point)


def draft_key(cfg: SweepConfig, point: dict) -> str:
    """The trained draft a point needs: one per [train] settings, tokens and layers."""
    key = json.dumps([cfg.train, point["tokens"], point["layers"]], sort_keys=True)
    return "sweep-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def finished_ids(db: str) -> set[str]:
    from scylla.store import runs_frame

    if not Path(db).is_file():
        return set()
    frame = runs_frame(db)
    return set(frame["id"]) if len(frame) else set()


EXECUTORS = ("local", "ray")
RAY_RETRIES = 1   # a point whose worker dies runs once more, then is reported


def check_executor(args) -> None:
    executor = getattr(args, "executor", None) or "local"
    if executor not in EXECUTORS:
        raise ScyllaError(f"unknown --executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if getattr(args, "address", None) and executor != "ray":
        raise ScyllaError("--address is for --executor ray")
    if executor == "ray" and not getattr(args, "dry_run", False):
        import_ray()
        if args.address:
            check_reachable(args.address)   # before anything is printed or written


def sweep_command(args) -> int:
    check_executor(args)
    cfg = load_config(args.config)
    points = grid_points(cfg)
    done = finished_ids(args.db)
    todo = [p for p in points if point_id(cfg, p) + "-all" not in done]
    print(f"sweep {cfg.name}: {len(points)} points, {len(points) - len(todo)} done, {len(todo)} to run", file=sys.stderr)
    if args.dry_run:
        for p in points:
            state = "done" if p not in todo else "todo"
            print(f"{state}  {json.dumps(p, sort_keys=True)}")
        return 0
    if getattr(args, "executor", "local") == "ray":
        return run_on_ray(cfg, todo, args.db, args.config, getattr(args, "address", None),
                          getattr(args, "cpus_per_point", 1))
    from scylla.models import load_target
    from scylla.store import init_db

    init_db(args.db)
    target = load_target(cfg.target, cfg.quant)
    for point in tqdm(local_order(cfg, todo), desc=f"sweep {cfg.name}", unit="point"):
        run_point(cfg, point, target, args.db, args.config)
    return 0


def local_order(cfg: SweepConfig, points: list[dict]) -> list[dict]:
    """Each draft measured at all its points before the next one trains: a sweep stopped early
    leaves whole drafts, and the grid's first (smallest) draft comes first."""
    return [p for queue in draft_queues(cfg, points) for p in queue]


def run_point(cfg: SweepConfig, point: dict, target, db: str, config_path: str) -> None:
    from scylla.store import insert_training, write_runs_atomic

    spec, record = point_draft(cfg, point, target)
    if record is not None:  # stored before the bench: a kill mid-bench keeps the training
        insert_training(db, record)
    write_runs_atomic(db, bench_rows(cfg, point, target, spec, config_path))


def point_draft(cfg: SweepConfig, point: dict, target) -> tuple[str, dict | None]:
    """The point's draft spec, training it first where the point trains one (and its record
    when it was trained now)."""
    if point.get("draft") is not None:
        return point["draft"], None
    folder, record = ensure_draft(cfg, point, target)
    return str(folder), record


def bench_rows(cfg: SweepConfig, point: dict, target, spec: str, config_path: str) -> list[dict]:
    from scylla.bench import run_bench
    from scylla.data import load_prompts
    from scylla.drafts import make_draft

    draft = make_draft(spec, target)
    prompts = load_prompts(cfg.prompts, cfg.limit)
    report = run_bench(target, draft, prompts, cfg.max_new_tokens, point["k"], point["temperature"],
                       1.0, cfg.seed, spec, point["batch"], tree=point.get("tree"))
    return report_rows(cfg, point, report, spec, config_path)


# ---------------------------------------------------------------- on Ray

_WORKER_TARGETS: dict = {}   # a Ray worker process loads each target once


def point_task(cfg: SweepConfig, point: dict, config_path: str) -> dict:
    """One point on a Ray worker: trains and measures, writes nothing; returns its rows."""
    from scylla.models import load_target

    key = (cfg.target, cfg.quant)
    if key not in _WORKER_TARGETS:
        _WORKER_TARGETS[key] = load_target(cfg.target, cfg.quant)
    target = _WORKER_TARGETS[key]
    spec, record = point_draft(cfg, point, target)
    return {"training": record, "rows": bench_rows(cfg, point, target, spec, config_path)}


def point_resources(point: dict, cpus: int, cluster_gpus: float) -> dict:
    """What a point's task declares: its CPUs, and a GPU when it trains a draft on a cluster that has one."""
    trains = point.get("draft") is None
    return {"num_cpus": cpus, "num_gpus": 1 if trains and cluster_gpus >= 1 else 0}


def run_on_ray(cfg: SweepConfig, todo: list[dict], db: str, config_path: str, address: str | None,
               cpus: int = 1) -> int:
    ray = import_ray()
    started = connect_ray(ray, address)
    try:
        from scylla.store import init_db

        init_db(db)
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(point_task)

        def submit(point):
            return task.options(**point_resources(point, cpus, gpus), max_retries=RAY_RETRIES) \
                .remote(cfg, point, config_path)

        failed = collect_points(ray, submit, draft_queues(cfg, todo), db, cfg.name)
    finally:
        if started:
            ray.shutdown()
    if failed:
        raise ScyllaError(f"{len(failed)} of {len(todo)} point(s) failed, the others are stored; rerun "
                          f"to retry them (first: {failed[0]})")
    return 0


def draft_queues(cfg: SweepConfig, points: list[dict]) -> list[list[dict]]:
    """Points that train the same draft, in one queue each (run one after another, so that two
    workers never train one draft folder at once); every other point alone."""
    queues: dict[str, list[dict]] = {}
    for i, point in enumerate(points):
        key = draft_key(cfg, point) if point.get("draft") is None else f"point-{i}"
        queues.setdefault(key, []).append(point)
    return list(queues.values())


def collect_points(ray, submit, queues: list[list[dict]], db: str, name: str) -> list[str]:
    """Store each point's rows as it finishes (this process is the store's one writer); then
    submit the next point of its queue."""
    from scylla.store import insert_training, write_runs_atomic

    pending = {submit(q[0]): (q[0], q[1:]) for q in queues}
    failed = []
    bar = tqdm(total=sum(map(len, queues)), desc=f"sweep {name} (ray)", unit="point")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        point, rest = pending.pop(ready[0])
        if rest:
            pending[submit(rest[0])] = (rest[0], rest[1:])
        try:
            out = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            failed.append(f"{json.dumps(point, sort_keys=True)}: {task_error(exc)}")
            tqdm.write(f"scylla: point failed: {failed[-1]}", file=sys.stderr)
        else:
            if out["training"] is not None:
                insert_training(db, out["training"])
            write_runs_atomic(db, out["rows"])
        bar.update(1)
    bar.close()
    return failed


def task_error(exc: Exception) -> str:
    """One line: the task's own error where it raised one, else Ray's first line (a dead worker)."""
    cause = getattr(exc, "cause", None)
    text = str(cause) if cause is not None else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]


def import_ray():
    try:
        import ray
    except ImportError:
        raise ScyllaError("--executor ray needs the ray package (pip install ray)") from None
    return ray


def connect_ray(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray; True when this call started or
    joined it (so it disconnects after). Nothing answering at `address` is one line."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
        else:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ScyllaError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                          f"{task_error(exc)}") from None
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (Ray itself waits long) when nothing listens at HOST:PORT or ray://HOST:PORT."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ScyllaError(f"--address {address!r}: use HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ScyllaError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); nothing was run "
                          "or written") from None


def ensure_draft(cfg: SweepConfig, point: dict, target) -> tuple[Path, dict | None]:
    """Train the point's draft unless a finished one is cached; return (folder, new record)."""
    from scylla.data import load_feature_sequences
    from scylla.pipeline import ensure_features
    from scylla.train import TrainConfig, train_head, training_row

    folder = draft_folder(cfg, point)
    if (folder / "training.json").is_file():
        return folder, None
    t = cfg.train
    tcfg = TrainConfig(tokens=point["tokens"], layers=point["layers"], fusion=t.get("fusion", "multi"),
                       draft_vocab=t.get("draft_vocab", 8192), ttt_steps=t.get("ttt", 3),
                       seed=t.get("seed", 0), lr=t.get("lr", 1e-3), kind="scylla-sweep",
                       arch=t.get("arch", "eagle"), precision=t.get("precision", "auto"),
                       labels=t.get("labels", "hard"))
    seqs = load_feature_sequences(ensure_features(target, t.get("corpus", "mix")))
    record = train_head(target, seqs, tcfg, folder, target.name)
    row = {**training_row(record), "target": target.name, "corpus": t.get("corpus", "mix"),
           "command": f"scylla sweep ({cfg.name})"}
    return folder, row


def draft_label(spec: str) -> str:
    """What the store names a draft: a trained point's cache folder by its name (sweep-<key>),
    never by a path on this machine; a named or untrained draft by its spec."""
    return Path(spec).name if Path(spec).is_absolute() else spec


def report_rows(cfg: SweepConfig, point: dict, report: dict, spec: str, config_path: str) -> list[dict]:
    from scylla.head import read_config

    base = {"command": f"scylla sweep {config_path}", "device": report["device"], "target": report["target"],
            "quant": report["quant"], "draft": draft_label(spec), "temperature": point["temperature"], "top_p": 1.0,
            "shape": report["shape"], "k": point["k"] if point["k"] != "auto" and "tree" not in point else None,
            "batch": point["batch"], "prompt_set": Path(cfg.prompts).name,
            "notes": f"mean draft length per step {report['k_mean']}" if point["k"] == "auto" else None}
    if "tokens" in point and "draft" not in point:
        head = read_config(Path(spec))
        base.update({"draft_kind": "scylla", "layers": head.layers, "fusion": head.fusion,
                     "draft_vocab": head.draft_vocab, "tokens": head.tokens, "train_seed": head.seed})
    else:
        base["draft_kind"] = spec.split(":")[0]
    pid = point_id(cfg, point)
    overall = {**base, "id": pid + "-all", "category": "all", "n_prompts": report["n_prompts"],
               "tau": report["tau"], "accept_rate": report["accept_rate"],
               "per_position_accept": report["per_position_accept"], "tokens_per_s": report["tokens_per_s"],
               "baseline_tokens_per_s": report["baseline_tokens_per_s"], "speedup": report["speedup"],
               "throughput": report["tokens_per_s"], "exact_match_rate": report["exact_match_rate"],
               "wall_s": report["wall_s"], "draft_ms": report["draft_ms_per_step"],
               "verify_ms": report["verify_ms_per_step"], "plain_tokens_per_s": report["plain_tokens_per_s"],
               "spec_gain": report["spec_gain"]}
    rows = [overall]
    for cat, c in sorted(report["by_category"].items()):
        rows.append({**base, "id": f"{pid}-{cat}", "category": cat, "n_prompts": c["n"], "tau": c["tau"],
                     "accept_rate": c["accept_rate"], "speedup": c["speedup"], "spec_gain": c["spec_gain"]})
    return rows


# ---------------------------------------------------------------- Scylla's recommendation, checked

def recommend_command(args) -> dict:
    """Recommend (layers, tokens, k) for a batch size and token budget from the runs measured
    with the config's evaluation set-up; with --check, train or load that draft, measure it as a
    point of the same sweep, and store the predicted-versus-measured pair."""
    from scylla.laws import recommend
    from scylla.store import insert_prediction, runs_frame

    cfg = load_config(args.config)
    runs = comparable_runs(runs_frame(args.db), cfg)
    out = recommend(runs, batch=args.batch, budget_tokens=args.budget_tokens)
    best = out["best"]
    print(f"recommended: layers {best['layers']}, tokens {best['tokens']}, k {best['k']}: predicted tau "
          f"{best['predicted_tau']:.3f} [{best['tau_low']:.3f}, {best['tau_high']:.3f}], speedup "
          f"{best['predicted_speedup']:.3f} [{best['speedup_low']:.3f}, {best['speedup_high']:.3f}]",
          file=sys.stderr)
    if not args.check:
        return out
    point = {"batch": args.batch, "k": int(best["k"]), "layers": int(best["layers"]),
             "temperature": 0.0, "tokens": int(best["tokens"])}
    run_id = point_id(cfg, point) + "-all"
    if run_id not in finished_ids(args.db):
        from scylla.models import load_target

        run_point(cfg, point, load_target(cfg.target, cfg.quant), args.db, args.config)
    measured = runs_frame(args.db).set_index("id").loc[run_id]
    pair = {**{k: best[k] for k in ("batch", "budget_tokens", "layers", "tokens", "k", "predicted_tau",
                                     "tau_low", "tau_high", "predicted_speedup", "speedup_low", "speedup_high")},
            "measured_tau": float(measured["tau"]), "measured_speedup": float(measured["speedup"]),
            "run_id": run_id}
    pair["prediction_id"] = insert_prediction(args.db, pair)
    pair["tau_inside_interval"] = bool(best["tau_low"] <= pair["measured_tau"] <= best["tau_high"])
    print(f"measured: tau {pair['measured_tau']:.3f} ({'inside' if pair['tau_inside_interval'] else 'OUTSIDE'} "
          f"the prediction interval), speedup {pair['measured_speedup']:.3f}", file=sys.stderr)
    return {**out, "check": pair}


def comparable_runs(runs, cfg: SweepConfig):
    """Trained-draft runs measured like this config: same prompt set, greedy, overall rows."""
    if runs.empty:
        raise ScyllaError("the store holds no runs: run a tokens or layers sweep first")
    keep = (runs["tokens"].notna() & (runs["prompt_set"] == Path(cfg.prompts).name)
            & (runs["temperature"] == 0.0) & (runs["category"] == "all"))
    chosen = runs[keep]
    if chosen.empty:
        raise ScyllaError(f"no trained-draft runs on {Path(cfg.prompts).name} at T=0 to fit a law to")
    return chosen
