"""The target's own quantized blocks, read from its GGUF file (never re-quantized).

Q4_1 stores, per 32 consecutive weights of a row, a float16 scale d, a float16 minimum m
and 32 unsigned nibbles q (0..15): w = d * q + m. Q8_0 stores a float16 scale d and 32
signed bytes q: w = d * q. Both are read here into plain tensors (q as integers, d and m
as float32, one value per group); `scylla.kernels` packs them for PyTorch's int4 kernel.

llama.cpp's converter permutes the rows of the query and key projections (its RoPE pairs
adjacent dimensions; transformers' pairs the halves). `unpermute_rows` undoes it, exactly
as transformers does when it dequantizes the same file, so the lean forward's RoPE is
unchanged. Rows carry whole groups, so the permutation moves blocks and their scales alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scylla import ScyllaError, one_line

GROUP = 32
SUPPORTED = ("Q4_1", "Q8_0", "F32", "F16")


@dataclass
class Blocks:
    """A [rows, cols] weight as groups of 32 along each row: w = d * q + m."""

    q: torch.Tensor       # [rows, cols]; uint8 0..15 for Q4_1, int8 for Q8_0 (a byte each)
    d: torch.Tensor       # float32 [rows, cols / 32]
    m: torch.Tensor       # float32 [rows, cols / 32] (zeros for Q8_0)
    kind: str             # "Q4_1" | "Q8_0"

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        groups = self.q.view(rows, cols // GROUP, GROUP).float()
        return (groups * self.d[..., None] + self.m[..., None]).view(rows, cols)

    def select_rows(self, index: torch.Tensor) -> "Blocks":
        return Blocks(self.q[index], self.d[index], self.m[index], self.kind)


def q4_1_blocks(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    """raw: uint8 [rows, cols / 32 * 20] (d f16, m f16, 16 bytes of nibbles per block)."""
    blocks = raw.reshape(rows, cols // GROUP, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    packed = blocks[..., 4:]
    # ggml keeps weight j of a block in the low nibble of byte j and weight j + 16 in its high one
    q = np.concatenate([packed & 0x0F, packed >> 4], -1).reshape(rows, cols)
    return Blocks(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d.astype(np.float32)),
                  torch.from_numpy(m.astype(np.float32)), "Q4_1")


def q8_0_blocks(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    """raw: uint8 [rows, cols / 32 * 34] (d f16, then 32 signed bytes per block)."""
    blocks = raw.reshape(rows, cols // GROUP, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    d32 = torch.from_numpy(d.astype(np.float32))
    return Blocks(torch.from_numpy(np.ascontiguousarray(q)), d32, torch.zeros_like(d32), "Q8_0")


def unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's query/key permutation (as transformers does)."""
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, half, 2).transpose(1, 2).reshape(-1)


def read_tensors(path: Path) -> dict:
    """{name: (type name, rows, cols, raw array)} for every tensor of a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ScyllaError(f"{path}: not a readable GGUF file ({one_line(exc)})") from exc
    out = {}
    for t in reader.tensors:
        shape = [int(s) for s in t.shape]
        cols, rows = shape[0], (shape[1] if len(shape) > 1 else 1)
        out[t.name] = (t.tensor_type.name, rows, cols, t.data)
    return out


def blocks_of(entry, name: str) -> Blocks:
    kind, rows, cols, raw = entry
    if kind == "Q4_1":
        return q4_1_blocks(np.asarray(raw), rows, cols)
    if kind == "Q8_0":
        return q8_0_blocks(np.asarray(raw), rows, cols)
    raise ScyllaError(f"{name} is {kind} in the GGUF; the q4 target runs Q4_1 and Q8_0 blocks only "
                      f"(use --quant none for the dequantized fp32 reference)")


def vector_of(entry, name: str) -> torch.Tensor:
    kind, _, _, raw = entry
    if kind not in ("F32", "F16"):
        raise ScyllaError(f"{name} is {kind} in the GGUF; expected a float vector")
    return torch.from_numpy(np.asarray(raw).astype(np.float32).reshape(-1))


@dataclass
class GGUFWeights:
    """Every weight of a Llama GGUF the lean forward needs, as stored."""

    layers: list[dict]          # per layer: q, k, v, o, gate, up, down (Blocks); n1, n2 (vectors)
    norm: torch.Tensor
    embed: Blocks
    head: Blocks                # the token embedding again where the file ties them


def load_gguf_weights(path: Path, n_layers: int, n_head: int, n_kv_head: int) -> GGUFWeights:
    tensors = read_tensors(Path(path))

    def get(name):
        if name not in tensors:
            raise ScyllaError(f"{path}: no tensor {name}; not a Llama GGUF of this shape")
        return tensors[name]

    layers = []
    for i in range(n_layers):
        p = f"blk.{i}."
        q, k = blocks_of(get(p + "attn_q.weight"), p + "attn_q"), blocks_of(get(p + "attn_k.weight"), p + "attn_k")
        layers.append(dict(
            q=q.select_rows(unpermute_rows(q.q.shape[0], n_head)),
            k=k.select_rows(unpermute_rows(k.q.shape[0], n_kv_head)),
            v=blocks_of(get(p + "attn_v.weight"), p + "attn_v"),
            o=blocks_of(get(p + "attn_output.weight"), p + "attn_output"),
            gate=blocks_of(get(p + "ffn_gate.weight"), p + "ffn_gate"),
            up=blocks_of(get(p + "ffn_up.weight"), p + "ffn_up"),
            down=blocks_of(get(p + "ffn_down.weight"), p + "ffn_down"),
            n1=vector_of(get(p + "attn_norm.weight"), p + "attn_norm"),
            n2=vector_of(get(p + "ffn_norm.weight"), p + "ffn_norm")))
    embed = blocks_of(get("token_embd.weight"), "token_embd")
    head = blocks_of(tensors["output.weight"], "output") if "output.weight" in tensors else embed
    return GGUFWeights(layers, vector_of(get("output_norm.weight"), "output_norm"), embed, head)


def concat_rows(parts: list[Blocks]) -> Blocks:
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        raise ScyllaError(f"cannot fuse blocks of different quant types {sorted(kinds)}")
    return Blocks(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                  torch.cat([p.m for p in parts]), parts[0].kind)
