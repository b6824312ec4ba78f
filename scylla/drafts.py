"""Draft kinds behind one small interface.

A draft sees what the target has processed (`observe`) and proposes k tokens after
a context (`propose`), returning them with their draft probabilities q (None for a
deterministic proposal, which verification treats as one-hot q).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import DynamicCache

from scylla import ScyllaError
from scylla.decoding import DraftTree, logits_to_probs, rollback, sample

NAMED_DRAFTS = ("scylla", "eagle3-style", "eagle2-style")
DRAFT_CHOICES = ("none", "ngram", "layerskip:8", *NAMED_DRAFTS)


class Draft:
    name = "draft"
    needs_hidden = False

    def reset(self) -> None:
        """Forget the previous sequence."""

    def fork(self) -> "Draft":
        """A twin with its own sequence state and shared weights (one per batch row)."""
        twin = copy.copy(self)
        twin.reset()
        return twin

    def observe(self, tokens: list[int], hidden) -> None:
        """The target has now processed `tokens` (hidden: its hidden states for them)."""

    def propose(self, context: list[int], k: int, temperature: float, top_p: float,
                generator) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def propose_tree(self, context: list[int], shape, temperature: float, top_p: float,
                     generator) -> DraftTree:
        """A draft tree; drafts without a tree of their own give their greedy chain."""
        drafted, _ = self.propose(context, shape.depth, 0.0, 1.0, None)
        return DraftTree.chain(drafted)


class NgramDraft(Draft):
    """Prompt lookup: copy what followed the latest earlier match of the context's tail."""

    needs_hidden = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = "ngram"

    def propose(self, context, k, temperature, top_p, generator):
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            found = find_continuation(context, n, k)
            if found:
                return found, None
        return [], None  # nothing matches: propose nothing, pay nothing

    def propose_tree(self, context, shape, temperature, top_p, generator):
        """A trie of what followed the latest `topk` distinct earlier matches of the tail."""
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            found = find_continuations(context, n, shape.depth, shape.topk)
            if found:
                return trie_of(found, shape.total)
        return DraftTree([], [])


def find_continuations(context: list[int], n: int, k: int, limit: int) -> list[list[int]]:
    """Continuations of the latest matches of the n-token tail, newest first, distinct."""
    if len(context) <= n:
        return []
    tail, found = context[-n:], []
    for start in range(len(context) - n - 1, -1, -1):
        if context[start:start + n] == tail:
            cont = context[start + n:start + n + k]
            if cont and cont not in found:
                found.append(cont)
                if len(found) >= limit:
                    break
    return found


def trie_of(sequences: list[list[int]], total: int) -> DraftTree:
    """Merge sequences into a prefix tree of at most `total` nodes (earlier sequences first)."""
    tokens, parents, index = [], [], {}
    for seq in sequences:
        parent = -1
        for tok in seq:
            key = (parent, tok)
            if key not in index:
                if len(tokens) >= total:
                    break
                index[key] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
            parent = index[key]
    return DraftTree(tokens, parents)


def find_continuation(context: list[int], n: int, k: int) -> list[int]:
    if len(context) <= n:
        return []
    tail = context[-n:]
    for start in range(len(context) - n - 1, -1, -1):
        if context[start:start + n] == tail:
            return context[start + n:start + n + k]
    return []


class LayerSkipDraft(Draft):
    """The target's first `layers` decoder layers, its final norm and its head."""

    def __init__(self, target, layers: int):
        total = target.model.config.num_hidden_layers
        if not 1 <= layers < total:
            raise ScyllaError(f"layerskip:K needs 1 <= K < {total}, got {layers}")
        self.name = f"layerskip:{layers}"
        self.device = target.device
        self.model = shallow_prefix_model(target.model, layers)
        self.cache = DynamicCache()
        self.cached: list[int] = []

    def reset(self):
        self.cache = DynamicCache()
        self.cached = []

    @torch.inference_mode()
    def propose(self, context, k, temperature, top_p, generator):
        keep = common_prefix(self.cached, context[:-1])
        rollback(self.cache, keep)
        pending = context[keep:]
        drafted, rows = [], []
        for _ in range(k):
            ids = torch.tensor([pending], device=self.device)
            logits = self.model(input_ids=ids, cache=self.cache, use_cache=True).logits[0, -1]
            probs = logits_to_probs(logits[None], temperature, top_p)[0]
            tok = int(logits.argmax()) if temperature <= 0 else sample(probs, generator)
            drafted.append(tok)
            rows.append(probs)
            pending = [tok]
        self.cached = list(context) + drafted[:-1]
        q = torch.stack(rows) if temperature > 0 else None
        return drafted, q


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shallow_prefix_model(model, layers: int):
    """A view of the causal LM that runs only its first `layers` layers (weights shared)."""
    view = shallow_module_copy(model)
    view.model = shallow_module_copy(model.model)
    view.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
    view.config = copy.deepcopy(model.config)
    view.config.num_hidden_layers = layers
    view.model.config = view.config
    return view


def shallow_module_copy(module: torch.nn.Module) -> torch.nn.Module:
    # copy.copy alone would share the _modules dict, so edits would leak into the target
    view = copy.copy(module)
    view._modules = dict(module._modules)
    view._parameters = dict(module._parameters)
    view._buffers = dict(module._buffers)
    return view


def check_draft_spec(spec: str) -> None:
    """Refuse a malformed spec before any model is loaded."""
    spec = (spec or "none").strip()
    if spec in ("none", "ngram", *NAMED_DRAFTS) or Path(spec).is_dir():
        return
    kind, _, num = spec.partition(":")
    if kind == "layerskip" and num.isdigit():
        return
    raise ScyllaError(f"unknown --draft {spec!r}; use none, ngram, layerskip:K, "
                      f"{', '.join(NAMED_DRAFTS)} or a folder with a saved draft")


def make_draft(spec: str, target) -> Draft | None:
    """Resolve a --draft spec: none, ngram, layerskip:K, a named trained draft, or a folder."""
    spec = (spec or "none").strip()
    if spec == "none":
        return None
    if spec == "ngram":
        return NgramDraft()
    if spec.startswith("layerskip"):
        _, _, num = spec.partition(":")
        if not num.isdigit():
            raise ScyllaError(f"bad draft spec {spec!r}; use layerskip:K with an integer K")
        return LayerSkipDraft(target, int(num))
    from scylla.head import load_head_draft, named_draft_dir

    if spec in NAMED_DRAFTS:
        return load_head_draft(named_draft_dir(spec), target, name=spec)
    if Path(spec).is_dir():
        return load_head_draft(Path(spec), target, name=Path(spec).name)
    raise ScyllaError(f"unknown --draft {spec!r}; use none, ngram, layerskip:K, "
                      f"{', '.join(NAMED_DRAFTS)} or a folder with a saved draft")
