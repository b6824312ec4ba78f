"""`scylla bench`: per prompt, interleaved: the baseline (transformers generate()), the
engine's plain decoding on its own forward, and the engine with the draft. `speedup` is over
generate(); `spec_gain` over the engine's plain decoding (what speculation alone gains)."""
from __future__ import annotations

import platform
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from scylla import ScyllaError
from scylla.decoding import TreeShape, batch_generate_ids, check_decode_args, generate_ids, pad_id
from scylla.models import encode_row
from scylla.trace import summarize


def baseline_generate(target, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                      top_p: float, seed: int | None) -> list[int]:
    """Plain transformers generate() on the same target: greedy at T=0, sampling at T>0."""
    ids = torch.tensor([prompt_ids], device=target.device)
    kwargs = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature,
                                                              "top_p": top_p, "top_k": 0}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=max_new_tokens, eos_token_id=target.eos_ids,
                                    pad_token_id=target.tokenizer.pad_token_id, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def device_name(target) -> str:
    if target.device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(target, draft, prompts: list[dict], max_new_tokens: int = 128, k: int = 6,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, draft_spec: str = "none",
              batch_size: int = 1, warmup: bool = True, tree=None) -> dict:
    check_decode_args(max_new_tokens, temperature, top_p, k)
    tree = TreeShape.parse(tree) if isinstance(tree, str) else tree
    if batch_size < 1:
        raise ScyllaError(f"--batch-size must be >= 1, got {batch_size}")
    encoded = [encode_checked(target, p, max_new_tokens) for p in prompts]
    if batch_size > 1:
        return run_batched_bench(target, draft, prompts, encoded, max_new_tokens, k, temperature,
                                 top_p, seed, draft_spec, batch_size, warmup, tree)
    if warmup:  # first calls pay one-off allocation costs; keep them out of every timing
        baseline_generate(target, encoded[0][:32], 4, 0.0, 1.0, None)
        generate_ids(target, draft, encoded[0][:32], max_new_tokens=4, k=k, tree=tree)
        generate_ids(target, None, encoded[0][:32], max_new_tokens=4)
    rows = []
    for i, (p, ids) in enumerate(tqdm(list(zip(prompts, encoded)), desc="bench", unit="prompt")):
        base, base_s = timed(baseline_generate, target, ids, max_new_tokens, temperature, top_p, seed + i)
        decode = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
        (plain, plain_steps), plain_s = timed(generate_ids, target, None, ids, **decode)
        if draft is None:  # --draft none: the engine's plain decoding is the measured engine
            (spec, steps), spec_s = (plain, plain_steps), plain_s
        else:
            (spec, steps), spec_s = timed(generate_ids, target, draft, ids, k=k, tree=tree, **decode)
        rows.append({"category": p["category"], "base": base, "base_s": base_s, "spec": spec, "spec_s": spec_s,
                     "steps": steps, "plain": plain, "plain_s": plain_s, "plain_steps": plain_steps,
                     "prompt_tokens": len(ids)})
    report = bench_report(rows, target, draft_spec, temperature, top_p, batch_size, k, max_new_tokens)
    report.update(decode_rates(rows))
    if tree is not None:
        report.update({"shape": str(tree), "k": None, "tree_nodes_mean": mean_tree_size(rows)})
    return report


def decode_rates(rows: list[dict]) -> dict:
    """One prompt at a time: tokens/s with the prefill forward and its first token taken out
    (what llama.cpp reports as eval speed), and the prefill's own prompt tokens/s."""

    def decode_tps(out_key, seconds_key, steps_key):
        tokens = sum(max(len(r[out_key]) - 1, 0) for r in rows)
        seconds = sum(r[seconds_key] - r[steps_key][0].verify_ms / 1e3 for r in rows)
        return round(tokens / seconds, 3) if seconds > 0 else None

    prefill_s = sum(r["plain_steps"][0].verify_ms for r in rows) / 1e3
    plain, spec = decode_tps("plain", "plain_s", "plain_steps"), decode_tps("spec", "spec_s", "steps")
    return {"plain_decode_tokens_per_s": plain, "decode_tokens_per_s": spec,
            "decode_spec_gain": round(spec / plain, 4) if plain and spec else None,
            "prefill_tokens_per_s": round(sum(r["prompt_tokens"] for r in rows) / prefill_s, 1),
            "first_token_s_max": round(max(r["plain_steps"][0].verify_ms for r in rows) / 1e3, 4)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where two outputs differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(rows: list[dict]) -> dict:
    """Speculative against the engine's own plain decoding (losslessness on this forward),
    and the engine's plain decoding against generate() on the fp32 model (what a quantized
    forward changes): the share identical and where the first difference falls."""
    firsts = [first_difference(r["plain"], r["base"]) for r in rows]
    differing = sorted(f for f in firsts if f is not None)
    return {"spec_plain_match_rate": sum(r["spec"] == r["plain"] for r in rows) / len(rows),
            "plain_first_diff_median": differing[len(differing) // 2] if differing else None}


def mean_tree_size(rows: list[dict]) -> float:
    sizes = [s.tree_size for r in rows for s in r["steps"] if s.index > 0]
    return round(sum(sizes) / max(len(sizes), 1), 2)


def encode_checked(target, prompt: dict, max_new_tokens: int) -> list[int]:
    ids = encode_row(target, prompt)
    if len(ids) + max_new_tokens > target.max_positions:
        raise ScyllaError(f"prompt {prompt['question_id']}: {len(ids)} tokens + {max_new_tokens} new "
                          f"exceeds the target's context of {target.max_positions}")
    return ids


def bench_report(rows, target, draft_spec, temperature, top_p, batch_size, k, max_new_tokens) -> dict:
    summary = aggregate(rows)
    by_cat = group_rows(rows)
    summary["by_category"] = {c: category_summary(rs) for c, rs in by_cat.items()}
    summary.update(forward_costs(rows))
    summary.update(agreement(rows))
    summary.update({"n_prompts": len(rows), "target": target.name, "quant": target.quant,
                    "backend": target.forward.backend, "kernels": target.kernels,
                    "draft": draft_spec, "device": device_name(target), "batch_size": batch_size,
                    "temperature": temperature, "top_p": top_p, "k": k, "shape": f"chain:{k}",
                    "k_mean": per_step_mean(rows, lambda s: s.k),
                    "drafted_mean": per_step_mean(rows, lambda s: len(s.drafted)),
                    "max_new_tokens": max_new_tokens})
    if temperature > 0:
        summary["exact_match_rate"] = None
    return summary


def category_summary(rows: list[dict]) -> dict:
    agg = aggregate(rows)
    return {"n": len(rows), **{key: agg[key] for key in ("tau", "speedup", "spec_gain", "accept_rate")}}


def forward_costs(rows: list[dict]) -> dict:
    """Median ms of one target forward by width (tokens per row verified at once) in this run,
    and the median verify forward over the median one-token forward."""
    by_width = defaultdict(list)
    for r in rows:
        for s in r["steps"] + r["plain_steps"]:
            if s.index > 0:
                by_width[s.tree_size + 1].append(s.verify_ms)
    forward_ms = {w: round(median(ms), 3) for w, ms in sorted(by_width.items())}
    verify = [s.verify_ms for r in rows for s in r["steps"] if s.index > 0 and s.tree_size > 0]
    one = by_width.get(1, [])
    ratio = round(median(verify) / median(one), 4) if verify and one else None
    return {"forward_ms": forward_ms, "verify_cost_ratio": ratio}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def aggregate(rows: list[dict]) -> dict:
    steps = [s for r in rows for s in r["steps"]]
    stats = summarize(steps)
    spec_tokens = sum(len(r["spec"]) for r in rows)
    base_tokens = sum(len(r["base"]) for r in rows)
    plain_tokens = sum(len(r["plain"]) for r in rows)
    spec_s = sum(r["spec_s"] for r in rows)
    base_s = sum(r["base_s"] for r in rows)
    plain_s = sum(r["plain_s"] for r in rows)
    tps, base_tps, plain_tps = spec_tokens / spec_s, base_tokens / base_s, plain_tokens / plain_s
    # overhead: everything in the engine's wall time that is not a target or draft forward
    overhead_ms = spec_s * 1e3 - stats.draft_ms - stats.verify_ms
    return {"tau": round(stats.tau, 4), "accept_rate": stats.accept_rate,
            "per_position_accept": [round(x, 4) for x in stats.per_position_accept],
            "tokens_per_s": round(tps, 3), "baseline_tokens_per_s": round(base_tps, 3),
            "speedup": round(tps / base_tps, 4),
            "plain_tokens_per_s": round(plain_tps, 3), "spec_gain": round(tps / plain_tps, 4),
            "plain_speedup": round(plain_tps / base_tps, 4),
            "exact_match_rate": sum(r["spec"] == r["base"] for r in rows) / len(rows),
            "plain_exact_match_rate": sum(r["plain"] == r["base"] for r in rows) / len(rows),
            "draft_ms_per_step": round(stats.draft_ms / max(stats.n_steps, 1), 3),
            "verify_ms_per_step": round(stats.verify_ms / max(stats.n_steps, 1), 3),
            "overhead_share": round(overhead_ms / (spec_s * 1e3), 4),
            "generated_tokens": spec_tokens, "baseline_generated_tokens": base_tokens,
            "wall_s": round(spec_s + base_s, 2)}


def per_step_mean(rows: list[dict], measure) -> float | None:
    """A per-step figure averaged over the speculative steps: the draft length the engine
    allowed (`s.k`: k, or what k=auto chose), or what was drafted (a draft may propose fewer)."""
    values = [measure(s) for r in rows for s in r["steps"] if s.index > 0]
    return round(sum(values) / len(values), 3) if values else None


# ---------------------------------------------------------------- batches

def baseline_generate_batch(target, batch: list[list[int]], max_new_tokens: int, temperature: float,
                            top_p: float, seed: int | None) -> list[list[int]]:
    """transformers generate() on the batch, left-padded; each row cut after its first EOS."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id(target), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(batch):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    kwargs = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature,
                                                              "top_p": top_p, "top_k": 0}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = target.model.generate(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                                    max_new_tokens=max_new_tokens, eos_token_id=target.eos_ids,
                                    pad_token_id=pad_id(target), **kwargs)
    return [cut_after_eos(row[width:].tolist(), target.eos_ids) for row in out]


def cut_after_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i + 1]
    return tokens


def run_batched_bench(target, draft, prompts, encoded, max_new_tokens, k, temperature, top_p, seed,
                      draft_spec, batch_size, warmup, tree=None) -> dict:
    """Batches of B prompts, baseline then engine per batch; throughput is generated tokens of
    all rows over wall time, and tau, acceptance and exact match are per row, then averaged."""
    chunks = [list(range(i, min(i + batch_size, len(encoded)))) for i in range(0, len(encoded), batch_size)]
    if warmup:
        short = [encoded[i][:32] for i in chunks[0]]
        baseline_generate_batch(target, short, 4, 0.0, 1.0, None)
        batch_generate_ids(target, draft, short, max_new_tokens=4, k=k, tree=tree)
        batch_generate_ids(target, None, short, max_new_tokens=4)
    rows = []
    for c, chunk in enumerate(tqdm(chunks, desc=f"bench B={batch_size}", unit="batch")):
        batch = [encoded[i] for i in chunk]
        base, base_s = timed(baseline_generate_batch, target, batch, max_new_tokens, temperature, top_p, seed + c)
        decode = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + c)
        plain_run = timed(batch_generate_ids, target, None, batch, **decode)
        spec_run = plain_run if draft is None else timed(batch_generate_ids, target, draft, batch, k=k,
                                                         tree=tree, **decode)
        rows += share_batch_time(prompts, chunk, base, base_s, spec_run, plain_run)
    report = bench_report(rows, target, draft_spec, temperature, top_p, batch_size, k, max_new_tokens)
    report.update(row_averages(rows))
    if tree is not None:
        report.update({"shape": str(tree), "k": None, "tree_nodes_mean": mean_tree_size(rows)})
    for cat, rs in group_rows(rows).items():
        report["by_category"][cat].update({"tau": row_averages(rs)["tau"]})
    return report


def share_batch_time(prompts, chunk, base, base_s, spec_run, plain_run) -> list[dict]:
    """Split a batch's wall times over its rows by generated tokens, so that sums over rows
    give the batch totals (throughput) and categories get a fair share."""
    (spec, steps), spec_s = spec_run
    (plain, plain_steps), plain_s = plain_run

    def share(seconds, outputs, j):
        return seconds * len(outputs[j]) / max(sum(map(len, outputs)), 1)

    return [{"category": prompts[i]["category"], "base": base[j], "spec": spec[j], "steps": steps[j],
             "plain": plain[j], "plain_steps": plain_steps[j], "base_s": share(base_s, base, j),
             "spec_s": share(spec_s, spec, j), "plain_s": share(plain_s, plain, j)}
            for j, i in enumerate(chunk)]


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    return by_cat


def row_averages(rows: list[dict]) -> dict:
    per_row = [summarize(r["steps"]) for r in rows]
    rates = [s.accept_rate for s in per_row if s.accept_rate is not None]
    depth = max((len(s.per_position_accept) for s in per_row), default=0)
    positions = [[s.per_position_accept[i] for s in per_row if len(s.per_position_accept) > i]
                 for i in range(depth)]
    return {"tau": round(sum(s.tau for s in per_row) / len(per_row), 4),
            "accept_rate": sum(rates) / len(rates) if rates else None,
            "per_position_accept": [round(sum(p) / len(p), 4) for p in positions],
            "averaging": "per row, then mean over rows"}


def draft_taus(target, draft, prompts: list[list[int]], k: int, temperature: float, max_new_tokens: int,
               batch: int = 16, tree=None) -> list[float]:
    """Tau per prompt, batches of rows through the engine, no timing: compares drafts cheaply."""
    taus = []
    for i in range(0, len(prompts), batch):
        _, steps = batch_generate_ids(target, draft, prompts[i:i + batch], max_new_tokens=max_new_tokens, k=k,
                                      temperature=temperature, seed=0, tree=tree)
        taus += [summarize(s).tau for s in steps]
    return taus


# ---------------------------------------------------------------- drafts against each other

def compare_drafts(target, specs: list[str], prompts: list[dict], max_new_tokens: int = 128,
                   temperature: float = 0.0, seed: int = 0) -> dict:
    """Per prompt, interleaved in one run: the engine's plain decoding, then each draft at its
    default shape on this target (what a user gets without flags). No generate() baseline:
    spec_gain over the engine's own plain decoding is the figure that picks a default."""
    from scylla.drafts import default_shape, make_draft

    encoded = [encode_checked(target, p, max_new_tokens) for p in prompts]
    setups = {spec: (make_draft(spec, target), *default_shape(spec, None, None, temperature, 1, target.quant))
              for spec in specs}
    for draft, k, tree in setups.values():   # warm-up: calibration, first-call allocations
        generate_ids(target, draft, encoded[0][:32], max_new_tokens=4, k=k, tree=tree)
    rows = []
    for i, (p, ids) in enumerate(tqdm(list(zip(prompts, encoded)), desc="drafts", unit="prompt")):
        decode = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        (plain, _), plain_s = timed(generate_ids, target, None, ids, **decode)
        row = {"category": p["category"], "plain": plain, "plain_s": plain_s, "drafts": {}}
        for spec, (draft, k, tree) in setups.items():
            (out, steps), seconds = timed(generate_ids, target, draft, ids, k=k, tree=tree, **decode)
            row["drafts"][spec] = {"out": out, "s": seconds, "steps": steps}
        rows.append(row)
    return {"target": target.name, "quant": target.quant, "kernels": target.kernels, "n_prompts": len(rows),
            "temperature": temperature, "max_new_tokens": max_new_tokens,
            "plain_tokens_per_s": round(sum(len(r["plain"]) for r in rows) / sum(r["plain_s"] for r in rows), 3),
            "drafts": {spec: draft_figures(rows, spec, setups[spec][1:], temperature) for spec in specs}}


def draft_figures(rows: list[dict], spec: str, shape: tuple, temperature: float) -> dict:
    """One draft's tau, spec_gain (overall and by kind) and agreement with plain decoding."""
    def gain(subset):
        spec_tps = sum(len(r["drafts"][spec]["out"]) for r in subset) / sum(r["drafts"][spec]["s"] for r in subset)
        plain_tps = sum(len(r["plain"]) for r in subset) / sum(r["plain_s"] for r in subset)
        return round(spec_tps / plain_tps, 4)

    kinds = sorted({r["category"] for r in rows})
    stats = summarize([s for r in rows for s in r["drafts"][spec]["steps"]])
    same = sum(r["drafts"][spec]["out"] == r["plain"] for r in rows) / len(rows)
    return {"k": shape[0], "tree": str(shape[1]) if shape[1] else None, "tau": round(stats.tau, 4),
            "spec_gain": gain(rows), "by_kind": {c: gain([r for r in rows if r["category"] == c]) for c in kinds},
            "spec_plain_match_rate": same if temperature <= 0 else None}
