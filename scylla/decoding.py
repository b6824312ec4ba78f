"""The engine: draft, verify in one target forward, accept, keep the accepted cache slots.

In the spirit of gpt-fast's `speculative_decode`: one step function built from small
helpers, and one loop. A single prompt is a batch of one; a chain of k drafted tokens is a
one-wide tree. Greedy verification (T=0) reproduces plain greedy decoding token for token;
at T>0 acceptance is recursive rejection sampling (Leviathan et al.; SpecInfer for trees):
child x of the current node is accepted with min(1, r(x)/q(x)) under the residual r (at
first the target's p); a rejection turns r into norm(max(0, r - q)) (one-hot q: r without
x) and the next child is tried; when none is accepted the token is sampled from r. The
emitted tokens are then exactly distributed as the target's, whatever the draft.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from scylla import ScyllaError
from scylla.budget import KMAX, DraftBudget  # noqa: F401  (KMAX: the pages read it here)
from scylla.lean import KVCache
from scylla.proposals import (DraftTree, TreeShape, apply_top_p, logits_to_probs,  # noqa: F401
                              no_tree_error, sample)
from scylla.trace import Step

CACHE_MARGIN = 160  # room past the prompt and budget for the widest verify block


# ---------------------------------------------------------------- checks

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


def check_batch(target, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse the whole batch, naming the row, rather than silently dropping a prompt."""
    if not prompts:
        raise ScyllaError("empty batch")
    for i, ids in enumerate(prompts):
        try:
            check_prompt(target, ids, max_new_tokens)
        except ScyllaError as exc:
            raise ScyllaError(f"batch row {i}: {exc}") from None


def make_generator(seed: int | None, device: str) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def pad_id(target) -> int:
    pad = target.model.generation_config.pad_token_id
    return int(pad) if pad is not None else 0


# ---------------------------------------------------------------- rows

class Row:
    """One prompt's state: its context ends with the token not yet in the target's cache."""

    def __init__(self, row: int, prompt_ids: list[int], budget: int, draft):
        self.row, self.context, self.budget, self.draft = row, list(prompt_ids), budget, draft
        self.produced, self.done = 0, False

    def depth_allowed(self, k: int) -> int:
        """Drafting past the token budget is wasted work (the bonus token fills the last)."""
        if self.draft is None:
            return 0
        return max(0, min(k, self.budget - self.produced - 1))

    def take(self, tokens: list[int], eos_ids: list[int]) -> list[int]:
        """Append tokens up to the first EOS (kept) and the budget; the one place that
        decides a row is finished."""
        emitted = []
        for tok in tokens[:self.budget - self.produced]:
            emitted.append(tok)
            if tok in eos_ids:
                break
        self.context += emitted
        self.produced += len(emitted)
        self.done = self.produced >= self.budget or any(t in eos_ids for t in emitted)
        return emitted


# ---------------------------------------------------------------- prefill

@dataclass
class PromptPrefill:
    """One target forward over a prompt. Decoders of the same prompt can share it (the live
    page runs plain and speculative decoding side by side): each takes a copy of the cache,
    and each is charged the measured prefill time."""

    prompt_ids: list[int]
    cache: KVCache
    last_logits: torch.Tensor             # [vocab]
    features: dict[int, torch.Tensor]     # layer -> [len(prompt), H]
    verify_ms: float

    def features_of(self, layers: tuple[int, ...]) -> torch.Tensor | None:
        if not layers:
            return None
        n = max(self.features)   # the last layer is always kept
        return torch.cat([self.features[i % (n + 1)] for i in layers], -1)


def prefill_features(target) -> tuple[int, ...]:
    """The layers any shipped draft kind reads (low, mid, high and the last): a shared
    prefill keeps them so that whichever draft is picked can start from it."""
    n = target.model.config.num_hidden_layers
    return tuple(sorted({i % (n + 1) for i in (2, n // 2, n - 3, n)}))


def prefill_prompt(target, prompt_ids: list[int], need_hidden: bool = True,
                   capacity: int | None = None) -> PromptPrefill:
    layers = prefill_features(target) if need_hidden else ()
    fwd = target.forward
    cache = fwd.new_cache(1, capacity or len(prompt_ids) + 512)
    start = time.perf_counter()
    logits, feats = fwd.forward(torch.tensor([prompt_ids]), cache, features=layers,
                                logits_at=torch.tensor([[len(prompt_ids) - 1]]))
    verify_ms = (time.perf_counter() - start) * 1e3
    cache.keep(0, list(range(len(prompt_ids))))
    width = feats.shape[-1] // len(layers) if layers else 0
    features = {layer: feats[0, :, i * width:(i + 1) * width] for i, layer in enumerate(layers)}
    return PromptPrefill(list(prompt_ids), cache, logits[0, -1], features, verify_ms)


def check_shared_prefill(shared: PromptPrefill, prompt_ids: list[int], layers: tuple[int, ...]) -> None:
    if shared.prompt_ids != list(prompt_ids):
        raise ScyllaError("the shared prefill is of another prompt")
    n = len(shared.features) and max(shared.features)
    if any(i % (n + 1) not in shared.features for i in layers):
        raise ScyllaError("the shared prefill has no hidden states, and the draft needs them")


def prefill_rows(target, rows: list[Row], layers, capacity: int, shared: PromptPrefill | None):
    """The prompts' forward (ragged: padded to the longest), or a copy of a shared one.
    Returns the cache, per row the last logits and features, and the forward's ms."""
    if shared is not None:
        check_shared_prefill(shared, rows[0].context, layers)
        cache = shared.cache.clone()
        cache.reserve(capacity)
        return cache, shared.last_logits[None], [shared.features_of(layers)], shared.verify_ms
    lengths = [len(r.context) for r in rows]
    ids = torch.full((len(rows), max(lengths)), pad_id(target), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :lengths[b]] = torch.tensor(r.context)
    fwd = target.forward
    cache = fwd.new_cache(len(rows), capacity)
    start = time.perf_counter()
    logits, feats = fwd.forward(ids, cache, features=layers, logits_at=torch.tensor(lengths)[:, None] - 1)
    verify_ms = (time.perf_counter() - start) * 1e3
    for b, n in enumerate(lengths):
        cache.keep(b, list(range(n)))
    row_feats = [None if feats is None else feats[b, :n] for b, n in enumerate(lengths)]
    return cache, logits[:, 0], row_feats, verify_ms


def first_steps(rows, last_logits, row_feats, verify_ms, temperature, top_p, generator, eos_ids) -> list[Step]:
    steps = []
    for b, row in enumerate(rows):
        if row.draft is not None:
            row.draft.reset()
            row.draft.observe(row.context, row_feats[b])
        logits = last_logits[b]
        first = int(logits.argmax()) if temperature <= 0 else sample(
            logits_to_probs(logits[None], temperature, top_p)[0], generator)
        emitted = row.take([first], eos_ids)
        steps.append(Step(index=0, drafted=[], accepted=0, bonus=first, emitted=emitted,
                          verify_ms=verify_ms, row=row.row))
    return steps


# ---------------------------------------------------------------- acceptance

def accept(tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor | None, generator) -> tuple[list[int], int]:
    """The accepted path (node indices) and the token after it. Block slot 0 is the root,
    slot i+1 holds node i, so node n's children are judged by row n+1 of logits/probs."""
    if probs is None:
        return accept_greedy(tree, logits)
    return accept_sampled(tree, probs, generator)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk from the root while the target's argmax is a child."""
    choice = logits.argmax(-1).tolist()
    path, node = [], -1
    while True:
        want = choice[node + 1]
        match = [c for c in tree.children(node) if tree.tokens[c] == want]
        if not match:
            return path, want
        node = match[0]
        path.append(node)


def accept_sampled(tree: DraftTree, probs: torch.Tensor, generator) -> tuple[list[int], int]:
    """Recursive rejection sampling over each node's children (see the module docstring)."""
    path, node = [], -1
    while True:
        residual, moved = probs[node + 1], False
        for child in tree.children(node):
            tok = tree.tokens[child]
            q = None if tree.q is None else tree.q[child]
            q_tok = 1.0 if q is None else float(q[tok])
            if q_tok > 0 and torch.rand((), generator=generator, device=residual.device).item() < min(1.0, float(residual[tok]) / q_tok):
                node, moved = child, True
                path.append(child)
                break
            residual = drop_rejected(residual, tok, q)
        if not moved:
            return path, sample(residual, generator)


def drop_rejected(residual: torch.Tensor, tok: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, r - q)); with one-hot q, r without tok. An all-zero result means r == q up
    to rounding, where r itself is still exact."""
    out = residual.clone()
    if q is None:
        out[tok] = 0.0
    else:
        out = (out - q.to(out.dtype)).clamp_min(0.0)
    total = out.sum()
    return out / total if total > 0 else residual


# ---------------------------------------------------------------- one step

def propose(row: Row, depth: int, shape: TreeShape | None, temperature, top_p, generator) -> DraftTree:
    if depth == 0:
        return DraftTree([], [])
    if shape is not None:
        return row.draft.propose_tree(row.context, TreeShape(depth, shape.topk, shape.total),
                                      temperature, top_p, generator)
    return row.draft.propose_chain(row.context, depth, temperature, top_p, generator)


def pack_blocks(rows: list[Row], trees: list[DraftTree], pad: int):
    """Per row the block [root] + tree tokens, right-padded: ids, depth offsets and the block
    mask (None where every row is a chain of one width, so plain causal attention is exact)."""
    width = 1 + max(len(t) for t in trees)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    offsets = torch.arange(width)[None].repeat(len(rows), 1)
    for b, (row, tree) in enumerate(zip(rows, trees)):
        ids[b, 0] = row.context[-1]
        ids[b, 1:len(tree) + 1] = torch.tensor(tree.tokens, dtype=torch.long)
        offsets[b, 1:len(tree) + 1] = torch.tensor(tree.depths, dtype=torch.long)
    if all(t.is_chain() and len(t) == width - 1 for t in trees):
        return ids, offsets, None
    block = torch.eye(width, dtype=torch.bool)[None].repeat(len(rows), 1, 1)  # padding sees itself
    for b, tree in enumerate(trees):
        block[b, :len(tree) + 1, :len(tree) + 1] = tree.block_mask()
    return ids, offsets, block


def step(target, cache: KVCache, rows: list[Row], k: int, shape: TreeShape | None, temperature: float,
         top_p: float, generator, eos_ids: list[int], index: int) -> list[Step]:
    """One draft -> verify -> accept cycle for every live row, with one target forward."""
    trees, draft_ms, depths = [], [], []
    for row in rows:
        t0 = time.perf_counter()
        depths.append(row.depth_allowed(shape.depth if shape is not None else k))  # the step's k
        trees.append(propose(row, depths[-1], shape, temperature, top_p, generator))
        draft_ms.append((time.perf_counter() - t0) * 1e3)
    t1 = time.perf_counter()
    ids, offsets, block = pack_blocks(rows, trees, pad_id(target))
    layers = rows[0].draft.feature_layers if rows[0].draft is not None else ()
    logits, feats = target.forward.forward(ids, cache, offsets, block, layers)
    verify_ms = (time.perf_counter() - t1) * 1e3
    t2 = time.perf_counter()
    logits = logits.float()
    all_probs = logits_to_probs(logits, temperature, top_p) if temperature > 0 else None  # one batched top-p
    shared_ms = (time.perf_counter() - t2) * 1e3 / len(rows)
    steps = []
    for b, (row, tree) in enumerate(zip(rows, trees)):
        t2 = time.perf_counter()
        row_logits = logits[b, :len(tree) + 1]
        probs = all_probs[b, :len(tree) + 1] if all_probs is not None else None
        path, bonus = accept(tree, row_logits, probs, generator)
        kept = [0] + [i + 1 for i in path]
        cache.keep(b, kept)
        accepted = [tree.tokens[i] for i in path]
        if row.draft is not None:
            row.draft.observe([row.context[-1]] + accepted, None if feats is None else feats[b, kept])
        emitted = row.take(accepted + [bonus], eos_ids)
        steps.append(step_record(tree, path, bonus, emitted, row_logits, probs, index, row.row,
                                 draft_ms[b], verify_ms, shared_ms + (time.perf_counter() - t2) * 1e3, depths[b]))
    return steps


def step_record(tree, path, bonus, emitted, logits, probs, index, row, draft_ms, verify_ms, overhead_ms,
                k) -> Step:
    """p_draft: the target's probability of each recorded token in the distribution it
    samples from (at T=0 its untempered softmax); q_draft: the draft's own probability."""
    nodes = tree.recorded(path)
    judged_at = [tree.parents[n] + 1 for n in nodes]
    p_draft = []
    if nodes:
        dist = probs[judged_at] if probs is not None else torch.softmax(logits[judged_at], -1)
        p_draft = [float(dist[j, tree.tokens[n]]) for j, n in enumerate(nodes)]
    return Step(index=index, drafted=[tree.tokens[n] for n in nodes],
                accepted=min(len(path), len(emitted)),
                bonus=bonus if len(emitted) == len(path) + 1 else None, emitted=emitted,
                p_draft=p_draft, q_draft=[tree.confidence[n] for n in nodes], draft_ms=draft_ms,
                verify_ms=verify_ms, overhead_ms=overhead_ms, row=row, tree_size=len(tree), k=k)


# ---------------------------------------------------------------- the loop

def batch_generate(target, draft, prompts: list[list[int]], max_new_tokens: int = 128,
                   k: int | str = 6, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, kmax: int = KMAX, tree: "TreeShape | str | None" = None,
                   shared_prefill: PromptPrefill | None = None) -> Iterator[list[Step]]:
    """Decode B prompts together; yield, per target forward, one Step for each live row.
    With `tree` (a TreeShape or 'tree:D,K,N') each row verifies a draft tree, else a chain.
    k="auto" picks the draft length every step from this machine's measured verify cost and
    the acceptance seen so far (DraftBudget). A batch of one uses `draft` itself; larger
    batches give each row a fork. `shared_prefill` (one prompt) copies a prompt's forward."""
    check_decode_args(max_new_tokens, temperature, top_p, k)
    check_batch(target, prompts, max_new_tokens)
    if isinstance(tree, str):
        tree = TreeShape.parse(tree)
    if tree is not None and draft is not None and not draft.has_tree:
        raise no_tree_error(draft.name)
    if shared_prefill is not None and len(prompts) != 1:
        raise ScyllaError("a shared prefill serves a single prompt")
    generator = make_generator(seed, target.device)
    eos_ids = target.eos_ids
    drafts = [draft] if len(prompts) == 1 or draft is None else [draft.fork() for _ in prompts]
    rows = [Row(i, p, max_new_tokens, drafts[min(i, len(drafts) - 1)]) for i, p in enumerate(prompts)]
    layers = draft.feature_layers if draft is not None else ()
    capacity = max(len(p) for p in prompts) + max_new_tokens + CACHE_MARGIN
    cache, last_logits, row_feats, ms = prefill_rows(target, rows, layers, capacity, shared_prefill)
    yield first_steps(rows, last_logits, row_feats, ms, temperature, top_p, generator, eos_ids)
    budget = DraftBudget(target, len(rows), kmax) if k == "auto" and draft is not None and tree is None else None
    live, index = keep_live(cache, rows), 1
    while live:
        step_k = budget.choose(len(live)) if budget else (1 if k == "auto" else k)
        steps = step(target, cache, live, step_k, tree, temperature, top_p, generator, eos_ids, index)
        if budget:
            budget.record(steps)
        live, index = keep_live(cache, live), index + 1
        yield steps


def keep_live(cache: KVCache, rows: list[Row]) -> list[Row]:
    """Finished rows leave the cache, so they stop costing compute."""
    cache.select_rows([b for b, r in enumerate(rows) if not r.done])
    return [r for r in rows if not r.done]


def speculative_generate(target, draft, prompt_ids: list[int], max_new_tokens: int = 128,
                         k: int | str = 6, temperature: float = 0.0, top_p: float = 1.0,
                         seed: int | None = None, tree: "TreeShape | str | None" = None,
                         shared_prefill: PromptPrefill | None = None) -> Iterator[Step]:
    """One prompt: one Step per target forward (the prefill first), as tokens are accepted."""
    for steps in batch_generate(target, draft, [prompt_ids], max_new_tokens, k, temperature, top_p,
                                seed, tree=tree, shared_prefill=shared_prefill):
        yield steps[0]


def plain_generate(target, prompt_ids: list[int], max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, shared_prefill: PromptPrefill | None = None) -> Iterator[Step]:
    """Plain autoregressive decoding on the same forward, one Step per token."""
    yield from speculative_generate(target, None, prompt_ids, max_new_tokens, 1,
                                    temperature, top_p, seed, shared_prefill=shared_prefill)


def generate_ids(target, draft, prompt_ids, **kwargs) -> tuple[list[int], list[Step]]:
    """Run to completion; return the generated ids and every Step."""
    steps = list(speculative_generate(target, draft, prompt_ids, **kwargs))
    return [t for s in steps for t in s.emitted], steps


def batch_generate_ids(target, draft, prompts, **kwargs) -> tuple[list[list[int]], list[list[Step]]]:
    """Run a batch to completion; per row, the generated ids and its Steps."""
    ids = [[] for _ in prompts]
    steps = [[] for _ in prompts]
    for forward in batch_generate(target, draft, prompts, **kwargs):
        for s in forward:
            ids[s.row] += s.emitted
            steps[s.row].append(s)
    return ids, steps
