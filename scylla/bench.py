"""`scylla bench`: baseline (transformers generate) and the engine, interleaved per prompt."""
from __future__ import annotations

import platform
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from scylla import ScyllaError
from scylla.decoding import check_decode_args, generate_ids
from scylla.models import encode_prompt
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
              batch_size: int = 1, warmup: bool = True) -> dict:
    check_decode_args(max_new_tokens, temperature, top_p, k)
    if batch_size != 1:
        raise ScyllaError("--batch-size > 1 is not implemented yet (see the batching issue); use 1")
    encoded = [encode_checked(target, p, max_new_tokens) for p in prompts]
    if warmup:  # first calls pay one-off allocation costs; keep them out of both timings
        baseline_generate(target, encoded[0][:32], 4, 0.0, 1.0, None)
        generate_ids(target, draft, encoded[0][:32], max_new_tokens=4, k=k)
    rows = []
    for i, (p, ids) in enumerate(tqdm(list(zip(prompts, encoded)), desc="bench", unit="prompt")):
        base, base_s = timed(baseline_generate, target, ids, max_new_tokens, temperature, top_p, seed + i)
        (spec, steps), spec_s = timed(generate_ids, target, draft, ids, max_new_tokens=max_new_tokens,
                                      k=k, temperature=temperature, top_p=top_p, seed=seed + i)
        rows.append({"category": p["category"], "base": base, "base_s": base_s,
                     "spec": spec, "spec_s": spec_s, "steps": steps})
    return bench_report(rows, target, draft_spec, temperature, top_p, batch_size, k, max_new_tokens)


def encode_checked(target, prompt: dict, max_new_tokens: int) -> list[int]:
    ids = encode_prompt(target, prompt["prompt"])
    if len(ids) + max_new_tokens > target.max_positions:
        raise ScyllaError(f"prompt {prompt['question_id']}: {len(ids)} tokens + {max_new_tokens} new "
                          f"exceeds the target's context of {target.max_positions}")
    return ids


def bench_report(rows, target, draft_spec, temperature, top_p, batch_size, k, max_new_tokens) -> dict:
    summary = aggregate(rows)
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    summary["by_category"] = {c: {"n": len(rs), "tau": aggregate(rs)["tau"], "speedup": aggregate(rs)["speedup"],
                                  "accept_rate": aggregate(rs)["accept_rate"]} for c, rs in by_cat.items()}
    summary.update({"n_prompts": len(rows), "target": target.name, "quant": target.quant,
                    "draft": draft_spec, "device": device_name(target), "batch_size": batch_size,
                    "temperature": temperature, "top_p": top_p, "k": k, "shape": f"chain:{k}",
                    "max_new_tokens": max_new_tokens})
    if temperature > 0:
        summary["exact_match_rate"] = None
    return summary


def aggregate(rows: list[dict]) -> dict:
    steps = [s for r in rows for s in r["steps"]]
    stats = summarize(steps)
    spec_tokens = sum(len(r["spec"]) for r in rows)
    base_tokens = sum(len(r["base"]) for r in rows)
    spec_s = sum(r["spec_s"] for r in rows)
    base_s = sum(r["base_s"] for r in rows)
    tps, base_tps = spec_tokens / spec_s, base_tokens / base_s
    # overhead: everything in the engine's wall time that is not a target or draft forward
    overhead_ms = spec_s * 1e3 - stats.draft_ms - stats.verify_ms
    return {"tau": round(stats.tau, 4), "accept_rate": stats.accept_rate,
            "per_position_accept": [round(x, 4) for x in stats.per_position_accept],
            "tokens_per_s": round(tps, 3), "baseline_tokens_per_s": round(base_tps, 3),
            "speedup": round(tps / base_tps, 4),
            "exact_match_rate": sum(r["spec"] == r["base"] for r in rows) / len(rows),
            "draft_ms_per_step": round(stats.draft_ms / max(stats.n_steps, 1), 3),
            "verify_ms_per_step": round(stats.verify_ms / max(stats.n_steps, 1), 3),
            "overhead_share": round(overhead_ms / (spec_s * 1e3), 4),
            "generated_tokens": spec_tokens, "baseline_generated_tokens": base_tokens,
            "wall_s": round(spec_s + base_s, 2)}
