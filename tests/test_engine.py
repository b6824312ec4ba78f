"""The engine on a tiny random Llama: greedy equality, lossless sampling, rollback, drafts."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats

from scylla import ScyllaError
from scylla.decoding import apply_top_p, generate_ids, speculative_generate
from scylla.drafts import Draft, LayerSkipDraft, NgramDraft, check_draft_spec, find_continuation
from scylla.trace import summarize
from tests.conftest import tiny_target


def plain_greedy(target, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    out = target.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=target.eos_ids, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class RandomDraft(Draft):
    """Proposes random tokens: exercises every rejection path."""

    def __init__(self, vocab, seed=0):
        self.rng, self.vocab, self.name = random.Random(seed), vocab, "random"

    def propose(self, context, k, temperature, top_p, generator):
        return [self.rng.randrange(self.vocab) for _ in range(k)], None


class OracleDraft(Draft):
    """Proposes the known greedy continuation, with one planted mistake per step."""

    def __init__(self, prompt, answer, wrong_at):
        self.full, self.wrong_at, self.name = list(prompt) + list(answer), wrong_at, "oracle"

    def propose(self, context, k, temperature, top_p, generator):
        out = self.full[len(context):len(context) + k]
        if len(out) > self.wrong_at:
            out[self.wrong_at] = (out[self.wrong_at] + 1) % 96
        return out, None


def random_prompt(rng, n, vocab=96):
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equals_plain_decoding_for_every_k(k):
    target = tiny_target()
    rng = random.Random(k)
    for trial in range(2):
        prompt = random_prompt(rng, rng.randrange(1, 40))
        n_new = rng.randrange(1, 30)
        want = plain_greedy(target, prompt, n_new)
        for draft in (NgramDraft(), RandomDraft(96, seed=trial), LayerSkipDraft(target, 2),
                      OracleDraft(prompt, want, wrong_at=trial % 3)):
            got, steps = generate_ids(target, draft, prompt, max_new_tokens=n_new, k=k)
            assert got == want, (k, trial, draft.name)
            assert summarize(steps).n_tokens == len(want)


def test_oracle_draft_is_accepted_and_tau_counts_forwards():
    target = tiny_target()
    prompt = [5, 6, 7, 8]
    want = plain_greedy(target, prompt, 30)
    got, steps = generate_ids(target, OracleDraft(prompt, want, wrong_at=99), prompt, max_new_tokens=30, k=4)
    assert got == want
    st = summarize(steps)
    assert st.tau == pytest.approx(len(want) / len(steps))
    assert st.tau > 3.0  # 1 prefill token + 5 tokens per full step
    assert st.accept_rate == pytest.approx(1.0)


def test_eos_in_the_middle_of_an_accepted_draft_stops_there():
    probe = tiny_target(eos=None)
    prompt = [9, 10, 11, 12, 13]
    free = plain_greedy(probe, prompt, 30)
    eos = free[7]  # a token the target emits mid-way: make it the EOS
    target = tiny_target(eos=eos)
    want = plain_greedy(target, prompt, 30)
    assert want[-1] == eos and len(want) <= 8
    got, steps = generate_ids(target, OracleDraft(prompt, free, wrong_at=99), prompt, max_new_tokens=30, k=8)
    assert got == want
    assert got.count(eos) == 1 and got[-1] == eos


def test_long_prompt_near_context_limit_and_over_it():
    target = tiny_target(max_pos=128)
    prompt = random_prompt(random.Random(3), 120)
    want = plain_greedy(target, prompt, 8)
    got, _ = generate_ids(target, NgramDraft(), prompt, max_new_tokens=8, k=8)
    assert got == want
    with pytest.raises(ScyllaError, match="context"):
        generate_ids(target, NgramDraft(), prompt, max_new_tokens=9, k=8)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(k=0)])
def test_bad_decode_arguments_are_refused(bad):
    kwargs = dict(max_new_tokens=4, k=2, temperature=0.0, top_p=1.0) | bad
    with pytest.raises(ScyllaError):
        generate_ids(tiny_target(), None, [4, 5], **kwargs)


def test_empty_prompt_is_refused():
    with pytest.raises(ScyllaError, match="empty"):
        generate_ids(tiny_target(), None, [], max_new_tokens=4)


def test_rollback_leaves_the_cache_of_the_prefix():
    target = tiny_target()
    fwd = target.forward
    seq = list(range(3, 23))
    full, short = fwd.new_cache(1, 64), fwd.new_cache(1, 64)
    fwd.forward(torch.tensor([seq]), full)
    full.keep(0, list(range(20)))
    fwd.forward(torch.tensor([seq[:12]]), short)
    short.keep(0, list(range(12)))
    full.set_length(0, 12)
    nxt = torch.tensor([[40, 41]])
    a, _ = fwd.forward(nxt, full)
    b, _ = fwd.forward(nxt, short)
    torch.testing.assert_close(a, b)
    for ka, kb in zip(full.keys, short.keys):
        torch.testing.assert_close(ka[:, :, :14], kb[:, :, :14])


def test_ngram_lookup_copies_the_latest_match_and_proposes_nothing_otherwise():
    ctx = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert find_continuation(ctx, 3, 2) == ([7, 8], 3)
    assert NgramDraft().propose([1, 2, 3, 4, 5], 4, 0.0, 1.0, None) == ([], None)


def test_draft_specs_resolve_or_fail_clearly(tiny):
    for spec in ("none", "ngram", "layerskip:2"):
        check_draft_spec(spec)
    for spec in ("bogus", "layerskip:x", "layerskip"):
        with pytest.raises(ScyllaError, match="unknown --draft"):
            check_draft_spec(spec)
    with pytest.raises(ScyllaError, match="layerskip"):
        LayerSkipDraft(tiny, 4)
    assert len(LayerSkipDraft(tiny, 1).lm.stack.layers) == 1
    assert tiny.model.config.num_hidden_layers == 4  # the view did not shrink the target


def test_top_p_keeps_the_smallest_prefix():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = apply_top_p(probs, 0.8)
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def exact_joint_23(target, prompt, temperature):
    """Exact P(x2, x3) of plain sampling, by enumerating the tiny vocabulary."""
    vocab = target.model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        joint = torch.zeros(vocab, vocab, dtype=torch.float64)
        for x1 in range(vocab):
            seqs = torch.tensor([prompt + [x1, x2] for x2 in range(vocab)])
            logits = target.model(seqs).logits
            p2 = torch.softmax(logits[0, -2] / temperature, -1)
            p3 = torch.softmax(logits[:, -1] / temperature, -1)
            joint += p1[x1] * p2[:, None] * p3
    return joint.numpy()


@pytest.fixture
def one_thread():
    # thousands of tiny forwards: thread hand-offs cost more than the maths
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_greedy_sampling_at_t0_matches_steps_stream():
    target = tiny_target()
    prompt = [4, 5, 6, 7]
    streamed = []
    for step in speculative_generate(target, NgramDraft(), prompt, max_new_tokens=20, k=4):
        assert len(step.emitted) == step.accepted + (1 if step.bonus is not None else 0)
        assert len(step.p_draft) == len(step.drafted) == len(step.q_draft)
        streamed += step.emitted
    assert streamed == plain_greedy(target, prompt, 20)


def run_steps(target, draft, prompt, **kwargs):
    return [(s.drafted, s.emitted) for s in speculative_generate(target, draft, prompt, **kwargs)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_shared_prefill_decodes_exactly_as_an_own_prefill(temperature):
    from scylla.decoding import prefill_prompt

    target = tiny_target()
    prompt = [4, 5, 6, 7, 4, 5, 6]
    kwargs = dict(max_new_tokens=16, k=3, temperature=temperature, seed=7)
    own = run_steps(target, NgramDraft(), prompt, **kwargs)
    shared = prefill_prompt(target, prompt, need_hidden=False)
    before = shared.cache.keys[0].clone()
    # twice from one shared prefill: each decoder copies the cache, none writes into it
    assert run_steps(target, NgramDraft(), prompt, shared_prefill=shared, **kwargs) == own
    assert run_steps(target, None, prompt, shared_prefill=shared, max_new_tokens=16, k=1,
                     temperature=temperature, seed=7) == run_steps(target, None, prompt, max_new_tokens=16,
                                                                   k=1, temperature=temperature, seed=7)
    assert torch.equal(shared.cache.keys[0], before)


def test_a_shared_prefill_of_another_prompt_is_refused():
    from scylla.decoding import prefill_prompt

    target = tiny_target()
    shared = prefill_prompt(target, [4, 5, 6], need_hidden=False)
    with pytest.raises(ScyllaError, match="another prompt"):
        next(speculative_generate(target, NgramDraft(), [4, 5, 7], max_new_tokens=4, shared_prefill=shared))
