"""The EAGLE-3 draft architecture and the file layout that vLLM and SGLang serve.

The architecture (one decoder layer): the target's low, middle and high features are fused
by `fc` (3H -> H); the layer normalises the token embedding (`input_layernorm`) and the
fused features (`hidden_norm`), feeds their concatenation [embedding, features] (2H) to
q/k/v, takes its residual from the fused features, then `post_attention_layernorm`, the MLP
and the final `norm` before a reduced-vocabulary `lm_head`. The state fed back for the next
drafted token is the layer's output *before* the final norm (as the engines do).

The layout (a folder): config.json with "architectures": ["LlamaForCausalLMEagle3"] and
model.safetensors with `midlayer.*`, `fc.weight`, `norm.weight`, `lm_head.weight`, `d2t`
(target id = draft id + d2t[draft id]) and `t2d` (bool over the target vocabulary); no
embedding: the engines take the target's. Layer ids are written twice: vLLM reads a
top-level `eagle_aux_hidden_state_layer_ids` (input-of-layer ids, which is transformers'
hidden_states numbering used here), SGLang `eagle_config.eagle_aux_hidden_state_layer_ids`
(output-of-layer ids: one less).

Nothing here knows the draft classes (scylla/head.py builds on it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scylla import ScyllaError
from scylla.kernels import Linear
from scylla.lean import KVCache, apply_rope, rope_table

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MAX_POSITIONS = 8192   # what the draft's RoPE table is sized for in the engines


# ---------------------------------------------------------------- the layer (training)

class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer; parameter names are the layout's `midlayer.*` names."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int, eps: float):
        super().__init__()
        head_dim = hidden // heads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.self_attn = nn.ModuleDict(dict(
            q_proj=nn.Linear(2 * hidden, heads * head_dim, bias=False),
            k_proj=nn.Linear(2 * hidden, kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(2 * hidden, kv_heads * head_dim, bias=False),
            o_proj=nn.Linear(heads * head_dim, hidden, bias=False)))
        self.mlp = nn.ModuleDict(dict(
            gate_proj=nn.Linear(hidden, intermediate, bias=False),
            up_proj=nn.Linear(hidden, intermediate, bias=False),
            down_proj=nn.Linear(intermediate, hidden, bias=False)))
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.hidden_norm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)

    def forward(self, fused, embeds, cos, sin, mask):
        """fused, embeds [B, T, H]; mask bool [B, 1, T, T]; returns the layer output [B, T, H]."""
        a, m = self.self_attn, self.mlp
        rows, width, _ = fused.shape
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(fused)], -1)
        q = a["q_proj"](x).view(rows, width, self.heads, self.head_dim).transpose(1, 2)
        k = a["k_proj"](x).view(rows, width, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a["v_proj"](x).view(rows, width, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        h = fused + a["o_proj"](o.transpose(1, 2).reshape(rows, width, -1))
        n = self.post_attention_layernorm(h)
        return h + m["down_proj"](F.silu(m["gate_proj"](n)) * m["up_proj"](n))

    def init_from(self, layer) -> None:
        """Warm start from a target decoder layer of the same width: each half of q/k/v gets
        half the target's weights (both halves read normalised H-vectors)."""
        a = layer.self_attn
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                w = getattr(a, name).weight
                self.self_attn[name].weight.copy_(torch.cat([w, w], 1) / 2)
            self.self_attn["o_proj"].weight.copy_(a.o_proj.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                self.mlp[name].weight.copy_(getattr(layer.mlp, name).weight)
            self.input_layernorm.weight.copy_(layer.input_layernorm.weight)
            self.hidden_norm.weight.copy_(layer.input_layernorm.weight)
            self.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight)


class Eagle3Body(nn.Module):
    """The midlayer and the final norm; forward returns the state before the norm."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int, eps: float, theta: float):
        super().__init__()
        self.midlayer = Eagle3Layer(hidden, heads, kv_heads, intermediate, eps)
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.hidden, self.theta = hidden, theta

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs [B, T, 2H] = [fused features, token embedding]; attention_mask [B, T] (1 = real)."""
        fused, embeds = inputs.split(self.hidden, -1)
        rows, width, _ = fused.shape
        cos, sin = rope_table(self.midlayer.head_dim, self.theta, width, fused.device)
        mask = torch.ones(width, width, dtype=torch.bool, device=fused.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        return self.midlayer(fused, embeds, cos.to(fused.dtype), sin.to(fused.dtype), mask)


# ---------------------------------------------------------------- the layer (decoding, lean)

class LeanMidlayer:
    """Eagle3Body as the lean forward's fused, prepacked pieces, with LeanStack's run
    interface (its own path: LeanStack's layers read H-wide inputs, this one 2H)."""

    def __init__(self, body: Eagle3Body, kind: str, device):
        m = body.midlayer
        a, p = m.self_attn, m.mlp
        self.hidden, self.theta = body.hidden, body.theta
        self.heads, self.kv_heads, self.head_dim = m.heads, m.kv_heads, m.head_dim
        self.eps = m.input_layernorm.eps
        self.qkv = Linear(torch.cat([a["q_proj"].weight, a["k_proj"].weight, a["v_proj"].weight]), kind)
        self.o = Linear(a["o_proj"].weight, kind)
        self.gate_up = Linear(torch.cat([p["gate_proj"].weight, p["up_proj"].weight]), kind)
        self.down = Linear(p["down_proj"].weight, kind)
        self.n_embed = m.input_layernorm.weight.detach()
        self.n_fused = m.hidden_norm.weight.detach()
        self.n_post = m.post_attention_layernorm.weight.detach()
        self.norm = body.norm.weight.detach()
        self.device = device
        self.cos = self.sin = torch.empty(0)

    def new_cache(self, rows: int, capacity: int, dtype=torch.float32) -> KVCache:
        self.ensure_rope(capacity)
        return KVCache(1, rows, self.kv_heads, self.head_dim, capacity, dtype, self.device)

    def ensure_rope(self, capacity: int) -> None:
        if self.cos.shape[0] < capacity:
            self.cos, self.sin = rope_table(self.head_dim, self.theta, max(capacity, 256), self.device)

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.rms_norm(x, (self.hidden,), weight, self.eps)

    def run(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, allowed):
        """x [B, W, 2H] at positions [B, W], written at the cache's length (rows of one length).
        Returns the state before the final norm [B, W, H] and {} (LeanStack's kept layers)."""
        rows, width, _ = x.shape
        cache.check_room(width)
        self.ensure_rope(int(positions.max()) + 1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        fused, embeds = x.reshape(rows * width, 2 * self.hidden).split(self.hidden, -1)
        qkv = self.qkv(torch.cat([self.rms(embeds, self.n_embed), self.rms(fused, self.n_fused)], -1))
        qkv = qkv.view(rows, width, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, :self.heads + self.kv_heads], cos, sin)
        q, k = qk[:, :self.heads], qk[:, self.heads:]
        v = qkv[:, self.heads + self.kv_heads:]
        start = int(cache.lengths[0])
        cache.keys[0][:, :, start:start + width] = k
        cache.values[0][:, :, start:start + width] = v
        span = start + width
        o = F.scaled_dot_product_attention(q, cache.keys[0][:, :, :span], cache.values[0][:, :, :span],
                                           attn_mask=allowed, enable_gqa=self.heads != self.kv_heads)
        h = fused + self.o(o.transpose(1, 2).reshape(rows * width, self.heads * self.head_dim))
        gate, up = self.gate_up(self.rms(h, self.n_post)).chunk(2, -1)
        h = h + self.down(F.silu(gate) * up)
        return h.view(rows, width, self.hidden), {}

    def final_norm(self, state: torch.Tensor) -> torch.Tensor:
        return self.rms(state, self.norm)


# ---------------------------------------------------------------- the layout: names

def to_layout(state: dict[str, torch.Tensor], target_vocab: int) -> dict[str, torch.Tensor]:
    """A FeatureHead(arch="eagle3") state dict -> the layout's tensors."""
    out = {}
    for name, tensor in state.items():
        if name == "fuse.weight":
            out["fc.weight"] = tensor
        elif name.startswith("body.midlayer."):
            out[name[len("body."):]] = tensor
        elif name == "body.norm.weight":
            out["norm.weight"] = tensor
        elif name == "head.weight":
            out["lm_head.weight"] = tensor
        elif name == "d2t":
            ids = tensor.long()
            out["d2t"] = ids - torch.arange(len(ids))
            t2d = torch.zeros(target_vocab, dtype=torch.bool)
            t2d[ids] = True
            out["t2d"] = t2d
        else:
            raise ScyllaError(f"the EAGLE-3 layout has no place for draft tensor {name!r}")
    return {k: v.contiguous() for k, v in out.items()}


IGNORED = ("t2d", "embed_tokens.weight")   # derived from d2t / the target's own embedding


def from_layout(tensors: dict[str, torch.Tensor], draft_vocab: int, where: str) -> dict[str, torch.Tensor]:
    """The layout's tensors -> a FeatureHead(arch="eagle3") state dict (d2t as target ids)."""
    state = {}
    for name, tensor in tensors.items():
        if name in IGNORED:
            continue
        if name == "fc.weight":
            state["fuse.weight"] = tensor
        elif name.startswith("midlayer."):
            state["body." + name] = tensor
        elif name == "norm.weight":
            state["body.norm.weight"] = tensor
        elif name == "lm_head.weight":
            state["head.weight"] = tensor
        elif name == "d2t":
            state["d2t"] = tensor.long() + torch.arange(len(tensor))
        else:
            raise ScyllaError(f"{where}: unexpected tensor {name!r} for a one-layer EAGLE-3 draft")
    if "d2t" not in state:
        state["d2t"] = torch.arange(draft_vocab)  # a full-vocabulary head maps ids to themselves
    return state


# ---------------------------------------------------------------- the layout: config

def layout_config(*, hidden: int, heads: int, kv_heads: int, intermediate: int, rms_eps: float,
                  rope_theta: float, target_vocab: int, draft_vocab: int, feature_layers: list[int],
                  dtype: torch.dtype, scylla: dict) -> dict:
    """config.json for vLLM and SGLang; `scylla` keeps what loading back here needs."""
    return {
        "architectures": [ARCHITECTURES[0]],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": MAX_POSITIONS,
        "vocab_size": target_vocab,
        "draft_vocab_size": draft_vocab,
        "target_hidden_size": hidden,
        "tie_word_embeddings": False,
        "norm_before_residual": False,   # residual from the fc output, as trained here
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": list(feature_layers),                  # vLLM: input of layer i
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in feature_layers],  # SGLang
                         "use_aux_hidden_state": True},
        "scylla": scylla,
    }


def is_layout_folder(folder) -> bool:
    """A folder whose config.json names an EAGLE-3 Llama architecture."""
    try:
        raw = json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and any(a in ARCHITECTURES for a in raw.get("architectures") or [])


def read_layout_config(folder) -> dict:
    path = Path(folder) / CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScyllaError(f"{path}: unreadable EAGLE-3 config ({exc})") from None
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "rms_norm_eps")
    missing = [k for k in need if not isinstance(raw.get(k), (int, float))]
    if missing:
        raise ScyllaError(f"{path}: EAGLE-3 config lacks {', '.join(missing)}")
    return raw


def feature_layers_of(raw: dict, target_layers: int, where: str) -> list[int]:
    """The target's hidden_states indices the draft reads (input-of-layer ids, vLLM's field first)."""
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        inner = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        ids = [i + 1 for i in inner] if inner else None
    if not ids:
        n = target_layers
        ids = [2, n // 2, n - 3]   # the engines' default
    if len(ids) != 3 or not all(isinstance(i, int) and 0 <= i <= target_layers for i in ids):
        raise ScyllaError(f"{where}: EAGLE-3 aux layer ids {ids} do not fit a {target_layers}-layer target")
    return list(ids)


def rope_theta_of_layout(raw: dict, where: str) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise ScyllaError(f"{where}: EAGLE-3 rope type {kind!r} is not supported here (default RoPE only)")
    theta = (params.get("rope_theta") if isinstance(params, dict) else None) or raw.get("rope_theta") or 10000.0
    return float(theta)


def head_fields(raw: dict, target_config, where: str) -> dict:
    """HeadConfig fields for an EAGLE-3 folder on this target; one line when it does not fit."""
    tc = target_config
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    checks = [
        (raw.get("num_hidden_layers", 1) == 1, f"has {raw.get('num_hidden_layers')} decoder layers; "
                                               "this engine runs one-layer EAGLE-3 drafts"),
        (hidden == tc.hidden_size, f"hidden_size {hidden} differs from the target's {tc.hidden_size}"),
        (raw.get("target_hidden_size", hidden) == hidden,
         "target_hidden_size differs from hidden_size (not supported here)"),
        (int(raw["vocab_size"]) == tc.vocab_size, f"vocab_size {raw['vocab_size']} differs from the "
                                                 f"target's {tc.vocab_size}"),
        (raw.get("hidden_act", "silu") == "silu", f"hidden_act {raw.get('hidden_act')!r} is not silu"),
        (raw.get("head_dim") in (None, hidden // heads), "head_dim differs from hidden_size / heads"),
        (not raw.get("norm_before_residual", False), "norm_before_residual drafts are not supported here"),
        (not raw.get("attention_bias") and not raw.get("mlp_bias"), "biased layers are not supported here"),
    ]
    for ok, why in checks:
        if not ok:
            raise ScyllaError(f"{where}: EAGLE-3 draft does not fit this target: {why}")
    mine = raw.get("scylla") or {}
    layers = feature_layers_of(raw, tc.num_hidden_layers, where)
    default = [2, tc.num_hidden_layers // 2, tc.num_hidden_layers - 3]
    return dict(target_name=str(mine.get("target_name") or getattr(tc, "_name_or_path", "") or "unknown"),
                target_hidden=hidden, target_vocab=tc.vocab_size,
                target_layers=int(mine.get("target_layers", tc.num_hidden_layers)), layers=1, fusion="multi",
                draft_vocab=int(raw.get("draft_vocab_size") or raw["vocab_size"]), heads=heads,
                kv_heads=int(raw.get("num_key_value_heads") or heads), intermediate=int(raw["intermediate_size"]),
                rope_theta=rope_theta_of_layout(raw, where), rms_eps=float(raw["rms_norm_eps"]),
                ttt_steps=int(mine.get("ttt_steps", 1)), tokens=int(mine.get("tokens", 0)),
                seed=int(mine.get("seed", 0)), kind=str(mine.get("kind", "eagle3")),
                max_positions=int(mine.get("max_positions", MAX_POSITIONS)), arch="eagle3",
                extra={} if layers == default else {"feature_layers": layers})
