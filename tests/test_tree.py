"""Draft trees (EAGLE-2 style) on a tiny random Llama: exact at T=0, lossless at T>0."""
from __future__ import annotations

import math
import random

import pytest
import torch

from scylla import ScyllaError
from scylla.decoding import DraftTree, TreeShape, generate_ids, prefill_prompt
from scylla.lean import attention_allowed
from scylla.drafts import Draft, LayerSkipDraft, NgramDraft, trie_of
from tests.conftest import tiny_target
from tests.test_head import head_draft
from tests.test_engine import RandomDraft, exact_joint_23, one_thread, plain_greedy, random_prompt  # noqa: F401


class RandomTreeDraft(Draft):
    """A random branching tree every step: exercises every branch and rejection path."""

    def __init__(self, vocab, seed=0):
        self.rng, self.vocab, self.name = random.Random(seed), vocab, "random-tree"

    def propose_tree(self, context, shape, temperature, top_p, generator):
        tokens, parents, frontier = [], [], [-1]
        for _ in range(shape.depth):
            nxt = []
            for parent in frontier:
                for tok in self.rng.sample(range(self.vocab), min(shape.topk, self.vocab)):
                    if len(tokens) < shape.total:
                        tokens.append(tok)
                        parents.append(parent)
                        nxt.append(len(tokens) - 1)
            frontier = nxt
        return DraftTree(tokens, parents)


@pytest.mark.parametrize("kind", ["ngram", "random-tree", "head"])
@pytest.mark.parametrize("shape", ["tree:1,1,1", "tree:4,3,12", "tree:6,4,30"])
def test_tree_decoding_equals_plain_greedy(kind, shape, tmp_path):
    target = tiny_target()
    drafts = {"ngram": NgramDraft(), "random-tree": RandomTreeDraft(96, seed=2)}
    draft = head_draft(target, tmp_path) if kind == "head" else drafts[kind]
    rng = random.Random(len(kind) + len(shape))
    for _ in range(3):
        # few distinct tokens, so that n-gram lookup finds several earlier matches
        prompt = [rng.randrange(3, 12) for _ in range(rng.randrange(4, 40))]
        got, steps = generate_ids(target, draft, prompt, max_new_tokens=30, tree=shape)
        assert got == plain_greedy(target, prompt, 30)
        assert all(s.tree_size <= TreeShape.parse(shape).total for s in steps)


def test_a_draft_without_trees_given_a_tree_shape_is_refused_not_turned_into_a_chain():
    from scylla import ScyllaError
    from scylla.drafts import CopyOrDraft

    target = tiny_target()
    for draft in (LayerSkipDraft(target, 2), CopyOrDraft(LayerSkipDraft(target, 2))):
        assert not draft.has_tree
        with pytest.raises(ScyllaError, match="chains only"):
            generate_ids(target, draft, [5, 6, 7], max_new_tokens=4, tree="tree:2,2,4")
    assert NgramDraft().has_tree and RandomTreeDraft(96).has_tree


def test_ngram_trees_branch():
    prompt = [5, 6, 7, 5, 6, 8, 5, 6, 9, 5, 6]
    tree = NgramDraft().propose_tree(prompt, TreeShape(3, 3, 9), 0.0, 1.0, None)
    assert tree.children(-1) and len(tree.children(-1)) == 3  # 9, 8 and 7 all followed "5 6"
    assert [tree.tokens[c] for c in tree.children(-1)] == [9, 8, 7]  # the latest match first
    assert tree.tokens == [9, 5, 6, 8, 5, 6, 7, 5, 6] and max(tree.depths) == 3


def test_trie_merges_shared_prefixes_and_caps_its_size():
    tree = trie_of([[1, 2, 3], [1, 2, 4], [5]], total=10)
    assert tree.tokens == [1, 2, 3, 4, 5]
    assert tree.parents == [-1, 0, 1, 1, -1]
    assert len(trie_of([[1, 2, 3], [4, 5, 6]], total=4)) == 4


def test_tree_mask_sees_the_context_and_own_ancestors_only():
    tree = DraftTree([10, 11, 12, 13], [-1, -1, 0, 2])
    allowed = attention_allowed(torch.tensor([2]), tree.block_mask()[None], span=7)[0, 0]
    assert allowed[:, :3].all()  # two context slots and the root
    assert allowed[3, 3:].tolist() == [True, False, True, False]  # node 2 sees node 0 and itself
    assert allowed[4, 3:].tolist() == [True, False, True, True]
    assert allowed[2, 3:].tolist() == [False, True, False, False]


def head_twins_at_one_context(tmp_path):
    """An untrained head and its fork, both having observed one prefilled prompt, and the
    context (prompt + one token) they draft after."""
    target = tiny_target()
    draft = head_draft(target, tmp_path)
    prompt = [5, 9, 33, 12, 40, 7]
    twin = draft.fork()
    state = prefill_prompt(target, prompt)
    for d in (draft, twin):
        d.observe(prompt, state.features_of(d.feature_layers))
    return draft, twin, prompt + [17]


def test_head_tree_of_width_one_is_the_head_chain(tmp_path):
    draft, twin, context = head_twins_at_one_context(tmp_path)
    chain, _ = draft.propose(context, 5, 0.0, 1.0, None)
    tree = twin.propose_tree(context, TreeShape(5, 1, 5), 0.0, 1.0, None)
    assert tree.tokens == chain and tree.parents == [-1, 0, 1, 2, 3]


@pytest.mark.parametrize("spec", ["tree:0,2,4", "tree:3,2", "tree:a,b,c", "tree:2,2,500"])
def test_bad_tree_shapes_are_refused(spec):
    with pytest.raises(ScyllaError, match="tree"):
        TreeShape.parse(spec)


def test_head_tree_keeps_the_top_k_children_and_the_best_scoring_nodes(tmp_path):
    """Depth 1 holds the head's top-k tokens at the root; the kept nodes are the `total`
    best by cumulative draft log-prob (one batched projection per level must not change them)."""
    draft, twin, context = head_twins_at_one_context(tmp_path)
    root = twin.catch_up(context)
    top3 = twin.lean.to_target_ids(twin.lean.logits(root[None])[0].topk(3).indices).tolist()
    wide = draft.propose_tree(context, TreeShape(3, 3, 39), 0.0, 1.0, None)
    assert [wide.tokens[c] for c in wide.children(-1)] == top3
    assert len(wide) == 3 + 9 + 9   # level 2: 3 x 3 children; level 3: the best 3 expanded
    small = draft.propose_tree(context, TreeShape(3, 3, 5), 0.0, 1.0, None)

    def paths(tree):   # each node as its token path from the root, with its cumulative log-prob
        return {tuple(tree.tokens[a] for a in reversed(tree.lineage(n))):
                sum(math.log(tree.confidence[a]) for a in tree.lineage(n)) for n in range(len(tree))}

    grown = paths(wide)
    best5 = sorted(grown, key=lambda p: -grown[p])[:5]
    assert len(small) == 5 and set(paths(small)) == set(best5)


@pytest.mark.parametrize("spec,k,tree,temperature,batch,want", [
    ("scylla", None, None, 0.0, 1, (6, "tree:2,3,5")),
    ("scylla", None, None, 0.0, 8, ("auto", None)),          # several rows: chains, k auto
    ("eagle3-style", None, None, 1.0, 1, (6, "tree:1,5,5")),  # sampling: one level of five guesses
    ("scylla+ngram", None, None, 0.0, 1, (6, "tree:2,3,5")),
    ("eagle2-style", 4, None, 0.0, 1, (4, None)),             # --k alone: a chain
    ("scylla", None, "3,3,8", 1.0, 4, (6, "3,3,8")),          # --tree alone: that tree
    ("ngram", None, None, 0.0, 1, (6, None)),
    ("layerskip:3", "auto", None, 0.0, 1, ("auto", None)),
    ("none", None, None, 1.0, 2, (6, None)),
])
def test_a_trained_head_drafts_a_small_tree_unless_told_otherwise(spec, k, tree, temperature, batch, want):
    from scylla.drafts import default_shape

    assert default_shape(spec, k, tree, temperature, batch) == want
