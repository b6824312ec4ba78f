"""The engine: draft k tokens, verify them in one target forward, accept, roll back.

In the spirit of gpt-fast's `speculative_decode`: one short step function built
from small helpers. Greedy verification (T=0) reproduces plain greedy decoding
token for token; at T>0 it is lossless speculative sampling (Leviathan et al.):
accept draft token d with min(1, p(d)/q(d)), on the first rejection resample
from norm(max(0, p - q)), and take a bonus token from p when all are accepted.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import DynamicCache

from scylla import ScyllaError
from scylla.models import cache_root
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


def check_decode_args(max_new_tokens: int, temperature: float, top_p: float, k: int | str = 1) -> None:
    if max_new_tokens <= 0:
        raise ScyllaError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ScyllaError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ScyllaError(f"top_p must be in (0, 1], got {top_p}")
    if k != "auto" and (not isinstance(k, int) or k < 1):
        raise ScyllaError(f"draft length k must be an integer >= 1 or 'auto', got {k!r}")


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


@dataclass
class PromptPrefill:
    """One target forward over a prompt. Decoders of the same prompt can share it (the live
    page runs plain and speculative decoding side by side): each takes a copy of the cache,
    and each is charged the measured prefill time."""

    prompt_ids: list[int]
    cache: DynamicCache
    last_logits: torch.Tensor
    hidden: tuple | None
    verify_ms: float


def prefill_prompt(target, prompt_ids: list[int], need_hidden: bool) -> PromptPrefill:
    cache = DynamicCache()
    start = time.perf_counter()
    logits, hidden = target_forward(target, prompt_ids, cache, need_hidden)
    verify_ms = (time.perf_counter() - start) * 1e3
    return PromptPrefill(list(prompt_ids), cache, logits[-1:], hidden, verify_ms)


def check_shared_prefill(shared: PromptPrefill, prompt_ids: list[int], need_hidden: bool) -> None:
    if shared.prompt_ids != list(prompt_ids):
        raise ScyllaError("the shared prefill is of another prompt")
    if need_hidden and shared.hidden is None:
        raise ScyllaError("the shared prefill has no hidden states, and the draft needs them")


def prefill(target, draft, prompt_ids, temperature, top_p, generator, shared: PromptPrefill | None = None):
    """The prompt's forward (or a copy of a shared one); returns the cache, the first token
    and the prefill's milliseconds."""
    need_hidden = draft is not None and draft.needs_hidden
    if shared is None:
        state = prefill_prompt(target, prompt_ids, need_hidden)
        cache = state.cache
    else:
        check_shared_prefill(shared, prompt_ids, need_hidden)
        state, cache = shared, copy.deepcopy(shared.cache)
    if draft is not None:
        draft.observe(prompt_ids, state.hidden)
    probs = logits_to_probs(state.last_logits, temperature, top_p)[0]
    first = int(state.last_logits[-1].argmax()) if temperature <= 0 else sample(probs, generator)
    return cache, first, state.verify_ms


def plain_generate(target, prompt_ids: list[int], max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, shared_prefill: PromptPrefill | None = None) -> Iterator[Step]:
    """Plain autoregressive decoding with a KV cache, one Step per token (for streaming UIs)."""
    yield from speculative_generate(target, None, prompt_ids, max_new_tokens, 1,
                                    temperature, top_p, seed, shared_prefill=shared_prefill)


def speculative_generate(target, draft, prompt_ids: list[int], max_new_tokens: int = 128,
                         k: int | str = 6, temperature: float = 0.0, top_p: float = 1.0,
                         seed: int | None = None, tree: "TreeShape | str | None" = None,
                         shared_prefill: PromptPrefill | None = None) -> Iterator[Step]:
    """Yield one Step per target forward (the prefill first) as tokens are accepted.
    With `tree` (a TreeShape or 'tree:D,K,N') each step verifies a draft tree instead of a chain.
    With `shared_prefill` the prompt's forward is copied from it instead of run again."""
    check_decode_args(max_new_tokens, temperature, top_p, k)
    if isinstance(tree, str):
        tree = TreeShape.parse(tree)
    check_prompt(target, prompt_ids, max_new_tokens)
    generator = make_generator(seed, target.device)
    eos_ids = target.eos_ids
    if draft is not None:
        draft.reset()
    cache, cur, verify_ms = prefill(target, draft, prompt_ids, temperature, top_p, generator, shared_prefill)
    emitted, done = emit([cur], eos_ids, max_new_tokens)
    yield Step(index=0, drafted=[], accepted=0, bonus=cur, emitted=emitted, verify_ms=verify_ms)
    context = list(prompt_ids) + emitted
    produced = len(emitted)
    index = 1
    budget = DraftBudget(target, 1) if k == "auto" and draft is not None and tree is None else None
    while not done:
        step_k = budget.choose(1) if budget else (1 if k == "auto" else k)
        if tree is not None:
            step = tree_step(target, draft, cache, context, max_new_tokens - produced, tree,
                             temperature, top_p, generator, eos_ids, index)
        else:
            step = speculative_step(target, draft, cache, context, max_new_tokens - produced,
                                    step_k, temperature, top_p, generator, eos_ids, index)
        if budget:
            budget.record([step])
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
                tree_size=len(drafted), k=k)


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


# ---------------------------------------------------------------- batches (ragged acceptance)
# B rows share one target forward per step, and each row accepts its own number of tokens.
# The cache stays one rectangular DynamicCache: after every step the rejected slots are
# dropped and each row's real slots are packed to the right (left padding), with a per-row
# `valid` mask passed as the attention mask and explicit per-row positions for RoPE.
# Finished rows leave the cache, so they stop costing compute.

class RaggedCache:
    def __init__(self):
        self.cache = DynamicCache()
        self.valid: torch.Tensor | None = None  # bool [rows, slots]: is this slot a real token?

    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)

    def append(self, block_valid: torch.Tensor, keep_rows: torch.Tensor) -> None:
        """Mark the slots of the block just verified (True = accepted), drop finished rows
        and rejected slots, and repack every row's real slots to the right."""
        valid = block_valid if self.valid is None else torch.cat([self.valid, block_valid], 1)
        valid = valid[keep_rows]
        if valid.shape[0] == 0:
            self.cache, self.valid = DynamicCache(), valid
            return
        width = int(valid.sum(1).max())
        # a stable sort puts each row's invalid slots first, its real slots after, in order
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, -width:]
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys[keep_rows].gather(2, index.to(layer.keys.device))
            layer.values = layer.values[keep_rows].gather(2, index.to(layer.values.device))
        self.valid = valid.gather(1, order)


@torch.inference_mode()
def ragged_forward(target, ragged: RaggedCache, inputs: list[list[int]], need_hidden: bool,
                   trees: "list[DraftTree] | None" = None):
    """One target forward over each row's new tokens (right-padded to the widest row).
    With `trees`, row b's inputs are [root] + trees[b].tokens under a per-row tree mask."""
    width = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), width), pad_id(target), dtype=torch.long)
    new = torch.zeros((len(inputs), width), dtype=torch.bool)
    for b, toks in enumerate(inputs):
        ids[b, :len(toks)] = torch.tensor(toks)
        new[b, :len(toks)] = True
    past = ragged.valid if ragged.valid is not None else torch.zeros((len(inputs), 0), dtype=torch.bool)
    if trees is None:
        positions = past.sum(1, keepdim=True) + torch.arange(width)[None]
        mask = torch.cat([past, new], 1).long()
    else:
        positions = past.sum(1, keepdim=True) + tree_offsets(trees, width)
        mask = ragged_tree_mask(past, trees, width, target.model.dtype)
    device = target.device
    out = target.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), cache=ragged.cache, use_cache=True,
                       output_hidden_states=need_hidden)
    return out.logits, out.hidden_states if need_hidden else None


def tree_offsets(trees: "list[DraftTree]", width: int) -> torch.Tensor:
    """Per row, each block slot's distance from the root (padding slots just count on)."""
    offsets = torch.arange(width)[None].repeat(len(trees), 1)
    for b, tree in enumerate(trees):
        offsets[b, 1:len(tree) + 1] = torch.tensor(tree.depths, dtype=torch.long)
    return offsets


def ragged_tree_mask(past: torch.Tensor, trees: "list[DraftTree]", width: int, dtype) -> torch.Tensor:
    """Additive [B, 1, width, slots + width]: each row's real past slots, then, inside the
    block, the root and the node's own ancestors (padding slots see the past and themselves)."""
    rows, slots = past.shape
    allowed = torch.zeros(rows, width, slots + width, dtype=torch.bool)
    allowed[:, :, :slots] = past[:, None, :]
    allowed[:, torch.arange(width), slots + torch.arange(width)] = True
    for b, tree in enumerate(trees):
        allowed[b, 1:len(tree) + 1, slots] = True  # every node sees the root
        for i in range(len(tree)):
            allowed[b, i + 1, [slots + 1 + a for a in tree.lineage(i)]] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def pad_id(target) -> int:
    pad = target.model.generation_config.pad_token_id
    return int(pad) if pad is not None else 0


class BatchRow:
    """One prompt's state inside a batch."""

    def __init__(self, row: int, prompt_ids: list[int], budget: int, draft):
        self.row, self.context, self.budget, self.draft = row, list(prompt_ids), budget, draft
        self.produced, self.done = 0, False

    def take(self, emitted: list[int], eos_ids: list[int], bonus_missing: bool) -> None:
        self.context += emitted
        self.produced += len(emitted)
        self.done = bonus_missing or self.produced >= self.budget or any(t in eos_ids for t in emitted)


def check_batch(target, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse the whole batch, naming the row, rather than silently dropping a prompt."""
    if not prompts:
        raise ScyllaError("empty batch")
    for i, ids in enumerate(prompts):
        try:
            check_prompt(target, ids, max_new_tokens)
        except ScyllaError as exc:
            raise ScyllaError(f"batch row {i}: {exc}") from None


def batch_generate(target, draft, prompts: list[list[int]], max_new_tokens: int = 128,
                   k: int | str = 6, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, kmax: int = 8,
                   tree: "TreeShape | str | None" = None) -> Iterator[list[Step]]:
    """Decode B prompts together; yield, per target forward, one Step for each live row.

    k="auto" picks the draft length every step from the measured verification cost of
    this batch size on this machine and the acceptance seen so far (see DraftBudget)."""
    check_decode_args(max_new_tokens, temperature, top_p, k)
    check_batch(target, prompts, max_new_tokens)
    if isinstance(tree, str):
        tree = TreeShape.parse(tree)
    generator = make_generator(seed, target.device)
    eos_ids = target.eos_ids
    rows = [BatchRow(i, p, max_new_tokens, draft.fork() if draft is not None else None)
            for i, p in enumerate(prompts)]
    need_hidden = draft is not None and draft.needs_hidden
    budget = DraftBudget(target, len(rows), kmax) if k == "auto" and draft is not None and tree is None else None
    ragged = RaggedCache()
    yield batch_prefill(target, ragged, rows, need_hidden, temperature, top_p, generator, eos_ids)
    index = 1
    while rows := [r for r in rows if not r.done]:
        step_k = budget.choose(len(rows)) if budget else (1 if k == "auto" else k)
        if tree is not None:
            steps = batch_tree_step(target, ragged, rows, tree, need_hidden, temperature, top_p,
                                    generator, eos_ids, index)
        else:
            steps = batch_step(target, ragged, rows, step_k, need_hidden, temperature, top_p,
                               generator, eos_ids, index)
        if budget:
            budget.record(steps)
        index += 1
        yield steps


def batch_prefill(target, ragged, rows, need_hidden, temperature, top_p, generator, eos_ids) -> list[Step]:
    start = time.perf_counter()
    logits, hidden = ragged_forward(target, ragged, [r.context for r in rows], need_hidden)
    verify_ms = (time.perf_counter() - start) * 1e3
    steps, block = [], torch.zeros(logits.shape[:2], dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row.context)
        block[b, :n] = True
        if row.draft is not None:
            row.draft.reset()
            row.draft.observe(row.context, row_hidden(hidden, b, n))
        last = logits[b, n - 1]
        first = int(last.argmax()) if temperature <= 0 else sample(
            logits_to_probs(last[None], temperature, top_p)[0], generator)
        emitted, _ = emit([first], eos_ids, row.budget)
        row.take(emitted, eos_ids, False)
        steps.append(Step(index=0, drafted=[], accepted=0, bonus=first, emitted=emitted,
                          verify_ms=verify_ms, row=row.row))
    ragged.append(block, keep_rows_of(rows))
    return steps


def keep_rows_of(rows) -> torch.Tensor:
    return torch.tensor([b for b, r in enumerate(rows) if not r.done], dtype=torch.long)


def row_hidden(hidden, b: int, n: int):
    if hidden is None:
        return None
    return tuple(h[b:b + 1, :n] for h in hidden)


def batch_step(target, ragged, rows, k, need_hidden, temperature, top_p, generator, eos_ids,
               index) -> list[Step]:
    """One draft -> verify -> accept cycle for every live row, with one target forward."""
    proposals, draft_ms = [], []
    for row in rows:
        t0 = time.perf_counter()
        row_k = min(k, row.budget - row.produced - 1)
        drafted, q = ([], None)
        if row.draft is not None and row_k > 0:
            drafted, q = row.draft.propose(row.context, row_k, temperature, top_p, generator)
        proposals.append((drafted, q))
        draft_ms.append((time.perf_counter() - t0) * 1e3)
    t1 = time.perf_counter()
    logits, hidden = ragged_forward(target, ragged, [[r.context[-1]] + d for r, (d, _) in zip(rows, proposals)],
                                    need_hidden)
    verify_ms = (time.perf_counter() - t1) * 1e3
    block = torch.zeros(logits.shape[:2], dtype=torch.bool)
    steps = []
    for b, (row, (drafted, q)) in enumerate(zip(rows, proposals)):
        t2 = time.perf_counter()
        row_logits = logits[b, :len(drafted) + 1]
        p = logits_to_probs(row_logits, temperature, top_p) if temperature > 0 else None
        n, bonus = (accept_greedy(drafted, row_logits) if temperature <= 0
                    else accept_sampling(drafted, q, p, generator))
        block[b, :n + 1] = True
        if row.draft is not None:
            row.draft.observe([row.context[-1]] + drafted[:n], row_hidden(hidden, b, n + 1))
        emitted, _ = emit(drafted[:n] + [bonus], eos_ids, row.budget - row.produced)
        row.take(emitted, eos_ids, len(emitted) < n + 1)
        steps.append(Step(index=index, drafted=drafted, accepted=min(n, len(emitted)),
                          bonus=bonus if len(emitted) == n + 1 else None, emitted=emitted,
                          p_draft=target_probs_of(p, row_logits, drafted),
                          q_draft=draft_probs_of(q, drafted), draft_ms=draft_ms[b],
                          verify_ms=verify_ms, overhead_ms=(time.perf_counter() - t2) * 1e3,
                          row=row.row, tree_size=len(drafted), k=k))
    ragged.append(block, keep_rows_of(rows))
    return steps


def batch_tree_step(target, ragged, rows, shape, need_hidden, temperature, top_p, generator, eos_ids,
                    index) -> list[Step]:
    """batch_step with a draft tree per row, all verified in one forward."""
    trees, draft_ms = [], []
    for row in rows:
        t0 = time.perf_counter()
        depth = min(shape.depth, row.budget - row.produced - 1)
        tree = DraftTree([], [])
        if row.draft is not None and depth > 0:
            tree = row.draft.propose_tree(row.context, TreeShape(depth, shape.topk, shape.total),
                                          temperature, top_p, generator)
        trees.append(tree)
        draft_ms.append((time.perf_counter() - t0) * 1e3)
    t1 = time.perf_counter()
    inputs = [[r.context[-1]] + t.tokens for r, t in zip(rows, trees)]
    logits, hidden = ragged_forward(target, ragged, inputs, need_hidden, trees=trees)
    verify_ms = (time.perf_counter() - t1) * 1e3
    block = torch.zeros(logits.shape[:2], dtype=torch.bool)
    steps = []
    for b, (row, tree) in enumerate(zip(rows, trees)):
        t2 = time.perf_counter()
        row_logits = logits[b, :len(tree) + 1]
        probs = logits_to_probs(row_logits, temperature, top_p) if temperature > 0 else None
        path, bonus = (accept_tree_greedy(tree, row_logits) if temperature <= 0
                       else accept_tree_sampling(tree, probs, generator))
        kept = [0] + [i + 1 for i in path]
        block[b, kept] = True  # slots in increasing order: the packed cache keeps the path in order
        accepted = [tree.tokens[i] for i in path]
        if row.draft is not None:
            row.draft.observe([row.context[-1]] + accepted,
                              None if hidden is None else tuple(h[b:b + 1, kept] for h in hidden))
        emitted, _ = emit(accepted + [bonus], eos_ids, row.budget - row.produced)
        row.take(emitted, eos_ids, len(emitted) < len(path) + 1)
        drafted = tree.drafted_along(path)
        steps.append(Step(index=index, drafted=drafted, accepted=min(len(path), len(emitted)),
                          bonus=bonus if len(emitted) == len(path) + 1 else None, emitted=emitted,
                          q_draft=[1.0] * len(drafted), draft_ms=draft_ms[b], verify_ms=verify_ms,
                          overhead_ms=(time.perf_counter() - t2) * 1e3, row=row.row,
                          tree_size=len(tree), k=shape.depth))
    ragged.append(block, keep_rows_of(rows))
    return steps


def batch_generate_ids(target, draft, prompts, **kwargs) -> tuple[list[list[int]], list[list[Step]]]:
    """Run a batch to completion; per row, the generated ids and its Steps."""
    ids = [[] for _ in prompts]
    steps = [[] for _ in prompts]
    for forward in batch_generate(target, draft, prompts, **kwargs):
        for s in forward:
            ids[s.row] += s.emitted
            steps[s.row].append(s)
    return ids, steps


# ---------------------------------------------------------------- batch-aware draft budget

class DraftBudget:
    """Choose the draft length per step for a batch: wider verification costs more as the
    batch grows, so weigh the measured cost of verifying k+1 tokens per row at this batch
    size (calibrated once per machine and cached) against the acceptance seen so far."""

    def __init__(self, target, batch: int, kmax: int = 8):
        self.costs = verify_costs(target, batch, kmax)
        self.drafted = self.accepted = 0
        self.draft_ms = 0.0
        self.steps = 0

    def choose(self, live_rows: int) -> int:
        alpha = (self.accepted + 1) / (self.drafted + 2)  # Laplace prior: 0.5 before any data
        ms_per_token = self.draft_ms / self.drafted if self.drafted else 0.0
        k = best_draft_length(alpha, self.costs, ms_per_token * live_rows)
        self.steps += 1
        if k == 0 and self.steps % 16 == 0:
            k = 1  # keep probing, or a bad start would switch drafting off for good
        return k

    def record(self, steps: list[Step]) -> None:
        for s in steps:
            self.drafted += len(s.drafted)
            self.accepted += s.accepted
            self.draft_ms += s.draft_ms if s.drafted else 0.0


def best_draft_length(alpha: float, verify_ms: list[float], draft_ms_per_k: float) -> int:
    """argmax_k E[tokens per row]/time, E = 1 + a + ... + a^k for a chain with per-token
    acceptance a; verify_ms[k] is one forward of k+1 tokens per row. k=0 is plain decoding."""
    def rate(k):
        expected = sum(alpha ** i for i in range(k + 1))
        return expected / (verify_ms[k] + k * draft_ms_per_k)
    return max(range(len(verify_ms)), key=rate)


_COSTS: dict[str, list[float]] = {}


def verify_costs(target, batch: int, kmax: int, context: int = 128, repeats: int = 3) -> list[float]:
    """Median ms of one target forward of w = 1..kmax+1 tokens per row at this batch size,
    over a cache of `context` tokens; cached in memory and in the cache folder's calibration.json."""
    key = f"{target.name}|{target.quant}|{target.device}|{torch.get_num_threads()}t|B{batch}|ctx{context}"
    path = cache_root() / "calibration.json"
    if key not in _COSTS:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if len(stored.get(key, [])) < kmax + 1:
            stored[key] = measure_verify_costs(target, batch, kmax, context, repeats)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored, indent=1))
        _COSTS[key] = stored[key]
    return _COSTS[key][:kmax + 1]


@torch.inference_mode()
def measure_verify_costs(target, batch, kmax, context, repeats) -> list[float]:
    vocab = target.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    prompt = torch.randint(3, vocab, (batch, context), generator=gen).to(target.device)
    target.model(input_ids=prompt, cache=cache, use_cache=True)
    costs = []
    for width in range(1, kmax + 2):
        ids = torch.randint(3, vocab, (batch, width), generator=gen).to(target.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            target.model(input_ids=ids, cache=cache, use_cache=True)
            times.append((time.perf_counter() - start) * 1e3)
            cache.crop(-width)
        costs.append(sorted(times)[len(times) // 2])
    return costs


# ---------------------------------------------------------------- draft trees (EAGLE-2 style)
# A tree of draft tokens is verified in one target forward: node i sits at position
# base + depth(i) and attends to the whole context plus its own ancestors (a tree mask).
# The longest path the target agrees with is accepted; at T>0 each node's children are
# tried in turn by recursive rejection (SpecInfer / EAGLE): child x is accepted with
# probability p(x) under the current residual p, which then drops x, so the emitted
# token is exactly distributed as p whatever the tree. A chain is the one-child tree.

class TreeShape:
    """`tree:DEPTH,TOPK,TOTAL`: expand the TOPK best frontier nodes into TOPK children each,
    for DEPTH levels, then keep the TOTAL nodes with the best cumulative draft log-prob."""

    def __init__(self, depth: int, topk: int, total: int):
        if not (1 <= depth <= 16 and 1 <= topk <= 16 and 1 <= total <= 128):
            raise ScyllaError(f"tree shape needs 1<=depth<=16, 1<=topk<=16, 1<=total<=128; "
                              f"got {depth},{topk},{total}")
        self.depth, self.topk, self.total = depth, topk, total

    @classmethod
    def parse(cls, spec: str) -> "TreeShape":
        body = spec.removeprefix("tree:")
        parts = body.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ScyllaError(f"bad tree shape {spec!r}; use tree:DEPTH,TOPK,TOTAL such as tree:5,4,24")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"tree:{self.depth},{self.topk},{self.total}"


class DraftTree:
    """Draft tokens with parent links; parents come before children, -1 is the root
    (the last context token, not yet in the cache)."""

    def __init__(self, tokens: list[int], parents: list[int]):
        self.tokens, self.parents = tokens, parents
        self.depths = []
        for p in parents:
            self.depths.append(1 if p < 0 else self.depths[p] + 1)

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def lineage(self, node: int) -> list[int]:
        """The node and its ancestors, up to (not including) the root."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out

    def drafted_along(self, path: list[int]) -> list[int]:
        """What a Step records as drafted: the accepted path, then the draft's best guess
        where verification stopped (so per-position acceptance counts the miss)."""
        stop = self.children(path[-1] if path else -1)
        return [self.tokens[i] for i in path] + ([self.tokens[stop[0]]] if stop else [])

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def __len__(self) -> int:
        return len(self.tokens)


def tree_attention(tree: DraftTree, past: int, dtype) -> torch.Tensor:
    """Additive 4D mask [1, 1, 1+n, past+1+n]: the context, the root, own ancestors and self."""
    width = len(tree) + 1
    allowed = torch.zeros(width, past + width, dtype=torch.bool)
    allowed[:, :past + 1] = True
    for i in range(len(tree)):
        allowed[i + 1, [past + 1 + a for a in tree.lineage(i)]] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.inference_mode()
def tree_forward(target, root: int, tree: DraftTree, cache: DynamicCache, need_hidden: bool):
    past = cache.get_seq_length()
    ids = torch.tensor([[root] + tree.tokens], device=target.device)
    positions = torch.tensor([[past] + [past + d for d in tree.depths]], device=target.device)
    mask = tree_attention(tree, past, target.model.dtype).to(target.device)
    out = target.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, output_hidden_states=need_hidden)
    return out.logits[0], out.hidden_states if need_hidden else None


def accept_tree_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk from the root while the target's argmax is a child; return the path and bonus."""
    path, node = [], -1
    choice = logits.argmax(-1).tolist()
    while True:
        want = choice[node + 1]
        match = [c for c in tree.children(node) if tree.tokens[c] == want]
        if not match:
            return path, want
        node = match[0]
        path.append(node)


def accept_tree_sampling(tree: DraftTree, probs: torch.Tensor, generator) -> tuple[list[int], int]:
    """Recursive rejection over each node's children (deterministic drafts: one-hot q)."""
    path, node = [], -1
    while True:
        residual = probs[node + 1].clone()
        moved = False
        for child in tree.children(node):
            tok = tree.tokens[child]
            if torch.rand((), generator=generator).item() < float(residual[tok]):
                node, moved = child, True
                path.append(child)
                break
            residual[tok] = 0.0
            total = residual.sum()
            if total <= 0:
                break
            residual /= total
        if not moved:
            if residual.sum() <= 0:  # every token with mass was a rejected child: sample p itself
                residual = probs[node + 1]
            return path, sample(residual / residual.sum(), generator)


def keep_tree_path(cache: DynamicCache, past: int, path: list[int]) -> None:
    """Keep the context, the root and the accepted path's slots; drop the other branches."""
    index = torch.tensor([past] + [past + 1 + i for i in path])
    for layer in cache.layers:
        keep = index.to(layer.keys.device)
        layer.keys = torch.cat([layer.keys[..., :past, :], layer.keys.index_select(-2, keep)], -2)
        layer.values = torch.cat([layer.values[..., :past, :], layer.values.index_select(-2, keep)], -2)


def tree_step(target, draft, cache, context, budget, shape: TreeShape, temperature, top_p,
              generator, eos_ids, index) -> Step:
    """One tree draft -> tree verify -> accept-longest-path cycle (batch of one)."""
    t0 = time.perf_counter()
    depth = min(shape.depth, budget - 1)
    tree = DraftTree([], [])
    if draft is not None and depth > 0:
        tree = draft.propose_tree(context, TreeShape(depth, shape.topk, shape.total), temperature, top_p, generator)
    t1 = time.perf_counter()
    past = cache.get_seq_length()
    need_hidden = draft is not None and draft.needs_hidden
    logits, hidden = tree_forward(target, context[-1], tree, cache, need_hidden)
    t2 = time.perf_counter()
    probs = logits_to_probs(logits, temperature, top_p) if temperature > 0 else None
    path, bonus = (accept_tree_greedy(tree, logits) if temperature <= 0
                   else accept_tree_sampling(tree, probs, generator))
    keep_tree_path(cache, past, path)
    accepted = [tree.tokens[i] for i in path]
    if draft is not None:
        rows = [0] + [i + 1 for i in path]
        draft.observe([context[-1]] + accepted, None if hidden is None else tuple(h[:, rows] for h in hidden))
    emitted, _ = emit(accepted + [bonus], eos_ids, budget)
    drafted = tree.drafted_along(path)
    at = [0] + [i + 1 for i in path]  # block row whose logits judged each drafted token
    shown = [float(torch.softmax(logits[at[j]].float(), -1)[tok]) for j, tok in enumerate(drafted)]
    return Step(index=index, drafted=drafted, accepted=min(len(path), len(emitted)),
                bonus=bonus if len(emitted) == len(path) + 1 else None, emitted=emitted,
                p_draft=shown, q_draft=[1.0] * len(drafted), draft_ms=(t1 - t0) * 1e3, verify_ms=(t2 - t1) * 1e3,
                overhead_ms=(time.perf_counter() - t2) * 1e3, tree_size=len(tree), k=depth)
