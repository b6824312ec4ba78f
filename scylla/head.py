"""Scylla draft heads: EAGLE-style feature-level drafts, read top to bottom.

The draft reads the target's hidden features at position t plus the (frozen, target)
embedding of token t+1, fuses them with a linear layer, runs N Llama decoder layers,
and predicts the feature at t+1 and the token at t+2. Features come from the last
layer (EAGLE-1/2 style) or from a low, a middle and a high layer (EAGLE-3 style);
the head is the target's frozen lm_head or a reduced vocabulary mapped back.

Two architectures (HeadConfig.arch): "eagle" (EAGLE-1/2's input: `fc` over [fused features,
token embedding] into standard Llama layers) and "eagle3" (EAGLE-3's one decoder layer, whose
q/k/v read the normalised embedding and fused features side by side: scylla/eagle3.py), which
exports to the layout vLLM and SGLang serve and loads back from it.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel

from scylla import ScyllaError, one_line
from scylla import eagle3
from scylla.kernels import Linear, draft_linear_kind
from scylla.lean import KVCache, LeanStack
from scylla.proposals import Draft, DraftTree, logits_to_probs, sample

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class HeadConfig:
    target_name: str
    target_hidden: int
    target_vocab: int
    target_layers: int
    layers: int = 1
    fusion: str = "last"            # last | multi
    draft_vocab: int = 0            # 0: the target's full frozen lm_head
    heads: int = 9
    kv_heads: int = 3
    intermediate: int = 1536
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    ttt_steps: int = 1              # training-time test unroll (1 = teacher forcing only)
    tokens: int = 0                 # pretraining tokens seen (the paper's token volume)
    seed: int = 0
    kind: str = "scylla"
    max_positions: int = 384        # positions it was trained at (older drafts: the first 384)
    arch: str = "eagle"             # eagle | eagle3 (see the module docstring)
    extra: dict = field(default_factory=dict)

    @property
    def feature_layers(self) -> list[int]:
        """Indices into the target's hidden_states tuple (0 = embeddings)."""
        if "feature_layers" in self.extra:  # an imported EAGLE-3 draft trained on other layers
            return list(self.extra["feature_layers"])
        n = self.target_layers
        if self.fusion == "multi":
            return [2, n // 2, n - 3]
        return [n]  # hidden_states[-1]: the last layer after the final norm


ARCHS = ("eagle", "eagle3")


def check_arch(cfg) -> None:
    """EAGLE-3's layout fixes one layer, three fused features and an own lm_head."""
    if cfg.arch not in ARCHS:
        raise ScyllaError(f"unknown draft arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.arch == "eagle3" and (cfg.layers != 1 or cfg.fusion != "multi" or not cfg.draft_vocab):
        raise ScyllaError(f"the eagle3 arch has one layer, multi fusion and a draft vocabulary "
                          f"(got layers {cfg.layers}, fusion {cfg.fusion}, draft_vocab {cfg.draft_vocab})")


def llama_body(cfg: HeadConfig) -> LlamaModel:
    body_cfg = LlamaConfig(hidden_size=cfg.target_hidden, intermediate_size=cfg.intermediate,
                           num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                           num_key_value_heads=cfg.kv_heads, vocab_size=1,
                           rms_norm_eps=cfg.rms_eps,
                           rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
                           max_position_embeddings=8192, bos_token_id=None,
                           eos_token_id=None, pad_token_id=None)
    return LlamaModel(body_cfg)


class FeatureHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        check_arch(cfg)
        self.cfg = cfg
        h = cfg.target_hidden
        n_feat = len(cfg.feature_layers)
        self.fuse = nn.Linear(n_feat * h, h, bias=False) if n_feat > 1 else nn.Identity()
        if cfg.arch == "eagle3":
            self.fc = None  # the fused features and the embedding meet inside the layer
            self.body = eagle3.Eagle3Body(h, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.rms_eps,
                                          cfg.rope_theta)
        else:  # module order kept: a seed gives the same initial weights as before
            self.fc = nn.Linear(2 * h, h, bias=False)
            self.body = llama_body(cfg)
        self.head = nn.Linear(h, cfg.draft_vocab, bias=False) if cfg.draft_vocab else None
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab or 1), persistent=True)
        # frozen target pieces, attached (not saved) by attach_target
        self.embed: nn.Module | None = None
        self.lm_head: nn.Module | None = None

    def attach_target(self, target_model) -> None:
        object.__setattr__(self, "embed", target_model.get_input_embeddings())
        object.__setattr__(self, "lm_head", target_model.get_output_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype if self.head is not None else self.fc.weight.dtype

    def step_inputs(self, features: torch.Tensor, tokens: torch.Tensor, fused: bool) -> torch.Tensor:
        """features [B, T, nF*H] (or already fused [B, T, H]), tokens [B, T] -> [B, T, H]
        (eagle3: [B, T, 2H], the fused features beside the embedding)."""
        g = features if fused else self.fuse(features)
        both = torch.cat([g, self.embed(tokens).to(g.dtype)], dim=-1)
        return both if self.fc is None else self.fc(both)

    def forward(self, inputs: torch.Tensor, cache=None, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The head's state: eagle: after the final norm; eagle3: before it (what is fed back)."""
        if self.cfg.arch == "eagle3":
            return self.body(inputs, attention_mask)
        out = self.body(inputs_embeds=inputs, cache=cache, use_cache=cache is not None,
                        attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the full target vocabulary when draft_vocab=0)."""
        if self.cfg.arch == "eagle3":
            hidden = self.body.norm(hidden)
        return self.head(hidden) if self.head is not None else self.lm_head(hidden)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.d2t[draft_ids] if self.head is not None else draft_ids

    @torch.no_grad()
    def target_probs(self, last: torch.Tensor) -> torch.Tensor:
        """The target's next-token distribution from its own normed last hidden state, over
        the draft vocabulary and renormalised there: EAGLE-3's soft training labels."""
        rows = self.lm_head.weight if self.head is None else self.lm_head.weight[self.d2t]
        return torch.softmax(last @ rows.to(last.dtype).T, dim=-1)

    def full_vocab_probs(self, probs: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.cfg.target_vocab)
        return out.index_copy_(-1, self.d2t, probs)

    def init_from_target(self, target_model) -> None:
        """Start each draft layer from the target's last layer (same shapes): a warm start."""
        if self.cfg.arch == "eagle3":
            self.body.midlayer.init_from(target_model.model.layers[-1])
            self.body.norm.load_state_dict(target_model.model.norm.state_dict())
            return
        last = target_model.model.layers[-1].state_dict()
        for layer in self.body.layers:
            layer.load_state_dict(last)
        self.body.norm.load_state_dict(target_model.model.norm.state_dict())


# ---------------------------------------------------------------- save / load

def save_head(head: FeatureHead, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(asdict(head.cfg), indent=2))


def read_config(folder: Path) -> HeadConfig:
    path = Path(folder) / CONFIG
    try:
        raw = json.loads(path.read_text())
        return HeadConfig(**raw)
    except FileNotFoundError:
        raise ScyllaError(f"{folder}: no {CONFIG}; not a saved draft") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ScyllaError(f"{path}: corrupt draft config ({exc})") from None


def check_matches_target(cfg: HeadConfig, target_model) -> None:
    tc = target_model.config
    have = (tc.hidden_size, tc.vocab_size, tc.num_hidden_layers)
    want = (cfg.target_hidden, cfg.target_vocab, cfg.target_layers)
    if have != want:
        raise ScyllaError(f"draft was trained for {cfg.target_name} (hidden, vocab, layers) = {want}; "
                          f"this target has {have}")


def load_head(folder: Path, target_model) -> FeatureHead:
    """A saved draft, or an EAGLE-3 folder (exported here or trained elsewhere for this target)."""
    if eagle3.is_layout_folder(folder):
        return load_eagle3_head(folder, target_model)
    cfg = read_config(folder)
    check_matches_target(cfg, target_model)
    head = FeatureHead(cfg)
    load_weights(head, folder, lambda state: state)
    return attached(head, target_model)


def load_weights(head: FeatureHead, folder: Path, mapping) -> None:
    """safetensors only (nothing is unpickled); `mapping` turns the file's names into the head's."""
    try:
        state = mapping(load_file(str(Path(folder) / WEIGHTS)))
        head.load_state_dict(state)
    except FileNotFoundError:
        raise ScyllaError(f"{folder}: no {WEIGHTS} (weights load from safetensors only)") from None
    except ScyllaError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ScyllaError(f"{folder}/{WEIGHTS}: corrupt or mismatched weights ({gist(exc)})") from None


gist = one_line   # the name this module's messages use


def attached(head: FeatureHead, target_model) -> FeatureHead:
    head.attach_target(target_model)
    ref = target_model.get_input_embeddings().weight
    return head.to(device=ref.device, dtype=ref.dtype).eval()


def export_head(src: Path, dst: Path) -> None:
    """Copy a trained draft in float16 (half the bytes; loading casts back to the target dtype)."""
    cfg, state = read_draft_state(src)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(half, str(dst / WEIGHTS))
    (dst / CONFIG).write_text(json.dumps(asdict(cfg), indent=2))
    for extra in ("training.json",):
        if (Path(src) / extra).is_file():
            (dst / extra).write_text((Path(src) / extra).read_text())


def load_eagle3_head(folder: Path, target_model) -> FeatureHead:
    """An EAGLE-3 folder (vLLM/SGLang layout) as an eagle3-arch head on this target."""
    where = str(folder)
    raw = eagle3.read_layout_config(folder)
    cfg = HeadConfig(**eagle3.head_fields(raw, target_model.config, where))
    check_matches_target(cfg, target_model)
    head = FeatureHead(cfg)
    load_weights(head, folder, lambda tensors: eagle3.from_layout(tensors, cfg.draft_vocab, where))
    if int(head.d2t.min()) < 0 or int(head.d2t.max()) >= cfg.target_vocab:
        raise ScyllaError(f"{folder}: d2t maps draft ids outside the target vocabulary")
    if int(head.d2t.unique().numel()) < int(head.d2t.numel()):   # index_copy would keep one, drop the other's mass
        raise ScyllaError(f"{folder}: d2t maps two draft ids to one target id")
    return attached(head, target_model)


def read_draft_state(src: Path) -> tuple[HeadConfig, dict]:
    """A saved draft's config and tensors (no target needed)."""
    cfg = read_config(src)
    try:
        return cfg, load_file(str(Path(src) / WEIGHTS))
    except FileNotFoundError:
        raise ScyllaError(f"{src}: no {WEIGHTS}") from None
    except Exception as exc:
        raise ScyllaError(f"{src}/{WEIGHTS}: corrupt weights ({gist(exc)})") from None


def export_eagle3(src: Path, out: Path, force: bool = False) -> Path:
    """Write an eagle3-arch draft in the EAGLE-3 layout vLLM and SGLang load (weights keep
    their dtype, so loading back here decodes exactly as the source)."""
    src, out = Path(src), Path(out)
    if eagle3.is_layout_folder(src):
        raise ScyllaError(f"{src} is already in the EAGLE-3 layout; serve or load it as it is")
    cfg, state = read_draft_state(src)
    if cfg.arch != "eagle3":
        raise ScyllaError(f"{src}: draft {cfg.kind!r} has the {cfg.arch!r} architecture (fc over [features, "
                          "embedding] into Llama layers), not EAGLE-3's; only an eagle3-arch draft exports")
    check_arch(cfg)
    check_empty_output(out, force)
    tensors = eagle3.to_layout(state, cfg.target_vocab)
    config = eagle3.layout_config(
        hidden=cfg.target_hidden, heads=cfg.heads, kv_heads=cfg.kv_heads, intermediate=cfg.intermediate,
        rms_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, target_vocab=cfg.target_vocab,
        draft_vocab=cfg.draft_vocab, feature_layers=cfg.feature_layers, dtype=tensors["fc.weight"].dtype,
        scylla={"target_name": cfg.target_name, "target_layers": cfg.target_layers, "kind": cfg.kind,
                "tokens": cfg.tokens, "ttt_steps": cfg.ttt_steps, "seed": cfg.seed,
                "max_positions": cfg.max_positions})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / eagle3.WEIGHTS), metadata={"format": "pt"})
    (out / eagle3.CONFIG).write_text(json.dumps(config, indent=2))
    return out


def check_empty_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ScyllaError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ScyllaError(f"{out} exists and is not empty; pass --force to write into it")


def shipped_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "drafts"


def named_draft_dir(name: str) -> Path:
    from scylla.models import cache_root

    for root in (shipped_dir(), cache_root() / "drafts"):
        if (root / name / CONFIG).is_file():
            return root / name
    raise ScyllaError(f"draft {name!r} is not shipped or trained yet; train it with "
                      f"`scylla train-draft --name {name}` or use --draft ngram")


def load_head_draft(folder: Path, target, name: str) -> "HeadDraft":
    return HeadDraft(load_head(folder, target.model), name)


# ---------------------------------------------------------------- the draft at decode time

class LeanHead:
    """A trained FeatureHead's weights as the lean forward's fused, prepacked pieces: the
    head runs once per drafted token, so its per-call overhead is what decides its cost."""

    def __init__(self, head: FeatureHead):
        weight = head.head.weight if head.head is not None else head.fc.weight
        kind = draft_linear_kind(weight.device, weight.dtype)
        self.fuse = Linear(head.fuse.weight, kind) if isinstance(head.fuse, nn.Linear) else None
        if head.cfg.arch == "eagle3":
            self.fc = None
            self.stack = eagle3.LeanMidlayer(head.body, kind, weight.device)
            self.final_norm = self.stack.final_norm  # eagle3 states are fed back before the norm
        else:
            self.fc = Linear(head.fc.weight, kind)
            self.stack = LeanStack(head.body.layers, head.body.norm, head.body.config, kind, weight.device)
            self.final_norm = None
        self.out = Linear(head.head.weight if head.head is not None else head.lm_head.weight, kind)
        self.embed = head.embed.weight.detach()
        self.d2t = head.d2t if head.head is not None else None
        self.target_vocab = head.cfg.target_vocab

    def new_cache(self, capacity: int = 512) -> KVCache:
        return self.stack.new_cache(1, capacity, self.embed.dtype)

    def step_inputs(self, features: torch.Tensor, tokens: torch.Tensor, fused: bool) -> torch.Tensor:
        """features [n, nF*H] (or already fused [n, H]), tokens [n] -> [n, H] (eagle3: [n, 2H])."""
        g = features if fused or self.fuse is None else self.fuse(features)
        both = torch.cat([g, self.embed[tokens].to(g.dtype)], -1)
        return both if self.fc is None else self.fc(both)

    def run(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, allowed=None) -> torch.Tensor:
        """x [n, H] (eagle3: [n, 2H]) at positions [n], written at the cache's length (which it then
        includes). The state: eagle after the final norm, eagle3 before it."""
        if allowed is None and x.shape[0] > 1:
            allowed = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
            allowed = torch.cat([torch.ones(x.shape[0], cache.length(), dtype=torch.bool), allowed], -1)[None, None]
        if allowed is not None:
            allowed = allowed.to(x.device)   # masks are built on the CPU
        out, _ = self.stack.run(x[None], cache, positions[None].to(x.device), allowed)
        cache.set_length(0, cache.length() + x.shape[0])
        return out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.out(hidden).float()

    def to_target_ids(self, draft_ids):
        return self.d2t[draft_ids] if self.d2t is not None else draft_ids

    def full_vocab_probs(self, probs: torch.Tensor) -> torch.Tensor:
        if self.d2t is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.target_vocab)
        return out.index_copy_(-1, self.d2t, probs)


class DraftPositionWarning(UserWarning):
    """Decoding past the positions a draft was trained at."""


class HeadDraft(Draft):
    def __init__(self, head: FeatureHead, name: str):
        self.head, self.name = head, name
        self.lean = LeanHead(head)
        self.feature_layers = tuple(head.cfg.feature_layers)
        self.reset()

    def reset(self):
        self.cache = self.lean.new_cache()
        self.features: torch.Tensor | None = None   # [L, nF*H] real target features
        self.n_real = 0                              # draft cache entries built from real features
        self.root: torch.Tensor | None = None        # the head's state at the last real position
        self.warned = False

    def observe(self, tokens, features):
        self.features = features if self.features is None else torch.cat([self.features, features])
        self.warn_past_trained_positions(self.features.shape[0])

    def warn_past_trained_positions(self, position: int) -> None:
        """Once per sequence: a draft decoding past the positions it was trained at is guessing."""
        limit = self.head.cfg.max_positions
        if position > limit and not self.warned:
            self.warned = True
            warnings.warn(f"draft {self.name!r} was trained on positions < {limit}; decoding at {position} "
                          f"(its acceptance may drop)", DraftPositionWarning, stacklevel=2)

    def catch_up(self, context) -> torch.Tensor:
        """Drop last step's draft slots, feed the new real features; the state at the root [H].
        Slot j pairs the target's feature at position j with the token at j + 1."""
        lean = self.lean
        self.cache.set_length(0, self.n_real)
        n_feat = self.features.shape[0]
        if n_feat > self.n_real:   # nothing new when asked twice at one context
            new_toks = torch.tensor(context[self.n_real + 1:n_feat + 1], dtype=torch.long)
            x = lean.step_inputs(self.features[self.n_real:n_feat], new_toks, fused=False)
            self.root = lean.run(x, self.cache, torch.arange(self.n_real, n_feat))[-1]
            self.n_real = n_feat
        return self.root

    @torch.inference_mode()
    def propose(self, context, k, temperature, top_p, generator):
        drafted, rows, _ = self.draft_chain(context, k, temperature, top_p, generator)
        q = self.lean.full_vocab_probs(torch.stack(rows)) if temperature > 0 else None
        return drafted, q

    @torch.inference_mode()
    def propose_chain(self, context, k, temperature, top_p, generator) -> DraftTree:
        drafted, rows, confidence = self.draft_chain(context, k, temperature, top_p, generator)
        q = self.lean.full_vocab_probs(torch.stack(rows)) if temperature > 0 else None
        return DraftTree.chain(drafted, q, confidence)

    def draft_chain(self, context, k, temperature, top_p, generator):
        """k tokens, each draft's sampling rows, and its own (untempered) confidence."""
        lean = self.lean
        hidden = self.catch_up(context)
        drafted, rows, confidence = [], [], []
        for j in range(k):
            logits = lean.logits(hidden)
            if temperature > 0:   # greedy drafts carry no q, so no sampling rows
                rows.append(logits_to_probs(logits[None], temperature, top_p)[0])
                pick = sample(rows[-1], generator)
            else:
                pick = int(logits.argmax())
            tok = int(lean.to_target_ids(torch.tensor(pick)))
            drafted.append(tok)
            confidence.append(float(torch.softmax(logits, -1)[pick]))
            if j + 1 < k:
                x = lean.step_inputs(hidden[None], torch.tensor([tok]), fused=True)
                hidden = lean.run(x, self.cache, torch.tensor([self.cache.length()]))[-1]
        return drafted, rows, confidence

    @torch.inference_mode()
    def propose_tree(self, context, shape, temperature, top_p, generator) -> DraftTree:
        """EAGLE-2 dynamic tree: per level, expand the `topk` best new nodes (by cumulative
        draft log-prob) into their `topk` best children, all in one head forward with a tree
        mask; finally keep the `total` best nodes (an ancestor-closed set)."""
        grow = TreeGrowth(self.lean)
        grow.add_children([-1], self.catch_up(context)[None], shape.topk)
        for _ in range(shape.depth - 1):
            expand = grow.best_new(shape.topk)
            hidden = self.feed_nodes(grow, expand)
            grow.frontier = []
            grow.add_children(expand, hidden, shape.topk)
        return grow.tree(shape.total)

    def feed_nodes(self, grow: "TreeGrowth", nodes: list[int]) -> torch.Tensor:
        """Run the head on `nodes` (each sees the real context and its own fed ancestors)."""
        past = self.cache.length()
        parents = torch.stack([grow.state_of_parent[n] for n in nodes])
        toks = torch.tensor([grow.tokens[n] for n in nodes])
        allowed = torch.zeros(len(nodes), past + len(nodes), dtype=torch.bool)
        allowed[:, :self.n_real] = True
        for j, n in enumerate(nodes):
            allowed[j, past + j] = True
            a = grow.parents[n]
            while a >= 0:
                allowed[j, grow.slot[a]] = True
                a = grow.parents[a]
            grow.slot[n] = past + j
        positions = torch.tensor([self.n_real + grow.depths[n] - 1 for n in nodes])
        x = self.lean.step_inputs(parents, toks, fused=True)
        return self.lean.run(x, self.cache, positions, allowed[None, None])


class TreeGrowth:
    """The nodes a dynamic tree has grown so far, with their cumulative log-probs."""

    def __init__(self, lean: "LeanHead"):
        self.lean = lean
        self.tokens, self.parents, self.depths, self.scores, self.conf = [], [], [], [], []
        self.state_of_parent: list[torch.Tensor] = []  # the head state that predicted the node
        self.slot: dict[int, int] = {}                  # draft-cache slot of a fed node
        self.frontier: list[int] = []

    def add_children(self, nodes: list[int], states: torch.Tensor, topk: int) -> None:
        """The `topk` best children of each node (-1: the root), from its state [n, H]; one
        batched head projection for the whole level, because per-node calls cost more than
        the matmul itself on a CPU."""
        logp = torch.log_softmax(self.lean.logits(states), -1)
        best = logp.topk(min(topk, logp.shape[-1]), dim=-1)
        ids = self.lean.to_target_ids(best.indices).tolist()
        for j, (node, values) in enumerate(zip(nodes, best.values.tolist())):
            base = self.scores[node] if node >= 0 else 0.0
            for lp, tok in zip(values, ids[j]):
                self.tokens.append(int(tok))
                self.parents.append(node)
                self.depths.append(1 if node < 0 else self.depths[node] + 1)
                self.scores.append(base + lp)
                self.conf.append(math.exp(lp))
                self.state_of_parent.append(states[j])
                self.frontier.append(len(self.tokens) - 1)

    def best_new(self, topk: int) -> list[int]:
        return sorted(self.frontier, key=lambda n: -self.scores[n])[:topk]

    def tree(self, total: int) -> DraftTree:
        keep = set(sorted(range(len(self.tokens)), key=lambda n: -self.scores[n])[:total])
        # a child never outscores its parent (log-probs <= 0), but ties could break the closure
        keep = {n for n in keep if all(a in keep for a in self.ancestors(n))}
        order = sorted(keep)  # creation order: parents before children
        new_index = {n: i for i, n in enumerate(order)}
        return DraftTree([self.tokens[n] for n in order],
                         [new_index[self.parents[n]] if self.parents[n] >= 0 else -1 for n in order],
                         confidence=[self.conf[n] for n in order])

    def ancestors(self, node: int) -> list[int]:
        out, a = [], self.parents[node]
        while a >= 0:
            out.append(a)
            a = self.parents[a]
        return out
