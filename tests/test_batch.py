"""Batched speculative decoding on a tiny random Llama: each row is what it is decoded alone."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats

from scylla import ScyllaError
from scylla.budget import best_draft_length
from scylla.decoding import batch_generate, batch_generate_ids, generate_ids
from scylla.lean import KVCache
from scylla.drafts import LayerSkipDraft, NgramDraft
from tests.conftest import tiny_target
from tests.test_engine import RandomDraft, exact_joint_23, one_thread, plain_greedy, random_prompt  # noqa: F401
from tests.test_head import head_draft
from tests.test_tree import RandomTreeDraft


def mixed_prompts(seed, n, longest=40):
    rng = random.Random(seed)
    return [random_prompt(rng, rng.randrange(1, longest)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["none", "ngram", "random", "layerskip", "head"])
@pytest.mark.parametrize("k", [1, 3, "auto"])
def test_every_row_equals_its_plain_greedy_decoding(kind, k, tmp_path):
    target = tiny_target()
    drafts = {"none": None, "ngram": NgramDraft(), "random": RandomDraft(96, seed=3),
              "layerskip": LayerSkipDraft(target, 2)}
    draft = head_draft(target, tmp_path) if kind == "head" else drafts[kind]
    prompts = mixed_prompts(seed=len(kind), n=5)
    got, steps = batch_generate_ids(target, draft, prompts, max_new_tokens=24, k=k)
    for prompt, row, row_steps in zip(prompts, got, steps):
        assert row == plain_greedy(target, prompt, 24)
        assert all(len(s.drafted) <= (s.k if k == "auto" else k) for s in row_steps)


@pytest.mark.parametrize("kind", ["ngram", "random-tree", "head"])
def test_tree_rows_equal_their_plain_greedy_decoding(kind, tmp_path):
    target = tiny_target()
    draft = {"ngram": NgramDraft(), "random-tree": RandomTreeDraft(96, seed=5)}.get(kind) or head_draft(target, tmp_path)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 12) for _ in range(rng.randrange(1, 40))] for _ in range(5)]
    got, steps = batch_generate_ids(target, draft, prompts, max_new_tokens=24, tree="tree:4,3,10")
    for prompt, row in zip(prompts, got):
        assert row == plain_greedy(target, prompt, 24)
    assert max(s.tree_size for r in steps for s in r) > 1


def test_rows_stop_at_their_own_eos_and_leave_the_batch():
    probe = tiny_target()
    prompts = mixed_prompts(seed=11, n=6)
    outputs = [plain_greedy(probe, p, 30) for p in prompts]
    # an EOS that one row emits early and at least one other row never emits
    eos = next(t for t in outputs[0][2:10] if any(t not in o for o in outputs[1:]))
    target = tiny_target(eos=eos)
    got, steps = batch_generate_ids(target, RandomDraft(96, seed=1), prompts, max_new_tokens=30, k=3)
    lengths = set()
    for prompt, row in zip(prompts, got):
        assert row == plain_greedy(target, prompt, 30)
        lengths.add(len(row))
    assert len(lengths) > 1
    # a finished row gets no more steps: its last step is the one that emitted EOS or hit the budget
    for row_steps in steps:
        assert sum(eos in s.emitted for s in row_steps) <= 1
    forwards = list(batch_generate(target, NgramDraft(), prompts, max_new_tokens=30, k=3))
    assert len(forwards[-1]) < len(prompts)


def test_batch_of_one_is_the_single_prompt_engine():
    target = tiny_target()
    prompt = mixed_prompts(seed=5, n=1)[0]
    draft = LayerSkipDraft(target, 1)
    single, single_steps = generate_ids(target, draft, prompt, max_new_tokens=20, k=4)
    (batched,), (batched_steps,) = batch_generate_ids(target, draft, [prompt], max_new_tokens=20, k=4)
    assert batched == single
    assert [s.accepted for s in batched_steps] == [s.accepted for s in single_steps]


@pytest.mark.parametrize("bad_row,prompt", [(2, []), (1, list(range(3, 250)))])
def test_a_bad_row_refuses_the_batch_and_names_it(bad_row, prompt):
    target = tiny_target()
    prompts = mixed_prompts(seed=1, n=4)
    prompts[bad_row] = prompt
    with pytest.raises(ScyllaError, match=f"batch row {bad_row}"):
        batch_generate_ids(target, NgramDraft(), prompts, max_new_tokens=20, k=3)


def test_kv_cache_keeps_accepted_slots_and_drops_finished_rows():
    cache = KVCache(n_layers=1, rows=3, kv_heads=1, head_dim=1, capacity=8)
    cache.keys[0][:, 0, :, 0] = torch.arange(3 * 8.).reshape(3, 8)
    cache.lengths[:] = torch.tensor([2, 1, 0])
    cache.keep(0, [0, 1])      # a chain: nothing moves
    cache.keep(1, [0, 2, 3])   # a tree path: slots 1+2 and 1+3 move down
    cache.keep(2, [])
    assert cache.lengths.tolist() == [4, 4, 0]
    assert cache.keys[0][1, 0, :4, 0].tolist() == [8.0, 9.0, 11.0, 12.0]
    cache.select_rows([1])
    assert cache.rows == 1 and cache.lengths.tolist() == [4]
    assert cache.keys[0][0, 0, :4, 0].tolist() == [8.0, 9.0, 11.0, 12.0]
    cache.reserve(20)
    assert cache.capacity >= 20 and cache.keys[0][0, 0, :4, 0].tolist() == [8.0, 9.0, 11.0, 12.0]


def test_draft_length_choice_follows_cost_and_acceptance():
    rising = [10.0, 14.0, 18.0, 22.0, 26.0]
    assert best_draft_length(0.0, rising, 0.0) == 0      # nothing accepted: do not draft
    assert best_draft_length(0.95, [10.0] * 5, 0.0) == 4  # free verification: draft the most
    assert best_draft_length(0.95, [10.0] * 5, 50.0) == 0  # a draft dearer than the target
    flat_then_steep = [10.0, 10.5, 11.0, 30.0, 50.0]      # compute-bound past 3 tokens per row
    assert best_draft_length(0.8, flat_then_steep, 0.0) == 2


def test_draft_length_weighs_acceptance_depth_by_depth():
    flat = [10.0] * 5
    assert best_draft_length([0.9, 0.1, 0.1, 0.1], flat, 1.0) == 1       # right once, rarely twice
    assert best_draft_length([0.5, 0.9, 0.9, 0.9], flat, 1.0) == 4       # once right, it stays right
    assert best_draft_length(0.5, flat, 1.0) == best_draft_length([0.5] * 4, flat, 1.0)


def test_draft_budget_learns_each_depth_and_probes_one_deeper():
    from types import SimpleNamespace

    from scylla.budget import DraftBudget

    budget = object.__new__(DraftBudget)
    budget.costs, budget.judged, budget.passed = [10.0] * 5, [0] * 4, [0] * 4
    budget.drafted, budget.draft_ms, budget.steps = 0, 0.0, 0
    assert budget.depth_rates() == [0.5] * 4
    # chains of 3: the first token always right, the second never
    budget.record([SimpleNamespace(drafted=[7, 8, 9], accepted=1, draft_ms=3.0)] * 40)
    assert budget.judged == [40, 40, 0, 0] and budget.passed == [40, 0, 0, 0]
    rates = budget.depth_rates()
    assert rates[0] > 0.95 and rates[1] < 0.05 and rates[2] == rates[1]
    picks = [budget.choose(1) for _ in range(32)]
    assert picks.count(1) == 30 and picks[15] == picks[31] == 2
