"""The answers-v2 corpus on a tiny random target with the real tokenizer: provenance, dedup,
no overlap with the evaluation prompts, and a build that resumes after a kill."""
from __future__ import annotations

import json

import pytest
import torch

from scylla import corpus, sources
from scylla.data import eval_prompts


CHEAP_MAGPIE = {"magpie_batch": 4, "magpie_tokens": 8}   # a random model: its requests are noise anyway


@pytest.fixture
def chat_target(tiny_chat_target_dir, tmp_path, monkeypatch):
    from scylla.models import load_target

    monkeypatch.setenv("SCYLLA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "SNAPSHOT", tmp_path / "no-snapshot")   # not the repository's
    return load_target(str(tiny_chat_target_dir))


@pytest.fixture
def small_long_texts(monkeypatch):
    """A few passages, one of them an evaluation prompt's own text and one repeated."""
    leaked = max(eval_prompts(), key=lambda r: len(r["prompt"]))["prompt"]
    texts = [("test-docs", f"Passage {i}: " + " ".join(f"word{i}_{j}" for j in range(80))) for i in range(6)]
    texts += [("test-docs", texts[0][1]), ("test-leak", leaked)]
    monkeypatch.setattr(sources, "long_texts", lambda: texts)
    return texts


def test_near_duplicates_and_evaluation_prompts_are_dropped():
    evals = eval_prompts()
    rows = [{"prompt": evals[0]["prompt"], "source": "x"},
            {"prompt": "Translate to French: " + evals[5]["prompt"], "source": "x"},
            {"prompt": "Write a poem about the moon over a quiet harbour at night.", "source": "x"},
            {"prompt": "Write a poem about the moon over a quiet harbour at night!", "source": "x"},
            {"prompt": "Summarize the following text in a few sentences.\n\nAlpha beta gamma delta "
                       "epsilon zeta eta theta iota kappa lambda mu.", "source": "x"},
            {"prompt": "Summarize the following text in a few sentences.\n\nOne two three four five "
                       "six seven eight nine ten eleven twelve.", "source": "x"}]
    kept = sources.dedup(rows, sources.eval_shingles())
    assert [r["prompt"][:24] for r in kept] == ["Write a poem about the m", "Summarize the following ",
                                                "Summarize the following "]


def test_prompt_set_records_provenance_and_never_meets_the_evaluation_prompts(chat_target, small_long_texts):
    prompts = corpus.build_prompt_set(chat_target, 24, seed=0, **CHEAP_MAGPIE)
    assert len({p["question_id"] for p in prompts}) == len(prompts) >= 12
    banned = sources.eval_shingles()
    assert sources.dedup(prompts, banned) == prompts             # nothing near an evaluation prompt
    assert not any("test-leak" in p["source"] for p in prompts)  # the leaked passage was dropped
    record = json.loads((corpus.answers_dir() / "provenance.json").read_text())
    assert set(record["tranches"][0]["sources"]) == {"magpie", "template", "longtext"}
    assert record["prompts"] == len(prompts) and "8-gram" in record["dedup"]
    assert {p["source"].split(":")[0] for p in prompts} >= {"template", "longtext"}


def test_asking_for_more_prompts_appends_a_tranche_and_asking_again_adds_none(chat_target, small_long_texts):
    first = corpus.build_prompt_set(chat_target, 12, seed=0, **CHEAP_MAGPIE)
    assert corpus.build_prompt_set(chat_target, 12, seed=0, **CHEAP_MAGPIE) == first
    grown = corpus.build_prompt_set(chat_target, 30, seed=0, **CHEAP_MAGPIE)
    assert grown[:len(first)] == first and len(grown) > len(first)   # kept prompts keep their order
    assert len({p["question_id"] for p in grown}) == len(grown)
    assert sources.dedup(grown, sources.eval_shingles()) == grown      # the new tranche meets nothing kept
    record = json.loads((corpus.answers_dir() / "provenance.json").read_text())
    assert [t["seed"] for t in record["tranches"]] == [0, 1] and record["prompts"] == len(grown)
    assert corpus.build_prompt_set(chat_target, 30, seed=0, **CHEAP_MAGPIE) == grown


def test_answers_build_resumes_after_a_kill(chat_target, small_long_texts):
    corpus.build_prompt_set(chat_target, 10, **CHEAP_MAGPIE)
    corpus.build_answers(chat_target, 10, max_new_tokens=5, batch=4)
    path = corpus.answers_dir() / "answers.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == len(corpus.build_prompt_set(chat_target, 10))
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])   # killed mid-line
    corpus.build_answers(chat_target, 10, max_new_tokens=5, batch=4)
    rows = corpus.read_answers()
    assert [r["question_id"] for r in rows[:3]] == [json.loads(x)["question_id"] for x in lines[:3]]
    assert sorted(r["question_id"] for r in rows) == sorted(json.loads(x)["question_id"] for x in lines)
    assert all(0 < len(r["answer_ids"]) <= 5 and r["temperature"] in (0.0, 1.0) for r in rows)


def test_a_snapshot_in_the_repository_seeds_a_fresh_machine(chat_target, small_long_texts, tmp_path, monkeypatch):
    corpus.build_prompt_set(chat_target, 8, **CHEAP_MAGPIE)
    corpus.build_answers(chat_target, 8, max_new_tokens=4, batch=4)
    before = corpus.read_answers()
    snapshot = corpus.save_snapshot(tmp_path / "snapshot")
    monkeypatch.setenv("SCYLLA_CACHE", str(tmp_path / "fresh-cache"))
    assert corpus.restore_snapshot(snapshot)
    assert corpus.read_answers() == before
    assert not corpus.restore_snapshot(snapshot)   # never over a build in progress


def test_a_grown_corpus_reopens_its_feature_cache_keeping_all_but_the_cut_tail(tmp_path):
    from scylla.pipeline import reopen_for_growth

    assert reopen_for_growth(tmp_path, 5)   # nothing cached yet
    for i in range(3):
        (tmp_path / f"shard-{i:04d}.safetensors").write_bytes(b"x")
    (tmp_path / "DONE").write_text(json.dumps({"sequences": 40, "shards": 3}))
    assert not reopen_for_growth(tmp_path, 40)   # unchanged corpus: the cache stands
    assert (tmp_path / "DONE").is_file()
    assert reopen_for_growth(tmp_path, 52)
    assert not (tmp_path / "DONE").exists()
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-0000.safetensors", "shard-0001.safetensors"]


def test_greedy_corpus_answers_are_the_engines_answers(chat_target, small_long_texts):
    """build_answers runs bulk.decode_group (faster on the lean forward); a greedy answer is
    still exactly what the engine's plain decoding gives for the same prompt ids."""
    from scylla.decoding import batch_generate_ids

    corpus.build_prompt_set(chat_target, 10, **CHEAP_MAGPIE)
    corpus.build_answers(chat_target, 10, max_new_tokens=6, batch=4)
    greedy = [r for r in corpus.read_answers() if r["temperature"] == 0.0]
    assert greedy
    for row in greedy:
        expected, _ = batch_generate_ids(chat_target, None, [row["prompt_ids"]], max_new_tokens=6)
        assert row["answer_ids"] == expected[0]


def test_a_source_that_runs_dry_is_made_up_by_magpie(chat_target, monkeypatch):
    def requests(target, n, seed=0, **_):
        return [{"prompt": f"Request {seed} number {i}: " + " ".join(f"w{seed}_{i}_{j}" for j in range(12)),
                 "category": "magpie", "source": "magpie", "question_id": f"magpie-{seed}-{i}"} for i in range(n)]

    monkeypatch.setattr(sources, "magpie_prompts", requests)
    monkeypatch.setattr(sources, "template_prompts", lambda n, seed=0: [])   # the templates are spent
    monkeypatch.setattr(sources, "longtext_prompts", lambda n, seed=0: [])
    prompts = corpus.build_prompt_set(chat_target, 40, seed=0)
    assert len(prompts) == 40 and len({p["question_id"] for p in prompts}) == 40
    record = json.loads((corpus.answers_dir() / "provenance.json").read_text())
    assert record["tranches"][0]["sources"]["magpie"]["kept"] == 40


def test_features_captured_while_answering_fill_the_cache_without_a_second_forward(chat_target, small_long_texts,
                                                                                     monkeypatch):
    from scylla import data, pipeline
    from scylla.train import stored_layers

    corpus.build_prompt_set(chat_target, 10, **CHEAP_MAGPIE)
    corpus.build_answers(chat_target, 10, max_new_tokens=6, batch=4, capture_to=pipeline.captured_folder(chat_target))
    rows = corpus.read_answers()
    layers = stored_layers(chat_target.model.config.num_hidden_layers)
    expected = [data.features_of(chat_target, r["prompt_ids"] + r["answer_ids"], layers) for r in rows]

    def second_forward(*args):
        raise AssertionError("a captured sequence was forwarded again")

    monkeypatch.setattr(data, "features_of", second_forward)
    cached = data.load_feature_sequences(pipeline.ensure_features(chat_target, pipeline.ANSWERS_CORPUS))
    assert not pipeline.captured_folder(chat_target).exists()   # consumed into the shards
    assert len(cached) == len(rows)
    for seq, ref, row in zip(cached, expected, rows):
        assert torch.equal(seq["tokens"], ref["tokens"]) and torch.equal(seq["labels"], ref["labels"])
        assert torch.allclose(seq["features"].float(), ref["features"].float(), atol=2e-2)
        assert seq["prompt_len"] == len(row["prompt_ids"])


def test_a_captured_sequence_that_no_longer_matches_the_corpus_is_forwarded_again(tmp_path):
    from scylla.data import CapturedFeatures, save_captured

    seq = {"tokens": torch.tensor([5, 6, 7]), "features": torch.zeros(3, 8, dtype=torch.float16),
           "labels": torch.tensor([6, 7, 8])}
    save_captured({"magpie-0-1": seq}, tmp_path)
    kept = CapturedFeatures(tmp_path)
    assert torch.equal(kept.get("magpie-0-1", [5, 6, 7])["labels"], seq["labels"])
    assert kept.get("magpie-0-1", [5, 6, 9]) is None   # answered again after a kill: different tokens
    assert kept.get("magpie-0-2", [5, 6, 7]) is None


def test_a_killed_magpie_draw_resumes_after_its_last_batch(chat_target, tmp_path, monkeypatch):
    from scylla import bulk

    seeds = []
    eos = chat_target.eos_ids[0]

    def fake_answers(target, prompts, max_new_tokens, temperature, top_p, seed):
        seeds.append(seed)
        return [[100 + seed % 97 + j, eos] for j in range(len(prompts))]

    monkeypatch.setattr(bulk, "plain_answers", fake_answers)
    monkeypatch.setattr(sources, "usable_request", lambda text: True)
    whole = sources.magpie_prompts(chat_target, 10, seed=3, batch=2)

    def killed_after_two_batches(kept):
        if kept >= 4:
            raise KeyboardInterrupt
    draw = corpus.magpie_draw_path(3)
    with pytest.raises(KeyboardInterrupt):
        sources.magpie_prompts(chat_target, 10, seed=3, batch=2, progress=killed_after_two_batches, resume=draw)
    with draw.open("a") as f:
        f.write('{"attempt": 2, "ke')                  # a third batch's line, cut by the kill
    seeds.clear()
    resumed = sources.magpie_prompts(chat_target, 10, seed=3, batch=2, resume=corpus.magpie_draw_path(3))
    assert resumed == whole
    assert seeds == [3 * 100003 + attempt for attempt in (2, 3, 4)]   # only the batches not recorded


def test_a_written_tranche_clears_its_magpie_draws(chat_target, small_long_texts):
    corpus.build_prompt_set(chat_target, 24, seed=0, **CHEAP_MAGPIE)
    assert not list(corpus.answers_dir().glob("magpie-draw-*.jsonl"))
