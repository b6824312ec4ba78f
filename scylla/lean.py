"""The target's forward without transformers' per-module overhead (gpt-fast's model.py in spirit).

Built from a loaded transformers Llama (no new weight files): fused QKV and gate/up
projections, RMSNorm and RoPE as plain tensor ops, a preallocated KV cache whose rollback
sets a length, tree attention from a block mask and per-node positions, ragged batches,
and the hidden states of chosen layers. On CPU the linears are prepacked for oneDNN, which
makes a 5-token forward cost about what a 1-token one does; elsewhere they run as F.linear.

`HFForward` runs the transformers model itself behind the same interface: the reference
path (`--backend hf`) that the tests hold the lean path equal to. Nothing here knows about
drafting; the engine and the drafts use `forward`, `KVCache.keep` and `KVCache.set_length`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scylla import ScyllaError
from scylla.kernels import BlockEmbedding, Int4Linear, Linear, linear_kind
from scylla.options import BACKENDS
from scylla.q4 import GGUFWeights, concat_rows



# ---------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values, [layers] x [rows, kv_heads, capacity, head_dim].

    Row b holds `lengths[b]` real slots, in order, at 0..lengths[b]-1 (slot = position).
    A forward writes its block at lengths[b].. and leaves the length alone; the caller then
    keeps what it accepted with `keep` (a path through a tree: a few slot copies) or
    `set_length` (rollback)."""

    def __init__(self, n_layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype=torch.float32, device="cpu"):
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.capacity = capacity
        self.single = rows == 1   # made for one row: stays so when rows are selected (lean.compiles)
        self.marked = False       # sizes marked for torch.compile (only a compiled stack's caches)

    def mark_static_dims(self) -> None:
        """For torch.compile (LeanStack.compile): a cache varies in capacity only, never in
        heads or head size, so those stay constants and no width is mistaken for them."""
        self.marked = True
        for t in self.keys + self.values:
            torch._dynamo.mark_static(t, 1)
            torch._dynamo.mark_static(t, 3)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def length(self, row: int = 0) -> int:
        return int(self.lengths[row])

    def set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length

    def keep(self, row: int, block_slots: list[int]) -> None:
        """Keep these slots of the block just written (relative to the row's length, in
        increasing order, 0 = the block's first token) and append them to the row."""
        base = int(self.lengths[row])
        if block_slots != list(range(len(block_slots))):
            src = torch.tensor([base + s for s in block_slots], device=self.keys[0].device)
            dst = slice(base, base + len(block_slots))
            for keys, values in zip(self.keys, self.values):
                keys[row, :, dst] = keys[row, :, src]
                values[row, :, dst] = values[row, :, src]
        self.lengths[row] = base + len(block_slots)

    def select_rows(self, rows: list[int]) -> None:
        """Keep only these rows (finished rows stop costing compute)."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = self.lengths[torch.tensor(rows, dtype=torch.long)]

    def clone(self) -> "KVCache":
        twin = object.__new__(KVCache)
        twin.keys = [k.clone() for k in self.keys]
        twin.values = [v.clone() for v in self.values]
        twin.lengths, twin.capacity, twin.single = self.lengths.clone(), self.capacity, self.single
        twin.marked = False
        if self.marked:
            twin.mark_static_dims()
        return twin

    def reserve(self, capacity: int) -> None:
        """Grow (by copying into larger buffers) so that `capacity` slots fit."""
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        self.keys = [grown(k, capacity) for k in self.keys]
        self.values = [grown(v, capacity) for v in self.values]
        if self.marked:
            self.mark_static_dims()
        self.capacity = capacity

    def check_room(self, width: int) -> None:
        self.reserve(int(self.lengths.max()) + width)


def grown(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    out = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[-1])
    out[:, :, :buffer.shape[2]] = buffer
    return out


# ---------------------------------------------------------------- masks and positions

def causal_block(rows: int, width: int) -> torch.Tensor:
    return torch.ones(width, width, dtype=torch.bool).tril()[None].expand(rows, -1, -1)


def attention_allowed(lengths: torch.Tensor, block: torch.Tensor, span: int) -> torch.Tensor:
    """Bool [B, 1, W, span]: row b's query i sees its past slots (< lengths[b]) and the
    block slots lengths[b] + j that block[b, i, j] allows."""
    rows, width, _ = block.shape
    col = torch.arange(span)[None]                       # [1, span]
    rel = col - lengths[:, None]                         # slot's offset into the block
    in_block = (rel >= 0) & (rel < width)
    picked = block.gather(2, rel.clamp(0, width - 1)[:, None, :].expand(rows, width, span))
    allowed = (rel < 0)[:, None, :] | (in_block[:, None, :] & picked)
    return allowed[:, None]


def rope_table(head_dim: int, theta: float, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with rotate-half's sign folded in (its first half negated), for apply_rope_signed."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rope in three ops instead of seven (same numbers: only where a sign sits moves)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def rope_theta_of(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta or getattr(config, "rope_theta", None) or 10000.0
    if isinstance(params, dict) and params.get("rope_type", "default") not in ("default", None):
        raise ScyllaError(f"lean forward supports default RoPE only, not {params.get('rope_type')!r}")
    return float(theta)


# ---------------------------------------------------------------- the stack

@dataclass
class LayerWeights:
    """One decoder layer as the lean forward runs it: fused projections and two norms."""

    qkv: object
    o: object
    gate_up: object
    down: object
    n1: torch.Tensor
    n2: torch.Tensor
    act: torch.dtype = torch.float32   # what the linears take: bf16 for the int4 kernel
    wide: bool = False                 # bf16 copies for a prompt's forward (Int4Linear.wide)

    @classmethod
    def from_module(cls, layer, kind: str) -> "LayerWeights":
        a, m = layer.self_attn, layer.mlp
        if any(getattr(p, "bias", None) is not None for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
            raise ScyllaError("lean forward supports bias-free Llama attention only; use --backend hf")
        return cls(qkv=Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), kind),
                   o=Linear(a.o_proj.weight, kind),
                   gate_up=Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), kind),
                   down=Linear(m.down_proj.weight, kind),
                   n1=layer.input_layernorm.weight.detach(),
                   n2=layer.post_attention_layernorm.weight.detach(), act=a.q_proj.weight.dtype)

    @classmethod
    def from_blocks(cls, b: dict) -> "LayerWeights":
        """From a GGUF layer's own blocks (scylla.q4), run by the int4 kernel."""
        qkv = Int4Linear(concat_rows([b["q"], b["k"], b["v"]]), wide=True)
        return cls(qkv=qkv, o=Int4Linear(b["o"], wide=True), gate_up=Int4Linear(concat_rows([b["gate"], b["up"]]), wide=True),
                   down=Int4Linear(b["down"], wide=True), n1=b["n1"], n2=b["n2"], act=torch.bfloat16,
                   wide=qkv.wide is not None)


class LeanStack:
    """Llama decoder layers plus the final norm, as fused and prepacked weights."""

    def __init__(self, layers, norm, config, kind: str, device):
        """layers: transformers decoder layers, or LayerWeights already built (shared)."""
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.gqa = bool(self.heads != self.kv_heads)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.eps = config.rms_norm_eps
        self.theta = rope_theta_of(config)
        self.layers = [layer if isinstance(layer, LayerWeights) else LayerWeights.from_module(layer, kind)
                       for layer in layers]
        self.norm = norm if isinstance(norm, torch.Tensor) else norm.weight.detach()
        self.device = device
        self.cos = self.sin = self.sin_signed = torch.empty(0)
        self.compiled_layers = None

    def new_cache(self, rows: int, capacity: int, dtype=torch.float32) -> KVCache:
        self.ensure_rope(capacity, rope_dtype(dtype, self.norm.dtype))
        cache = KVCache(len(self.layers), rows, self.kv_heads, self.head_dim, capacity, dtype, self.device)
        if self.compiled_layers is not None:   # marking imports torch._dynamo (about 1 s): compiled stacks only
            cache.mark_static_dims()
        return cache

    def ensure_rope(self, capacity: int, dtype) -> None:
        """RoPE tables in the dtype that q and k rotate in (rope_dtype)."""
        if self.cos.shape[0] < capacity or self.cos.dtype != dtype:
            cos, sin = rope_table(self.head_dim, self.theta, max(capacity, 256, self.cos.shape[0]), self.device)
            self.cos, self.sin = cos.to(dtype), sin.to(dtype)
            self.sin_signed = signed_sin(self.sin)

    def run(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, allowed: torch.Tensor | None,
            keep_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """x [B, W, H] at `positions` [B, W]; writes K/V at each row's length onward.
        Returns the normed output [B, W, H] and {i: hidden after layer i} for keep_layers
        (transformers' hidden_states numbering: 0 = the input, len(layers) = after the norm)."""
        rows, width, _ = x.shape
        cache.check_room(width)
        self.ensure_rope(int(positions.max()) + 1, rope_dtype(cache.keys[0].dtype, x.dtype))
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]   # [B, 1, W, D]
        at = cache_slots(cache, width, x.device)
        span = int(cache.lengths.max()) + width
        layers = self.compiled_layers if self.compiles(cache, at, allowed) else self.run_layers
        out, hidden = layers(x.reshape(rows * width, self.hidden), cache.keys, cache.values, at, cos, sin, span, allowed)
        kept = {i: x if i == 0 else hidden[i - 1].view(rows, width, self.hidden) for i in keep_layers}
        return out.view(rows, width, self.hidden), kept

    def run_layers(self, flat, keys, values, at, cos, sin, span, allowed):
        """The layers and the final norm: (normed output, [hidden after each layer]); the
        last entry is the normed output, as in transformers' numbering."""
        hidden = []
        for i, p in enumerate(self.layers):
            flat = self.layer(flat, p, keys[i], values[i], at, cos, sin, span, allowed)
            hidden.append(flat)
        hidden[-1] = torch.rms_norm(flat, (self.hidden,), self.norm, self.eps)
        return hidden[-1], hidden

    def compile(self) -> None:
        """Run one-row forwards past the prompt through torch.compile (inductor's C++): the
        per-op dispatch of about 25 small ops per layer is most of a q4 step otherwise.
        One compiled graph serves width 1 and one every wider block (dynamic shapes), and
        the tests hold a block's rows bitwise equal to the same tokens decoded one by one."""
        for t in [self.norm] + [t for p in self.layers for t in weight_tensors(p)]:
            torch._dynamo.mark_static(t)   # the weights' sizes are constants; widths and lengths vary
        self.compiled_layers = torch.compile(self.run_layers, dynamic=True)

    def compiles(self, cache: KVCache, at: "CacheSlots", allowed) -> bool:
        """Compiled for caches made for one row (so a batch never switches path halfway),
        past the prompt (a prefill runs the wide kernels), with a length of 2 or more
        (torch.compile specialises sizes 0 and 1)."""
        return (self.compiled_layers is not None and cache.single and at.start is not None
                and at.start >= 2 and not isinstance(allowed, str))

    def attend(self, q, keys, values, span, allowed):
        """SDPA over the cache in the cache's dtype: float64 for the q4 target. A token's
        output must be bitwise the same whether it is decoded alone or verified in a block
        (a chain, or a tree whose node sits after masked siblings): its sums over the cache
        then run in another order, and the q4 target's bf16 roundings would turn the
        last-bit difference into another token on about one prompt in five (measured).
        Summed in float64 and rounded once, order no longer shows.
        allowed: bool [B, 1, W, span] (None: every query sees the whole span)."""
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys[:, :, :span], values[:, :, :span],
                                              attn_mask=allowed, enable_gqa=self.gqa)

    def prefill_attend(self, q, keys, values, span, wide: bool):
        """A prompt over an empty cache: SDPA's causal kernel, in bf16 where the prompt's
        products already are (the q4 target's wide kernels)."""
        low = torch.bfloat16 if wide else q.dtype
        return F.scaled_dot_product_attention(q.to(low), keys[:, :, :span].to(low), values[:, :, :span].to(low),
                                              is_causal=True, enable_gqa=self.gqa)

    def layer(self, flat, p, keys, values, at, cos, sin, span, allowed):
        """One decoder layer. Linears take and return their kernel's dtype (bf16 for int4):
        the residual stream stays fp32 (a bf16 output added to it is promoted), q and k
        rotate in the cache's dtype, and no cast runs that a kernel does not need."""
        prefill = isinstance(allowed, str)   # a prompt over an empty cache: the wide kernels
        rows, width = at.rows, at.width
        qkv = p.qkv(torch.rms_norm(flat, (self.hidden,), p.n1, self.eps).to(p.act), prefill)
        qkv = qkv.view(rows, width, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        qk = apply_rope_signed(qkv[:, :self.heads + self.kv_heads].to(cos.dtype), cos, sin)   # q and k at once
        at.write(keys, qk[:, self.heads:])
        at.write(values, qkv[:, self.heads + self.kv_heads:])
        if prefill:
            o = self.prefill_attend(qk[:, :self.heads], keys, values, span, p.wide)
        else:
            o = self.attend(qk[:, :self.heads], keys, values, span, allowed)
        flat = flat + p.o(o.transpose(1, 2).reshape(rows * width, self.heads * self.head_dim).to(p.act), prefill)
        gate, up = p.gate_up(torch.rms_norm(flat, (self.hidden,), p.n2, self.eps).to(p.act), prefill).chunk(2, -1)
        return flat + p.down(F.silu(gate) * up, prefill)


def weight_tensors(p: LayerWeights) -> list[torch.Tensor]:
    """Every tensor a layer's forward reads (its kernels' packed weights and tables, its norms)."""
    out = [p.n1, p.n2]
    for lin in (p.qkv, p.o, p.gate_up, p.down):
        out += [t for t in (getattr(lin, "weight", None), getattr(lin, "table", None)) if isinstance(t, torch.Tensor)]
    return out


def rope_dtype(cache_dtype, x_dtype):
    """q and k rotate in the cache's dtype (float64 for q4), a half-precision stack in its own."""
    return x_dtype if x_dtype in (torch.float16, torch.bfloat16) else cache_dtype


@dataclass
class CacheSlots:
    """Where a block's keys and values go: one slice when every row starts at the same
    length (one row, or a prefill), else per-row slots."""

    rows: int
    width: int
    start: int | None
    slots: torch.Tensor | None

    def write(self, buffer: torch.Tensor, block: torch.Tensor) -> None:
        if self.start is not None:
            buffer[:, :, self.start:self.start + self.width] = block
        else:
            row_idx = torch.arange(self.rows, device=buffer.device)[:, None]
            buffer[row_idx, :, self.slots] = block.transpose(1, 2).to(buffer.dtype)


def cache_slots(cache: KVCache, width: int, device) -> CacheSlots:
    lengths = cache.lengths
    if bool((lengths == lengths[0]).all()):
        return CacheSlots(cache.rows, width, int(lengths[0]), None)
    return CacheSlots(cache.rows, width, None, (lengths[:, None] + torch.arange(width)[None]).to(device))


def block_positions(lengths: torch.Tensor, offsets: torch.Tensor | None, width: int) -> torch.Tensor:
    """Per-row positions of a block: length + offset (offset = depth in a tree, index in a chain)."""
    if offsets is None:
        offsets = torch.arange(width)[None].expand(lengths.shape[0], -1)
    return lengths[:, None] + offsets


CAUSAL = "causal"


def mask_for(cache: KVCache, block: torch.Tensor | None, width: int, device):
    """None where attending to the whole span is exact (one row, one token); CAUSAL for a
    causal block over an empty cache (a prefill: right padding only ever follows a row's real
    tokens, so real queries never see it), which lets SDPA skip the mask."""
    rows = cache.rows
    if block is None and rows == 1 and width == 1:
        return None
    if block is None and int(cache.lengths.max()) == 0:
        return CAUSAL
    if block is None:
        block = causal_block(rows, width)
    span = int(cache.lengths.max()) + width
    return attention_allowed(cache.lengths, block, span).to(device)


# ---------------------------------------------------------------- the target

def compile_wanted(device) -> bool:
    """The q4 target compiles its one-row forwards on CPU unless SCYLLA_COMPILE=0 (the tests
    set it: a cold process spends about 110 s compiling, about 30 s once inductor's cache is
    warm)."""
    return (str(device).startswith("cpu") and os.environ.get("SCYLLA_COMPILE", "1") != "0"
            and cxx_available())


def cxx_available() -> bool:
    """Inductor builds its CPU kernels with a C++ compiler; without one the forward stays eager."""
    import shutil

    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++"))


class LeanLM:
    """Embedding, LeanStack and the LM head of a loaded transformers Llama."""

    backend = "lean"

    def __init__(self, model, quant: str = "none", layers: int | None = None, gguf: GGUFWeights | None = None):
        """layers: run only the first `layers` decoder layers (a layer-skip draft).
        quant "q4": the linears, embedding and head from `gguf`, the file's own blocks."""
        check_llama_shaped(model)
        weight = model.get_input_embeddings().weight
        device = weight.device
        inner = model.model
        if quant == "q4":
            if gguf is None:
                raise ScyllaError("--quant q4 runs a GGUF's own blocks; this target has no GGUF file")
            self.kind = "int4"
            fused = [LayerWeights.from_blocks(b) for b in gguf.layers[:layers]]
            self.stack = LeanStack(fused, gguf.norm, model.config, self.kind, device)
            self.embed = BlockEmbedding(gguf.embed)
            self.head = Int4Linear(gguf.head)
            self.head_rows = self.embed if gguf.head is gguf.embed else BlockEmbedding(gguf.head)
            if compile_wanted(device):
                self.stack.compile()
        else:
            self.kind = linear_kind(device, quant, weight.dtype)
            self.stack = LeanStack(list(inner.layers)[:layers], inner.norm, model.config, self.kind, device)
            self.embed = weight.detach()
            self.head = Linear(model.get_output_embeddings().weight, self.kind)
        self.vocab = self.head.out_features
        self.n_layers = len(self.stack.layers)
        self.device = device
        if self.stack.compiled_layers is not None:
            self.warm_up()

    def first_layers(self, layers: int) -> "LeanLM":
        """The same weights (shared, not copied) with only the first `layers` decoder layers."""
        twin = object.__new__(LeanLM)
        twin.__dict__.update(self.__dict__)
        twin.stack = object.__new__(LeanStack)
        twin.stack.__dict__.update(self.stack.__dict__)
        twin.stack.layers = self.stack.layers[:layers]
        twin.stack.cos = twin.stack.sin = twin.stack.sin_signed = torch.empty(0)
        twin.stack.compiled_layers = None   # a layer-skip draft runs eagerly: no second compile
        twin.n_layers = layers
        return twin

    def warm_up(self) -> None:
        """Compile now, not in the first timed step: a token, then blocks of two and five."""
        cache = self.new_cache(1, 24)
        self.forward(torch.tensor([[1, 2, 3]]), cache)
        cache.keep(0, [0, 1, 2])
        for ids in ([[4]], [[5, 6]], [[7, 8, 9, 10, 11]]):
            self.forward(torch.tensor(ids), cache)
            cache.keep(0, [0])

    @property
    def kernels(self) -> str:
        text = {"packed": "lean forward, oneDNN-prepacked fp32 linears",
                "int8": "lean forward, PyTorch dynamic int8 linears (fbgemm)",
                "int4": "lean forward, the GGUF's Q4_1 blocks on PyTorch's int4 CPU kernel "
                        "(bf16 activations); Q8_0 embedding and head as two int4 halves",
                "fp32": "lean forward, fp32 F.linear"}[self.kind]
        return text + ("; one-row steps compiled (torch.compile)" if self.stack.compiled_layers is not None else "")

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        # q4: keys and values kept in float64 so that attention sums do not depend on their order
        dtype = torch.float64 if self.kind == "int4" else self.embed.dtype
        return self.stack.new_cache(rows, capacity, dtype)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, offsets: torch.Tensor | None = None,
                block: torch.Tensor | None = None, features: tuple[int, ...] = (),
                logits_at: torch.Tensor | None = None):
        """ids [B, W] written after each row's cached slots. offsets [B, W]: each token's
        position past the row's length (tree depth; default 0..W-1); block [B, W, W]: which
        block slots each token sees (default causal). logits_at [B, K]: block indices whose
        logits to compute (default all). Returns logits and the concatenated features of
        `features` layers [B, W, len(features) * H] (None when none are asked)."""
        rows, width = ids.shape
        features = tuple(i % (self.n_layers + 1) for i in features)  # -1: the last, as in transformers
        positions = block_positions(cache.lengths, offsets, width).to(self.device)
        allowed = mask_for(cache, block, width, self.device)
        x = self.embed[ids.to(self.device)]
        out, kept = self.stack.run(x, cache, positions, allowed, features)
        if logits_at is not None:
            out = out.gather(1, logits_at.to(self.device)[..., None].expand(-1, -1, out.shape[-1]))
        return self.logits(out.reshape(-1, out.shape[-1])).view(rows, -1, self.vocab), concat_features(kept, features)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on normed hidden states [..., H] -> [..., vocab]."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = self.head(flat)
        if self.kind == "int4":
            logits = refine_top(logits.float(), flat, self.head_rows)
        return logits.view(*hidden.shape[:-1], self.vocab)


TOP_MARGIN = 2 ** -5   # relative: far above the bf16 rounding of activations, scales and outputs


def refine_top(logits: torch.Tensor, hidden: torch.Tensor, head_rows) -> torch.Tensor:
    """The int4 kernel returns bf16 logits: 1/16 apart near 10, so the top two tie or swap
    on a last-bit change upstream and greedy decoding would follow noise. The logits within
    a margin of each row's best are recomputed in fp32 from the head's own blocks (a few
    rows of 576 products), so the argmax is decided at fp32 precision again."""
    top = logits.max(-1, keepdim=True).values
    near = (logits >= top - TOP_MARGIN * top.abs().clamp_min(1.0)).nonzero()
    rows, cols = near[:, 0], near[:, 1]
    logits[rows, cols] = (head_rows[cols] * hidden[rows]).sum(-1)
    return logits


def concat_features(kept: dict, features: tuple[int, ...]):
    if not features:
        return None
    return torch.cat([kept[i] for i in features], -1)


def check_llama_shaped(model) -> None:
    kind = getattr(model.config, "model_type", "")
    if kind not in ("llama", "mistral") or getattr(model.config, "sliding_window", None):
        raise ScyllaError(f"the lean forward covers Llama-shaped targets, not {kind!r}; use --backend hf")
    if getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False):
        raise ScyllaError("the lean forward covers bias-free Llama layers; use --backend hf")
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise ScyllaError("the lean forward covers SiLU MLPs only; use --backend hf")


# ---------------------------------------------------------------- the reference: transformers itself

class HFForward:
    """The transformers model behind LeanLM's interface and cache (slow; the reference)."""

    backend = "hf"
    kernels = "transformers forward"

    def __init__(self, model):
        self.model = model
        c = model.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.n_layers = c.num_hidden_layers
        self.vocab = c.vocab_size
        self.device = model.get_input_embeddings().weight.device

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        dtype = self.model.get_input_embeddings().weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32
        return KVCache(self.n_layers, rows, self.kv_heads, self.head_dim, capacity, dtype, self.device)

    @torch.inference_mode()
    def forward(self, ids, cache, offsets=None, block=None, features=(), logits_at=None):
        from transformers import DynamicCache

        rows, width = ids.shape
        cache.check_room(width)
        past = int(cache.lengths.max())
        dyn = DynamicCache()
        for i in range(self.n_layers):
            dyn.update(cache.keys[i][:, :, :past], cache.values[i][:, :, :past], i)
        if block is None:
            block = causal_block(rows, width)
        allowed = torch.cat([(torch.arange(past)[None] < cache.lengths[:, None])[:, None].expand(-1, width, -1),
                             block], -1)
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        positions = block_positions(cache.lengths, offsets, width)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask[:, None].to(self.device),
                         position_ids=positions.to(self.device), cache=dyn, use_cache=True,
                         output_hidden_states=bool(features))
        for i, layer in enumerate(dyn.layers):  # move the block's new slots to each row's length
            for b in range(rows):
                at = int(cache.lengths[b])
                cache.keys[i][b, :, at:at + width] = layer.keys[b, :, past:past + width]
                cache.values[i][b, :, at:at + width] = layer.values[b, :, past:past + width]
        logits = out.logits
        if logits_at is not None:
            logits = logits.gather(1, logits_at.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))
        feats = torch.cat([out.hidden_states[i] for i in features], -1) if features else None
        return logits.float(), feats


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ScyllaError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def make_forward(model, backend: str = "lean", quant: str = "none", gguf: GGUFWeights | None = None):
    """The forward the engine runs: lean where the target is Llama-shaped and unquantized
    by bitsandbytes, else transformers'."""
    check_backend(backend)
    if backend == "hf":
        return HFForward(model)
    return LeanLM(model, quant, gguf=gguf)
