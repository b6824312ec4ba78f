"""Lossless speculative sampling, checked hard enough to catch a 1% shift.

The acceptance rule is exercised on a known Markov-chain target (the next token depends on
the previous one), so that tens of thousands of samples cost seconds: skewed stochastic and
deterministic drafts, chains and branching trees, T in {0.7, 1.3}, top-p < 1, three tokens
deep so that every draft position is reached. The same check run on a deliberately wrong
residual must fail: the test can fail. Engine-level checks on a real (tiny) model follow.
"""
from __future__ import annotations

import functools
import itertools
import random

import numpy as np
import pytest
import torch
from scipy import stats

import scylla.decoding as decoding
from scylla.decoding import DraftTree, accept, batch_generate_ids, generate_ids, logits_to_probs
from scylla.drafts import LayerSkipDraft, NgramDraft
from scylla.proposals import Draft
from tests.conftest import tiny_target
from tests.test_engine import one_thread  # noqa: F401

V = 5
DEPTH = 3
N_SAMPLES = 30000


def markov(seed: int, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=gen, dtype=torch.float64) * scale   # logits of next | prev


TARGET = markov(0, 1.5)
DRAFT = 1.6 * TARGET + markov(1, 1.0)   # informative but skewed: over-confident and noisy


@functools.cache
def target_probs(prev: int, temperature: float, top_p: float) -> torch.Tensor:
    return logits_to_probs(TARGET[prev][None], temperature, top_p)[0].double()


def exact_joint(start: int, temperature: float, top_p: float) -> np.ndarray:
    joint = np.zeros((V,) * DEPTH)
    for seq in itertools.product(range(V), repeat=DEPTH):
        prob, prev = 1.0, start
        for tok in seq:
            prob *= float(target_probs(prev, temperature, top_p)[tok])
            prev = tok
        joint[seq] = prob
    return joint


@functools.cache
def draft_row(prev: int) -> torch.Tensor:
    return torch.softmax(DRAFT[prev], -1)


def draft_tree(kind: str, prev: int, rng: random.Random) -> DraftTree:
    """chain-q: sampled from q; chain-det: q's argmax chain; tree-det: top-2 children per
    node; tree-q: 2 i.i.d. children per node sampled from q."""
    branching = 2 if kind.startswith("tree") else 1
    stochastic = kind.endswith("-q")
    tokens, parents, q_rows, frontier = [], [], [], [(-1, prev)]
    for _ in range(DEPTH):
        nxt = []
        for node, tok_prev in frontier:
            q = draft_row(tok_prev)
            if stochastic:
                picks = rng.choices(range(V), weights=q.tolist(), k=branching)
            else:
                picks = q.topk(branching).indices.tolist()
            for tok in picks:
                tokens.append(tok)
                parents.append(node)
                q_rows.append(q)
                nxt.append((len(tokens) - 1, tok))
        frontier = nxt
    return DraftTree(tokens, parents, torch.stack(q_rows) if stochastic else None)


def simulate(kind: str, temperature: float, top_p: float, n: int, seed: int = 0):
    """The first DEPTH emitted tokens of n runs; and how deep acceptance went."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = np.zeros((V,) * DEPTH)
    deepest = 0
    for _ in range(n):
        out, prev = [], 0
        while len(out) < DEPTH:
            tree = draft_tree(kind, prev, rng)
            probs = torch.stack([target_probs(prev, temperature, top_p)] +
                                [target_probs(t, temperature, top_p) for t in tree.tokens])
            path, bonus = accept(tree, probs, probs, gen)
            deepest = max(deepest, len(path))
            out += [tree.tokens[i] for i in path] + [bonus]
            prev = out[-1]
        counts[tuple(out[:DEPTH])] += 1
    return counts, deepest


def lossless_p(counts: np.ndarray, joint: np.ndarray) -> float:
    """Bonferroni over the joint of the first DEPTH tokens and each position's marginal (the
    marginals have few cells, so they see small shifts that the joint's many cells dilute)."""
    tests = [chisquare_p(counts, joint)]
    for axis in range(DEPTH):
        others = tuple(a for a in range(DEPTH) if a != axis)
        tests.append(chisquare_p(counts.sum(others), joint.sum(others)))
    return min(1.0, min(tests) * len(tests))


def chisquare_p(counts: np.ndarray, joint: np.ndarray) -> float:
    expected = joint.ravel() * counts.sum()
    observed = counts.ravel()
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()   # float32 probabilities sum to 1 within 1e-6 only
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("kind,temperature,top_p", [
    ("chain-q", 0.7, 1.0), ("chain-det", 1.3, 0.9), ("tree-det", 0.7, 0.8), ("tree-q", 1.3, 1.0),
])
def test_acceptance_reproduces_the_target_exactly(kind, temperature, top_p, one_thread):
    counts, deepest = simulate(kind, temperature, top_p, N_SAMPLES)
    assert deepest >= 2   # acceptance reached past the first draft position
    assert lossless_p(counts, exact_joint(0, temperature, top_p)) > 0.001


def wrong_residual(residual, tok, q):
    """The classic bug: drop only the rejected token, ignoring q."""
    out = residual.clone()
    out[tok] = 0.0
    return out / out.sum() if out.sum() > 0 else residual


def test_the_check_catches_a_residual_that_ignores_q(monkeypatch, one_thread):
    monkeypatch.setattr(decoding, "drop_rejected", wrong_residual)
    counts, _ = simulate("chain-q", 0.7, 1.0, N_SAMPLES)
    assert lossless_p(counts, exact_joint(0, 0.7, 1.0)) < 1e-6


def test_the_check_sees_a_one_percent_shift(one_thread):
    """Move 1% of probability between the second and third likeliest first tokens: the
    samples that fit the exact distribution must not fit this one."""
    counts, _ = simulate("chain-det", 1.3, 0.9, N_SAMPLES)
    joint = exact_joint(0, 1.3, 0.9)
    first = joint.sum((1, 2))
    second, third = np.argsort(-first)[1:3]
    shifted = joint.copy()
    shifted[second] *= (first[second] + 0.01) / first[second]
    shifted[third] *= (first[third] - 0.01) / first[third]
    assert lossless_p(counts, joint) > 0.001
    assert lossless_p(counts, shifted) < 0.001


# ---------------------------------------------------------------- the engine on a tiny model

def exact_joint_34(target, prompt, temperature, top_p):
    """Exact P(x3, x4) of plain sampling (the first two tokens summed out), by enumeration."""
    vocab = target.model.config.vocab_size
    model = target.model

    def dist(seqs):
        with torch.no_grad():
            return logits_to_probs(model(torch.tensor(seqs)).logits[:, -1].double(), temperature, top_p).double()

    p1 = dist([prompt])[0]
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for x1 in range(vocab):
        p2 = dist([prompt + [x1]])[0]
        pairs = [prompt + [x1, x2] for x2 in range(vocab)]
        p3 = dist(pairs)
        for x2 in range(vocab):
            p4 = dist([pairs[x2] + [x3] for x3 in range(vocab)])
            joint += p1[x1] * p2[x2] * p3[x2][:, None] * p4
    return joint.numpy()


@pytest.mark.parametrize("kind,temperature,top_p", [
    ("layerskip", 1.3, 1.0), ("ngram", 0.7, 0.9),
])
def test_engine_sampling_is_lossless_at_every_draft_position(kind, temperature, top_p, one_thread):
    """Budget k + 2 = 4 tokens: the first speculative step may draft k = 2 and accept both."""
    vocab = 6
    target = tiny_target(vocab=vocab, layers=3, hidden=16, init_range=0.6, eos=99)
    target.model.generation_config.eos_token_id = None
    prompt = [2, 0, 3, 1, 5, 2, 0, 3, 1]   # 3-grams repeat: the n-gram draft proposes two tokens at times
    draft = {"layerskip": LayerSkipDraft(target, 1), "ngram": NgramDraft(3, 1)}[kind]
    n = 1500
    counts = np.zeros((vocab, vocab))
    reached, longest = np.zeros(2), 0
    for i in range(n):
        out, steps = generate_ids(target, draft, prompt, max_new_tokens=4, k=2, temperature=temperature,
                                  top_p=top_p, seed=i)
        counts[out[2], out[3]] += 1
        for s in steps:
            reached[:min(s.accepted, 2)] += 1
            longest = max(longest, len(s.drafted))
    assert longest == 2 and reached[0] > 0   # both draft positions were verified
    if kind != "ngram":   # a copy-draft on random text rarely gets two right
        assert reached[1] > 0
    assert chisquare_p(counts, exact_joint_34(target, prompt, temperature, top_p)) > 0.001


@pytest.mark.parametrize("tree", [None, "tree:2,2,6"])
def test_batch_rows_of_different_lengths_sample_losslessly(tree, one_thread):
    vocab = 6
    target = tiny_target(vocab=vocab, layers=3, hidden=16, init_range=0.6, eos=99)
    target.model.generation_config.eos_token_id = None
    prompts = [[2, 0, 3, 1, 5, 2, 0], [4, 1]]
    draft = LayerSkipDraft(target, 2) if tree is None else SampledTreeDraft(vocab, seed=5)
    n = 1200
    counts = [np.zeros((vocab, vocab)) for _ in prompts]
    for i in range(n):
        out, _ = batch_generate_ids(target, draft, prompts, max_new_tokens=4, k=2, temperature=0.9,
                                    top_p=0.95, seed=i, tree=tree)
        for row, ids in enumerate(out):
            counts[row][ids[2], ids[3]] += 1
    for row, prompt in enumerate(prompts):
        assert chisquare_p(counts[row], exact_joint_34(target, prompt, 0.9, 0.95)) > 0.001


class SampledTreeDraft(Draft):
    """A stochastic branching tree through the engine: at each node, two children drawn
    i.i.d. from a fixed q that depends on the parent token (SpecInfer's setting), with q."""

    name = "sampled-tree"

    def __init__(self, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.q_of = torch.softmax(2.0 * torch.randn(vocab, vocab, generator=gen), -1)
        self.rng = random.Random(seed)

    def propose_tree(self, context, shape, temperature, top_p, generator):
        tokens, parents, q_rows, frontier = [], [], [], [(-1, context[-1])]
        for _ in range(shape.depth):
            nxt = []
            for node, prev in frontier:
                q = self.q_of[prev]
                for tok in self.rng.choices(range(q.shape[0]), weights=q.tolist(), k=2):
                    tokens.append(tok)
                    parents.append(node)
                    q_rows.append(q)
                    nxt.append((len(tokens) - 1, tok))
            frontier = nxt
        return DraftTree(tokens, parents, torch.stack(q_rows))


def engine_tree_counts(target, prompt, n, temperature):
    draft = SampledTreeDraft(target.model.config.vocab_size, seed=5)
    vocab = target.model.config.vocab_size
    counts, deepest = np.zeros((vocab, vocab)), 0
    for i in range(n):
        out, steps = generate_ids(target, draft, prompt, max_new_tokens=4, temperature=temperature,
                                  seed=i, tree="tree:2,2,6")
        counts[out[2], out[3]] += 1
        deepest = max([deepest] + [s.accepted for s in steps])
    return counts, deepest


def test_engine_samples_a_branching_stochastic_tree_losslessly_and_a_wrong_residual_fails(monkeypatch, one_thread):
    """Several sampled candidates per level, verified as siblings through the engine; the
    same run with the residual that ignores q must be caught."""
    vocab = 6
    target = tiny_target(vocab=vocab, layers=3, hidden=16, init_range=0.6, eos=99)
    target.model.generation_config.eos_token_id = None
    prompt = [2, 0, 3, 1, 5, 2]
    joint = exact_joint_34(target, prompt, 1.0, 1.0)
    counts, deepest = engine_tree_counts(target, prompt, 1500, 1.0)
    assert deepest == 2   # both levels of the tree were accepted at times
    assert chisquare_p(counts, joint) > 0.001
    monkeypatch.setattr(decoding, "drop_rejected", wrong_residual)
    counts, _ = engine_tree_counts(target, prompt, 1500, 1.0)
    assert chisquare_p(counts, joint) < 0.001
