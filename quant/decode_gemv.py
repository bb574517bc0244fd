"""GEMVs of text decoding (batch 1) from compressed weights: INT8, FP8 (e4m3) and NF4, in the style of
:mod:`bagel_rt.kernels.gemv`.

A decode step reads every weight byte once per token, so a compressed weight should cost its bytes, not its
decode: 1 byte per weight for INT8 / FP8 (half of bf16), 0.5625 for NF4 (packed nibbles + an fp32 absmax per
64). :func:`qgemv` is ``x @ W.T`` and :func:`qgemv_swiglu` the MLP's gate/up + SwiGLU in one launch, for a
:class:`DecodeWeight`: the codes and fp32 scales of one Linear, or of q/k/v concatenated once when the decoder is
built (:func:`decode_weight`, :func:`concat`; INT8's ``SCB / 127`` is computed there once, never per call). As
the bf16 GEMVs: one program owns ``BN`` output channels, streams their codes in ``BK``-wide tiles requested one
iteration ahead (the first before ``griddepcontrol.wait``: weights are never written, so a PDL launch streams
them while the previous kernel drains), fp32 partial sums per lane, the per-channel scale in the epilogue.

The decode of a code to fp32 is where these kernels are won or lost: at 4.8 TB/s an H200 SM must consume about
18 weight bytes per clock, an SM issues 128 thread-instructions per clock (integer ALU: 64), and the int ->
float converter (I2F) runs at 16 results per clock per SM. So:

* INT8: ``bits(int32(q) + 0x4B400000) - 12582912.0`` (the float 1.5 * 2^23 + q, minus 1.5 * 2^23): one integer
  add and one fp32 add per weight, exact for any int8.
* FP8 e4m3: :func:`quant.fp8_matmul.e4m3_to_f32`, the sm_89+ conversion instruction (two codes per
  instruction, then fp16 -> fp32 as HADD2.F32 on the FMA pipe), integer bit moves elsewhere and in the
  interpreter.
* NF4: a gather from the 16-entry fp32 code table (64 bytes, one L1 line, so a warp's gather is one
  wavefront at any spread of indices): the exact codes. The packed codes are loaded as int32 words of 8 codes;
  a shift and a mask give each code's byte offset, OR-ed into the (64-byte aligned) table address, so the
  loop spends about 4 integer ops and one L1 load per code, no 64-bit add. The select tree of ``quant.matmul``
  costs 15 selects plus the bit tests per code (gate/up 18944 x 3584 at 1 row: 81 us, ~3 codes per clock per
  SM). Evaluated on paper and rejected: a 256-entry table of code pairs per byte (2 KB: a warp's gather
  spreads over 16 lines, up to 16 wavefronts); ``prmt`` byte permutes over the codes in registers (exact fp32
  codes need four byte planes, 2 permutes and a select per plane and four codes, then a 4x4 byte transpose:
  ~6 integer ops per code; fp16/bf16 pairs would be cheaper but are not the fp32 codes); ``tl.where`` chains
  on 2-bit halves (still 15 selects per code).

Offline sm_90 SASS of the loops (``benchmarks/decode_sass.py``: ``triton.compile`` for a CUDA target, no
GPU needed), instructions per weight: bf16 GEMV 4.9, INT8 5.7, FP8 6.4, NF4 7.7 (the byte-wise gather: 8.7);
at 128 issue slots per clock per SM that leaves INT8 / FP8 at their 1-byte bandwidth with little headroom and
NF4 issue-bound at about half of its 0.56-byte bandwidth. PTX ``prmt`` decodes of INT8 / FP8
(``tl.inline_asm_elementwise``) compiled to more instructions (Triton unpacks the loaded bytes and packs them
again for the asm: 7.9 / 8.7 per weight), and on int32 words of four codes to 5.2 / 5.9 with x in four strided
tiles: not kept.

Each launcher has a ``*_ref`` twin with the same signature (dequantize to fp32, ``F.linear``); the rounding
follows the bf16 GEMVs (fp32 sums, one rounding; SwiGLU as :func:`bagel_rt.kernels.gemv.swiglu_store`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bagel_rt.kernels._device import (
    Switch,
    gdc_wait,
    has_capability,
    is_interpreting,
    l2_prefetch,
    prefetch_kwargs,
)
from bagel_rt.kernels.gemv import INTERPRETER_CONFIG, MAX_M, _launch, _w_tile, _x_tile, swiglu_store
from bagel_rt.kernels.swiglu import swiglu_ref
from torch import Tensor, nn

from . import fp8_matmul
from .fp8 import FP8Linear
from .fp8_matmul import FP8, e4m3_to_f32, e4m3_unit
from .int8 import Int8Linear
from .matmul import nf4_dequant_ref
from .nf4 import NF4Linear

__all__ = [
    "DecodeWeight",
    "decode_weight",
    "concat",
    "dequantize_ref",
    "qgemv",
    "qgemv_parts",
    "qgemv_parts_ref",
    "qgemv_ref",
    "qgemv_swiglu",
    "qgemv_swiglu_ref",
    "swiglu_pair",
]


@dataclass
class DecodeWeight:
    """A compressed ``[N, K]`` weight as the decode GEMVs read it.

    fmt: "int8", "fp8" or "nf4". codes: int8 [N, K] / float8_e4m3fn [N, K] / NF4 bytes uint8 [N * K // 2]
    (row-major, high nibble = even element). scale: fp32 [N] per output channel (int8, fp8), or the fp32 NF4
    absmax [N * K // blocksize]. table: the fp32 [16] NF4 code table (NF4 only; 64-byte aligned). planes: int32
    [16], the table's codes rounded to fp16, then to bf16, as the byte-permute decodes read them
    (:func:`nf4_planes`; made with the weight). Those decodes compute with the rounded codes (NF4's codes lie in
    [-1, 1]: fp16 at most 2^-11 of a code away, below the bf16 rounding of the NF4 modules' own dequantized
    weights; bf16 at most 2^-8, that rounding itself); every other decode with the exact ones.
    """

    fmt: str
    codes: Tensor
    scale: Tensor
    shape: tuple[int, int]
    blocksize: int = 0
    table: Tensor | None = None
    planes: Tensor | None = None

    def __post_init__(self):
        if self.fmt == "nf4" and self.planes is None:
            self.planes = torch.cat([nf4_planes(self.table.to(torch.float16)),
                                     nf4_planes(self.table.to(torch.bfloat16))])


def nf4_planes(table: Tensor) -> Tensor:
    """int32 [8] of an fp16 or bf16 [16] code table: the low bytes of codes 0-3, 4-7, 8-11, 12-15, then their
    high bytes (little-endian words: a ``prmt`` over two words picks any of 8 codes' bytes). On the table's
    device, no synchronisation."""
    bits = table.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.cat([bits & 0xFF, bits >> 8]).to(torch.uint8).view(torch.int32)


def decode_weight(mod: nn.Module) -> DecodeWeight | None:
    """The :class:`DecodeWeight` of an ``Int8Linear`` / ``FP8Linear`` / ``NF4Linear`` (scales computed once
    here), None for any other module."""
    shape = (mod.out_features, mod.in_features) if hasattr(mod, "out_features") else None
    if type(mod) is Int8Linear:
        return DecodeWeight("int8", mod.weight, (mod.SCB.float() / 127.0).contiguous(), shape)
    if type(mod) is FP8Linear:
        return DecodeWeight("fp8", mod.weight, mod.weight_scale.reshape(-1).float().contiguous(), shape)
    if type(mod) is NF4Linear:
        # a table of its own: a fresh allocation is 64-byte aligned (the kernels OR offsets into its address)
        return DecodeWeight("nf4", mod.weight.reshape(-1), mod.absmax.reshape(-1), shape, mod.blocksize,
                            mod.quant_map.float().clone())
    return None


def concat(ws: list[DecodeWeight]) -> DecodeWeight:
    """The weights stacked along N (one GEMV for q/k/v): codes and scales copied once."""
    w0 = ws[0]
    for w in ws[1:]:
        assert (w.fmt, w.shape[1], w.blocksize) == (w0.fmt, w0.shape[1], w0.blocksize), "mixed weights"
        assert w.table is None or torch.equal(w.table, w0.table), "NF4 code tables differ"
    return DecodeWeight(w0.fmt, torch.cat([w.codes for w in ws]).contiguous(),
                        torch.cat([w.scale for w in ws]).contiguous(), (sum(w.shape[0] for w in ws), w0.shape[1]),
                        w0.blocksize, w0.table, w0.planes)


def swiglu_pair(gate: DecodeWeight, up: DecodeWeight) -> tuple[DecodeWeight, DecodeWeight] | None:
    """``(gate, up)`` ready for :func:`qgemv_swiglu` (same format, shape and block size; NF4: one shared code
    table, compared once here, never per call), or None when they cannot run fused."""
    if (gate.fmt, gate.shape, gate.blocksize) != (up.fmt, up.shape, up.blocksize):
        return None
    if gate.table is not None:
        if not torch.equal(gate.table, up.table):
            return None
        up = replace(up, table=gate.table, planes=gate.planes)
    return gate, up


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def dequantize_ref(w: DecodeWeight) -> Tensor:
    """The fp32 [N, K] weight: ``code * scale[n]`` (int8, fp8) or ``table[nibble] * absmax[block]`` (nf4)."""
    if w.fmt == "nf4":
        return nf4_dequant_ref(w.codes, w.scale, w.blocksize, w.shape, w.table)
    return w.codes.float() * w.scale.reshape(-1, 1)


def qgemv_ref(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False) -> Tensor:
    """Reference. x [M, K] @ dequantize_ref(w)^T (+ bias) in fp32 -> [M, N] in x.dtype (``pdl`` unused)."""
    return F.linear(x.float(), dequantize_ref(w), None if bias is None else bias.float()).to(x.dtype)


def qgemv_swiglu_ref(x: Tensor, gate: DecodeWeight, up: DecodeWeight, pdl: bool = False) -> Tensor:
    """Reference. silu(x @ gate^T) * (x @ up^T), each projection rounded to x.dtype -> [M, I] (``pdl``
    unused)."""
    return swiglu_ref(qgemv_ref(x, gate), qgemv_ref(x, up))


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------

_INT8_MAGIC: tl.constexpr = tl.constexpr(0x4B400000)  # the bits of 1.5 * 2^23


@triton.jit
def _decode8(b_w, CODE: tl.constexpr):
    """[BN, BK] one-byte codes -> fp32, exact, times :func:`_code_unit`: "int8" (an integer add and an fp32 add
    per code, no converter), "fp8" / "fp8_native" (:func:`quant.fp8_matmul.e4m3_to_f32`: integer bit moves, or
    the sm_89+ conversion instruction)."""
    if CODE == "int8":
        return (b_w.to(tl.int32) + _INT8_MAGIC).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return e4m3_to_f32(b_w, CODE == "fp8_native")


@triton.jit
def _code_unit(CODE: tl.constexpr):
    # the power of two a decode leaves out, for the per-channel scale
    if CODE == "int8":
        return 1.0
    else:
        return e4m3_unit(CODE == "fp8_native")


# The FP8 (e4m3) decode with packed bf16 products: $0 (f32) = the sum over the 4 codes of word $1 (element i =
# byte i, little-endian) of code * x * 2^-12, $2 (64 bits) the bf16 x of elements 0..3 times 2^100 (_Q8_X_ASM),
# as two pairs xa (elements 0, 1) and xb (2, 3), element 2i in the low half. The sm_89+ conversion turns each
# half word into an f16 pair (exact; the upper byte to the upper half). An e4m3 value is an f16 normal (2^-9 ..
# 448; 0 -> 0) whose 7 low mantissa bits are zero, so its bits without the sign shifted right by 3, the sign put
# back (one lop3), are the bf16 of the value times 2^-112, exactly (the 5-bit exponent field read as bf16's 8-bit
# one: 2^(15 - 127) apart). Two ``fma.rn.bf16x2`` (sm_80+) sum the products per lane in bf16 (elements 0, 2 in
# the low lane, 1, 3 in the high), the lanes are added in fp32. Per word 14 instructions in the sm_90 loop (2
# conversions, 6 bit ops, 2 packed FMAs, 3 to unpack, the fp32 accumulate) against ~26 for fp32 products
# (6.5 per weight). Products stay normal for |x| < 2^27 (x * 2^100 < 2^127). Deviation from the fp32 path:
# each product rounded to bf16 and one bf16 add per lane (each at most 2^-8 relative, bf16's unit roundoff),
# far below e4m3's own rounding (2^-4): the bit-exact CPU emulation in tests/test_decode_gemv.py measures at
# most 5.4e-03 of the sum of |products| of a word (1000 random words of codes, random bf16 x).
_FP8_HFMA_ASM: tl.constexpr = tl.constexpr(
    "{\n.reg .b16 lo16, hi16;\n.reg .b32 h0, h1, a0, a1, c0, c1, acc, lo, hi, xa, xb;\n"
    "mov.b32 {lo16, hi16}, $1;\nmov.b64 {xa, xb}, $2;\n"
    "cvt.rn.f16x2.e4m3x2 h0, lo16;\n"
    "cvt.rn.f16x2.e4m3x2 h1, hi16;\n"
    "and.b32 a0, h0, 0x7FFF7FFF;\nshr.b32 a0, a0, 3;\nlop3.b32 c0, a0, h0, 0x80008000, 0xF8;\n"
    "and.b32 a1, h1, 0x7FFF7FFF;\nshr.b32 a1, a1, 3;\nlop3.b32 c1, a1, h1, 0x80008000, 0xF8;\n"
    "mov.b32 acc, 0;\n"
    "fma.rn.bf16x2 acc, c0, xa, acc;\n"
    "fma.rn.bf16x2 acc, c1, xb, acc;\n"
    "shl.b32 lo, acc, 16;\nand.b32 hi, acc, 0xFFFF0000;\nadd.f32 $0, lo, hi;\n}\n")
# both bf16 lanes of $1 times 2^100 (bf16 bits 0x7180; exact): an FMA with -0.0 added, which keeps the signs
# of zeros (sm_80+; mul.rn.bf16x2 needs sm_90). The x of both one-byte packed-product decodes
_Q8_X_ASM: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 k, z, a, b;\nmov.b32 k, 0x71807180;\nmov.b32 z, 0x80008000;\nmov.b64 {a, b}, $1;\n"
    "fma.rn.bf16x2 a, a, k, z;\nfma.rn.bf16x2 b, b, k, z;\nmov.b64 $0, {a, b};\n}\n")


# The INT8 decode with packed bf16 products: $0, $1, $2 as in _FP8_HFMA_ASM (codes: int8 bytes). The sign bit of
# each byte flipped (one xor) gives u = q + 128 in 0..255; a byte permute puts two of them under the f16 exponent
# of 1024 (0x64XX: 1024 + u, exact), one packed f16 subtract leaves u (exact), and as u has at most 8
# significant bits its f16 has 3 zero low mantissa bits: the word shifted right by 3 (both halves positive, so
# nothing crosses between them) is the bf16 pair of u * 2^-112, exactly; one bf16 FMA (u * 1 - 128 * 2^-112,
# exact: q has at most 8 significant bits too) makes it q * 2^-112. The products and the lane sums are
# _FP8_HFMA_ASM's, with x scaled by _Q8_X_ASM: code * x * 2^-12. Per word 14 instructions in the loop as for
# FP8 (1 xor, 2 permutes, 2 subtracts, 2 shifts, 2 offset FMAs, 2 packed FMAs, 3 to unpack, the accumulate
# beside) against ~23 for the fp32 decode (5.84 per weight, benchmarks/decode_sass.py). Deviation: as FP8's
# (each product rounded to bf16, one bf16 add per lane).
_INT8_HFMA_ASM: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 u, p0, p1, c0, c1, acc, lo, hi, xa, xb, e, m, one, off;\n"
    "mov.b64 {xa, xb}, $2;\n"
    "mov.b32 e, 0x64646464;\nmov.b32 m, 0x64006400;\nmov.b32 one, 0x3F803F80;\nmov.b32 off, 0x8B008B00;\n"
    "xor.b32 u, $1, 0x80808080;\n"
    "prmt.b32 p0, u, e, 0x4140;\n"
    "prmt.b32 p1, u, e, 0x4342;\n"
    "sub.rn.f16x2 p0, p0, m;\nshr.b32 p0, p0, 3;\nfma.rn.bf16x2 c0, p0, one, off;\n"
    "sub.rn.f16x2 p1, p1, m;\nshr.b32 p1, p1, 3;\nfma.rn.bf16x2 c1, p1, one, off;\n"
    "mov.b32 acc, 0;\n"
    "fma.rn.bf16x2 acc, c0, xa, acc;\n"
    "fma.rn.bf16x2 acc, c1, xb, acc;\n"
    "shl.b32 lo, acc, 16;\nand.b32 hi, acc, 0xFFFF0000;\nadd.f32 $0, lo, hi;\n}\n")


@triton.jit
def _q8_x_words(p_x, k0, K, W: tl.constexpr, EVEN_K: tl.constexpr):
    # [W] int64: x[k0 + 4j .. k0 + 4j + 3] (the bf16 row p_x read as one int64 per word j), zeros past K. Loaded
    # as two [W // 4, 2] tiles (words 4i, 4i + 1 and 4i + 2, 4i + 3: one 16-byte load each) joined in registers,
    # so that a thread holds the x of the 4 words of its 16-byte code load (the word tile's column layout: no
    # layout conversion; a plain [W] load of 16 bytes per thread goes through shared memory or shuffles)
    o_t = k0 // 4 + 4 * tl.arange(0, W // 4)[:, None] + tl.arange(0, 2)[None, :]
    p_x64 = p_x.to(tl.pointer_type(tl.int64))
    if EVEN_K:
        xa, xb = tl.load(p_x64 + o_t), tl.load(p_x64 + o_t + 2)
    else:
        xa = tl.load(p_x64 + o_t, mask=o_t < K // 4, other=0)
        xb = tl.load(p_x64 + o_t + 2, mask=o_t + 2 < K // 4, other=0)
    return tl.reshape(tl.permute(tl.join(xa, xb), (0, 2, 1)), [W])


@triton.jit
def _q8_x(p_x, k0, K, W: tl.constexpr, EVEN_K: tl.constexpr):
    # [W] int64: _q8_x_words, each bf16 times 2^100 (_Q8_X_ASM: once per column, not per row)
    return tl.inline_asm_elementwise(_Q8_X_ASM, "=l,l", [_q8_x_words(p_x, k0, K, W, EVEN_K)], dtype=tl.int64,
                                     is_pure=True, pack=1)


@triton.jit
def _q8_hfma(b_w, xs, CODE: tl.constexpr):
    # [BN, W] fp32: per word j of b_w [BN, W] (int32 words of 4 one-byte codes: "int8", else e4m3), the sum of
    # its codes times x[k0 + 4j .. k0 + 4j + 3] * 2^-12 by _INT8_HFMA_ASM / _FP8_HFMA_ASM (xs: the scaled x of
    # _q8_x)
    ASM: tl.constexpr = _INT8_HFMA_ASM if CODE == "int8" else _FP8_HFMA_ASM
    return tl.inline_asm_elementwise(ASM, "=r,r,l", [b_w, xs[None, :]], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _row_part(K, K_PER, SPLIT: tl.constexpr):
    # (part p, row m, first column, end column) of this program of a decode GEMV whose grid is (n blocks, rows)
    # or, with SPLIT, (n blocks, parts, rows): part p sums columns [p K_PER, (p + 1) K_PER), the last one to K
    if SPLIT:
        i_p = tl.program_id(1)
        k_lo = i_p * K_PER
        return i_p, tl.program_id(2).to(tl.int64), k_lo, tl.minimum(k_lo + K_PER, K)
    else:
        return 0, tl.program_id(1).to(tl.int64), 0, K


@triton.jit
def _store_row(y, b, b_y, o_n, m_n, i_p, i_m, stride_ym, stride_yp, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    # the fp32 sums b_y [BN] of channels o_n plus the bias (in part 0 only, with SPLIT): into fp32 part i_p of
    # y [P, M, N] with SPLIT, else rounded once into y [M, N]
    if HAS_BIAS:
        b_b = tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)
        if SPLIT:
            b_b = tl.where(i_p == 0, b_b, 0.0)
        b_y += b_b
    if SPLIT:
        tl.store(y + i_p * stride_yp + i_m * stride_ym + o_n, b_y, mask=m_n)
    else:
        tl.store(y + i_m * stride_ym + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


@triton.jit
def _next_k(k0, k_hi, BK: tl.constexpr, EVEN_K: tl.constexpr):
    # the first column of the tile the rotated loops request during the tile at k0: k0 + BK, except that the
    # unmasked loads of EVEN_K re-read the last tile on the last iteration (never used) instead of reading
    # [k_hi, k_hi + BK), which runs past the end of the last row's buffer (a multiple of BK either way: told to
    # Triton, or it splits the vector loads it cannot prove aligned: NF4's absmax loads, +0.2 sm_90 instructions
    # per weight)
    if EVEN_K:
        return tl.multiple_of(tl.minimum(k0 + BK, k_hi - BK), BK)
    else:
        return k0 + BK


@triton.jit
def _q8_tile(p_w, m_n, k0, K, BK: tl.constexpr, HFMA: tl.constexpr, EVEN_K: tl.constexpr = False):
    # the weight tile of columns [k0, k0 + BK): [BN, BK] one-byte codes, or with HFMA [BN, BK // 4] int32 words
    # of 4 codes (p_w: int32 rows of K // 4 words, every row valid: no row mask; with EVEN_K no column mask:
    # a masked load zeroes its registers first, 2 instructions per 16 bytes)
    if HFMA:
        o_j = k0 // 4 + tl.arange(0, BK // 4)
        if EVEN_K:
            return tl.load(p_w[:, None] + o_j[None, :])
        else:
            return tl.load(p_w[:, None] + o_j[None, :], mask=(o_j < K // 4)[None, :], other=0)
    else:
        return _w_tile(p_w, m_n, k0, K, BK)


@triton.jit
def _q8_rows(o_n, N, K, HFMA: tl.constexpr):
    # [BN] int64: where rows o_n start in the codes as the kernels read them: bytes, or with HFMA int32 words of 4
    # (then rows past N read row N - 1, not stored: no row masks)
    if HFMA:
        return tl.minimum(o_n, N - 1).to(tl.int64) * (K // 4)
    else:
        return o_n.to(tl.int64) * K


@triton.jit
def _q8_x_operand(p_x, k0, K, BK: tl.constexpr, HFMA: tl.constexpr, EVEN_K: tl.constexpr):
    # x of columns [k0, k0 + BK) as _q8_products takes it: [BK] fp32, or with HFMA the scaled words of _q8_x
    if HFMA:
        return _q8_x(p_x, k0, K, BK // 4, EVEN_K)
    else:
        return _x_tile(p_x, k0, K, BK)


@triton.jit
def _q8_products(b_w, x_op, CODE: tl.constexpr, HFMA: tl.constexpr):
    # the products of a weight tile (_q8_tile) with x (_q8_x_operand), to sum into the fp32 accumulator:
    # [BN, BK] exact ones, or with HFMA [BN, BK // 4] word sums (_q8_hfma)
    if HFMA:
        return _q8_hfma(b_w, x_op, CODE)
    else:
        return _decode8(b_w, CODE) * x_op[None, :]


@triton.jit
def _q8_unit(CODE: tl.constexpr, HFMA: tl.constexpr):
    # the power of two for the per-channel scale (_code_unit; HFMA: the 2^-12 of _q8_hfma's products)
    if HFMA:
        return 4096.0
    else:
        return _code_unit(CODE)


@triton.jit
def _q8_gemv_kernel(x, w, s, b, y, N, K, stride_xm, stride_ym, HAS_BIAS: tl.constexpr, CODE: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr, K_PER=0, stride_yp=0,
                    SPLIT: tl.constexpr = False, PREFETCH: tl.constexpr = False, HFMA: tl.constexpr = False,
                    EVEN_K: tl.constexpr = False):
    # SPLIT: program (n block, part p, row m) sums columns [p K_PER, (p + 1) K_PER) into fp32 part p of y [P, M, N]
    # (the bias in part 0); else program (n block, row m) the whole row into y [M, N]. HFMA: the codes as int32
    # words of 4 (w: int32 [N, K // 4]), bf16 x, packed bf16 products (_q8_hfma); its rows past N read row
    # N - 1 (not stored); EVEN_K (HFMA): BK divides the columns of every program, no column masks
    i_n = tl.program_id(0)
    i_p, i_m, k_lo, k_hi = _row_part(K, K_PER, SPLIT)
    CW: tl.constexpr = 4 if HFMA else 1  # codes per element of w
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_x = x + i_m * stride_xm
    p_w = w + _q8_rows(o_n, N, K, HFMA)
    # rotated loop as in bagel_rt.kernels.gemv: the first tile is requested before the wait
    b_w = _q8_tile(p_w, m_n, k_lo, k_hi, BK, HFMA, EVEN_K)
    l2_prefetch(p_w, m_n, k_lo // CW, k_hi // CW, PREFETCH)  # an A/B option (kernels._device._L2_PREFETCH)
    acc = tl.zeros([BN, BK // CW], dtype=tl.float32)
    gdc_wait(USE_GDC)
    for k0 in range(k_lo, k_hi, BK):
        acc += _q8_products(b_w, _q8_x_operand(p_x, k0, k_hi, BK, HFMA, EVEN_K), CODE, HFMA)
        b_w = _q8_tile(p_w, m_n, _next_k(k0, k_hi, BK, EVEN_K), k_hi, BK, HFMA, EVEN_K)
    # [BN]: the per-channel scale, then the bias, on the fp32 sums (one rounding)
    b_y = tl.sum(acc, axis=1) * (tl.load(s + o_n, mask=m_n, other=0.0) * _q8_unit(CODE, HFMA))
    _store_row(y, b, b_y, o_n, m_n, i_p, i_m, stride_ym, stride_yp, HAS_BIAS, SPLIT)


@triton.jit
def _q8_gemv_swiglu_kernel(x, wg, wu, sg, su, y, N, K, stride_xm, stride_ym, CODE: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, USE_GDC: tl.constexpr, PREFETCH: tl.constexpr = False,
                           HFMA: tl.constexpr = False, EVEN_K: tl.constexpr = False):
    # HFMA, EVEN_K: as in _q8_gemv_kernel (wg, wu: int32 words of 4 codes)
    i_n, i_m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    CW: tl.constexpr = 4 if HFMA else 1  # codes per element of wg, wu
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_x = x + i_m * stride_xm
    rows = _q8_rows(o_n, N, K, HFMA)
    # one loop over both weights (twice the bytes in flight), rotated
    b_g = _q8_tile(wg + rows, m_n, 0, K, BK, HFMA, EVEN_K)
    b_u = _q8_tile(wu + rows, m_n, 0, K, BK, HFMA, EVEN_K)
    l2_prefetch(wg + rows, m_n, 0, K // CW, PREFETCH)
    l2_prefetch(wu + rows, m_n, 0, K // CW, PREFETCH)
    acc_g = tl.zeros([BN, BK // CW], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK // CW], dtype=tl.float32)
    gdc_wait(USE_GDC)
    for k0 in range(0, K, BK):
        x_op = _q8_x_operand(p_x, k0, K, BK, HFMA, EVEN_K)  # once for both weights
        acc_g += _q8_products(b_g, x_op, CODE, HFMA)
        acc_u += _q8_products(b_u, x_op, CODE, HFMA)
        k_next = _next_k(k0, K, BK, EVEN_K)
        b_g = _q8_tile(wg + rows, m_n, k_next, K, BK, HFMA, EVEN_K)
        b_u = _q8_tile(wu + rows, m_n, k_next, K, BK, HFMA, EVEN_K)
    g = tl.sum(acc_g, axis=1) * (tl.load(sg + o_n, mask=m_n, other=0.0) * _q8_unit(CODE, HFMA))
    u = tl.sum(acc_u, axis=1) * (tl.load(su + o_n, mask=m_n, other=0.0) * _q8_unit(CODE, HFMA))
    swiglu_store(y + i_m * stride_ym + o_n, g, u, m_n)


@triton.jit
def _nf4_tile(p_p, p_a, m_n, k0, K, BK: tl.constexpr, BLOCKSIZE: tl.constexpr, HFMA: tl.constexpr = False,
              EVEN_K: tl.constexpr = False):
    # ([BN, BK // 8] int32 words of 8 codes, [BN, BK // BLOCKSIZE] absmax) of columns [k0, k0 + BK); whole
    # quantization blocks past K read nothing (K is a multiple of BLOCKSIZE >= 32: rows start on a word). HFMA:
    # every row valid (rows past N clamped by the caller): no row mask; with EVEN_K (BK divides K) no column
    # mask either (a masked load zeroes its registers first)
    o_j = k0 // 8 + tl.arange(0, BK // 8)
    o_b = k0 // BLOCKSIZE + tl.arange(0, BK // BLOCKSIZE)
    if HFMA:
        # the absmax as [BN, NB, BLOCKSIZE // 8] (one per word), already in the code tile's layout: loaded as a
        # flat [BN * NB * G] tile, one absmax per 16-byte code load (G per block; a flat tile, since Triton lays a
        # [BN, NB, G] one with a repeated last dim out differently), broadcast in registers (the [BN, NB] tile is
        # moved there by shuffles, or shared memory with several warps)
        G: tl.constexpr = BLOCKSIZE // 32 if BLOCKSIZE % 32 == 0 else 1
        NB: tl.constexpr = BK // BLOCKSIZE
        BN: tl.constexpr = p_p.shape[0]
        o_g = o_b[None, :, None] + tl.zeros([BN, 1, G], dtype=tl.int32)
        q_a = tl.reshape(p_a[:, None, None] + o_g, [BN * NB * G])
        o_g = tl.reshape(o_g, [BN * NB * G])
        if EVEN_K:
            b_p = tl.load(p_p[:, None] + o_j[None, :])
            b_a = tl.load(q_a)
        else:
            b_p = tl.load(p_p[:, None] + o_j[None, :], mask=(o_j < K // 8)[None, :], other=0)
            b_a = tl.load(q_a, mask=o_g < K // BLOCKSIZE, other=0.0)
        b_a = tl.reshape(tl.broadcast_to(tl.reshape(b_a, [BN, NB, G, 1]), [BN, NB, G, BLOCKSIZE // 8 // G]),
                         [BN, NB, BLOCKSIZE // 8])
    else:
        b_p = tl.load(p_p[:, None] + o_j[None, :], mask=m_n[:, None] & (o_j < K // 8)[None, :], other=0)
        b_a = tl.load(p_a[:, None] + o_b[None, :], mask=m_n[:, None] & (o_b < K // BLOCKSIZE)[None, :],
                      other=0.0)
    return b_p, b_a


@triton.jit
def _nf4_code(t_bits, b_p, i: tl.constexpr):
    # the exact fp32 code of element i of each word, gathered from the 16-entry table at ``t_bits`` (64-byte
    # aligned, so the byte offset 4 * nibble is OR-ed into the address: no 64-bit add per code). Word j holds
    # elements 8j .. 8j + 7; its byte b (little-endian) elements 8j + 2b (high nibble) and 8j + 2b + 1 (low)
    SHIFT: tl.constexpr = 8 * (i // 2) + 4 - 4 * (i % 2) - 2  # the nibble's lowest bit -> bit 2
    if SHIFT < 0:
        off = (b_p << 2) & 0x3C
    else:
        off = (b_p >> SHIFT) & 0x3C
    return tl.load((t_bits | off.to(tl.int64)).to(tl.pointer_type(tl.float32)))


# The byte-permute decode of one int32 word of 8 NF4 codes ($8) into 8 fp16 codes ($0-$7, in the order elements
# 1, 0, 3, 2, 5, 4, 7, 6: nibble i of the word is element i ^ 1), from the table planes $9-$16 (nf4_planes). Per
# half word (4 codes): the 3 low bits of each code select its byte from codes 0-7 and from codes 8-15 of each
# plane (4 prmt), bit 3 chooses between them (a byte mask made by one prmt in sign-replicate mode from the word
# and the word << 4: each code's bit 3 sits at a byte's top bit in one of them; one lop3 per plane), and two
# prmt interleave the low and high bytes into fp16 pairs: 11.5 instructions per 4 codes, no memory access.
# Checked against a bit-exact emulation of prmt / lop3 over random words before it was written here.


def _nf4_prmt_half(word: str, plane: int, select: str, mask: int, tail: str) -> str:
    # the assembly of one half word of ``word``: ``select`` puts its 4 codes' 3-bit selectors in s, the prmt
    # selector ``mask`` picks each code's bit 3 from the word or w4 (= word << 4), the planes are operands
    # $plane .. $plane + 7; lo / hi get the codes' low / high bytes (nibble order), then ``tail``
    pl = [f"${plane + i}" for i in range(8)]
    return f"""{select}
prmt.b32 m, {word}, w4, {mask:#06x};
prmt.b32 la, {pl[0]}, {pl[1]}, s;
prmt.b32 lb, {pl[2]}, {pl[3]}, s;
prmt.b32 ha, {pl[4]}, {pl[5]}, s;
prmt.b32 hb, {pl[6]}, {pl[7]}, s;
lop3.b32 lo, la, lb, m, 0xD8;
lop3.b32 hi, ha, hb, m, 0xD8;
{tail}"""


def _nf4_prmt_asm(word: str, plane: int, tails: tuple[str, str]) -> str:
    # both half words of ``word`` (nibbles 0-3, then 4-7), each followed by its tail
    return (f"shl.b32 w4, {word}, 4;\n"
            + _nf4_prmt_half(word, plane, f"and.b32 s, {word}, 0x7777;", 0x9D8C, tails[0])
            + _nf4_prmt_half(word, plane, f"shr.b32 s, {word}, 16;\nand.b32 s, s, 0x7777;", 0xBFAE, tails[1]))


_NF4_PRMT_ASM: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 s, m, w4, la, lb, ha, hb, lo, hi, p, q;\n"
    + _nf4_prmt_asm("$8", 9, tuple(f"""prmt.b32 p, lo, hi, 0x5140;
prmt.b32 q, lo, hi, 0x7362;
mov.b32 {{${o}, ${o + 1}}}, p;
mov.b32 {{${o + 2}, ${o + 3}}}, q;
""" for o in (0, 4))) + "}\n")

# The byte-permute decode with packed bf16 products: $0 (f32) = sum over the 8 elements of word $1 of code * x,
# x the bf16 elements 0..7 of the word as four pairs ($2-$5, element 2i in the low half), codes from bf16 planes
# ($6-$13). The interleave puts element 2i in the low half of each pair (the x pair's order), and four
# ``fma.rn.bf16x2`` (sm_80+) sum the products per lane in bf16; the two lanes are added in fp32. Per word: the
# decode's 23 instructions, 4 packed FMAs and 3 to unpack, against the fp16 codes' 8 conversions, 8 FMAs and 7
# adds. Each bf16 rounding is at most 2^-8 relative (the size of the NF4 modules' own bf16 dequantization), far
# below NF4's code spacing: the bit-exact CPU emulation in tests/test_decode_gemv.py measures at most 4.6e-3 of
# a word's sum of |products| (300 random words and x).
_NF4_HFMA_ASM: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 s, m, w4, la, lb, ha, hb, lo, hi, p, q, acc;\nmov.b32 acc, 0;\n"
    + _nf4_prmt_asm("$1", 6, tuple(f"""prmt.b32 p, lo, hi, 0x4051;
prmt.b32 q, lo, hi, 0x6273;
fma.rn.bf16x2 acc, p, ${i}, acc;
fma.rn.bf16x2 acc, q, ${i + 1}, acc;
""" for i in (2, 4)))
    + "shl.b32 lo, acc, 16;\nand.b32 hi, acc, 0xFFFF0000;\nadd.f32 $0, lo, hi;\n}\n")


@triton.jit
def _nf4_planes_args(pl):
    return (tl.load(pl), tl.load(pl + 1), tl.load(pl + 2), tl.load(pl + 3), tl.load(pl + 4), tl.load(pl + 5),
            tl.load(pl + 6), tl.load(pl + 7))


@triton.jit
def _nf4_prmt(b_p, pl):
    # the 8 fp16 codes of each word of b_p [BN, W] (see _NF4_PRMT_ASM), in element order 0..7
    p0, p1, p2, p3, p4, p5, p6, p7 = _nf4_planes_args(pl)
    c1, c0, c3, c2, c5, c4, c7, c6 = tl.inline_asm_elementwise(
        _NF4_PRMT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
        [b_p, p0, p1, p2, p3, p4, p5, p6, p7], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    return c0, c1, c2, c3, c4, c5, c6, c7


# $1 unchanged, as a per-thread value: a prmt of ($1, $1) whose selector depends on the thread (byte 0 or byte 4:
# the same byte), which ptxas cannot prove warp-uniform. Loaded plainly, the table planes are uniform, and in most
# settings (1-4 warps) ptxas held some in uniform registers and copied one into a register for each table permute
# that reads it (about 1 instruction per weight in the loop); this way they stay in registers, at 8 prmt before it.
_NF4_PER_THREAD_ASM: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 t;\nmov.u32 t, %tid.x;\nand.b32 t, t, 4;\nor.b32 t, t, 0x3210;\nprmt.b32 $0, $1, $1, t;\n}")


@triton.jit
def _nf4_per_thread(v):
    return tl.inline_asm_elementwise(_NF4_PER_THREAD_ASM, "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _nf4_plane_regs(pl):
    # the 8 planes at pl (_nf4_planes_args) as per-thread values (_NF4_PER_THREAD_ASM)
    p0, p1, p2, p3, p4, p5, p6, p7 = _nf4_planes_args(pl)
    return (_nf4_per_thread(p0), _nf4_per_thread(p1), _nf4_per_thread(p2), _nf4_per_thread(p3),
            _nf4_per_thread(p4), _nf4_per_thread(p5), _nf4_per_thread(p6), _nf4_per_thread(p7))


@triton.jit
def _nf4_x_cols(p_x32, o_t, K, EVEN_K: tl.constexpr):
    # the 4 columns ([Q] each) of the int32 [Q, 4] tile of x at offsets o_t (one 16-byte load per row), zeros
    # past K (EVEN_K: no mask)
    if EVEN_K:
        t = tl.load(p_x32 + o_t)
    else:
        t = tl.load(p_x32 + o_t, mask=o_t < K // 2, other=0)
    a, b = tl.split(tl.reshape(t, [o_t.shape[0], 2, 2]))  # columns (0, 2) and (1, 3)
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    return c0, c1, c2, c3


@triton.jit
def _nf4_x_words(p_x, k0, K, R: tl.constexpr, W: tl.constexpr, EVEN_K: tl.constexpr):
    # the x operands of _NF4_HFMA_ASM for the [R, W] code words of columns [k0, k0 + 8W): 4 x [R, W] int32 (the R
    # rows equal), x word c of code word j = the bf16 pair x[k0 + 8j + 2c], x[k0 + 8j + 2c + 1] of the bf16 row
    # p_x (element 2c in the low half), zeros past K. A thread's 16-byte code load holds words 4i .. 4i + 3 of a
    # row, whose x are the 64 bytes at k0 + 32i: read as four [R * W // 4, 4] tiles (tile v: the x of words
    # 4i + v, one 16-byte load per row; the R copies of each row as rows of the tile, so that the tile has a row
    # per thread of the code tile, which a tile of W // 4 rows has not when W // 4 < the threads: Triton would give
    # it fewer elements per thread), their columns split in registers and joined back in word order: the code
    # tile's layout, no layout conversion (a [W] slice per x word, strided by 16 bytes, and a [W // 4, 4] tile
    # are moved there by shuffles). ptxas merges the R copies' loads when a thread holds several rows.
    o_t = k0 // 2 + 16 * (tl.arange(0, R * W // 4) % (W // 4))[:, None] + tl.arange(0, 4)[None, :]
    p_x32 = p_x.to(tl.pointer_type(tl.int32))
    a0, a1, a2, a3 = _nf4_x_cols(p_x32, o_t, K, EVEN_K)  # words 4i
    b0, b1, b2, b3 = _nf4_x_cols(p_x32, o_t + 4, K, EVEN_K)  # 4i + 1
    c0, c1, c2, c3 = _nf4_x_cols(p_x32, o_t + 8, K, EVEN_K)  # 4i + 2
    d0, d1, d2, d3 = _nf4_x_cols(p_x32, o_t + 12, K, EVEN_K)  # 4i + 3
    # [R * W // 4, 2, 2]: element [r * W // 4 + i, u, v] from the tile of words 4i + 2u + v
    x0 = tl.reshape(tl.join(tl.join(a0, c0), tl.join(b0, d0)), [R, W])
    x1 = tl.reshape(tl.join(tl.join(a1, c1), tl.join(b1, d1)), [R, W])
    x2 = tl.reshape(tl.join(tl.join(a2, c2), tl.join(b2, d2)), [R, W])
    x3 = tl.reshape(tl.join(tl.join(a3, c3), tl.join(b3, d3)), [R, W])
    return x0, x1, x2, x3


@triton.jit
def _nf4_hfma(b_p, p_x, k0, K, pl, EVEN_K: tl.constexpr = False):
    # [BN, W] fp32: per word j of b_p [BN, W], the sum of its 8 codes times x[k0 + 8j .. k0 + 8j + 7] by
    # _NF4_HFMA_ASM; p_x: the bf16 row of x (read as int32 pairs in the code tile's layout: _nf4_x_words); pl:
    # the bf16 planes (as per-thread values: _nf4_plane_regs). EVEN_K: BK divides K, no masks
    x0, x1, x2, x3 = _nf4_x_words(p_x, k0, K, b_p.shape[0], b_p.shape[1], EVEN_K)
    p0, p1, p2, p3, p4, p5, p6, p7 = _nf4_plane_regs(pl)
    return tl.inline_asm_elementwise(
        _NF4_HFMA_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r", [b_p, x0, x1, x2, x3, p0, p1, p2, p3, p4, p5, p6, p7],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _nf4_acc(acc, b_p, b_a, t, pl, p_x, k0, K, BK: tl.constexpr, BLOCKSIZE: tl.constexpr, WORDWISE: tl.constexpr,
             PRMT: tl.constexpr = False, HFMA: tl.constexpr = False, EVEN_K: tl.constexpr = False):
    # acc [BN, NB, BLOCKSIZE // 8] += per block: absmax * sum over the 8 codes of each word of code * x
    BN: tl.constexpr = acc.shape[0]
    if HFMA:  # byte permutes and packed bf16 products (_nf4_hfma; bf16 x, the decoder's dtype)
        b_s = _nf4_hfma(b_p, p_x, k0, K, pl + 8, EVEN_K)
    elif PRMT or WORDWISE:
        # the 8 codes of a word as a last, in-thread dimension: one x load of the tile, the codes of every word in
        # one shot, the products summed by in-thread splits. Word-wise: the nibbles' offsets into the 64-byte
        # table, one gather. Offline sm_90 SASS (``benchmarks/decode_sass.py``): 9.0 loop instructions per
        # weight with Triton 3.6 (the GPU machine's) against 14.0 for the per-code loop below, whose word tile
        # Triton 3.6 moves through shared memory once per code; but 10.9 against 7.7 with Triton 3.9; on the
        # H200 1.7-2.2x faster than the per-code loop at every decode shape (see ``NF4_SETTINGS``, which take
        # it). PRMT: byte permutes in registers (_nf4_prmt; inline PTX, so not in the interpreter), joined in an
        # order that gives elements 0..7.
        o_e = k0 + tl.arange(0, BK)
        b_x = tl.reshape(tl.load(p_x + o_e, mask=o_e < K, other=0.0).to(tl.float32), [BK // 8, 8])
        if PRMT:
            c0, c1, c2, c3, c4, c5, c6, c7 = _nf4_prmt(b_p, pl)
            code = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
            code = tl.reshape(code, [BN, BK // 8, 8]).to(tl.float32)
        else:
            i = tl.arange(0, 8)
            sh = 8 * (i // 2) + 4 - 4 * (i % 2)  # element i's nibble: bits [sh, sh + 4) of its word
            off = ((b_p[:, :, None] >> sh[None, None, :]) & 0xF) << 2  # byte offsets into the 64-byte table
            code = tl.load((t.to(tl.int64) | off.to(tl.int64)).to(tl.pointer_type(tl.float32)))
        prod = code * b_x[None, :, :]  # [BN, BK // 8, 8]
        lo, hi = tl.split(tl.reshape(prod, [BN, BK // 8, 4, 2]))
        lo, hi = tl.split(tl.reshape(lo + hi, [BN, BK // 8, 2, 2]))
        lo, hi = tl.split(lo + hi)
        b_s = lo + hi
    else:
        o_e = k0 + 8 * tl.arange(0, BK // 8)
        m_e = o_e < K
        t_bits = t.to(tl.int64)
        b_s = tl.zeros([BN, BK // 8], dtype=tl.float32)
        for i in tl.static_range(8):
            b_x = tl.load(p_x + o_e + i, mask=m_e, other=0.0).to(tl.float32)
            b_s += _nf4_code(t_bits, b_p, i) * b_x[None, :]
    if HFMA:  # b_a: [BN, NB, BLOCKSIZE // 8], already broadcast (_nf4_tile)
        acc = acc + tl.reshape(b_s, [BN, BK // BLOCKSIZE, BLOCKSIZE // 8]) * b_a
    else:
        acc = acc + tl.reshape(b_s, [BN, BK // BLOCKSIZE, BLOCKSIZE // 8]) * b_a[:, :, None]
    return acc


@triton.jit
def _nf4_rows(o_n, N, K, BLOCKSIZE: tl.constexpr, HFMA: tl.constexpr):
    # ([BN] int64, [BN] int64): where rows o_n start in the int32 code words and in the absmax. HFMA: rows past N
    # read row N - 1 (not stored: no row masks), and a row's K // 8 words written as (K // BLOCKSIZE) *
    # (BLOCKSIZE // 8), so that Triton sees whole blocks (16-byte loads)
    if HFMA:
        r_n = tl.minimum(o_n, N - 1).to(tl.int64)
        return r_n * ((K // BLOCKSIZE) * (BLOCKSIZE // 8)), r_n * (K // BLOCKSIZE)
    else:
        r_n = o_n.to(tl.int64)
        return r_n * (K // 8), r_n * (K // BLOCKSIZE)


@triton.jit
def _nf4_gemv_kernel(x, p, a, t, pl, b, y, N, K, stride_xm, stride_ym, HAS_BIAS: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr,
                     WORDWISE: tl.constexpr = False, PREFETCH: tl.constexpr = False, PRMT: tl.constexpr = False,
                     HFMA: tl.constexpr = False, EVEN_K: tl.constexpr = False, K_PER=0, stride_yp=0,
                     SPLIT: tl.constexpr = False):
    # HFMA: packed bf16 products (_nf4_hfma); its rows past N read row N - 1 (not stored); EVEN_K (HFMA): BK
    # divides the columns of every program, no column masks. SPLIT: program (n block, part p, row m) sums columns
    # [p K_PER, (p + 1) K_PER) (K_PER a multiple of BK) into fp32 part p of y [P, M, N], the bias in part 0
    tl.static_assert(BK % BLOCKSIZE == 0)
    i_n = tl.program_id(0)
    i_p, i_m, k_lo, k_hi = _row_part(K, K_PER, SPLIT)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_x = x + i_m * stride_xm
    o_p, o_a = _nf4_rows(o_n, N, K, BLOCKSIZE, HFMA)
    p_p, p_a = p + o_p, a + o_a
    # columns past k_hi (the part's end) are masked like columns past K
    b_p, b_a = _nf4_tile(p_p, p_a, m_n, k_lo, k_hi, BK, BLOCKSIZE, HFMA, EVEN_K)
    l2_prefetch(p_p, m_n, k_lo // 8, k_hi // 8, PREFETCH)
    gdc_wait(USE_GDC)
    acc = tl.zeros([BN, BK // BLOCKSIZE, BLOCKSIZE // 8], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        acc = _nf4_acc(acc, b_p, b_a, t, pl, p_x, k0, k_hi, BK, BLOCKSIZE, WORDWISE, PRMT, HFMA, EVEN_K)
        b_p, b_a = _nf4_tile(p_p, p_a, m_n, _next_k(k0, k_hi, BK, EVEN_K), k_hi, BK, BLOCKSIZE, HFMA, EVEN_K)
    b_y = tl.sum(tl.sum(acc, axis=2), axis=1)
    _store_row(y, b, b_y, o_n, m_n, i_p, i_m, stride_ym, stride_yp, HAS_BIAS, SPLIT)


@triton.jit
def _nf4_gemv_swiglu_kernel(x, pg, ag, pu, au, t, pl, y, N, K, stride_xm, stride_ym, BLOCKSIZE: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr,
                            WORDWISE: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                            PRMT: tl.constexpr = False, HFMA: tl.constexpr = False, EVEN_K: tl.constexpr = False):
    # HFMA, EVEN_K: as in _nf4_gemv_kernel
    tl.static_assert(BK % BLOCKSIZE == 0)
    i_n, i_m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_x = x + i_m * stride_xm
    o_p, o_a = _nf4_rows(o_n, N, K, BLOCKSIZE, HFMA)
    b_pg, b_ag = _nf4_tile(pg + o_p, ag + o_a, m_n, 0, K, BK, BLOCKSIZE, HFMA, EVEN_K)
    b_pu, b_au = _nf4_tile(pu + o_p, au + o_a, m_n, 0, K, BK, BLOCKSIZE, HFMA, EVEN_K)
    l2_prefetch(pg + o_p, m_n, 0, K // 8, PREFETCH)
    l2_prefetch(pu + o_p, m_n, 0, K // 8, PREFETCH)
    gdc_wait(USE_GDC)
    acc_g = tl.zeros([BN, BK // BLOCKSIZE, BLOCKSIZE // 8], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK // BLOCKSIZE, BLOCKSIZE // 8], dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc_g = _nf4_acc(acc_g, b_pg, b_ag, t, pl, p_x, k0, K, BK, BLOCKSIZE, WORDWISE, PRMT, HFMA, EVEN_K)
        acc_u = _nf4_acc(acc_u, b_pu, b_au, t, pl, p_x, k0, K, BK, BLOCKSIZE, WORDWISE, PRMT, HFMA, EVEN_K)
        k_next = _next_k(k0, K, BK, EVEN_K)
        b_pg, b_ag = _nf4_tile(pg + o_p, ag + o_a, m_n, k_next, K, BK, BLOCKSIZE, HFMA, EVEN_K)
        b_pu, b_au = _nf4_tile(pu + o_p, au + o_a, m_n, k_next, K, BK, BLOCKSIZE, HFMA, EVEN_K)
    swiglu_store(y + i_m * stride_ym + o_n, tl.sum(tl.sum(acc_g, axis=2), axis=1),
                 tl.sum(tl.sum(acc_u, axis=2), axis=1), m_n)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

# Launch settings, measured (``benchmarks/bench_kernels.py --only qgemv --graph``, H200, CUDA-graph replay,
# 186c6be; results/kernels_h200.jsonl): 8 channels x 512 columns per program and iteration with 4 warps is the
# best or within 1% of it at every decode shape but down (K = 18944: 4 x 1024 / 4) for the one-byte formats.
# Against the first settings (4 x 2048 / 8, 8 x 1024 / 8) in microseconds, INT8: qkv 7.5 -> 6.2, down 24.7 ->
# 22.0, gate/up + SwiGLU 56.2 -> 42.3, lm_head 214.5 -> 163.8; FP8: gate/up 94.5 -> 53.9, lm_head 264.3 -> 199.8.
SETTINGS = {
    "gemv": dict(BN=8, BK=512, num_warps=4),
    "gemv_long": dict(BN=4, BK=1024, num_warps=4),  # K > 8192 (down): fewer channels, longer rows per program
    "swiglu": dict(BN=8, BK=512, num_warps=4),
}
#: NF4 with fp32 products (the packed products off: ``nf4_hfma_on(False)``, ``fast_decode`` "triton-fp32") takes
#: the word-wise decode (``_nf4_acc``), by shape; it was the default until the packed products
#: (:data:`NF4_HFMA_SETTINGS`) replaced it. Measured (same sweep, 9c4a67a, microseconds, the
#: per-code loop at its best settings -> word-wise at these): qkv 16.2 -> 8.9, o 13.4 -> 7.5, down 61.3 -> 28.5
#: (4 x 2048, c1fb778; 4 x 1024: 29.9), gate/up + SwiGLU 98.7 -> 51.2, lm_head 415.8 -> 193.0 (bf16 GEMV: 7.9, 6.3,
#: 34.2, 64.5, 242.5); greedy decode 140.6 -> 269.3 tok/s (bf16 251.1, ``compressed_speed.py --tasks decode``,
#: c1fb778). Triton 3.6 (the GPU machine's) moves the per-code loop's word tile through shared memory once per
#: code (14.0 sm_90 loop instructions per weight against 9.0 word-wise, ``benchmarks/decode_sass.py``).
NF4_SETTINGS = {
    "gemv": dict(BN=4, BK=512, num_warps=4, wordwise=True),
    "gemv_long": dict(BN=4, BK=2048, num_warps=4, wordwise=True),
    "gemv_wide": dict(BN=8, BK=256, num_warps=2, wordwise=True),  # N > WIDE_N (lm_head)
    "swiglu": dict(BN=4, BK=512, num_warps=4, wordwise=True),
}
#: the byte-permute NF4 decode (``prmt``: :func:`_nf4_prmt`) at settings chosen from offline sm_90 SASS (Triton
#: 3.6, ``benchmarks/decode_sass.py``), loop instructions per weight: gemv 8 x 512 / 2 warps 6.28 against the
#: word-wise gather's 8.47 at the same setting and 9.50 at its own 4 x 512 / 4; gate/up + SwiGLU 8 x 512 / 2 5.91
#: against 7.23. It computes with the codes rounded to fp16 (see DecodeWeight). An A/B candidate
#: (:func:`nf4_prmt_on`, fast_decode "triton-prmt"), not measured on a GPU yet.
NF4_PRMT_SETTINGS = {
    "gemv": dict(BN=8, BK=512, num_warps=2, prmt=True),
    "gemv_long": dict(BN=8, BK=1024, num_warps=4, prmt=True),
    "gemv_wide": dict(BN=8, BK=512, num_warps=2, prmt=True),
    "swiglu": dict(BN=8, BK=512, num_warps=2, prmt=True),
}
#: the byte-permute decode with packed bf16 products (``hfma``: :func:`_nf4_hfma`; bf16 x, else the byte-permute
#: decode): the default since the fifteenth stop. Settings from a kernel sweep (H100, ``bench_kernels.py --only
#: qgemv --graph --providers hfma``, 09db864 and again at 1ff1e2e, microseconds, the word-wise decode
#: (NF4_SETTINGS) -> these): qkv 9.0 -> 7.1, o 7.5 -> 5.6, down 29.9 -> 25.3, lm_head 198.8 -> 128.2, gate/up +
#: SwiGLU 51.3 -> 36.2; greedy decode (``compressed_speed.py --tasks decode``, one process, H100, 1ff1e2e, median
#: of 5) 279.7 -> 337.3 tok/s (1.472x -> 1.775x bf16's 190.0; 283.3 -> 321.9 in another process). The first
#: pick, 8 x 512 / 1 warp (lm_head 16 x 512), had the fewest loop instructions offline (sm_90 SASS, Triton 3.6,
#: ``benchmarks/decode_sass.py``, whole tiles: 4.04 per weight, gate/up 3.94; the fp32-product byte permutes 6.28
#: / 5.91, the word-wise decode 9.50 / 7.23) but too few bytes in flight per SM: 8.7, 7.6, 38.2, 134.1, 47.2 µs,
#: and the decoder slower (H100, 237.2 vs 288.2 tok/s, 09db864). The loop reads x in the code tile's layout
#: (_nf4_x_words) and the absmax already broadcast (_nf4_tile): no shuffles or shared memory where a thread's code
#: load is 16 bytes, and the planes as per-thread values (_nf4_plane_regs: ptxas had copied planes held in uniform
#: registers into registers once per permute, +1 per weight). Products and sums in bf16 pairs: rel. L2 3.2-4.1e-3
#: against the exact codes' fp32 product at BAGEL's shapes (GPU test ``test_nf4_hfma_bf16``), where NF4's own
#: rounding of the weights is ~1e-1 (fast_decode "triton-fp32" keeps the word-wise fp32 decode for A/B runs).
NF4_HFMA_SETTINGS = {
    "gemv": dict(BN=4, BK=512, num_warps=1, hfma=True),
    "gemv_long": dict(BN=4, BK=1024, num_warps=2, hfma=True),
    "gemv_wide": dict(BN=4, BK=512, num_warps=1, hfma=True),
    "swiglu": dict(BN=2, BK=512, num_warps=1, hfma=True),
}
#: FP8 with packed bf16 products (``hfma``: :func:`_q8_hfma`; bf16 x on sm_89+, else the fp32 decode): the default
#: since the fifteenth stop, at settings from a kernel sweep (H100, ``bench_kernels.py --only qgemv --graph
#: --providers hfma``, 09db864 / 1ff1e2e, microseconds, the fp32 decode -> these): qkv 8.5 -> 6.5, o 7.2 -> 4.8,
#: down 30.5 -> 28.6 (the decoder keeps FP8 down split-K on the tensor cores: decode_mma.prefers_split), gate/up +
#: SwiGLU (FMA kernel, fast_decode "triton-fma") 59.1 -> 50.2, lm_head (FMA kernel) 211.9 -> 177.9. Greedy decode
#: (one process, H100, 1ff1e2e, median of 5): 280.6 -> 283.2 tok/s (three A/Bs: +0.9 to +3.0 %). The first pick,
#: 8 x 512 / 1 warp, had the fewest loop instructions offline (3.88 per weight, gate/up 3.78, against the fp32
#: decode's 6.50 / 5.77) but too few bytes in flight (down 57.9 µs). Rel. L2 2.5-3.2e-3 against the fp32 product
#: (GPU test ``test_q8_hfma_bf16``).
FP8_HFMA_SETTINGS = {
    "gemv": dict(BN=4, BK=512, num_warps=1, hfma=True),
    "gemv_long": dict(BN=8, BK=1024, num_warps=4, hfma=True),
    "swiglu": dict(BN=4, BK=512, num_warps=1, hfma=True),
}
#: INT8 with packed bf16 products (bf16 x on sm_80+), from the same sweep
#: (H100, 1ff1e2e, microseconds, the fp32 decode -> these): qkv 6.3 -> 5.3, o 5.4 -> 4.5, gate/up + SwiGLU (FMA
#: kernel) 52.3 -> 48.5, lm_head (FMA kernel) 190.9 -> 177.5; down keeps the fp32 decode (27.1 against 27.3 at the
#: best packed setting, 4 x 1024 / 2). Greedy decode (one process, H100, 1ff1e2e, median of 5, at FP8's gemv
#: settings 4 x 512 / 1 and packed down 8 x 1024 / 4): 297.7 -> 303.4 tok/s (three A/Bs: +0.8 to +1.9 %); these
#: settings measured per kernel only. Rel. L2 2.5-2.6e-3 against the fp32 product (``test_q8_hfma_bf16``).
#: The default since 2026-12-07. It was off for a stop: with it on, the tiny checkpoint's INT8 greedy decode in
#: bf16 diverged from the modules' forward on an H100 (logits rel. L2 0.72,
#: ``test_compressed_greedy_matches_torch_bf16``, a0527a6) while the kernel tests passed, at BAGEL's shapes and the
#: tiny checkpoint's (rel. L2 2.44-2.53e-3, as FP8's 2.51-2.84e-3; b195568): a near-tie flip of the tiny model's
#: greedy ids, after which the test compared every later logit of two different prefixes. Comparing the shared
#: prefix only (``conftest.same_prefix_rel_l2``), the test passes with these products (H100, 2e7b1d6). Worth +2 %
#: (decode, one process, H100, a0527a6, median of 3: 318.8 vs 312.4 tok/s); ``fast_decode`` "triton-fp32" keeps
#: the fp32 products for A/B runs.
INT8_HFMA_SETTINGS = {
    "gemv": dict(BN=2, BK=512, num_warps=1, hfma=True),
    "gemv_long": dict(SETTINGS["gemv_long"]),
    "swiglu": dict(BN=4, BK=512, num_warps=1, hfma=True),
}
_NF4_PRMT = Switch()
_NF4_HFMA = Switch(True)
_FP8_HFMA = Switch(True)
_INT8_HFMA = Switch(True)
#: within the block, NF4 decode GEMVs take the byte-permute decode (:data:`NF4_PRMT_SETTINGS`) where the packed
#: products are off (``nf4_hfma_on(False)``)
nf4_prmt_on = _NF4_PRMT.on
#: NF4 decode GEMVs take the byte-permute decode with bf16 products (:data:`NF4_HFMA_SETTINGS`; on by default, off
#: within ``nf4_hfma_on(False)``: the word-wise fp32 decode, :data:`NF4_SETTINGS`)
nf4_hfma_on = _NF4_HFMA.on
#: FP8 decode GEMVs take the packed bf16 products (:data:`FP8_HFMA_SETTINGS`; on by default, off within
#: ``fp8_hfma_on(False)``: :data:`SETTINGS`)
fp8_hfma_on = _FP8_HFMA.on
#: INT8 decode GEMVs take the packed bf16 products (:data:`INT8_HFMA_SETTINGS`; on by default, off within
#: ``int8_hfma_on(False)``: :data:`SETTINGS`)
int8_hfma_on = _INT8_HFMA.on
LONG_K = 8192
WIDE_N = 8192  # more output channels than this: lm_head's settings (NF4 here, the tensor-core GEMVs' "wide")


def settings(kind: str, w: DecodeWeight) -> dict:
    """Launch settings of ``kind`` ("gemv" or "swiglu") for ``w`` (every format; NF4's BK at least its block)."""
    if kind == "gemv" and w.shape[1] > LONG_K:
        kind = "gemv_long"
    if w.fmt == "fp8" and _FP8_HFMA.value:
        return dict(FP8_HFMA_SETTINGS[kind])
    if w.fmt == "int8" and _INT8_HFMA.value:
        return dict(INT8_HFMA_SETTINGS[kind])
    if w.fmt != "nf4":
        return dict(SETTINGS[kind])
    if kind == "gemv" and w.shape[0] > WIDE_N:
        kind = "gemv_wide"
    table = NF4_HFMA_SETTINGS if _NF4_HFMA.value else NF4_PRMT_SETTINGS if _NF4_PRMT.value else NF4_SETTINGS
    cfg = dict(table[kind])
    cfg["BK"] = max(cfg["BK"], w.blocksize)
    return cfg


def _x_words_ok(x: Tensor, nbytes: int) -> bool:
    """Whether the packed-bf16 decodes can read ``x`` as words of ``nbytes`` (pairs of bf16 and more): bf16, and
    every row starting on an ``nbytes`` boundary."""
    return x.dtype == torch.bfloat16 and x.data_ptr() % nbytes == 0 and x.stride(0) * 2 % nbytes == 0


def _nf4_options(cfg: dict, x: Tensor) -> tuple[dict, dict]:
    """(launch settings, kernel options) of NF4 settings for activations ``x``: ``wordwise``, ``prmt`` and
    ``hfma`` are decodes, not launch settings; ``hfma`` reads x as int32 pairs of bf16 (:func:`_x_words_ok`;
    other x take ``prmt``); the byte-permute decodes (inline PTX) fall back to the per-code gather of the exact
    codes in the interpreter."""
    c = dict(cfg)
    wordwise, prmt, hfma = c.pop("wordwise", False), c.pop("prmt", False), c.pop("hfma", False)
    if hfma and not _x_words_ok(x, 4):
        prmt, hfma = True, False
    if (prmt or hfma) and is_interpreting():
        return c, dict(WORDWISE=False, PRMT=False, HFMA=False)
    return c, dict(WORDWISE=wordwise and not (prmt or hfma), PRMT=prmt and not hfma, HFMA=hfma)


def _q8_options(cfg: dict, x: Tensor, *ws: DecodeWeight, native: bool | None = None) -> tuple[dict, bool]:
    """(launch settings, HFMA) of one-byte settings for activations ``x``: ``hfma`` is a decode, not a launch
    setting, taken where it can run: bf16 x; packed bf16 FMAs (sm_80+); for FP8 the conversion instruction too
    (sm_89+; ``native`` False forbids it, None asks the GPU — not :data:`fp8_matmul.NATIVE_DEFAULT`, which
    chooses between the exact decodes and would keep this one off everywhere); not the interpreter (inline
    PTX); rows of whole int32 words on 4-byte aligned codes and 8-byte aligned x rows (read as int64).
    Otherwise the exact fp32 decode (:func:`_decode8`)."""
    c = dict(cfg)
    hfma = c.pop("hfma", False) and _x_words_ok(x, 8) and not is_interpreting() and x.device.type == "cuda"
    if ws[0].fmt == "fp8":
        hfma = hfma and (native if native is not None else has_capability(8, 9, x.device))
    hfma = hfma and has_capability(8, 0, x.device)
    hfma = hfma and ws[0].shape[1] % 4 == 0 and all(w.codes.data_ptr() % 4 == 0 for w in ws)
    return c, hfma


def _q8_codes(w: DecodeWeight, hfma: bool) -> Tensor:
    # the codes as the one-byte kernels read them: bytes, or with ``hfma`` int32 words of 4 codes
    return w.codes.view(torch.uint8).view(torch.int32) if hfma else _codes(w)


def _check(x: Tensor, *ws: DecodeWeight) -> tuple[int, int, int]:
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    M, K = x.shape
    assert M <= MAX_M, f"qgemv handles at most {MAX_M} rows, got {M}"
    for w in ws:
        N = w.shape[0]
        assert w.shape[1] == K and w.codes.is_contiguous() and w.scale.is_contiguous(), (w.shape, K)
        assert w.scale.dtype == torch.float32 and w.codes.device == x.device
        if w.fmt == "nf4":
            assert K % w.blocksize == 0 and w.blocksize % 8 == 0, (K, w.blocksize)  # rows of whole int32 words
            assert w.codes.dtype == torch.uint8 and w.codes.numel() == N * K // 2
            assert w.scale.numel() == N * K // w.blocksize and w.table.dtype == torch.float32
            assert w.table.numel() == 16 and w.table.data_ptr() % 64 == 0, "the NF4 table must be 64-byte aligned"
            assert w.planes is not None and w.planes.dtype == torch.int32 and w.planes.numel() == 16
        else:
            assert w.codes.dtype == {"int8": torch.int8, "fp8": FP8}[w.fmt] and w.codes.shape == (N, K)
            assert w.scale.numel() == N
    return M, ws[0].shape[0], K


def _code(w: DecodeWeight, x: Tensor, native: bool | None = None) -> str:
    """The decode of a one-byte format: FP8 by the conversion instruction or by bit moves, as
    :func:`quant.fp8_matmul._native` decides (``native``: None = its default)."""
    return "fp8_native" if w.fmt == "fp8" and fp8_matmul._native(x.device, native) else w.fmt


def _codes(w: DecodeWeight) -> Tensor:
    return w.codes.view(torch.uint8) if w.fmt == "fp8" else w.codes


def _qgemv(x: Tensor, w: DecodeWeight, bias: Tensor | None, pdl: bool, cfg: dict,
           native: bool | None = None) -> Tensor:
    M, N, K = _check(x, w)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    b = bias if bias is not None else w.scale
    if w.fmt == "nf4":
        args = (x, w.codes.view(torch.int32), w.scale, w.table, w.planes, b, y, N, K, x.stride(0), y.stride(0), M)
        c, opts = _nf4_options(cfg, x)
        _launch(_nf4_gemv_kernel, c, N, args, pdl, HAS_BIAS=bias is not None, BLOCKSIZE=w.blocksize, **opts,
                EVEN_K=opts["HFMA"] and K % c["BK"] == 0)
    else:
        c, hfma = _q8_options(cfg, x, w, native=native)
        args = (x, _q8_codes(w, hfma), w.scale, b, y, N, K, x.stride(0), y.stride(0), M)
        _launch(_q8_gemv_kernel, c, N, args, pdl, HAS_BIAS=bias is not None, CODE=_code(w, x, native), HFMA=hfma,
                EVEN_K=hfma and K % c["BK"] == 0)
    return y


def _qgemv_swiglu(x: Tensor, gate: DecodeWeight, up: DecodeWeight, pdl: bool, cfg: dict) -> Tensor:
    assert (gate.fmt, gate.shape, gate.blocksize) == (up.fmt, up.shape, up.blocksize), "gate / up differ"
    M, N, K = _check(x, gate, up)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if gate.fmt == "nf4":
        # one table for both, shared when the weights are built (torch.equal here would synchronise the device
        # on every call, which invalidates a CUDA-graph capture: the NF4 decode graph failed that way on the H200)
        assert gate.table is up.table, "gate / up must share one NF4 code table (see swiglu_pair)"
        args = (x, gate.codes.view(torch.int32), gate.scale, up.codes.view(torch.int32), up.scale, gate.table,
                gate.planes, y, N, K, x.stride(0), y.stride(0), M)
        c, opts = _nf4_options(cfg, x)
        _launch(_nf4_gemv_swiglu_kernel, c, N, args, pdl, BLOCKSIZE=gate.blocksize, **opts,
                EVEN_K=opts["HFMA"] and K % c["BK"] == 0)
    else:
        c, hfma = _q8_options(cfg, x, gate, up)
        args = (x, _q8_codes(gate, hfma), _q8_codes(up, hfma), gate.scale, up.scale, y, N, K, x.stride(0),
                y.stride(0), M)
        _launch(_q8_gemv_swiglu_kernel, c, N, args, pdl, CODE=_code(gate, x), HFMA=hfma,
                EVEN_K=hfma and K % c["BK"] == 0)
    return y


def qgemv(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
          native: bool | None = None) -> Tensor:
    """``x @ dequantize(w).T (+ bias)`` for a few rows (decode), the codes decoded in registers.

    Args:
        x: [M, K], M <= 4, bf16 / fp16 / fp32, last dim contiguous.
        w: the compressed [N, K] weight (:func:`decode_weight`, :func:`concat`). bias: [N] or None.
        pdl: programmatic dependent launch, as in :func:`bagel_rt.kernels.gemv`.
        native: FP8 only: e4m3 decoded by the conversion instruction or by bit moves (None: the default).
    Returns:
        [M, N] in x.dtype; fp32 sums, scale and bias applied before the one rounding.
    """
    return _qgemv(x, w, bias, pdl, settings("gemv", w), native)


#: split-K settings of the one-byte formats' FMA GEMV (:func:`qgemv_parts`): the part count and the launch. An
#: A/B candidate for the long down projection (K = 18944, 3.1 TB/s unsplit at 4 x 1024 / 4 on the H200: its 896
#: programs leave SMs with 6 or 7, a one-program tail); slower in the decoder, so "triton-fsplit" only (one
#: process, H200, 7b1c684, tok/s, unsplit / split: INT8 387.1 / 383.1, FP8 344.3 / 331.8)
PARTS_SETTINGS = dict(BN=4, BK=1024, num_warps=4, parts=2)
#: NF4's (packed bf16 products, as its unsplit default): its down projection streamed at ~1.4 TB/s on an H100
#: (25.3 µs for 36 MB, 1ff1e2e profile) while bf16's GEMVs reach ~2.9 TB/s — too few bytes in flight per SM: the
#: 896 programs of 4 channels hold one tile each, ~14 KB per SM at 1024 columns. Two parts double the programs
#: (and the bytes in flight); 512 columns keep every part's loop on whole tiles (18944 = 37 x 512), so the
#: packed products need no column masks. The decoder's default for NF4's down since it measured faster in the
#: decoder (one process, H200, 7b1c684: NF4 decode 339.2 -> 354.8 tok/s; see ``fast_decode.GEMVS``).
NF4_PARTS_SETTINGS = dict(BN=4, BK=512, num_warps=1, parts=2, hfma=True)


def _parts_plan(w: DecodeWeight, K: int, cfg: dict | None) -> tuple[dict, int]:
    # (launch settings, columns per part) of a split-K FMA GEMV of ``w``: ``cfg`` (default: the format's
    # settings above) with the interpreter's small tiles there, NF4's BK at least its block; whole BK tiles per
    # part, so every part's loop runs whole tiles but the last (at most ``parts`` parts, fewer for short rows)
    c = dict(cfg or (NF4_PARTS_SETTINGS if w.fmt == "nf4" else PARTS_SETTINGS))
    parts = c.pop("parts")
    if is_interpreting():
        c = dict(INTERPRETER_CONFIG)
    if w.fmt == "nf4":
        c["BK"] = max(c["BK"], w.blocksize)
    return c, _part_columns(K, c["BK"], parts)


def _part_columns(K: int, BK: int, parts: int) -> int:
    # columns per part of a split-K GEMV (this module's and decode_mma's): whole BK tiles, so every part's loop
    # runs whole tiles but the last
    return triton.cdiv(triton.cdiv(K, parts), BK) * BK


def _parts_ref(K: int, per: int, part, bias: Tensor | None) -> Tensor:
    # fp32 [P, M, N] of a split-K reference: ``part(lo, hi)`` the fp64 [M, N] product of columns [lo, hi), the
    # bias in part 0
    out = []
    for lo in range(0, max(K, 1), per):
        rows = part(lo, lo + per)
        if bias is not None and lo == 0:
            rows = rows + bias.double()[None, :]
        out.append(rows.float())
    return torch.stack(out)


def qgemv_parts(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
                cfg: dict | None = None) -> Tensor:
    """:func:`qgemv` split over column ranges (split-K): the fp32 partial products [P, M, N] whose sum (in order)
    is ``x @ dequantize(w).T (+ bias, in part 0)``; ``bagel_rt.kernels.add_rms_norm_parts`` sums them in the
    residual add that follows, so the split costs no launch of its own. ``cfg``: launch settings plus ``parts``
    (the ranges asked for; P may come out smaller for short rows; default :data:`PARTS_SETTINGS`, NF4
    :data:`NF4_PARTS_SETTINGS`: its packed bf16 products where bf16 x allows, as :func:`qgemv`)."""
    M, N, K = _check(x, w)
    c, per = _parts_plan(w, K, cfg)
    P = max(1, triton.cdiv(K, per))
    y = torch.empty((P, M, N), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return y.zero_()
    b = bias if bias is not None else w.scale
    grid = (triton.cdiv(N, c["BN"]), P, M)
    split = dict(HAS_BIAS=bias is not None, K_PER=per, stride_yp=y.stride(0), SPLIT=True,
                 **prefetch_kwargs(pdl, x.device))
    if w.fmt == "nf4":
        c, opts = _nf4_options(c, x)
        even = opts["HFMA"] and K % c["BK"] == 0
        _nf4_gemv_kernel[grid](x, w.codes.view(torch.int32), w.scale, w.table, w.planes, b, y, N, K, x.stride(0),
                               y.stride(1), BLOCKSIZE=w.blocksize, **opts, EVEN_K=even, **split, **c)
    else:
        _q8_gemv_kernel[grid](x, _codes(w), w.scale, b, y, N, K, x.stride(0), y.stride(1), CODE=_code(w, x),
                              **split, **c)
    return y


def qgemv_parts_ref(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
                    cfg: dict | None = None) -> Tensor:
    """Reference of :func:`qgemv_parts`: the same column ranges, each range's product in fp64 (the bias in part
    0), as fp32 [P, M, N] (``pdl`` unused)."""
    K = x.shape[1]
    per = _parts_plan(w, K, cfg)[1]
    wd, xd = dequantize_ref(w).double(), x.double()
    return _parts_ref(K, per, lambda lo, hi: xd[:, lo:hi] @ wd[:, lo:hi].T, bias)


def qgemv_swiglu(x: Tensor, gate: DecodeWeight, up: DecodeWeight, pdl: bool = False) -> Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for a few rows in one kernel (gate and up: same format and shape).

    Returns:
        [M, I] in x.dtype (each projection rounded to x.dtype, the SwiGLU in fp32, rounded once).
    """
    return _qgemv_swiglu(x, gate, up, pdl, settings("swiglu", gate))
