"""The engine: draft k tokens, verify them in one target forward, accept, roll back.

In the spirit of gpt-fast's `speculative_decode`: one short step function built
from small helpers. Greedy verification (T=0) reproduces plain greedy decoding
token for token; at T>0 it is lossless speculative sampling (Leviathan et al.):
accept draft token d with min(1, p(d)/q(d)), on the first rejection resample
from norm(max(0, p - q)), and take a bonus token from p when all are accepted.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from transformers import DynamicCache

from scylla import ScyllaError
from scylla.trace import Step


# ---------------------------------------------------------------- probabilities

def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution over the last dim; T=0 gives a one-hot argmax."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = apply_top_p(probs, top_p)
    return probs


def apply_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the top token always stays)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def check_decode_args(max_new_tokens: int, temperature: float, top_p: float, k: int = 1) -> None:
    if max_new_tokens <= 0:
        raise ScyllaError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ScyllaError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ScyllaError(f"top_p must be in (0, 1], got {top_p}")
    if k < 1:
        raise ScyllaError(f"draft length k must be >= 1, got {k}")


def check_prompt(target, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ScyllaError("empty prompt")
    limit = target.max_positions
    if len(prompt_ids) + max_new_tokens > limit:
        raise ScyllaError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens "
                          f"exceeds the target's context of {limit}")


# ---------------------------------------------------------------- target forwards

@torch.inference_mode()
def target_forward(target, tokens: list[int], cache: DynamicCache, need_hidden: bool):
    ids = torch.tensor([tokens], device=target.device)
    out = target.model(input_ids=ids, cache=cache, use_cache=True,
                       output_hidden_states=need_hidden)
    hidden = out.hidden_states if need_hidden else None
    return out.logits[0], hidden


def emit(tokens: list[int], eos_ids: list[int], budget: int) -> tuple[list[int], bool]:
    """Cut at the first EOS (kept) and at the token budget; say whether decoding is done."""
    out = []
    for tok in tokens[:budget]:
        out.append(tok)
        if tok in eos_ids:
            return out, True
    return out, len(out) >= budget


# ---------------------------------------------------------------- acceptance

def accept_greedy(drafted: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of drafted that matches the target's argmax, then the target's token."""
    choice = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafted) and drafted[n] == choice[n]:
        n += 1
    return n, choice[n]


def accept_sampling(drafted: list[int], q: torch.Tensor | None, p: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Lossless speculative sampling. q=None means a deterministic draft (one-hot q)."""
    for i, tok in enumerate(drafted):
        q_tok = 1.0 if q is None else float(q[i, tok])
        ratio = float(p[i, tok]) / q_tok if q_tok > 0 else 0.0
        if torch.rand((), generator=generator).item() < min(1.0, ratio):
            continue
        residual = p[i].clone()
        if q is None:
            residual[tok] = 0.0
        else:
            residual = (residual - q[i]).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q up to rounding: any sample from p is exact
            residual = p[i]
        return i, sample(residual / residual.sum(), generator)
    return len(drafted), sample(p[len(drafted)], generator)


def draft_probs_of(q: torch.Tensor | None, drafted: list[int]) -> list[float]:
    if q is None:
        return [1.0] * len(drafted)
    return [float(q[i, t]) for i, t in enumerate(drafted)]


# ---------------------------------------------------------------- the loops

def make_generator(seed: int | None, device: str) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def prefill(target, draft, prompt_ids, temperature, top_p, generator):
    """One forward over the prompt; returns the cache, the first token and its Step."""
    cache = DynamicCache()
    start = time.perf_counter()
    logits, hidden = target_forward(target, prompt_ids, cache, draft is not None and draft.needs_hidden)
    verify_ms = (time.perf_counter() - start) * 1e3
    if draft is not None:
        draft.observe(prompt_ids, hidden)
    probs = logits_to_probs(logits[-1:], temperature, top_p)[0]
    first = int(logits[-1].argmax()) if temperature <= 0 else sample(probs, generator)
    return cache, first, verify_ms


def plain_generate(target, prompt_ids: list[int], max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None) -> Iterator[Step]:
    """Plain autoregressive decoding with a KV cache, one Step per token (for streaming UIs)."""
    yield from speculative_generate(target, None, prompt_ids, max_new_tokens, 1,
                                    temperature, top_p, seed)


def speculative_generate(target, draft, prompt_ids: list[int], max_new_tokens: int = 128,
                         k: int = 6, temperature: float = 0.0, top_p: float = 1.0,
                         seed: int | None = None) -> Iterator[Step]:
    """Yield one Step per target forward (the prefill first) as tokens are accepted."""
    check_decode_args(max_new_tokens, temperature, top_p, k)
    check_prompt(target, prompt_ids, max_new_tokens)
    generator = make_generator(seed, target.device)
    eos_ids = target.eos_ids
    if draft is not None:
        draft.reset()
    cache, cur, verify_ms = prefill(target, draft, prompt_ids, temperature, top_p, generator)
    emitted, done = emit([cur], eos_ids, max_new_tokens)
    yield Step(index=0, drafted=[], accepted=0, bonus=cur, emitted=emitted, verify_ms=verify_ms)
    context = list(prompt_ids) + emitted
    produced = len(emitted)
    index = 1
    while not done:
        step = speculative_step(target, draft, cache, context, max_new_tokens - produced,
                                k, temperature, top_p, generator, eos_ids, index)
        context += step.emitted
        produced += len(step.emitted)
        done = step.bonus is None or produced >= max_new_tokens or any(t in eos_ids for t in step.emitted)
        index += 1
        yield step


def speculative_step(target, draft, cache, context, budget, k, temperature, top_p,
                     generator, eos_ids, index) -> Step:
    """One draft -> verify -> accept cycle. context ends with the token not yet in the cache."""
    t0 = time.perf_counter()
    k = min(k, budget - 1)  # drafting past the budget is wasted work
    drafted, q = ([], None)
    if draft is not None and k > 0:
        drafted, q = draft.propose(context, k, temperature, top_p, generator)
    t1 = time.perf_counter()
    need_hidden = draft is not None and draft.needs_hidden
    logits, hidden = target_forward(target, [context[-1]] + drafted, cache, need_hidden)
    t2 = time.perf_counter()
    p = logits_to_probs(logits, temperature, top_p) if temperature > 0 else None
    if temperature <= 0:
        n, bonus = accept_greedy(drafted, logits)
    else:
        n, bonus = accept_sampling(drafted, q, p, generator)
    kept = len(context) + n  # cache keeps the context plus the accepted drafts
    rollback(cache, kept)
    if draft is not None:
        draft.observe([context[-1]] + drafted[:n], slice_hidden(hidden, n + 1))
    emitted, _ = emit(drafted[:n] + [bonus], eos_ids, budget)
    shown = target_probs_of(p, logits, drafted)
    t3 = time.perf_counter()
    return Step(index=index, drafted=drafted, accepted=min(n, len(emitted)),
                bonus=bonus if len(emitted) == n + 1 else None, emitted=emitted,
                p_draft=shown,
                q_draft=draft_probs_of(q, drafted), draft_ms=(t1 - t0) * 1e3,
                verify_ms=(t2 - t1) * 1e3, overhead_ms=(t3 - t2) * 1e3,
                tree_size=len(drafted))


def target_probs_of(p, logits, drafted: list[int]) -> list[float]:
    """Target probability of each drafted token (at T=0 the untempered softmax, for display)."""
    if not drafted:
        return []
    rows = torch.arange(len(drafted))
    if p is None:
        p = torch.softmax(logits[: len(drafted)].float(), -1)
    return p[rows, torch.tensor(drafted)].tolist()


def rollback(cache: DynamicCache, keep: int) -> None:
    """Drop cached positions past `keep` (the rejected drafts)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def slice_hidden(hidden, n: int):
    if hidden is None:
        return None
    return tuple(h[:, :n] for h in hidden)


def generate_ids(target, draft, prompt_ids, **kwargs) -> tuple[list[int], list[Step]]:
    """Run to completion; return the generated ids and every Step."""
    steps = list(speculative_generate(target, draft, prompt_ids, **kwargs))
    return [t for s in steps for t in s.emitted], steps
