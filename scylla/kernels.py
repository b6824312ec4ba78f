"""Which kernel runs each linear of the lean forward, chosen once at load.

- fp32 (`--quant none`): weights prepacked for oneDNN on CPU (one reorder at load, none per call).
- int8 (`--quant int8`): PyTorch's dynamic int8 linear (fbgemm) over per-channel int8 weights.
- q4 (`--quant q4`, the default for the bundled GGUF): the GGUF's own 4-bit blocks run by
  PyTorch's int4 weight-only CPU kernel (`aten._weight_int4pack_mm_for_cpu`), group size 32.
- bf16 drafts: a draft only proposes, so on a CPU with native bf16 its linears run in bf16.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from scylla import ScyllaError
from scylla.q4 import GROUP, Blocks


def can_prepack(device) -> bool:
    return str(device).startswith("cpu") and torch.backends.mkldnn.is_available()


class Linear:
    """y = x @ W.T, with W prepacked for oneDNN on CPU (one reorder at load, none per call)."""

    def __init__(self, weight: torch.Tensor, kind: str = "fp32"):
        weight = weight.detach().contiguous()
        self.out_features = weight.shape[0]
        self.kind = kind
        if kind == "int8":
            self.weight = int8_prepack(weight)
        elif kind == "packed":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        elif kind == "bf16":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), None)
        elif kind == "int4":
            self.weight = Int4Linear(q4_1_quantize(weight.float()))
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        if self.kind == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        if self.kind == "int8":
            return torch.ops.quantized.linear_dynamic(x, self.weight, INT8_REDUCE_RANGE)
        if self.kind == "bf16":
            out = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.weight, None, "none", [], "")
            return out.to(x.dtype)
        if self.kind == "int4":
            return self.weight(x).to(x.dtype)
        return F.linear(x, self.weight)


@functools.cache
def cpu_flags() -> str:
    try:
        return open("/proc/cpuinfo").read()
    except OSError:
        return ""


def cpu_has_vnni() -> bool:
    flags = cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_has_bf16() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Without VNNI, fbgemm's u8 x s8 pairs can saturate 16-bit sums, so activations keep 7 bits;
# with VNNI the full 8 bits are exact and agree markedly better with fp32 (measured).
INT8_REDUCE_RANGE = not cpu_has_vnni()
DRAFT_BF16 = os.environ.get("SCYLLA_DRAFT_BF16", "1") != "0"   # 0: drafts in the target's fp32 kernels
# 0: drafts in bf16 where int4 would run (measured, chain k = 3 on q4: draft 3.8 against 7.2 ms
# per step, tau 1.49 against 1.51)
DRAFT_INT4 = os.environ.get("SCYLLA_DRAFT_INT4", "1") != "0"


def int8_prepack(weight: torch.Tensor):
    """Per-output-channel symmetric int8 weights for PyTorch's dynamic int8 linear (fbgemm)."""
    scale = weight.abs().amax(1).clamp_min(1e-8) / 127.0
    with warnings.catch_warnings():  # PyTorch marks its quantized tensors deprecated; the kernels remain
        warnings.simplefilter("ignore")
        return _int8_prepack(weight, scale)


def _int8_prepack(weight, scale):
    q = torch.quantize_per_channel(weight.float(), scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                   0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def linear_kind(device, quant: str, dtype=torch.float32) -> str:
    if quant == "int8":
        if not str(device).startswith("cpu"):
            raise ScyllaError("the lean int8 path runs on CPU; on CUDA use --backend hf --quant int8 (bitsandbytes)")
        return "int8"
    return "packed" if can_prepack(device) and dtype == torch.float32 else "fp32"


def draft_linear_kind(device, dtype=torch.float32) -> str:
    """A draft only proposes (the target judges every token), so on a CPU with native bf16
    its weights run in 4 bits (Q4_1-style groups, on the int4 kernel) or bf16: its
    single-row products are memory-bound, and fewer bytes are faster (bf16: 2.6x fp32 for
    the 12,288-row output projection; int4 halves bf16's per-step draft time again). Its q
    at T > 0 is whatever it proposed with, so acceptance stays exact."""
    if DRAFT_BF16 and can_prepack(device) and cpu_has_bf16() and dtype == torch.float32:
        return "int4" if DRAFT_INT4 and int4_available() else "bf16"
    return linear_kind(device, "none", dtype)


def q4_1_quantize(weight: torch.Tensor) -> Blocks:
    """A draft's weights as Q4_1 blocks (min and step per 32 weights, round to nearest), for
    the int4 kernel: a quarter of bf16's bytes per drafted token. Only drafts are quantized
    here; the target runs the blocks its GGUF ships."""
    rows, cols = weight.shape
    if cols % GROUP:
        raise ScyllaError(f"int4 needs rows of whole groups of {GROUP}, got {cols} columns")
    groups = weight.view(rows, cols // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    d = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((groups - lo[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Blocks(q.view(rows, cols), d, lo, "Q4_1")



# ---------------------------------------------------------------- int4 from GGUF blocks

def int4_available() -> bool:
    """The int4 CPU kernel is fast only with bf16 activations; without native bf16 the
    CPU would emulate them, so the q4 target falls back to fp32 there."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and cpu_has_bf16()


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int32 [N, K] in 0..15; the kernel computes w = (q - 8) * scale + zero per group.
    Returns the packed weight and the [K/32, N, 2] bf16 scale-and-zero table it reads.
    The kernel packs rows 16 at a time: rows past N are zero weights (scale and zero 0)."""
    pad = -q.shape[0] % 16
    if pad:
        q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
        scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    table = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, table


class Int4Linear:
    """y = x @ W.T with W exactly as a GGUF stores it, scales and zeros rounded to bf16.

    Q4_1 (w = d q + m) maps onto the kernel's (q - 8) * scale + zero with scale = d and
    zero = m + 8 d. Q8_0 (w = d q, q a signed byte) runs as two nibbles of one matmul: with
    q + 128 = 16 hi + lo, w = (hi - 8) * 16 d + (lo - 8) * d + 8 d, so the high nibbles
    (scale 16 d, zero 0) and the low ones (scale d, zero 8 d) sit side by side along K and
    x is fed twice: exact, at half the bytes of bf16. Precision is lost only where the
    float16 scales become bf16 and where activations are rounded to bf16."""

    kind = "int4"

    def __init__(self, blocks: Blocks, wide: bool = False):
        """wide: also keep the blocks dequantized to bf16 for prompt-wide products (below)."""
        self.out_features = blocks.q.shape[0]
        self.twice = blocks.kind == "Q8_0"
        self.wide = wide_copy(blocks) if wide else None
        if blocks.kind == "Q4_1":
            self.weight, self.table = pack_int4(blocks.q, blocks.d, blocks.m + 8 * blocks.d)
        elif self.twice:
            u = blocks.q.to(torch.int32) + 128
            q = torch.cat([u >> 4, u & 15], 1)
            scale = torch.cat([16 * blocks.d, blocks.d], 1)
            zero = torch.cat([torch.zeros_like(blocks.d), 8 * blocks.d], 1)
            self.weight, self.table = pack_int4(q, scale, zero)
        else:
            raise ScyllaError(f"no int4 kernel for {blocks.kind} blocks")

    def __call__(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """x [..., K] in any float dtype -> bf16 [..., N]."""
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1]), prefill).view(*x.shape[:-1], self.out_features)
        if prefill and self.wide is not None:
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.wide, None, "none", [], "")
        x = x.to(torch.bfloat16)
        if self.twice:
            x = torch.cat([x, x], -1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, GROUP, self.table)
        if out.shape[-1] != self.out_features:
            out = out[:, :self.out_features]
        return out   # bf16: the caller casts only where it must


def wide_copy(blocks: Blocks):
    """The kernel streams int4 weights, which is what one token at a time needs; over a whole
    prompt it is compute-bound and slow (measured at 1,000 rows: 48 ms for the 3072 x 576
    gate/up against 8 ms for oneDNN's bf16 GEMM on the same CPU). So a prompt's forward runs
    on bf16 copies of the same blocks: the prefill is shared by plain and speculative decoding,
    and every later forward runs int4, so the two still decode identically."""
    if not (can_prepack("cpu") and cpu_has_bf16()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(blocks.dequantize().bfloat16(), None)


class BlockEmbedding:
    """Token embedding looked up from its blocks (Q8_0 or Q4_1), one row per token, in fp32:
    a lookup reads a few rows, so the table stays at its stored size."""

    def __init__(self, blocks: Blocks):
        self.q = blocks.q.to(torch.int8) if blocks.kind == "Q8_0" else blocks.q.to(torch.uint8)
        self.d, self.m = blocks.d, blocks.m
        self.shape = tuple(blocks.q.shape)
        self.dtype = torch.float32

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.q[ids].float().view(*ids.shape, -1, GROUP)
        return (rows * self.d[ids][..., None] + self.m[ids][..., None]).flatten(-2)
