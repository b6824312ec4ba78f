"""Draft kinds behind one small interface.

The interface (`Draft`, in scylla/proposals.py): a draft sees what the target has processed
(`observe`) and proposes k tokens after a context (`propose`), returning them with their
draft probabilities q (None for a deterministic proposal: one-hot q), or a tree.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from scylla import ScyllaError
from scylla.head import load_head_draft, named_draft_dir
from scylla.lean import LeanLM
from scylla.proposals import Draft, DraftTree, logits_to_probs, sample

NAMED_DRAFTS = ("scylla", "eagle3-style", "eagle2-style")
COPY_SUFFIX = "+ngram"
# A trained head's default: a small EAGLE-2 tree. Its second and third guesses are often
# right where the first is not, and on this CPU a 6-wide verify costs about what a one-token
# forward does; deeper or bigger trees drafted and verified more than they gained. Sampling
# (T > 0) accepts less past the first token, so there one level of five guesses, drafted by
# a single head step, paid best. Chosen on the 16 sweep prompts (docs/results.md, "Draft
# trees on the lean forward").
HEAD_TREE = "tree:2,3,5"
HEAD_TREE_SAMPLED = "tree:1,5,5"
CHAIN_K = 6
__all__ = ["Draft", "NgramDraft", "LayerSkipDraft", "CopyOrDraft", "make_draft", "check_draft_spec"]


class NgramDraft(Draft):
    """Prompt lookup: copy what followed the latest earlier match of the context's tail."""

    needs_hidden = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = "ngram"

    def propose(self, context, k, temperature, top_p, generator):
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            found, run = find_continuation(context, n, k)
            if found:
                # propose long only where the match runs long: a copied passage matches far
                # back, a chance 2-gram does not, and each extra token widens the verify
                return found[:max(1, run - 1)], None
        return [], None  # nothing matches: propose nothing, pay nothing

    def propose_tree(self, context, shape, temperature, top_p, generator):
        """A trie of what followed the latest `topk` distinct earlier matches of the tail."""
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            found = find_continuations(context, n, shape.depth, shape.topk)
            if found:
                return trie_of(found, shape.total)
        return DraftTree([], [])


class CopyOrDraft(Draft):
    """Another draft, or prompt lookup where the answer copies (a summary quoting its article,
    an answer lifted from a passage, code repeating a name), chosen every step from measured
    acceptance: when the context's tail matches an earlier passage, the copy is proposed if
    copies whose match ran as far have had at least as many tokens accepted per step, in this
    decode, as the other draft's proposals (priors: a match of 4 or more tokens copies, a
    shorter one does not).
    The other draft still observes every step, so it picks up where the copy ends."""

    RUNS = (3, 4, 6, 9)   # match-run buckets: 3, 4-5, 6-8, 9 or more tokens

    def __init__(self, other: Draft, min_run: int = 4, ngram: int = 3):
        self.other, self.min_run, self.ngram = other, min_run, ngram
        self.name = f"{other.name}{COPY_SUFFIX}"
        self.feature_layers = other.feature_layers
        self.reset_tallies()

    def reset_tallies(self) -> None:
        # [tokens accepted, steps]; each prior weighs as two steps
        self.copy_tally = {run: [3.0 if run >= self.min_run else 0.5, 2.0] for run in self.RUNS}
        self.model_tally = [1.0, 2.0]
        self.last = None   # the tally the last proposal counts in

    def reset(self):
        self.other.reset()
        self.reset_tallies()

    def fork(self) -> "CopyOrDraft":
        twin = copy.copy(self)
        twin.other = self.other.fork()
        twin.reset_tallies()
        return twin

    def observe(self, tokens, features):
        if self.last is not None and tokens:   # tokens: the root, then what was accepted
            self.last[0] += len(tokens) - 1
            self.last[1] += 1
            self.last = None
        self.other.observe(tokens, features)

    def copied(self, context: list[int], k: int) -> list[int]:
        """The copy worth proposing here, or [] where the other draft has measured better."""
        found, run = find_continuation(context, self.ngram, k)
        found = found[:run - 1]
        if not found:
            return []
        bucket = self.copy_tally[max(r for r in self.RUNS if r <= max(run, self.RUNS[0]))]
        if bucket[0] / bucket[1] < self.model_tally[0] / self.model_tally[1]:
            return []
        self.last = bucket
        return found

    def remember(self, tree: DraftTree) -> DraftTree:
        self.last = self.model_tally if len(tree) else None
        return tree

    def propose(self, context, k, temperature, top_p, generator):
        copy_ = self.copied(context, k)
        if copy_:
            return copy_, None
        drafted, q = self.other.propose(context, k, temperature, top_p, generator)
        self.last = self.model_tally if drafted else None
        return drafted, q

    def propose_chain(self, context, k, temperature, top_p, generator) -> DraftTree:
        copy_ = self.copied(context, k)
        if copy_:
            return DraftTree.chain(copy_)
        return self.remember(self.other.propose_chain(context, k, temperature, top_p, generator))

    @property
    def has_tree(self) -> bool:
        return self.other.has_tree

    def propose_tree(self, context, shape, temperature, top_p, generator) -> DraftTree:
        copy_ = self.copied(context, shape.depth)
        if copy_:
            return DraftTree.chain(copy_)
        return self.remember(self.other.propose_tree(context, shape, temperature, top_p, generator))


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


def find_continuation(context: list[int], n: int, k: int, longest: int = 16) -> tuple[list[int], int]:
    """What followed the latest earlier match of the n-token tail, and how far back that
    match runs (n up to `longest` tokens)."""
    if len(context) <= n:
        return [], 0
    tail = context[-n:]
    for start in range(len(context) - n - 1, -1, -1):
        if context[start:start + n] == tail:
            return context[start + n:start + n + k], match_run(context, start + n, longest)
    return [], 0


def match_run(context: list[int], end: int, longest: int) -> int:
    """How many tokens before `end` equal the tokens before the context's end."""
    run = 0
    while run < longest and end - run - 1 >= 0 and context[end - run - 1] == context[-run - 1]:
        run += 1
    return run


class LayerSkipDraft(Draft):
    """The target's first `layers` decoder layers, its final norm and its head (lean forward)."""

    def __init__(self, target, layers: int):
        total = target.model.config.num_hidden_layers
        if not 1 <= layers < total:
            raise ScyllaError(f"layerskip:K needs 1 <= K < {total}, got {layers}")
        if target.quant != "none" and target.lean_quant == "none":
            raise ScyllaError("layerskip runs on the lean forward; it cannot read bitsandbytes weights "
                              "(use --quant none, or int8 on CPU)")
        self.name = f"layerskip:{layers}"
        fwd = target.forward
        # the target's own kernels and weights, shared; transformers' forward has none to share
        self.lm = fwd.first_layers(layers) if hasattr(fwd, "first_layers") else LeanLM(target.model, layers=layers)
        self.reset()

    def reset(self):
        self.cache = self.lm.new_cache(1, 512)
        self.cached: list[int] = []

    @torch.inference_mode()
    def propose(self, context, k, temperature, top_p, generator):
        keep = common_prefix(self.cached, context[:-1])
        self.cache.set_length(0, keep)
        pending = context[keep:]
        drafted, rows = [], []
        for _ in range(k):
            logits, _ = self.lm.forward(torch.tensor([pending]), self.cache,
                                        logits_at=torch.tensor([[len(pending) - 1]]))
            self.cache.keep(0, list(range(len(pending))))
            logits = logits[0, -1].float()
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


def unknown_draft(spec: str) -> ScyllaError:
    return ScyllaError(f"unknown --draft {spec!r}; use none, ngram, layerskip:K, {', '.join(NAMED_DRAFTS)} "
                       f"or a folder with a saved draft or an EAGLE-3 checkpoint; any but none and ngram "
                       f"take {COPY_SUFFIX} to copy where the context repeats")


def check_draft_spec(spec: str) -> None:
    """Refuse a malformed spec before any model is loaded."""
    spec = (spec or "none").strip()
    if spec.endswith(COPY_SUFFIX) and spec[:-len(COPY_SUFFIX)] not in ("", "none", "ngram"):
        return check_draft_spec(spec[:-len(COPY_SUFFIX)])
    if spec in ("none", "ngram", *NAMED_DRAFTS) or Path(spec).is_dir():
        return
    kind, _, num = spec.partition(":")
    if kind == "layerskip" and num.isdigit():
        return
    raise unknown_draft(spec)


def chains_only(spec: str) -> bool:
    """A spec whose draft has no tree proposer (layer-skip, alone or with copying): known
    before any model loads, so the CLI refuses a tree shape for it at once."""
    return (spec or "none").strip().removesuffix(COPY_SUFFIX).startswith("layerskip")


def is_head_spec(spec: str) -> bool:
    """A trained head (named or a folder), alone or with the copy fallback."""
    base = (spec or "none").strip().removesuffix(COPY_SUFFIX)
    return base not in ("", "none", "ngram") and not base.startswith("layerskip:")


def head_tree(temperature: float) -> str:
    """A trained head's default tree for one row at this temperature."""
    return HEAD_TREE if temperature <= 0 else HEAD_TREE_SAMPLED


def default_shape(spec: str, k: int | str | None, tree: str | None, temperature: float = 0.0,
                  batch: int = 1, quant: str = "none") -> tuple[int | str, str | None]:
    """Fill in what the user left out: --k alone means a chain of k; neither means a head's
    default tree (one row), a chain with k chosen per step (several rows: a batched verify
    turns compute-bound, and `auto` stops drafting where it does not pay), or a chain of
    CHAIN_K for the other drafts. On the q4 target every draft chains with `auto`: there a
    verify's cost climbs with its width (measured: 4 tokens 1.42x one, 6 tokens 2.06x), so
    the fixed shapes chosen on fp32's flat costs lose (spec_gain 0.60 for `tree:2,3,5`)."""
    if tree is None and k is None and quant == "q4" and spec not in ("none", None):
        return "auto", None
    if tree is None and k is None and is_head_spec(spec):
        if batch > 1:
            return "auto", None
        return CHAIN_K, head_tree(temperature)
    return (CHAIN_K if k is None else k), tree


def make_draft(spec: str, target) -> Draft | None:
    """Resolve a --draft spec: none, ngram, layerskip:K, a named trained draft, or a folder
    (a saved draft, or an EAGLE-3 checkpoint in the vLLM/SGLang layout: scylla.head.load_head);
    SPEC+ngram wraps it in CopyOrDraft."""
    spec = (spec or "none").strip()
    check_draft_spec(spec)
    if spec.endswith(COPY_SUFFIX):
        return CopyOrDraft(make_draft(spec[:-len(COPY_SUFFIX)], target))
    if spec == "none":
        return None
    if spec == "ngram":
        return NgramDraft()
    if spec.startswith("layerskip"):
        return LayerSkipDraft(target, int(spec.partition(":")[2]))
    if spec in NAMED_DRAFTS:
        return load_head_draft(named_draft_dir(spec), target, name=spec)
    return load_head_draft(Path(spec), target, name=Path(spec).name)
