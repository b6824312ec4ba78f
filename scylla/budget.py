"""How long a chain to draft each step (`--k auto`): policy over the engine's measured costs.

`verify_costs` measures one target forward by width on this machine (cached per machine in the
cache folder's calibration.json); `DraftBudget` weighs those costs and the draft's own against
the acceptance seen so far, depth by depth; `best_draft_length` is the arithmetic.
"""
from __future__ import annotations

import json
import time

import torch

from scylla.models import cache_root
from scylla.trace import Step

KMAX = 8            # the longest chain `k="auto"` may choose

class DraftBudget:
    """Choose the draft length per step: weigh the measured cost of verifying k+1 tokens per
    row at this batch size (calibrated once per machine and cached) and the draft's measured
    ms per token against the acceptance seen so far, depth by depth: a draft that is right
    once tends to stay right, so the second token is accepted more often than the first
    (measured: 0.49 against 0.43), which one run-wide rate would miss."""

    PROBE_EVERY = 16

    def __init__(self, target, batch: int, kmax: int = KMAX):
        self.costs = verify_costs(target, batch, kmax)
        self.judged = [0] * kmax   # drafted tokens at each depth that the target judged
        self.passed = [0] * kmax   # ... and accepted
        self.drafted = 0
        self.draft_ms = 0.0
        self.steps = 0

    def depth_rates(self) -> list[float]:
        """Acceptance at each depth given every earlier token accepted, smoothed towards the
        depth above (0.5 before any data): a depth not yet drafted counts as the last one measured."""
        rates, prior = [], 0.5
        for judged, passed in zip(self.judged, self.passed):
            prior = (passed + 2 * prior) / (judged + 2)
            rates.append(prior)
        return rates

    def choose(self, live_rows: int) -> int:
        ms_per_token = self.draft_ms / self.drafted if self.drafted else 0.0
        k = best_draft_length(self.depth_rates(), self.costs, ms_per_token * live_rows)
        self.steps += 1
        if self.steps % self.PROBE_EVERY == 0 and k < len(self.costs) - 1:
            k += 1  # probe one deeper: a depth's acceptance is only learnt by drafting it
        return k

    def record(self, steps: list[Step]) -> None:
        for s in steps:
            for depth in range(min(len(s.drafted), s.accepted + 1)):   # a chain is judged up to its first miss
                self.judged[depth] += 1
                self.passed[depth] += depth < s.accepted
            self.drafted += len(s.drafted)
            self.draft_ms += s.draft_ms if s.drafted else 0.0


def best_draft_length(accept: float | list[float], verify_ms: list[float], draft_ms_per_k: float) -> int:
    """argmax_k E[tokens per row]/time for a chain: E = 1 + a1 + a1*a2 + ... + a1*...*ak with
    a_j the acceptance at depth j given the earlier ones accepted (one float: the same at every
    depth); verify_ms[k] is one forward of k+1 tokens per row. k=0 is plain decoding."""
    rates = [accept] * (len(verify_ms) - 1) if isinstance(accept, float | int) else list(accept)

    def rate(k):
        expected, reach = 1.0, 1.0
        for a in rates[:k]:
            reach *= a
            expected += reach
        return expected / (verify_ms[k] + k * draft_ms_per_k)
    return max(range(min(len(verify_ms), len(rates) + 1)), key=rate)


_COSTS: dict[str, list[float]] = {}


def verify_costs(target, batch: int, kmax: int, context: int = 128, repeats: int = 3) -> list[float]:
    """Median ms of one target forward of w = 1..kmax+1 tokens per row at this batch size,
    over a cache of `context` tokens; cached in memory and in the cache folder's calibration.json."""
    fwd = target.forward
    compiled = "|compiled" if getattr(getattr(fwd, "stack", None), "compiled_layers", None) is not None else ""
    key = (f"{target.name}|{target.quant}|{target.device}|{fwd.backend}|{torch.get_num_threads()}t"
           f"|B{batch}|ctx{context}{compiled}")
    path = cache_root() / "calibration.json"
    if key not in _COSTS:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if len(stored.get(key, [])) < kmax + 1:
            stored[key] = measure_verify_costs(target, batch, kmax, context, repeats)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored, indent=1))
        _COSTS[key] = stored[key]
    return _COSTS[key][:kmax + 1]


@torch.inference_mode()
def measure_verify_costs(target, batch, kmax, context, repeats) -> list[float]:
    vocab = target.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    fwd = target.forward
    cache = fwd.new_cache(batch, context + kmax + 2)
    fwd.forward(torch.randint(3, vocab, (batch, context), generator=gen), cache)
    for b in range(batch):
        cache.keep(b, list(range(context)))
    costs = []
    for width in range(1, kmax + 2):
        ids = torch.randint(3, vocab, (batch, width), generator=gen)
        fwd.forward(ids, cache)   # the first call at a new width builds its kernels: not timed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fwd.forward(ids, cache)
            times.append((time.perf_counter() - start) * 1e3)
        costs.append(sorted(times)[len(times) // 2])
    return costs
