"""The evaluation prompts never leak into the training corpora's prompts.

Instructions may be phrased alike (a retrieval prompt starts "Answer the question using
only the context." in both sets: 9 words); content may not: no run of 12 words is shared.
"""
from __future__ import annotations

import re

import pytest

from scylla.data import eval_prompts, load_prompts, training_prompts


def shingles(text: str, n: int = 12) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("seed", [1, 2])  # the seeds of the built self-distillation corpora
def test_training_prompts_share_no_twelve_word_run_with_the_evaluation_prompts(seed):
    evaluation = eval_prompts() + load_prompts("assets/sweep_prompts.jsonl")
    assert len(eval_prompts()) >= 48 and len({p["category"] for p in eval_prompts()}) >= 6
    held_out = set().union(*(shingles(p["prompt"]) for p in evaluation))
    train = training_prompts(960, seed=seed)
    assert len({p["category"] for p in train}) == 8
    texts = {p["prompt"].strip() for p in evaluation}
    for p in train:
        assert p["prompt"].strip() not in texts
        shared = shingles(p["prompt"]) & held_out
        assert not shared, f"training prompt {p['question_id']} repeats {' '.join(next(iter(shared)))!r}"
