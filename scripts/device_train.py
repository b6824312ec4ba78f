"""One prepared run for a lent accelerator: build a corpus of the target's own answers and
train the three named drafts on it, inside a fixed number of seconds.

    python scripts/device_train.py --out OUT --seconds 540

Phases, each against the clock (a phase that runs out of time stops and the next one
starts, so the drafts always come back):
1. prompts: the committed answers-v2 corpus (answered already), Magpie requests written by
   the target (T = 1, top-p 0.95, filtered), long text on the machine and the template
   generator; all deduplicated against each other and the evaluation prompts;
2. answers: plain batched decoding (scylla/bulk.py), every fourth prompt at T = 1;
3. training: scylla, eagle3-style and eagle2-style on the same batches, features computed
   on the fly; the step count is fitted to the time left after the first steps;
4. the drafts in float16, packed into OUT; then, time allowing, tau of each draft on the
   evaluation prompts through the engine at T = 0 and T = 1 (k = 4).
OUT/report.json holds every figure; it is rewritten after each phase.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scylla import ScyllaError  # noqa: E402
from scylla import bulk, sources  # noqa: E402
from scylla.corpus import read_answers  # noqa: E402
from scylla.data import eval_prompts  # noqa: E402
from scylla.head import export_head, load_head_draft, save_head  # noqa: E402
from scylla.lean import LeanLM  # noqa: E402
from scylla.models import DEFAULT_TARGET, encode_prompt, load_target  # noqa: E402
from scylla.train import RECIPES, TrainConfig, loss_positions, stored_layers, window  # noqa: E402

MAX_PROMPT_TOKENS = 1792
MAX_POSITIONS = 2048


def recipes(tokens: int, lr: float) -> dict[str, TrainConfig]:
    """Same data, same steps; only the recipe differs (scylla.train.RECIPES). All three learn
    the target's distribution (soft labels), as EAGLE's own training does."""
    common = dict(tokens=tokens, layers=1, lr=lr, max_len=MAX_POSITIONS, prompt_weight=0.1, labels="soft")
    return {name: TrainConfig(**common, **settings, kind=name) for name, settings in RECIPES.items()}


class Clock:
    def __init__(self, seconds: float):
        self.start = time.time()
        self.end = self.start + seconds

    def at(self, share: float) -> float:
        return self.start + share * (self.end - self.start)

    def left(self) -> float:
        return self.end - time.time()

    def now(self) -> float:
        return round(time.time() - self.start, 1)


class Report:
    def __init__(self, out: Path):
        self.path = out / "report.json"
        self.data: dict = {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))


def log(clock: Clock, msg: str) -> None:
    print(f"[{clock.now():7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- prompts

def magpie_requests(target, lm, n_raw: int, seed: int, clock: Clock) -> list[dict]:
    opening = sources.magpie_opening(target.tokenizer)
    rows = bulk.bulk_generate(lm, [opening] * n_raw, 96, target.eos_ids, temperature=1.0, top_p=0.95,
                              seed=seed, deadline=clock.at(0.12))
    out = []
    for row in rows:
        if not row or row[-1] not in target.eos_ids:
            continue
        text = target.tokenizer.decode(row, skip_special_tokens=True).strip()
        if sources.usable_request(text):
            out.append({"prompt": text, "category": "magpie", "source": "magpie",
                        "question_id": f"magpie-d{seed}-{len(out)}"})
    return out


def new_prompts(target, lm, args, have: list[dict], clock: Clock, report: Report) -> list[dict]:
    raw = {"magpie": magpie_requests(target, lm, args.magpie, args.seed, clock),
           "longtext": sources.longtext_prompts(args.longtext, seed=100 + args.seed) if args.longtext else [],
           "template": sources.template_prompts(args.template, seed=100 + args.seed)}
    for rows in raw.values():
        for p in rows:
            p["question_id"] = f"d{args.seed}-{p['question_id']}"
    banned = sources.eval_shingles() + [sources.shingles(p["prompt"]) for p in have]
    kept = sources.dedup([p for rows in raw.values() for p in rows], banned)
    report.put("prompts", {"generated": {k: len(v) for k, v in raw.items()},
                           "kept": {k: sum(p["source"].startswith(k) for p in kept) for k in raw},
                           "dedup": "word 8-gram shingles, 50% of the smaller set, against each other, "
                                    "the answers-v2 prompts and the evaluation prompts",
                           "seconds": clock.now()})
    return kept


# ---------------------------------------------------------------- answers

def answer_all(target, lm, prompts: list[dict], args, clock: Clock, report: Report) -> list[dict]:
    encoded = [encode_prompt(target, p["prompt"])[-MAX_PROMPT_TOKENS:] for p in prompts]
    hot = [zlib.crc32(p["question_id"].encode()) % 4 == 0 for p in prompts]
    made = {"answer_tokens": 0, "rows": 0}
    start = time.time()

    def progress(rows, tokens):
        made["rows"] += rows
        made["answer_tokens"] += tokens
        log(clock, f"answers: {made['rows']} rows, {made['answer_tokens']} tokens, "
                   f"{made['answer_tokens'] / (time.time() - start):.0f} answer tok/s")

    seqs = []
    for temperature in (0.0, 1.0):
        idx = [i for i in range(len(prompts)) if hot[i] == (temperature > 0)]
        share = 0.75 if temperature == 0 else 1.0      # the T = 1 quarter gets its share of the time
        answers = bulk.bulk_generate(lm, [encoded[i] for i in idx], args.max_new_tokens, target.eos_ids,
                                     temperature=temperature, seed=args.seed, slots=args.slots,
                                     deadline=clock.at(0.12 + share * (args.gen_until - 0.12)), progress=progress)
        for i, answer in zip(idx, answers):
            if answer:
                seqs.append(sequence(prompts[i], encoded[i], answer, temperature))
    wall = time.time() - start
    report.put("answers", {"rows": made["rows"], "answer_tokens": made["answer_tokens"], "wall_s": round(wall, 1),
                           "answer_tok_s": round(made["answer_tokens"] / max(wall, 1e-9)),
                           "max_new_tokens": args.max_new_tokens, "dtype": str(lm.embed.dtype)})
    return seqs


def sequence(prompt: dict, prompt_ids: list[int], answer: list[int], temperature: float) -> dict:
    """A training sequence: its last MAX_POSITIONS tokens (where the answer is), as train.window."""
    seq = window({"tokens": prompt_ids + answer, "prompt_len": len(prompt_ids)}, MAX_POSITIONS)
    return {**seq, "question_id": prompt["question_id"], "source": prompt["source"],
            "category": prompt["category"], "temperature": temperature}


def committed_sequences() -> list[dict]:
    rows = read_answers()
    return [sequence({"question_id": r["question_id"], "source": r["source"], "category": r["category"]},
                     r["prompt_ids"], r["answer_ids"], r.get("temperature", 0.0)) for r in rows]


def corpus_stats(seqs: list[dict]) -> dict:
    by_source: dict[str, dict] = {}
    for s in seqs:
        src = s["source"].split(":")[0]
        row = by_source.setdefault(src, {"sequences": 0, "prompt_tokens": 0, "answer_tokens": 0})
        row["sequences"] += 1
        row["prompt_tokens"] += s["prompt_len"]
        row["answer_tokens"] += len(s["tokens"]) - s["prompt_len"]
    total = {k: sum(r[k] for r in by_source.values()) for k in ("sequences", "prompt_tokens", "answer_tokens")}
    return {"by_source": by_source, **total, "tokens": total["prompt_tokens"] + total["answer_tokens"]}


def save_corpus(seqs: list[dict], out: Path) -> None:
    """The corpus as it comes back: token ids (uint16) and one JSON line per sequence, so
    that it can be committed as a snapshot and trained on again without the accelerator."""
    import gzip

    import numpy as np

    np.savez_compressed(out / "corpus_tokens.npz", tokens=np.array([t for s in seqs for t in s["tokens"]], dtype=np.uint16),
                        lengths=np.array([len(s["tokens"]) for s in seqs], dtype=np.int32))
    with gzip.open(out / "corpus_meta.jsonl.gz", "wt") as fh:
        for s in seqs:
            fh.write(json.dumps({k: v for k, v in s.items() if k != "tokens"}) + "\n")


# ---------------------------------------------------------------- training

def train_all(target, lm, seqs: list[dict], args, clock: Clock, report: Report) -> list[bulk.Trainee]:
    held = [s for s in seqs if zlib.crc32(s["question_id"].encode()) % 100 == 0]
    train = [s for s in seqs if zlib.crc32(s["question_id"].encode()) % 100 != 0]
    layers = stored_layers(target.model.config.num_hidden_layers)
    trainees = [bulk.make_trainee(target.model, cfg, train, name, target.name)
                for name, cfg in recipes(args.tokens, args.lr).items() if name in args.heads]
    per_pass = bulk.length_batches(train, args.batch_tokens, args.seed)
    answers_per_batch = sum(loss_positions(s) for s in train) / max(len(per_pass), 1)
    plan = {"steps": max(1, int(args.tokens / max(answers_per_batch, 1)))}
    deadline = clock.at(args.train_until)
    step, seen, t_first, epoch = 0, 0, None, 0
    batches = iter(per_pass)
    while step < plan["steps"] and time.time() < deadline:
        items = next(batches, None)
        if items is None:
            epoch += 1
            batches = iter(bulk.length_batches(train, args.batch_tokens, args.seed + epoch))
            continue
        batch = bulk.training_batch(lm, items, layers, 0.1)
        for t in trainees:
            bulk.train_step(t, batch, step, plan, autocast=lm.device.type == "cuda")
        step += 1
        seen += sum(loss_positions(s) for s in items)
        if step == 3:
            t_first = time.time()
        if step == 13:   # the measured step time fixes how many steps fit
            step_s = (time.time() - t_first) / 10
            plan["steps"] = bulk.steps_that_fit(step_s, deadline - time.time(), plan["steps"] - step) + step
            log(clock, f"train: {step_s * 1e3:.0f} ms/step; plan {plan['steps']} steps")
        if step % 50 == 0:
            log(clock, f"train: step {step}/{plan['steps']}, {seen} answer positions, "
                       + ", ".join(f"{t.name} loss {t.losses[-1]:.3f} top1 {t.top1[-1]:.3f}" for t in trainees))
    held_batches = bulk.length_batches(held, args.batch_tokens, 0)
    records = {}
    for t in trainees:
        records[t.name] = {"heldout_top1": round(bulk.heldout_answer_top1(lm, t, held_batches, layers), 4),
                           "final_loss": round(sum(t.losses[-20:]) / max(len(t.losses[-20:]), 1), 4),
                           "in_vocab": in_vocab_share(t, held)}
    report.put("training", {"steps": step, "epochs": round(seen / max(sum(loss_positions(s) for s in train), 1), 3),
                            "answer_positions": seen, "train_sequences": len(train), "heldout_sequences": len(held),
                            "batch_tokens": args.batch_tokens, "lr": args.lr, "wall_s": clock.now(),
                            "drafts": records})
    for t in trainees:
        t.cfg.tokens = t.head.cfg.tokens = seen
        t.record = {"draft_kind": t.name, "layers": t.cfg.layers, "fusion": t.cfg.fusion,
                    "draft_vocab": t.cfg.draft_vocab, "tokens": seen, "ttt_steps": t.cfg.ttt_steps,
                    "seed": t.cfg.seed, "wall_s": clock.now(), **records[t.name],
                    "unique_tokens": sum(loss_positions(s) for s in train), "max_positions": MAX_POSITIONS,
                    "prompt_weight": 0.1, "name": t.name, "corpus": "answers-v3 (device)",
                    "device": torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu"}
    return trainees


def in_vocab_share(t: bulk.Trainee, held: list[dict]) -> float | None:
    if t.t2d is None:
        return None
    tokens = torch.tensor([tok for s in held for tok in s["tokens"][s["prompt_len"]:]], dtype=torch.long)
    if not len(tokens):
        return None
    return round(float((t.t2d[tokens.to(t.t2d.device)] >= 0).float().mean()), 4)


def save_drafts(trainees: list[bulk.Trainee], out: Path, work: Path) -> list[Path]:
    folders = []
    for t in trainees:
        full = work / "fp32" / t.name
        save_head(t.head.float().cpu(), full)
        (full / "training.json").write_text(json.dumps(t.record, indent=2))
        export_head(full, work / "drafts" / t.name)
        folders.append(full)
    subprocess.run(f"tar cf - -C {work} drafts | split -b 15M - {out}/drafts.tar.part-", shell=True, check=True)
    return folders


# ---------------------------------------------------------------- tau on the evaluation prompts

def eval_tau(target, folders: list[Path], args, clock: Clock, report: Report) -> None:
    from scylla.bench import draft_taus

    prompts = [encode_prompt(target, p["prompt"]) for p in eval_prompts(args.eval_prompts)]
    results = {}
    for temperature in (0.0, 1.0):
        for folder in folders:
            if clock.left() < 25:
                report.put("eval", {**results, "stopped": "out of time"})
                return
            draft = load_head_draft(folder, target, folder.name)
            start = time.time()
            taus = draft_taus(target, draft, prompts, 4, temperature, args.eval_tokens, batch=len(prompts))
            results[f"{folder.name}@T{temperature:g}"] = {"tau": round(sum(taus) / len(taus), 4),
                                                          "wall_s": round(time.time() - start, 1)}
            report.put("eval", {**results, "prompts": len(prompts), "max_new_tokens": args.eval_tokens, "k": 4})
            log(clock, f"eval {folder.name} T={temperature:g}: tau {results[f'{folder.name}@T{temperature:g}']['tau']}")


# ---------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=540)
    p.add_argument("--gen-until", type=float, default=0.5, help="share of the time by which answering stops")
    p.add_argument("--train-until", type=float, default=0.86, help="share of the time by which training stops")
    p.add_argument("--magpie", type=int, default=24000, help="Magpie openings sampled (about 60%% are kept)")
    p.add_argument("--longtext", type=int, default=20000)
    p.add_argument("--template", type=int, default=3000)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--slots", type=int, default=1_500_000, help="KV slots per generation group")
    p.add_argument("--gen-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--tokens", type=int, default=1 << 24, help="answer positions to train on, at most")
    p.add_argument("--batch-tokens", type=int, default=49152)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--heads", default="scylla,eagle3-style,eagle2-style")
    p.add_argument("--eval-prompts", type=int, default=48)
    p.add_argument("--eval-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--target", default=DEFAULT_TARGET, help="the bundled target, or a transformers folder")
    p.add_argument("--tiny-from", help="smoke run: a tiny random Llama with the tokenizer in this folder")
    return p.parse_args(argv)


def tiny_target_dir(tokenizer_dir: Path, out: Path) -> Path:
    """A 4-layer random Llama with the real tokenizer: every code path, seconds to run."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((tokenizer_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    args.heads = args.heads.split(",")
    clock = Clock(args.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("SCYLLA_WORK", "/tmp/scylla-device"))
    report = Report(out)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny_from:
        args.target = str(tiny_target_dir(Path(args.tiny_from), work / "tiny-target"))
    target = load_target(args.target, device=args.device)
    lm = target.forward
    gen_lm = LeanLM(copy.deepcopy(target.model).to(torch.bfloat16)) if args.gen_dtype == "bf16" else lm
    report.put("setup", {"device": str(lm.device), "torch": torch.__version__, "load_s": clock.now(),
                         "name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
    log(clock, f"target on {lm.device}")
    have = committed_sequences()
    from scylla.corpus import answers_dir
    kept_prompts = [json.loads(x) for x in (answers_dir() / "prompts.jsonl").read_text().splitlines()]
    prompts = new_prompts(target, gen_lm, args, kept_prompts, clock, report)
    log(clock, f"prompts: {len(prompts)} new after dedup")
    seqs = have + answer_all(target, gen_lm, prompts, args, clock, report)
    report.put("corpus", corpus_stats(seqs))
    save_corpus(seqs, out)
    log(clock, f"corpus: {report.data['corpus']['tokens']} tokens in {len(seqs)} sequences")
    del gen_lm
    trainees = train_all(target, lm, seqs, args, clock, report)
    folders = save_drafts(trainees, out, work)
    log(clock, f"drafts saved: {[f.name for f in folders]}")
    try:
        eval_tau(target, folders, args, clock, report)
    except (ScyllaError, RuntimeError) as exc:   # the drafts are already out; say why eval stopped
        report.put("eval_error", str(exc).splitlines()[0])
    report.put("total_s", clock.now())
    return 0


if __name__ == "__main__":
    sys.exit(main())
