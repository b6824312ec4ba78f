"""The broad evaluation set (assets/broad_prompts.jsonl): twelve kinds of use, each split into
a tune and a report half, long real documents to summarise, multi-turn conversations, and no
prompt near another one or near any prompt of the committed training corpus."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from types import SimpleNamespace

import pytest

from scylla import ScyllaError, sources
from scylla.corpus import SNAPSHOT
from scylla.data import BROAD_PROMPTS, broad_prompts, eval_prompts, load_prompts

KINDS = ("conversation", "summarization", "rag", "qa", "math", "code", "translation", "extraction",
         "roleplay", "stem", "humanities", "writing")


@pytest.fixture(scope="module")
def rows():
    return broad_prompts()


def test_every_kind_is_there_and_split_in_two_halves(rows):
    assert len(rows) >= 160 and len({r["question_id"] for r in rows}) == len(rows)
    kinds = Counter(r["category"] for r in rows)
    assert set(kinds) == set(KINDS) and min(kinds.values()) >= 10, kinds
    for kind in KINDS:
        halves = Counter(r["split"] for r in rows if r["category"] == kind)
        assert set(halves) == {"tune", "report"} and abs(halves["tune"] - halves["report"]) <= 1, (kind, halves)
    tune, report = broad_prompts("tune"), broad_prompts("report")
    assert len(tune) + len(report) == len(rows) and {r["split"] for r in tune} == {"tune"}


def test_summarization_documents_are_long(rows):
    for r in rows:
        if r["category"] != "summarization":
            continue
        paragraphs = r["prompt"].split("\n\n")
        instruction = min(paragraphs[0], paragraphs[-1], key=lambda p: len(p.split()))   # before or after
        words = len(r["prompt"].split()) - len(instruction.split())
        assert 500 <= words <= 1500, (r["question_id"], words)
    documents = [r["prompt"] for r in rows if r["category"] == "summarization"]
    assert len({d.split("\n\n")[1][:200] for d in documents}) == len(documents)   # each one distinct


def test_conversations_carry_their_turns_and_end_with_the_user(rows):
    talks = [r for r in rows if r["category"] == "conversation"]
    assert talks and all("messages" in r for r in talks)
    for r in talks:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[-1] == "user" and roles.count("assistant") >= 2, r["question_id"]
        assert r["prompt"] == r["messages"][-1]["content"]
    assert not any("messages" in r for r in rows if r["category"] != "conversation")


def test_no_prompt_is_near_another_or_near_an_evaluation_prompt(rows):
    keys = [sources.shingles(sources.prompt_text(r)) for r in rows]
    assert sources.dedup([{"prompt": sources.prompt_text(r)} for r in rows], []) == \
        [{"prompt": sources.prompt_text(r)} for r in rows]
    others = eval_prompts() + load_prompts("assets/sweep_prompts.jsonl")
    assert all(keys_kept(keys, [sources.shingles(r["prompt"]) for r in others]))


def test_no_prompt_is_near_a_committed_training_prompt(rows):
    with gzip.open(SNAPSHOT / "prompts.jsonl.gz", "rt") as f:
        train = [json.loads(line)["prompt"] for line in f]
    assert len(train) > 1000
    keys = [sources.shingles(sources.prompt_text(r)) for r in rows]
    near = [r["question_id"] for r, kept in zip(rows, keys_kept(keys, [sources.shingles(t) for t in train])) if not kept]
    assert not near, f"near a training prompt: {near}"


def test_training_dedup_bans_the_broad_set(rows):
    banned = sources.eval_shingles()
    assert len(banned) >= len(eval_prompts()) + len(rows)
    leaked = [{"prompt": rows[i]["prompt"]} for i in (0, 20, 60)]
    assert sources.dedup(leaked, banned) == []


def keys_kept(keys: list[set[str]], banned: list[set[str]]) -> list[bool]:
    """For each key set, whether it is clear of every banned one (sources.near_duplicate)."""
    index: dict[str, list[int]] = {}
    for i, other in enumerate(banned):
        for key in other:
            index.setdefault(key, []).append(i)
    sizes = [len(other) for other in banned]
    return [not sources.near_duplicate(k, index, sizes) for k in keys]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],   # ends with the assistant
    [{"role": "user", "content": "   "}],
    [{"role": "narrator", "content": "Once upon a time"}],
    [{"role": "user"}],
    "Hi there",
    [],
])
def test_a_malformed_conversation_is_refused_in_one_line(tmp_path, messages):
    path = tmp_path / "bad.jsonl"
    good = {"question_id": "a", "turns": ["Fine."]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question_id": "b", "turns": ["x"], "messages": messages}) + "\n")
    with pytest.raises(ScyllaError) as err:
        load_prompts(path)
    assert f"{path}:2:" in str(err.value) and "\n" not in str(err.value)


def test_a_conversation_line_keeps_its_messages_and_split(tmp_path):
    path = tmp_path / "ok.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]
    path.write_text(json.dumps({"split": "tune", "messages": messages, "turns": ["And now?"]}) + "\n"
                    + json.dumps({"turns": ["Plain."]}) + "\n")
    first, second = load_prompts(path)
    assert first["messages"] == messages and first["prompt"] == "And now?" and first["split"] == "tune"
    assert "messages" not in second and second["split"] == "all"


def test_encode_messages_formats_the_whole_conversation():
    from transformers import AutoTokenizer

    from scylla.models import encode_messages, encode_prompt, ensure_bundled_cached

    target = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(ensure_bundled_cached()))
    one = [{"role": "user", "content": "What is a pipe?"}]
    assert encode_messages(target, one) == encode_prompt(target, "What is a pipe?")
    talk = next(r for r in broad_prompts() if "messages" in r)["messages"]
    text = target.tokenizer.decode(encode_messages(target, talk))
    assert all(m["content"] in text for m in talk)
    assert text.rstrip().endswith("assistant") and text.count("<|im_start|>user") == sum(m["role"] == "user" for m in talk)
    assert BROAD_PROMPTS.is_file()
