"""The records that flow engine -> store -> UI: one Step per draft-then-verify cycle."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Step:
    """One target forward. index 0 is the prefill, which drafts nothing and emits one token."""

    index: int
    drafted: list[int]          # tokens the draft proposed (along the accepted path for trees)
    accepted: int               # how many of them the target accepted
    bonus: int | None           # the target's own token after the accepted prefix
    emitted: list[int]          # tokens appended to the output (cut at EOS / max_new_tokens)
    p_draft: list[float] = field(default_factory=list)  # target prob of each drafted token
    q_draft: list[float] = field(default_factory=list)  # draft prob of each drafted token
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    overhead_ms: float = 0.0    # engine bookkeeping: everything but the two forwards
    row: int = 0                # batch row this step belongs to
    tree_size: int = 0          # nodes verified (chain: len(drafted proposals))
    k: int = 0                  # draft length allowed this step (batch-aware budget)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunStats:
    """Summary of one decoded sequence (or the union of many)."""

    n_tokens: int
    n_steps: int                # target forwards, prefill included
    tau: float                  # tokens per target forward (plain decoding = 1.0)
    accept_rate: float | None   # accepted / drafted; None when nothing was drafted
    per_position_accept: list[float]
    draft_ms: float
    verify_ms: float
    overhead_ms: float


def summarize(steps: list[Step]) -> RunStats:
    n_tokens = sum(len(s.emitted) for s in steps)
    drafted = sum(len(s.drafted) for s in steps)
    accepted = sum(s.accepted for s in steps)
    return RunStats(
        n_tokens=n_tokens,
        n_steps=len(steps),
        tau=n_tokens / len(steps) if steps else 0.0,
        accept_rate=accepted / drafted if drafted else None,
        per_position_accept=per_position_accept(steps),
        draft_ms=sum(s.draft_ms for s in steps),
        verify_ms=sum(s.verify_ms for s in steps),
        overhead_ms=sum(s.overhead_ms for s in steps),
    )


def per_position_accept(steps: list[Step]) -> list[float]:
    """P(draft token i accepted | tokens < i accepted), from steps that drafted position i."""
    reached: list[int] = []
    passed: list[int] = []
    for s in steps:
        for i in range(len(s.drafted)):
            if i > s.accepted:
                break
            if i == len(reached):
                reached.append(0)
                passed.append(0)
            reached[i] += 1
            passed[i] += int(i < s.accepted)
    return [p / r for p, r in zip(passed, reached)]
