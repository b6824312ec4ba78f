"""What a draft hands the engine: the Draft interface, draft trees, sampling distributions.

Below both the drafts and the decoding loops, so neither imports the other. A chain of k
drafted tokens is a one-wide tree; a tree node may carry the distribution q it was sampled
from (stochastic drafts) or none (a deterministic pick: one-hot q).
"""
from __future__ import annotations

import copy

import torch

from scylla import ScyllaError


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


# ---------------------------------------------------------------- trees

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
    (the last context token, not yet in the cache). `q` ([n, vocab], optional): the
    distribution each node was sampled from; `confidence`: the draft's own probability of
    each node (for display; 1.0 where the draft has no distribution)."""

    def __init__(self, tokens: list[int], parents: list[int], q: torch.Tensor | None = None,
                 confidence: list[float] | None = None):
        self.tokens, self.parents, self.q = list(tokens), list(parents), q
        self.confidence = list(confidence) if confidence is not None else [1.0] * len(tokens)
        self.depths = []
        for p in parents:
            self.depths.append(1 if p < 0 else self.depths[p] + 1)

    @classmethod
    def chain(cls, tokens: list[int], q: torch.Tensor | None = None,
              confidence: list[float] | None = None) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q, confidence)

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def lineage(self, node: int) -> list[int]:
        """The node and its ancestors, up to (not including) the root."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def recorded(self, path: list[int]) -> list[int]:
        """The nodes a Step records as drafted: a whole chain; for a branching tree the
        accepted path, then the draft's best guess where verification stopped (so
        per-position acceptance counts the miss)."""
        if self.is_chain():
            return list(range(len(self.tokens)))
        stop = self.children(path[-1] if path else -1)
        return list(path) + stop[:1]

    def block_mask(self) -> torch.Tensor:
        """[1+n, 1+n] bool: slot 0 is the root; node i (slot i+1) sees the root, its
        ancestors and itself."""
        width = len(self.tokens) + 1
        allowed = torch.zeros(width, width, dtype=torch.bool)
        allowed[:, 0] = True
        for i in range(len(self.tokens)):
            allowed[i + 1, [a + 1 for a in self.lineage(i)]] = True
        return allowed

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------- the draft interface

class Draft:
    """A draft sees what the target has processed (`observe`) and proposes after a context.
    `feature_layers`: the target hidden layers it reads (transformers' hidden_states
    numbering), empty for drafts that read none."""

    name = "draft"
    feature_layers: tuple[int, ...] = ()

    @property
    def needs_hidden(self) -> bool:
        return bool(self.feature_layers)

    def reset(self) -> None:
        """Forget the previous sequence."""

    def fork(self) -> "Draft":
        """A twin with its own sequence state and shared weights (one per batch row)."""
        twin = copy.copy(self)
        twin.reset()
        return twin

    def observe(self, tokens: list[int], features: torch.Tensor | None) -> None:
        """The target has now processed `tokens` (features: [len(tokens), F] of feature_layers)."""

    def propose(self, context: list[int], k: int, temperature: float, top_p: float,
                generator) -> tuple[list[int], torch.Tensor | None]:
        """k tokens after context, with the [k, vocab] distributions they were sampled from
        (None: deterministic)."""
        raise NotImplementedError

    def propose_chain(self, context, k, temperature, top_p, generator) -> DraftTree:
        drafted, q = self.propose(context, k, temperature, top_p, generator)
        confidence = None if q is None else [float(q[i, t]) for i, t in enumerate(drafted)]
        return DraftTree.chain(drafted, q, confidence)

    @property
    def has_tree(self) -> bool:
        """Whether this draft proposes trees of its own (the engine refuses a tree shape otherwise)."""
        return type(self).propose_tree is not Draft.propose_tree

    def propose_tree(self, context: list[int], shape: TreeShape, temperature: float, top_p: float,
                     generator) -> DraftTree:
        raise NotImplementedError(f"{self.name} has no tree proposer")


def no_tree_error(name: str) -> ScyllaError:
    """A tree shape asked of a draft that proposes chains only (Draft.has_tree)."""
    return ScyllaError(f"--draft {name} proposes chains only, not trees: use --k instead of --tree")
