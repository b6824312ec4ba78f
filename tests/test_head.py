"""Scylla draft heads on a tiny random target: training, save/load, decoding with the head."""
from __future__ import annotations

import random

import pytest
import torch

from scylla import ScyllaError
from scylla.data import features_of
from scylla.decoding import generate_ids
from scylla.head import HeadDraft, export_head, load_head, save_head
from scylla.train import (TrainConfig, check_train_config, collate, draft_vocab_map, feature_columns,
                          head_loss, last_columns, length_grouped, make_head, recipe_settings, resolved_precision,
                          stored_layers, token_stream, train_head)
from tests.conftest import tiny_target
from tests.test_engine import plain_greedy


def tiny_cfg(**kw):
    base = dict(tokens=2000, layers=1, fusion="multi", draft_vocab=48, ttt_steps=2, lr=3e-3,
                batch_seqs=4, max_len=64, init_from_target=True, checkpoint_every=10_000)
    return TrainConfig(**(base | kw))


def fit_one_batch(head, batch, t2d, cfg, steps: int) -> tuple[float, float]:
    """Loss before and after `steps` AdamW steps on one batch (can the head learn at all?)."""
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    first, _ = head_loss(head, batch, t2d, cfg)
    for _ in range(steps):
        loss, _ = head_loss(head, batch, t2d, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first.item(), loss.item()


def head_draft(target, tmp_path):
    """An untrained head saved and loaded as a draft (exercises the real loading path)."""
    save_head(make_head(target.model, tiny_cfg(), None, "tiny"), tmp_path / "head")
    return HeadDraft(load_head(tmp_path / "head", target.model), "tiny")


def feature_seqs(target, n=24, length=40, seed=0):
    rng = random.Random(seed)
    layers = stored_layers(target.model.config.num_hidden_layers)
    with torch.no_grad():
        return [features_of(target, [rng.randrange(3, 96) for _ in range(length)], layers) for _ in range(n)]


@pytest.mark.parametrize("fusion,vocab", [("multi", 48), ("last", 0)])
def test_training_steps_lower_the_loss(fusion, vocab):
    target = tiny_target()
    seqs = feature_seqs(target)
    cfg = tiny_cfg(fusion=fusion, draft_vocab=vocab)
    vocab_ids = draft_vocab_map(seqs, vocab, 96) if vocab else None
    head = make_head(target.model, cfg, vocab_ids, "tiny")
    t2d = None
    if vocab_ids is not None:
        t2d = torch.full((96,), -100, dtype=torch.long)
        t2d[vocab_ids] = torch.arange(vocab)
    cols = feature_columns(fusion, 32)
    batch = collate(seqs[:4], cols, last_columns(cols))
    first, last = fit_one_batch(head, batch, t2d, cfg, steps=40)
    assert last < 0.7 * first


def tiny_head_and_batch(seqs, target, vocab=48):
    vocab_ids = draft_vocab_map(seqs, vocab, 96)
    t2d = torch.full((96,), -100, dtype=torch.long)
    t2d[vocab_ids] = torch.arange(vocab)
    head = make_head(target.model, tiny_cfg(), vocab_ids, "tiny")
    cols = feature_columns("multi", 32)
    return head, t2d, collate(seqs[:4], cols, last_columns(cols))


def test_soft_labels_are_the_targets_distribution_whose_argmax_is_the_hard_label():
    target = tiny_target()
    seqs = feature_seqs(target)
    head, t2d, batch = tiny_head_and_batch(seqs, target)
    probs = head.target_probs(batch["last"][:, 1:].float())
    hard = t2d[batch["labels"][:, 1:]]
    known = (hard >= 0) & (batch["mask"][:, 1:] == 1)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert (probs.argmax(-1)[known] == hard[known]).float().mean() > 0.99


def kl_to_target(head, batch) -> float:
    """Mean KL(target || draft) over the draft vocabulary on answer positions, teacher-forced."""
    with torch.no_grad():
        g = head.fuse(batch["features"][:, :-1].to(head.dtype))
        h = head(head.step_inputs(g, batch["tokens"][:, 1:], fused=True), attention_mask=batch["mask"][:, 1:])
        p = head.target_probs(batch["last"][:, 1:].to(head.dtype))
        logq = torch.log_softmax(head.logits(h), -1)
        kl = (p * (p.clamp_min(1e-12).log() - logq)).sum(-1)
    return kl[batch["mask"][:, 1:] == 1].mean().item()


def test_soft_labels_bring_the_draft_closer_to_the_targets_distribution_than_hard_labels():
    target = tiny_target()
    seqs = feature_seqs(target)
    kls = {}
    for labels in ("hard", "soft"):
        head, t2d, batch = tiny_head_and_batch(seqs, target)
        first, last = fit_one_batch(head, batch, t2d, tiny_cfg(labels=labels), steps=40)
        assert last < first
        kls[labels] = kl_to_target(head, batch)
    assert kls["soft"] < 0.8 * kls["hard"]


def test_token_budget_is_exact():
    seqs = [{"tokens": torch.arange(50), "features": torch.zeros(50, 4), "labels": torch.arange(50)}] * 3
    seen = sum(len(s["tokens"]) - 1 for s in token_stream(seqs, 333, 64, seed=0))
    assert seen == 333


def test_train_save_load_and_decode_exactly(tmp_path):
    target = tiny_target()
    seqs = feature_seqs(target, n=30)
    record = train_head(target, seqs, tiny_cfg(tokens=600), tmp_path / "d", "tiny-llama", log=lambda *a: None)
    assert record["tokens"] == 600 and 0.0 <= record["heldout_top1"] <= 1.0
    head = load_head(tmp_path / "d", target.model)
    prompt = [5, 9, 14, 3, 22, 7]
    want = plain_greedy(target, prompt, 25)
    got, steps = generate_ids(target, HeadDraft(head, "tiny"), prompt, max_new_tokens=25, k=4)
    assert got == want
    assert all(len(s.drafted) <= 4 for s in steps)
    export_head(tmp_path / "d", tmp_path / "half")  # the shipped form: float16 weights
    half = load_head(tmp_path / "half", target.model)
    assert half.fc.weight.dtype == target.model.dtype
    got_half, _ = generate_ids(target, HeadDraft(half, "half"), prompt, max_new_tokens=25, k=4)
    assert got_half == want


def test_training_is_deterministic_for_a_seed(tmp_path):
    target = tiny_target()
    seqs = feature_seqs(target, n=20)
    a = train_head(target, seqs, tiny_cfg(tokens=400), tmp_path / "a", "t", log=lambda *a: None)
    b = train_head(target, seqs, tiny_cfg(tokens=400), tmp_path / "b", "t", log=lambda *a: None)
    wa = load_head(tmp_path / "a", target.model).state_dict()
    wb = load_head(tmp_path / "b", target.model).state_dict()
    assert a["final_loss"] == b["final_loss"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key])


def test_mismatched_target_and_corrupt_files_are_refused(tmp_path):
    target = tiny_target()
    head = make_head(target.model, tiny_cfg(), None, "tiny")
    save_head(head, tmp_path / "d")
    other = tiny_target(hidden=64)
    with pytest.raises(ScyllaError, match="trained for"):
        load_head(tmp_path / "d", other.model)
    (tmp_path / "d" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ScyllaError, match="corrupt"):
        load_head(tmp_path / "d", target.model)
    (tmp_path / "d" / "config.json").write_text("{broken")
    with pytest.raises(ScyllaError, match="corrupt draft config"):
        load_head(tmp_path / "d", target.model)
    with pytest.raises(ScyllaError, match="no config.json"):
        load_head(tmp_path / "missing", target.model)


@pytest.mark.parametrize("bad", [dict(tokens=10), dict(layers=9), dict(fusion="mid"), dict(ttt_steps=0),
                                 dict(precision="fp8"), dict(labels="fuzzy")])
def test_bad_training_config_is_refused(bad):
    with pytest.raises(ScyllaError):
        check_train_config(tiny_cfg(**bad))


def test_a_recipe_sets_the_named_drafts_settings_and_refuses_a_clashing_flag():
    none = dict(fusion=None, draft_vocab=None, ttt_steps=None, arch=None)
    assert recipe_settings("eagle2-style", none) == dict(fusion="last", draft_vocab=0, ttt_steps=1, arch="eagle")
    assert recipe_settings("scylla", none | dict(draft_vocab=12288))["arch"] == "eagle3"
    plain = TrainConfig(tokens=4096, **recipe_settings(None, none | dict(ttt_steps=1)))
    assert (plain.fusion, plain.draft_vocab, plain.ttt_steps, plain.arch) == ("multi", 8192, 1, "eagle")
    with pytest.raises(ScyllaError, match="sets draft_vocab"):
        recipe_settings("eagle2-style", none | dict(draft_vocab=8192))
    with pytest.raises(ScyllaError, match="--recipe must be"):
        recipe_settings("eagle4", none)


def test_head_draft_with_a_shared_prefill_matches_its_own_prefill(tmp_path):
    from scylla.decoding import prefill_prompt, speculative_generate

    target = tiny_target()
    draft = head_draft(target, tmp_path)
    prompt = [5, 9, 11, 13, 5, 9]
    own = [s.emitted for s in speculative_generate(target, draft, prompt, max_new_tokens=12, k=3)]
    with pytest.raises(ScyllaError, match="hidden states"):
        bare = prefill_prompt(target, prompt, need_hidden=False)
        next(speculative_generate(target, draft, prompt, max_new_tokens=12, k=3, shared_prefill=bare))
    shared = prefill_prompt(target, prompt, need_hidden=True)
    assert [s.emitted for s in speculative_generate(target, draft, prompt, max_new_tokens=12, k=3,
                                                    shared_prefill=shared)] == own


def test_corpus_mix_follows_its_token_shares():
    from scylla.pipeline import interleave_by_share

    rng = random.Random(0)
    answers = [[1] * rng.randint(50, 300) for _ in range(400)]
    docs = [[2] * rng.randint(20, 200) for _ in range(2000)]
    merged = interleave_by_share([answers, docs], [0.75, 0.25])
    assert sorted(map(len, merged)) == sorted(map(len, answers + docs))  # nothing lost or repeated
    prefix = []
    for seq in merged:
        prefix += seq
        if len(prefix) > 20_000:
            break
    assert prefix.count(1) / len(prefix) == pytest.approx(0.75, abs=0.02)


def test_second_stage_continues_the_draft_and_keeps_its_vocabulary(tmp_path):
    from dataclasses import replace

    target = tiny_target()
    seqs = feature_seqs(target, n=30)
    cfg = replace(tiny_cfg(tokens=600), draft_vocab=48)
    first = train_head(target, seqs, cfg, tmp_path / "d", "tiny-llama", log=lambda *a: None)
    before = load_head(tmp_path / "d", target.model)
    other = feature_seqs(target, n=30, seed=7)
    second = train_head(target, other, replace(cfg, tokens=300, init_from=str(tmp_path / "d")),
                        tmp_path / "d2", "tiny-llama", log=lambda *a: None)
    after = load_head(tmp_path / "d2", target.model)
    assert torch.equal(after.d2t, before.d2t)  # the map its output rows were trained for
    assert not torch.equal(after.fc.weight, before.fc.weight)
    assert second["tokens"] == 300 and first["tokens"] == 600
    with pytest.raises(ScyllaError, match="layers/fusion/vocab"):
        train_head(target, other, replace(cfg, layers=2, init_from=str(tmp_path / "d")),
                   tmp_path / "d3", "tiny-llama", log=lambda *a: None)


def test_align_stage_replaces_the_draft_and_keeps_the_first_stage(tmp_path, monkeypatch):
    from dataclasses import replace

    from scylla import pipeline

    target = tiny_target()
    cfg = replace(tiny_cfg(tokens=400), draft_vocab=48)
    record = train_head(target, feature_seqs(target, n=20), cfg, tmp_path / "d", "tiny-llama", log=lambda *a: None)
    record["corpus"] = "answers"
    monkeypatch.setattr(pipeline, "ensure_features", lambda target, corpus: tmp_path / corpus)
    monkeypatch.setattr(pipeline, "load_feature_sequences", lambda folder: feature_seqs(target, n=20, seed=3))
    first = load_head(tmp_path / "d", target.model).state_dict()
    merged = pipeline.align_stage(target, record, cfg, tmp_path / "d", 300)
    assert merged["corpus"] == "answers+align:responses:300" and merged["tokens"] == 400
    kept = load_head(tmp_path / "d" / "pretrained", target.model).state_dict()
    aligned = load_head(tmp_path / "d", target.model).state_dict()
    assert all(torch.equal(kept[k], first[k]) for k in first)
    assert not torch.equal(aligned["fc.weight"], first["fc.weight"])


def test_a_two_layer_target_serves_a_feature_draft_from_a_shared_prefill(tmp_path):
    """Feature layers count from the end as in transformers (-1 = the last, after the norm)."""
    from scylla.decoding import prefill_prompt

    target = tiny_target(layers=2)
    draft = head_draft(target, tmp_path)
    prompt = [5, 9, 33, 12, 40]
    own, _ = generate_ids(target, draft, prompt, max_new_tokens=8, k=3)
    shared, _ = generate_ids(target, draft, prompt, max_new_tokens=8, k=3,
                             shared_prefill=prefill_prompt(target, prompt))
    assert own == shared == plain_greedy(target, prompt, 8)


def test_long_sequences_are_trained_on_their_answers():
    """A 600-token sequence whose answer starts at 550: all of it is trained (the old stream
    kept the first 384 tokens, so none of the answer)."""
    seq = {"tokens": torch.arange(600), "labels": torch.arange(600), "features": torch.zeros(600, 4),
           "prompt_len": 550}
    items = list(token_stream([seq], 50, max_len=2048, seed=0))
    assert len(items) == 1 and len(items[0]["tokens"]) == 600
    from scylla.train import loss_positions, position_weights, window

    assert loss_positions(items[0]) == 50
    short = window(seq, 100)   # past max_len: the last positions, where the answer is
    assert short["tokens"][0] == 500 and short["prompt_len"] == 50
    w = position_weights(seq, 0.1)
    assert w[:549].eq(0.1).all() and w[549:].eq(1.0).all()


def test_decoding_past_the_trained_positions_warns_once(tmp_path):
    from scylla.head import DraftPositionWarning

    target = tiny_target()
    draft = head_draft(target, tmp_path)
    draft.head.cfg.max_positions = 16
    with pytest.warns(DraftPositionWarning, match="trained on positions < 16"):
        generate_ids(target, draft, list(range(3, 23)), max_new_tokens=6, k=2)


def padding(batches) -> int:
    return sum(max(len(x["tokens"]) for x in b) * len(b) - sum(len(x["tokens"]) for x in b) for b in batches)


def test_length_grouped_batches_keep_every_sequence_and_cut_padding():
    rng = random.Random(3)   # lengths skewed as the corpus's: mostly short, a tail to 2,048
    items = [{"tokens": torch.zeros(min(2048, 2 + int(rng.expovariate(1 / 350))))} for _ in range(203)]
    batches = list(length_grouped(iter(items), 4, seed=0))
    assert sorted(id(x) for b in batches for x in b) == sorted(id(x) for x in items)
    assert sum(len(b) != 4 for b in batches) == 1   # 203 = 50 * 4 + 3
    assert padding(batches) < 0.2 * padding([items[i:i + 4] for i in range(0, len(items), 4)])
    again = list(length_grouped(iter(items), 4, seed=0))
    assert [[id(x) for x in b] for b in again] == [[id(x) for x in b] for b in batches]


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    import scylla.kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(scylla.kernels, "cpu_has_bf16", lambda: False)
    assert resolved_precision("auto") == "fp32"
    monkeypatch.setattr(scylla.kernels, "cpu_has_bf16", lambda: True)
    assert resolved_precision("auto") == "bf16"
    assert resolved_precision("fp32") == "fp32"


def test_bf16_training_runs_in_bf16_and_still_learns(tmp_path):
    target = tiny_target()
    target.model.float()   # autocast leaves the tiny target's float64 alone
    seqs = feature_seqs(target, n=30)
    runs = {p: train_head(target, seqs, tiny_cfg(tokens=1500, precision=p), tmp_path / p, "t") for p in ("fp32", "bf16")}
    assert runs["bf16"]["precision"] == "bf16" and runs["fp32"]["precision"] == "fp32"
    assert abs(runs["bf16"]["final_loss"] - runs["fp32"]["final_loss"]) < 0.15 * runs["fp32"]["final_loss"]
    w32 = load_head(tmp_path / "fp32", target.model).fuse.weight
    w16 = load_head(tmp_path / "bf16", target.model).fuse.weight
    assert w16.dtype == torch.float32 and not torch.equal(w16, w32)   # fp32 weights, bf16 products


def test_training_record_names_no_machine_path(tmp_path):
    from scylla.train import training_row

    target = tiny_target()
    record = train_head(target, feature_seqs(target, n=8), tiny_cfg(tokens=300), tmp_path / "mydraft", "tiny")
    saved = (tmp_path / "mydraft" / "training.json").read_text()
    assert str(tmp_path) not in saved and record["name"] == "mydraft"
    assert training_row(record)["path"] == "mydraft"


def test_logits_run_on_every_answer_position_and_a_weighted_share_of_the_prompt():
    from scylla.train import loss_positions_drawn

    torch.manual_seed(0)
    weights = torch.cat([torch.full((1, 4000), 0.1), torch.ones(1, 500), torch.zeros(1, 100)], dim=1)
    tgt = torch.ones(1, 4600, dtype=torch.long)
    tgt[0, 4400:4450] = -100   # out of the draft vocabulary: never a loss position
    drawn = loss_positions_drawn(tgt, weights)
    assert drawn[0, 4000:4400].all() and drawn[0, 4450:4500].all()
    assert not drawn[0, 4400:4450].any() and not drawn[0, 4500:].any()
    assert 320 < int(drawn[0, :4000].sum()) < 480   # about 10% of the prompt


def test_head_with_copy_fallback_stays_greedy_exact_and_copies_only_long_matches(tmp_path):
    from scylla.decoding import batch_generate_ids
    from scylla.drafts import CopyOrDraft, check_draft_spec

    target = tiny_target()
    draft = CopyOrDraft(head_draft(target, tmp_path))
    assert draft.name == "tiny+ngram" and draft.feature_layers == draft.other.feature_layers
    assert draft.copied([1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4], 4) == [5, 6, 9]   # a 4-token run: copy
    assert draft.copied([7, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4], 4) == []          # a 3-gram by chance: the head
    rng = random.Random(3)
    for trial in range(3):
        phrase = [rng.randrange(3, 96) for _ in range(12)]
        prompt = phrase + [rng.randrange(3, 96) for _ in range(5)] + phrase[:6]   # the answer may copy
        want = plain_greedy(target, prompt, 20)
        got, _ = generate_ids(target, draft, prompt, max_new_tokens=20, k=4)
        assert got == want
        tree_got, _ = generate_ids(target, draft, prompt, max_new_tokens=20, tree="tree:3,2,6")
        assert tree_got == want
    rows, _ = batch_generate_ids(target, draft, [prompt, prompt[:9]], max_new_tokens=12, k=3)
    assert rows == [plain_greedy(target, prompt, 12), plain_greedy(target, prompt[:9], 12)]
    check_draft_spec("scylla+ngram")
    for bad in ("ngram+ngram", "none+ngram", "+ngram", "bogus+ngram"):
        with pytest.raises(ScyllaError, match="unknown --draft"):
            check_draft_spec(bad)


def test_copy_or_draft_chooses_from_the_acceptance_measured_in_this_decode():
    from scylla.drafts import CopyOrDraft, NgramDraft
    from scylla.proposals import DraftTree

    draft = CopyOrDraft(NgramDraft())
    long_match = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 4]
    assert draft.copied(long_match, 4) == [5, 6, 9]       # the prior: a 4-token run copies
    draft.observe([4], None)                              # nothing of the copy accepted
    draft.remember(DraftTree.chain([7, 8, 9]))
    draft.observe([4, 7, 8, 9], None)                     # all of the other draft's chain accepted
    assert draft.copied(long_match, 4) == []              # so now the other draft proposes
    assert draft.fork().copied(long_match, 4) == [5, 6, 9]   # a new row starts from the priors
    draft.reset()
    assert draft.copied(long_match, 4) == [5, 6, 9]
