"""Draft training: corpus -> target features (cached) -> FeatureHead, via Accelerate.

`tokens` is the paper's pretraining token volume: exactly that many training
positions are seen (the corpus repeats when the budget exceeds it; the record says
how many unique tokens there were). Training-time test (EAGLE-3) unrolls the draft
on its own predicted features for `ttt_steps` passes.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from scylla import ScyllaError
from scylla.head import FeatureHead, HeadConfig, check_arch, save_head

# under bf16 autocast the draft's RMSNorm meets bf16 inputs and fp32 weights; torch then
# takes its unfused kernel, which is right, and says so on every process
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

STORED_LAYERS_NOTE = "feature cache holds hidden_states[2], [n//2], [n-3] and [n] (fp16)"


def stored_layers(n_layers: int) -> list[int]:
    return [2, n_layers // 2, n_layers - 3, n_layers]


PRECISIONS = ("auto", "bf16", "fp32")
LABELS = ("hard", "soft")
# The named drafts differ only in these settings (EAGLE-2: last-layer features, the full
# vocabulary, no training-time test; EAGLE-3: fused low/mid/high features, a reduced
# vocabulary, training-time test; scylla: EAGLE-3's layer with a larger vocabulary).
RECIPES = {"scylla": dict(fusion="multi", draft_vocab=12288, ttt_steps=3, arch="eagle3"),
           "eagle3-style": dict(fusion="multi", draft_vocab=8192, ttt_steps=3, arch="eagle"),
           "eagle2-style": dict(fusion="last", draft_vocab=0, ttt_steps=1, arch="eagle")}


def recipe_settings(recipe: str | None, given: dict) -> dict:
    """The recipe's fusion, vocabulary, TTT and architecture; flags given explicitly must agree
    with it (a flag that silently lost to the recipe would train a different draft than asked).
    Without a recipe, the flags given; TrainConfig's defaults fill the rest."""
    if recipe is None:
        return {key: value for key, value in given.items() if value is not None}
    if recipe not in RECIPES:
        raise ScyllaError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    clash = [key for key, value in RECIPES[recipe].items() if given.get(key) not in (None, value)]
    if clash:
        raise ScyllaError(f"--recipe {recipe} sets {', '.join(clash)}; leave those flags out or drop --recipe")
    return dict(RECIPES[recipe])


@dataclass
class TrainConfig:
    tokens: int
    layers: int = 1
    fusion: str = "multi"
    draft_vocab: int = 8192
    ttt_steps: int = 3
    lr: float = 1e-3
    batch_seqs: int = 4
    max_len: int = 2048          # positions per sequence: the context the draft decodes at
    prompt_weight: float = 0.1   # loss weight of prompt positions (answer positions weigh 1)
    seed: int = 0
    init_from_target: bool = True
    reg_weight: float = 1.0      # feature regression (last-layer fusion only, as EAGLE-1/2)
    kind: str = "scylla"
    checkpoint_every: int = 200  # optimizer steps
    init_from: str | None = None  # a trained draft folder: continue it (the alignment stage)
    arch: str = "eagle"          # eagle | eagle3 (EAGLE-3's layer; exports for vLLM and SGLang)
    precision: str = "auto"      # auto | bf16 | fp32: the matmuls' precision (weights stay fp32)
    labels: str = "hard"         # hard: the target's greedy token (the stored sweeps); soft: its distribution (EAGLE)


def check_train_config(cfg: TrainConfig) -> None:
    if cfg.tokens < 256:
        raise ScyllaError(f"--tokens must be >= 256, got {cfg.tokens}")
    if not 1 <= cfg.layers <= 8:
        raise ScyllaError(f"--layers must be in 1..8, got {cfg.layers}")
    if cfg.fusion not in ("last", "multi"):
        raise ScyllaError(f"--fusion must be last or multi, got {cfg.fusion!r}")
    if cfg.draft_vocab < 0 or cfg.ttt_steps < 1:
        raise ScyllaError("--draft-vocab must be >= 0 and --ttt >= 1")
    if cfg.max_len < 16 or not 0.0 <= cfg.prompt_weight <= 1.0:
        raise ScyllaError("--max-len must be >= 16 and --prompt-weight in [0, 1]")
    if cfg.precision not in PRECISIONS:
        raise ScyllaError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.labels not in LABELS:
        raise ScyllaError(f"--labels must be hard or soft, got {cfg.labels!r}")
    check_arch(cfg)


def resolved_precision(precision: str) -> str:
    """auto: bf16 autocast where the hardware multiplies bf16 natively (a CUDA GPU that
    supports it, a CPU with avx512_bf16 or AMX; a training step ran 2.5x faster than fp32 on
    this CPU); fp32 elsewhere, where emulated bf16 is slower."""
    if precision != "auto":
        return precision
    from scylla.kernels import cpu_has_bf16

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


# ---------------------------------------------------------------- data

def split_heldout(seqs: list[dict], share: float = 0.05, seed: int = 1234) -> tuple[list, list]:
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(seqs) * share))
    held = [seqs[i] for i in order[:cut]]
    train = [seqs[i] for i in order[cut:]]
    return train, held


def token_stream(seqs: list[dict], budget: int, max_len: int, seed: int):
    """Yield whole sequences (a longer one: its last max_len positions, where the answer is)
    until exactly `budget` loss positions are used. A sequence's loss positions are its
    answer positions when it marks them (prompt_len), else all of them."""
    rng = random.Random(seed)
    used = 0
    while used < budget:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        progressed = False
        for i in order:
            item = window(seqs[i], max_len)
            positions = loss_positions(item)
            if positions < 1:
                continue
            if used + positions > budget:
                item = cut_to_budget(item, budget - used)
                positions = loss_positions(item)
            yield item
            used += positions
            progressed = True
            if used >= budget:
                return
        if not progressed:
            return


def length_grouped(stream, batch_seqs: int, seed: int, group: int = 16):
    """Batches of similar length, as transformers' group_by_length: each window of `group`
    batches is sorted by length, then its batches come in shuffled order. A batch pads to
    its longest sequence, and this corpus runs from 40 to 2,048 positions, so random batches
    spent most of their compute on padding."""
    rng = random.Random(seed)
    window_items = []
    for item in stream:
        window_items.append(item)
        if len(window_items) == batch_seqs * group:
            yield from shuffled_batches(window_items, batch_seqs, rng)
            window_items = []
    yield from shuffled_batches(window_items, batch_seqs, rng)


def shuffled_batches(items: list[dict], batch_seqs: int, rng: random.Random) -> list[list[dict]]:
    items = sorted(items, key=lambda x: len(x["tokens"]))
    batches = [items[i:i + batch_seqs] for i in range(0, len(items), batch_seqs)]
    rng.shuffle(batches)
    return batches


def window(seq: dict, max_len: int) -> dict:
    n = len(seq["tokens"])
    if n <= max_len:
        return seq
    drop = n - max_len
    out = {k: v[drop:] for k, v in seq.items() if k != "prompt_len"}
    out["prompt_len"] = max(0, int(seq.get("prompt_len", 0)) - drop)
    return out


def loss_positions(seq: dict) -> int:
    """Positions t whose label (the target's token at t + 1) is trained at full weight."""
    return len(seq["tokens"]) - 1 - max(0, int(seq.get("prompt_len", 0)) - 1)


def cut_to_budget(seq: dict, positions: int) -> dict:
    keep = max(0, int(seq.get("prompt_len", 0)) - 1) + positions + 1
    out = {k: v[:keep] for k, v in seq.items() if k != "prompt_len"}
    if "prompt_len" in seq:
        out["prompt_len"] = seq["prompt_len"]
    return out


def position_weights(seq: dict, prompt_weight: float) -> torch.Tensor:
    """Weight of the label at each position: answer positions 1, prompt positions less."""
    n = len(seq["tokens"])
    w = torch.ones(n)
    w[:max(0, int(seq.get("prompt_len", 0)) - 1)] = prompt_weight
    return w


def collate(items: list[dict], feature_cols: slice, last_cols: slice | None = None,
            dtype=torch.float32, prompt_weight: float = 1.0) -> dict:
    width = max(len(x["tokens"]) for x in items)
    items = [{**x, "weights": position_weights(x, prompt_weight)} for x in items]
    def pad(key, fill, rows):
        out = []
        for x in items:
            v = x[key] if rows is None else x[key][:, rows]
            extra = width - len(v)
            out.append(torch.cat([v, v.new_full((extra, *v.shape[1:]), fill)]) if extra else v)
        return torch.stack(out)
    mask = torch.stack([torch.arange(width) < len(x["tokens"]) for x in items]).long()
    return {"tokens": pad("tokens", 0, None), "labels": pad("labels", -100, None),
            "weights": pad("weights", 0.0, None),
            "features": pad("features", 0, feature_cols).to(dtype),
            "last": pad("features", 0, last_cols).to(dtype) if last_cols else None, "mask": mask}


def feature_columns(fusion: str, hidden: int) -> slice:
    # stored order: [low, mid, high, last]
    return slice(0, 3 * hidden) if fusion == "multi" else slice(3 * hidden, 4 * hidden)


def last_columns(cols: slice) -> slice:
    width = (cols.stop - cols.start) // (3 if cols.start == 0 else 1)
    return slice(3 * width, 4 * width)


def draft_vocab_map(seqs: list[dict], size: int, target_vocab: int) -> torch.Tensor:
    """The `size` most frequent target next tokens on answer positions (where the draft
    drafts) in the corpus: EAGLE-3's reduced vocabulary."""
    return most_frequent((s["labels"][max(0, int(s.get("prompt_len", 0)) - 1):] for s in seqs), size, target_vocab)


def most_frequent(streams, size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent ids over token-id tensors, sorted by id."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for ids in streams:
        counts += torch.bincount(ids, minlength=vocab)
    return counts.argsort(descending=True)[:size].sort().values


# ---------------------------------------------------------------- loss

def loss_positions_drawn(tgt: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The positions whose logits are computed: every answer position, and each prompt
    position with probability equal to its weight. The draft's layer still runs over every
    position (its attention needs them); the head and softmax over the draft vocabulary, more
    than half a position's cost, run on about a fifth of a long-prompt sequence. Unbiased
    for the weighted loss: a drawn prompt position then counts fully."""
    drawn = torch.rand(weights.shape, device=weights.device) < weights
    return (tgt != -100) & ((weights >= 1.0) | drawn)


def head_loss(head: FeatureHead, batch: dict, t2d: torch.Tensor | None, cfg: TrainConfig):
    """CE over TTT passes on the drawn positions (+ feature regression for last-layer fusion);
    top-1 of pass 0 on answer positions. Soft labels: CE against the target's distribution
    over the draft vocabulary, which sampling (T > 0) accepts against, not only its argmax."""
    dtype = head.dtype
    feats, toks, labels, mask = batch["features"].to(dtype), batch["tokens"], batch["labels"], batch["mask"]
    inp_feat = feats[:, :-1]
    inp_tok = toks[:, 1:]
    attn = mask[:, 1:]
    tgt = labels[:, 1:].clone()
    tgt[attn == 0] = -100
    weights = batch["weights"][:, :-1] * (attn == 1)  # weight of predicting the token at t + 2
    if t2d is not None:
        tgt = torch.where(tgt >= 0, t2d[tgt.clamp_min(0)], tgt)
    drawn = loss_positions_drawn(tgt, weights)
    answer = weights[drawn] >= 1.0
    soft = head.target_probs(batch["last"][:, 1:][drawn].to(dtype)) if cfg.labels == "soft" else None
    g = head.fuse(inp_feat)
    total, top1 = 0.0, None
    for step in range(cfg.ttt_steps):
        h = head(head.step_inputs(g, inp_tok, fused=True), attention_mask=attn)
        logits = head.logits(h[drawn])
        ce = label_loss(logits, tgt[drawn], soft) if drawn.any() else h.sum() * 0.0
        total = total + (0.8 ** step) * ce
        if step == 0:
            top1 = ((logits.argmax(-1) == tgt[drawn]) & answer).sum().item() / max(answer.sum().item(), 1)
            if cfg.fusion == "last" and cfg.reg_weight > 0:
                true_next = batch["last"][:, 1:].to(dtype)
                reg = F.smooth_l1_loss(h[attn == 1], true_next[attn == 1])
                total = total + cfg.reg_weight * reg
        # next pass: each position sees the draft's own prediction of its feature
        g = torch.cat([g[:, :1], h[:, :-1]], dim=1)
    return total, top1


def label_loss(logits: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
    if soft is None:
        return F.cross_entropy(logits, hard)
    return -(soft.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def teacher_forced(cfg: TrainConfig) -> TrainConfig:
    """The same settings, one pass on the true features (what held-out top-1 scores)."""
    return TrainConfig(**{**asdict(cfg), "ttt_steps": 1, "reg_weight": 0.0, "labels": "hard"})


@torch.no_grad()
def heldout_top1(head, seqs, t2d, cfg, cols) -> float:
    head.eval()
    hits = n = 0
    one_pass = teacher_forced(cfg)
    for i in range(0, len(seqs), cfg.batch_seqs):
        items = [window(s, cfg.max_len) for s in seqs[i:i + cfg.batch_seqs]]
        batch = collate(items, cols, prompt_weight=cfg.prompt_weight)
        _, acc = head_loss(head, batch, t2d, one_pass)
        count = int(((batch["mask"][:, 1:] == 1) & (batch["weights"][:, :-1] >= 1.0)).sum())
        hits += acc * count
        n += count
    head.train()
    return hits / max(n, 1)


# ---------------------------------------------------------------- checkpoints (safetensors only)

def save_checkpoint(folder: Path, head, optimizer, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for name, val in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(val).detach().contiguous()
    save_file(tensors, str(folder / "checkpoint.tmp"))
    (folder / "checkpoint.tmp").replace(folder / "checkpoint.safetensors")
    (folder / "checkpoint.json").write_text(json.dumps(state))


def load_checkpoint(folder: Path, head, optimizer) -> dict | None:
    path = folder / "checkpoint.safetensors"
    if not path.is_file() or not (folder / "checkpoint.json").is_file():
        return None
    tensors = load_file(str(path))
    head.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = optimizer.state_dict()
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = val
    optimizer.load_state_dict(opt_state)
    return json.loads((folder / "checkpoint.json").read_text())


# ---------------------------------------------------------------- the loop

def continued_head(target_model, cfg: TrainConfig) -> tuple[FeatureHead, torch.Tensor | None]:
    """A trained draft to train further; it keeps its own vocabulary map (its output rows
    mean those tokens), so the second stage's data does not re-pick the vocabulary."""
    from scylla.head import load_head

    head = load_head(Path(cfg.init_from), target_model).train()
    mine = (head.cfg.layers, head.cfg.fusion, head.cfg.draft_vocab, head.cfg.arch)
    if mine != (cfg.layers, cfg.fusion, cfg.draft_vocab, cfg.arch):
        raise ScyllaError(f"{cfg.init_from}: the draft to continue has layers/fusion/vocab/arch {mine}, "
                          f"not {(cfg.layers, cfg.fusion, cfg.draft_vocab, cfg.arch)}")
    return head, (head.d2t.clone() if cfg.draft_vocab else None)


def make_head(target_model, cfg: TrainConfig, vocab_ids: torch.Tensor | None, name: str) -> FeatureHead:
    tc = target_model.config
    hcfg = HeadConfig(target_name=name, target_hidden=tc.hidden_size, target_vocab=tc.vocab_size,
                      target_layers=tc.num_hidden_layers, layers=cfg.layers, fusion=cfg.fusion,
                      draft_vocab=cfg.draft_vocab, heads=tc.num_attention_heads,
                      kv_heads=tc.num_key_value_heads, intermediate=tc.intermediate_size,
                      rope_theta=float(tc.rope_parameters["rope_theta"]), rms_eps=tc.rms_norm_eps,
                      ttt_steps=cfg.ttt_steps, tokens=cfg.tokens, seed=cfg.seed, kind=cfg.kind,
                      max_positions=cfg.max_len, arch=cfg.arch)
    torch.manual_seed(cfg.seed)
    head = FeatureHead(hcfg)
    if cfg.init_from_target:
        head.init_from_target(target_model)
    if vocab_ids is not None:
        head.d2t.copy_(vocab_ids)
        # start the reduced head from the target's own output rows
        head.head.weight.data.copy_(target_model.get_output_embeddings().weight.data[vocab_ids])
    head.attach_target(target_model)
    return head.to(target_model.get_input_embeddings().weight.dtype)


def train_head(target, seqs: list[dict], cfg: TrainConfig, out_dir: Path, target_name: str,
               log=print) -> dict:
    """Train a FeatureHead on cached feature sequences; save it to out_dir; return the record."""
    from accelerate import Accelerator

    check_train_config(cfg)
    cfg = replace(cfg, precision=resolved_precision(cfg.precision))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    train_seqs, held = split_heldout(seqs)
    unique = sum(loss_positions(s) for s in train_seqs)
    if cfg.init_from:
        head, vocab_ids = continued_head(target.model, cfg)
    else:
        vocab_ids = draft_vocab_map(train_seqs, cfg.draft_vocab, target.model.config.vocab_size) if cfg.draft_vocab else None
        head = make_head(target.model, cfg, vocab_ids, target_name)
    for p in head.parameters():
        p.requires_grad_(True)
    t2d = None
    if vocab_ids is not None:
        t2d = torch.full((target.model.config.vocab_size,), -100, dtype=torch.long)
        t2d[vocab_ids] = torch.arange(len(vocab_ids))
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, train_seqs))
    head, optimizer = accelerator.prepare(head, optimizer)
    ckpt = out_dir / "ckpt"
    state = load_checkpoint(ckpt, accelerator.unwrap_model(head), optimizer) or {"step": 0, "seen": 0}
    cols = feature_columns(cfg.fusion, target.model.config.hidden_size)
    stream = token_stream(train_seqs, cfg.tokens, cfg.max_len, cfg.seed)
    start, step, seen = time.time(), 0, 0
    bar = tqdm(total=cfg.tokens, desc=f"train {cfg.kind}", unit="tok", initial=state["seen"])
    for batch_items in length_grouped(stream, cfg.batch_seqs, cfg.seed):
        seen, step = run_batch(batch_items, head, optimizer, schedule, accelerator, t2d, cfg, cols, seen, step, state, bar)
        if step % cfg.checkpoint_every == 0 and step > state["step"]:
            save_checkpoint(ckpt, accelerator.unwrap_model(head), optimizer, {"step": step, "seen": seen})
    bar.close()
    head = accelerator.unwrap_model(head)
    top1 = heldout_top1(head, held, t2d, cfg, cols)
    save_head(head, out_dir)
    record = {"draft_kind": cfg.kind, "layers": cfg.layers, "fusion": cfg.fusion, "draft_vocab": cfg.draft_vocab,
              "tokens": cfg.tokens, "ttt_steps": cfg.ttt_steps, "seed": cfg.seed,
              "wall_s": round(time.time() - start, 1), "final_loss": state.get("loss"),
              "heldout_top1": round(top1, 4), "unique_tokens": unique, "max_positions": cfg.max_len,
              "prompt_weight": cfg.prompt_weight, "precision": cfg.precision, "batching": "length-grouped",
              "labels": cfg.labels, "name": out_dir.name}
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def lr_lambda(cfg: TrainConfig, seqs: list[dict]):
    """Linear warm-up over the first 5% of steps, then linear decay to 10%."""
    mean_len = sum(loss_positions(window(s, cfg.max_len)) for s in seqs) / len(seqs)
    n_steps = max(1, math.ceil(cfg.tokens / (cfg.batch_seqs * mean_len)))
    return lambda s: warmup_decay(s, n_steps)


def warmup_decay(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of `total` steps, then linear decay to 10%."""
    total = max(1, total)
    warm = max(1, total // 20)
    return min(1.0, (step + 1) / warm) * max(0.1, 1 - step / total)


def run_batch(items, head, optimizer, schedule, accelerator, t2d, cfg, cols, seen, step, state, bar):
    positions = sum(loss_positions(x) for x in items)
    if seen + positions <= state["seen"]:  # resuming: skip what the checkpoint already saw
        return seen + positions, step + 1
    batch = collate(items, cols, last_columns(cols), prompt_weight=cfg.prompt_weight)
    # torch's autocast, not Accelerate's: Accelerate fixes one precision per process
    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss, acc = head_loss(accelerator.unwrap_model(head), batch, t2d, cfg)
    optimizer.zero_grad()
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(head.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    state["loss"] = round(loss.item(), 4)
    bar.update(positions)
    bar.set_postfix(loss=f"{state['loss']:.3f}", top1=f"{acc:.2f}")
    return seen + positions, step + 1


LOG_ONLY = ("unique_tokens", "max_positions", "prompt_weight", "precision", "batching", "labels", "name")


def training_row(record: dict) -> dict:
    """A training record as a row of the store's trainings table: figures kept in
    training.json only are dropped; `path` holds the draft's name, never a machine path."""
    row = {k: v for k, v in record.items() if k not in LOG_ONLY}
    row["path"] = record.get("name") or Path(str(record.get("path", ""))).name
    return row
