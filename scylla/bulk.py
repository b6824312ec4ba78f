"""Bulk work for an accelerator: plain batched generation (corpus answers, Magpie requests)
and draft training with the target's features computed on the fly.

The engine (scylla/decoding.py) decides acceptance row by row in Python, which is right for
speculative decoding and wrong for generating millions of plain tokens: here every step is
one batched forward, one batched argmax or sample, and finished rows leave the cache in
groups. Training computes the target's features per batch instead of reading a feature
cache (2^24 tokens of fused features would be tens of GB), and trains several drafts on the
same batches, so that they differ only in recipe. scripts/device_train.py drives both.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from scylla.lean import CAUSAL, LeanLM
from scylla.proposals import logits_to_probs
from scylla.train import (TrainConfig, head_loss, loss_positions, make_head, most_frequent, teacher_forced,
                          warmup_decay)

MAX_ROWS = 1024


# ---------------------------------------------------------------- generation

def chunks_by_length(prompts: list[list[int]], max_new_tokens: int, slots: int,
                     max_rows: int = MAX_ROWS) -> list[list[int]]:
    """Indices of prompts grouped by similar length, each group's KV cache within `slots`
    (rows x (longest prompt + budget))."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups, current = [], []
    for i in order:
        width = len(prompts[i]) + max_new_tokens + 1
        if current and (len(current) + 1) * width > slots or len(current) >= max_rows:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    return ids.to(device), lengths


@torch.no_grad()
def prefill_into(lm: LeanLM, cache, prompts: list[list[int]], pad_id: int, prefill_tokens: int,
                 capture: "FeatureCapture | None" = None) -> torch.Tensor:
    """Prompt forwards in row slices (bounded activations), copied into `cache`; returns the
    last real position's hidden state per row [B, H]."""
    width = max(map(len, prompts))
    per = max(1, prefill_tokens // width)
    last = []
    keep = capture.layers if capture else ()
    for r0 in range(0, len(prompts), per):
        part = prompts[r0:r0 + per]
        ids, lengths = padded(part, pad_id, lm.device)
        small = lm.stack.new_cache(len(part), ids.shape[1], cache.keys[0].dtype)
        positions = torch.arange(ids.shape[1], device=lm.device)[None].expand(len(part), -1)
        out, kept = lm.stack.run(lm.embed[ids], small, positions, CAUSAL, keep)
        for big_k, big_v, k, v in zip(cache.keys, cache.values, small.keys, small.values):
            big_k[r0:r0 + len(part), :, :ids.shape[1]] = k
            big_v[r0:r0 + len(part), :, :ids.shape[1]] = v
        if capture:
            capture.prompt_slice(lm, kept, out)
        last.append(out[torch.arange(len(part), device=lm.device), (lengths - 1).to(lm.device)])
    cache.lengths = torch.tensor([len(p) for p in prompts])
    return torch.cat(last)


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode_group(lm: LeanLM, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float, generator, eos_ids: list[int], pad_id: int, prefill_tokens: int,
                 check_every: int = 16, capture: "FeatureCapture | None" = None) -> list[list[int]]:
    """Plain decoding of one group; each row's tokens up to its first EOS (kept) or the budget,
    as Row.take does in the engine. With `capture`, each row's last token is fed too, so that
    every position of prompt + answer has its features."""
    dev = lm.device
    rows = len(prompts)
    cache = lm.new_cache(rows, max(map(len, prompts)) + max_new_tokens + 1)
    nxt = pick(lm.logits(prefill_into(lm, cache, prompts, pad_id, prefill_tokens, capture)).float(),
               temperature, top_p, generator)
    eos = torch.tensor(eos_ids or [-1], device=dev)
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    alive = torch.arange(rows, device=dev)
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    lengths = cache.lengths.clone().to(dev)   # a copy on CPU too: the cache moves its own
    keep = capture.layers if capture else ()
    for t in range(max_new_tokens):
        out[alive, t] = nxt
        fed_eos = done    # rows whose EOS has been fed already (a capture needs its features)
        done = done | torch.isin(nxt, eos)
        last_step = t == max_new_tokens - 1
        if last_step and capture is None:
            break
        if t % check_every == check_every - 1:
            finished = (fed_eos if capture else done).cpu()
            if bool(finished.all()):
                break
            if int(finished.sum()) * 4 >= len(finished):   # a quarter finished: drop them
                keep_rows = (~finished).nonzero()[:, 0]
                cache.select_rows(keep_rows.tolist())
                keep_rows = keep_rows.to(dev)
                alive, nxt, done, lengths = alive[keep_rows], nxt[keep_rows], done[keep_rows], lengths[keep_rows]
        span = int(cache.lengths.max()) + 1
        allowed = (torch.arange(span, device=dev)[None] <= lengths[:, None])[:, None, None, :]
        hidden, kept = lm.stack.run(lm.embed[nxt][:, None], cache, lengths[:, None], allowed, keep)
        logits = lm.logits(hidden[:, 0]).float()
        if capture:
            capture.answer_step(alive, t, kept, logits)
            if last_step or bool(done.all()):
                break
        nxt = pick(logits, temperature, top_p, generator)
        cache.lengths += 1
        lengths = lengths + 1
    return [cut_at_eos(row, eos_ids) for row in out.tolist()]


def greedy_labels(lm: LeanLM, flat: torch.Tensor, label_rows: int) -> torch.Tensor:
    """The target's greedy next token at each row of normed hidden states [N, H], through
    the LM head `label_rows` at a time (bounded logits)."""
    return torch.cat([lm.logits(flat[i:i + label_rows]).argmax(-1) for i in range(0, len(flat), label_rows)])


class FeatureCapture:
    """The feature cache's content for a decoded group, kept while decoding instead of a second
    forward over prompt + answer (data.extract_features): the chosen layers' hidden states
    (fp16) and the target's greedy next token at every position."""

    def __init__(self, layers: list[int], rows: int, max_new_tokens: int, hidden: int, label_rows: int = 1024):
        self.layers = tuple(layers)
        self.label_rows = label_rows
        self.prompt_feats: list[torch.Tensor] = []
        self.prompt_labels: list[torch.Tensor] = []
        self.answer_feats = torch.zeros(rows, max_new_tokens, len(layers) * hidden, dtype=torch.float16)
        self.answer_labels = torch.zeros(rows, max_new_tokens, dtype=torch.long)

    def prompt_slice(self, lm: LeanLM, kept: dict, out: torch.Tensor) -> None:
        rows, width, hidden = out.shape
        labels = greedy_labels(lm, out.reshape(-1, hidden), self.label_rows)
        self.prompt_feats += list(torch.cat([kept[i] for i in self.layers], -1).half().cpu())
        self.prompt_labels += list(labels.view(rows, width).cpu())

    def answer_step(self, alive: torch.Tensor, t: int, kept: dict, logits: torch.Tensor) -> None:
        """Features of the token fed at answer index t (position prompt length + t)."""
        rows = alive.cpu()
        self.answer_feats[rows, t] = torch.cat([kept[i] for i in self.layers], -1)[:, 0].half().cpu()
        self.answer_labels[rows, t] = logits.argmax(-1).cpu()

    def sequences(self, prompts: list[list[int]], answers: list[list[int]]) -> list[dict]:
        """Per row, what data.features_of gives for prompt + answer."""
        out = []
        for b, (prompt, answer) in enumerate(zip(prompts, answers)):
            n, m = len(prompt), len(answer)
            out.append({"tokens": torch.tensor(prompt + answer),
                        "features": torch.cat([self.prompt_feats[b][:n], self.answer_feats[b, :m]]),
                        "labels": torch.cat([self.prompt_labels[b][:n], self.answer_labels[b, :m]])})
        return out


def cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i + 1]
    return row


def bulk_generate(lm: LeanLM, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                  pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  slots: int = 1_500_000, prefill_tokens: int = 65536, deadline: float | None = None,
                  progress=None) -> list[list[int] | None]:
    """Answers for every prompt (None for those not reached by `deadline`, a time.time())."""
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    groups = chunks_by_length(prompts, max_new_tokens, slots)
    random.Random(seed).shuffle(groups)    # a deadline then cuts a mix of lengths, not the longest
    answers: list[list[int] | None] = [None] * len(prompts)
    for group in groups:
        if deadline is not None and time.time() > deadline:
            break
        made = decode_group(lm, [prompts[i] for i in group], max_new_tokens, temperature, top_p,
                            generator, eos_ids, pad_id, prefill_tokens)
        for i, answer in zip(group, made):
            answers[i] = answer
        if progress:
            progress(len(group), sum(map(len, made)))
    return answers


def answers_with_features(target, prompts: list[list[int]], max_new_tokens: int, layers: list[int],
                          temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> tuple[list, list | None]:
    """plain_answers, plus each row's features and labels (data.features_of's dict for
    prompt + answer) where the target runs the lean forward; None on transformers' forward."""
    if not layers or not isinstance(target.forward, LeanLM):
        return plain_answers(target, prompts, max_new_tokens, temperature, top_p, seed), None
    lm = target.forward
    capture = FeatureCapture(layers, len(prompts), max_new_tokens, lm.embed.shape[1])
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    answers = decode_group(lm, prompts, max_new_tokens, temperature, top_p, generator, target.eos_ids,
                           target.tokenizer.pad_token_id or 0, prefill_tokens=8192, capture=capture)
    return answers, capture.sequences(prompts, answers)


def plain_answers(target, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """Plain answers to one batch (corpus answers, Magpie requests): decode_group on the lean
    forward, measured faster than the engine's row-by-row loop (scripts/corpus_speed.py);
    the engine where the target runs transformers' forward."""
    if not isinstance(target.forward, LeanLM):
        from scylla.decoding import batch_generate_ids

        return batch_generate_ids(target, None, prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed)[0]
    generator = torch.Generator(device=target.forward.device).manual_seed(seed)
    pad_id = target.tokenizer.pad_token_id or 0
    return decode_group(target.forward, prompts, max_new_tokens, temperature, top_p, generator,
                        target.eos_ids, pad_id, prefill_tokens=8192)   # bounded prompt activations on a CPU


# ---------------------------------------------------------------- features on the fly

@torch.no_grad()
def target_features(lm: LeanLM, ids: torch.Tensor, layers: list[int], label_rows: int = 8192):
    """Teacher-forced features of a right-padded batch [B, W]: the chosen hidden states
    (transformers' numbering; the last one is after the final norm) concatenated [B, W, L*H],
    and the target's greedy next token at every position [B, W]."""
    rows, width = ids.shape
    cache = lm.new_cache(rows, width)
    positions = torch.arange(width, device=ids.device)[None].expand(rows, -1)
    out, kept = lm.stack.run(lm.embed[ids], cache, positions, CAUSAL, tuple(layers))
    labels = greedy_labels(lm, out.reshape(-1, out.shape[-1]), label_rows)
    return torch.cat([kept[i] for i in layers], -1), labels.view(rows, width)


def training_batch(lm: LeanLM, seqs: list[dict], layers: list[int], prompt_weight: float) -> dict:
    """The batch dict head_loss reads, built on the accelerator: features [low, mid, high]
    for multi fusion, the last layer for last fusion, target labels, weights, mask."""
    dev = lm.device
    ids, lengths = padded([s["tokens"] for s in seqs], 0, dev)
    feats, labels = target_features(lm, ids, layers)
    width = ids.shape[1]
    col = torch.arange(width)[None]
    mask = (col < lengths[:, None])
    prompt = torch.tensor([max(0, int(s.get("prompt_len", 0)) - 1) for s in seqs])[:, None]
    weights = torch.where(col < prompt, prompt_weight, 1.0) * mask
    hidden = lm.embed.shape[1]
    labels = labels.masked_fill(~mask.to(dev), -100)
    return {"tokens": ids, "labels": labels, "weights": weights.to(dev), "mask": mask.long().to(dev),
            "multi": feats[..., :3 * hidden], "last": feats[..., 3 * hidden:]}


# ---------------------------------------------------------------- several drafts, one stream

@dataclass
class Trainee:
    name: str
    cfg: TrainConfig
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    t2d: torch.Tensor | None
    losses: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    record: dict = field(default_factory=dict)


def answer_vocab(seqs: list[dict], size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent answer tokens (what the draft will draft): EAGLE-3's reduced
    vocabulary, counted on the tokens themselves (the features, and so the target's labels,
    are only computed batch by batch)."""
    return most_frequent((torch.tensor(s["tokens"][max(1, s.get("prompt_len", 0)):]) for s in seqs), size, vocab)


def make_trainee(target_model, cfg: TrainConfig, seqs: list[dict], name: str, target_name: str) -> Trainee:
    vocab = target_model.config.vocab_size
    ids = answer_vocab(seqs, cfg.draft_vocab, vocab) if cfg.draft_vocab else None
    head = make_head(target_model, cfg, ids, target_name).float()
    dev = target_model.get_input_embeddings().weight.device
    head = head.to(dev).train()
    for p in head.parameters():
        p.requires_grad_(True)
    t2d = None
    if ids is not None:
        t2d = torch.full((vocab,), -100, dtype=torch.long, device=dev)
        t2d[ids.to(dev)] = torch.arange(len(ids), device=dev)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    return Trainee(name, cfg, head, optimizer, t2d)


def planned_lr(step: int, plan: dict) -> float:
    """train.warmup_decay over the planned steps; `plan['steps']` may be revised once the
    measured step time says how many fit."""
    return warmup_decay(step, plan["steps"])


def train_step(trainee: Trainee, batch: dict, step: int, plan: dict, autocast: bool) -> None:
    view = dict(batch, features=batch["multi"] if trainee.cfg.fusion == "multi" else batch["last"])
    for group in trainee.optimizer.param_groups:
        group["lr"] = trainee.cfg.lr * planned_lr(step, plan)
    with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, top1 = head_loss(trainee.head, view, trainee.t2d, trainee.cfg)
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainee.head.parameters(), 1.0)
    trainee.optimizer.step()
    trainee.losses.append(float(loss.detach()))
    trainee.top1.append(top1)


def length_batches(seqs: list[dict], batch_tokens: int, seed: int, max_rows: int = 256) -> list[list[dict]]:
    """Shuffled batches of similar-length sequences, each within `batch_tokens` padded positions."""
    rng = random.Random(seed)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), 4096):          # sort within windows: little padding, still mixed
        window = sorted(order[i:i + 4096], key=lambda j: len(seqs[j]["tokens"]))
        current: list[dict] = []
        for j in window:
            width = max([len(seqs[j]["tokens"])] + [len(s["tokens"]) for s in current])
            if current and ((len(current) + 1) * width > batch_tokens or len(current) >= max_rows):
                batches.append(current)
                current = []
            current.append(seqs[j])
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def heldout_answer_top1(lm: LeanLM, trainee: Trainee, batches: list[list[dict]], layers: list[int]) -> float:
    """Answer-position top-1 of the first (teacher-forced) pass on held-out sequences."""
    one = teacher_forced(trainee.cfg)
    trainee.head.eval()
    hits = n = 0.0
    for items in batches:
        batch = training_batch(lm, items, layers, trainee.cfg.prompt_weight)
        view = dict(batch, features=batch["multi"] if one.fusion == "multi" else batch["last"])
        _, top1 = head_loss(trainee.head, view, trainee.t2d, one)
        count = sum(loss_positions(s) for s in items)
        hits += top1 * count
        n += count
    trainee.head.train()
    return hits / max(n, 1.0)


def steps_that_fit(step_s: float, seconds_left: float, wanted: int) -> int:
    return max(1, min(wanted, math.floor(0.95 * seconds_left / max(step_s, 1e-6))))
