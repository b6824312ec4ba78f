"""Bulk generation and on-the-fly feature training (scylla/bulk.py) on a tiny random Llama."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_target
from scylla import bulk
from scylla.data import features_of
from scylla.decoding import batch_generate_ids
from scylla.train import TrainConfig, stored_layers


def ragged_prompts(n: int, seed: int = 0, vocab: int = 96) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def test_chunks_by_length_keep_each_group_within_its_slots():
    prompts = ragged_prompts(50)
    groups = bulk.chunks_by_length(prompts, 16, slots=300, max_rows=8)
    assert sorted(i for g in groups for i in g) == list(range(50))
    for g in groups:
        width = max(len(prompts[i]) for i in g) + 17
        assert len(g) <= 8 and (len(g) == 1 or len(g) * width <= 300)


def test_bulk_greedy_equals_the_engine_row_by_row():
    """Sliced prefills, several groups and rows leaving the cache mid-way change nothing."""
    target = tiny_target()
    prompts = ragged_prompts(12)
    engine, _ = batch_generate_ids(target, None, prompts, max_new_tokens=24, temperature=0.0)
    # an EOS the model actually emits, so that rows finish at different steps
    eos = engine[0][5]
    target.model.generation_config.eos_token_id = eos
    expected, _ = batch_generate_ids(target, None, prompts, max_new_tokens=24, temperature=0.0)
    assert any(len(r) < 24 for r in expected) and any(len(r) == 24 for r in expected)
    got = bulk.bulk_generate(target.forward, prompts, 24, [eos], slots=200, prefill_tokens=64)
    assert got == expected


def test_features_captured_while_decoding_equal_a_second_forward():
    """Every prompt and answer position, with sliced prefills and rows finishing (and leaving
    the cache) at different steps; capturing changes no answer."""
    target = tiny_target()
    layers = stored_layers(target.model.config.num_hidden_layers)
    prompts = ragged_prompts(10, seed=4)
    eos = bulk.bulk_generate(target.forward, prompts, 20, [])[0][3]

    def decode(capture=None):
        return bulk.decode_group(target.forward, prompts, 20, 0.0, 1.0, torch.Generator(), [eos], 0,
                                 prefill_tokens=64, check_every=4, capture=capture)

    capture = bulk.FeatureCapture(layers, len(prompts), 20, target.model.config.hidden_size)
    answers = decode(capture)
    assert answers == decode()
    assert any(len(a) < 20 for a in answers) and any(len(a) == 20 for a in answers)
    for prompt, answer, seq in zip(prompts, answers, capture.sequences(prompts, answers)):
        ref = features_of(target, prompt + answer, layers)
        assert torch.equal(seq["tokens"], ref["tokens"])
        assert torch.equal(seq["labels"], ref["labels"])
        assert torch.allclose(seq["features"].float(), ref["features"].float(), atol=2e-3)


def test_bulk_sampling_is_seeded_and_stops_at_the_deadline():
    target = tiny_target()
    prompts = ragged_prompts(6, seed=1)
    a = bulk.bulk_generate(target.forward, prompts, 12, [2], temperature=1.0, top_p=0.9, seed=3)
    b = bulk.bulk_generate(target.forward, prompts, 12, [2], temperature=1.0, top_p=0.9, seed=3)
    assert a == b and all(1 <= len(r) <= 12 for r in a)
    assert bulk.bulk_generate(target.forward, prompts, 12, [2], deadline=0.0) == [None] * 6


def test_batched_target_features_equal_the_cached_pipeline():
    target = tiny_target()
    layers = stored_layers(target.model.config.num_hidden_layers)
    seqs = ragged_prompts(5, seed=2)
    ids, _ = bulk.padded(seqs, 0, "cpu")
    feats, labels = bulk.target_features(target.forward, ids, layers)
    for b, seq in enumerate(seqs):
        ref = features_of(target, seq, layers)
        torch.testing.assert_close(feats[b, :len(seq)].half(), ref["features"], atol=2e-3, rtol=2e-3)
        assert labels[b, :len(seq)].tolist() == ref["labels"].tolist()


def test_training_batch_weighs_prompt_answer_and_padding():
    target = tiny_target()
    seqs = [{"tokens": list(range(3, 13)), "prompt_len": 4}, {"tokens": list(range(3, 9)), "prompt_len": 0}]
    batch = bulk.training_batch(target.forward, seqs, stored_layers(4), 0.1)
    torch.testing.assert_close(batch["weights"], torch.tensor([[0.1] * 3 + [1.0] * 7, [1.0] * 6 + [0.0] * 4]))
    assert (batch["labels"][1, 6:] == -100).all() and (batch["labels"][0] >= 0).all()
    assert batch["multi"].shape[-1] == 3 * 32 and batch["last"].shape[-1] == 32


def test_three_recipes_learn_from_the_same_batches():
    target = tiny_target()
    target.model.float()
    target._forward = None
    rng = random.Random(0)
    # a learnable corpus: answers that count upwards
    seqs = []
    for _ in range(24):
        start = rng.randrange(3, 40)
        seqs.append({"tokens": [rng.randrange(3, 96) for _ in range(4)] + list(range(start, start + 30)), "prompt_len": 4})
    recipes = {"eagle3": TrainConfig(tokens=10**6, fusion="multi", draft_vocab=48, ttt_steps=2, arch="eagle3", lr=3e-3),
               "eagle": TrainConfig(tokens=10**6, fusion="multi", draft_vocab=48, ttt_steps=2, lr=3e-3),
               "eagle2": TrainConfig(tokens=10**6, fusion="last", draft_vocab=0, ttt_steps=1, lr=3e-3)}
    trainees = [bulk.make_trainee(target.model, cfg, seqs, name, "tiny") for name, cfg in recipes.items()]
    layers = stored_layers(4)
    plan = {"steps": 60}
    for step in range(60):
        batch = bulk.training_batch(target.forward, seqs[step % 3 * 8:(step % 3 + 1) * 8], layers, 0.1)
        for t in trainees:
            bulk.train_step(t, batch, step, plan, autocast=False)
    for t in trainees:
        assert sum(t.losses[-5:]) < 0.7 * sum(t.losses[:5]), t.name
    batches = bulk.length_batches(seqs, 512, 0)
    assert sum(len(b) for b in batches) == 24
    assert 0.0 <= bulk.heldout_answer_top1(target.forward, trainees[0], batches, layers) <= 1.0


def test_answer_vocab_keeps_the_most_frequent_answer_tokens():
    seqs = [{"tokens": [90, 91, 5, 5, 5, 7], "prompt_len": 2}, {"tokens": [5, 8, 8], "prompt_len": 1}]
    assert bulk.answer_vocab(seqs, 2, 96).tolist() == [5, 8]


def test_planned_lr_warms_up_then_decays_to_a_tenth():
    plan = {"steps": 100}
    assert bulk.planned_lr(0, plan) < bulk.planned_lr(4, plan) == pytest.approx(0.96)
    assert bulk.planned_lr(99, plan) == 0.1 and bulk.steps_that_fit(0.5, 100.0, 1000) == 190
