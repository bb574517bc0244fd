"""Dequantizing matmuls: ``out[M, N] = x[M, K] @ dequant(W)[N, K].T`` for INT8 and NF4 weights.

* ``int8_matmul(x, qweight, scale)``: W8A16, ``W = qweight * scale[:, None]`` (per-output-channel scale).
* ``nf4_matmul(x, packed, absmax, blocksize, shape)``: W4A16, ``W = quant_map[idx] * absmax[block]`` in the
  bitsandbytes NF4 layout (row-major flattened weight, high nibble = even element).

Three paths, picked by the number of rows M and the format (``mode="auto"``) or forced with ``mode``:

* ``"gemv"`` (auto for NF4 at M = 1, decode): one program per (``BN`` output channels, row), streaming the
  weight rows once per row; fp32 partial sums stay per lane and are reduced once at the end.
* ``"gemm"`` (auto for INT8 at M <= ``ROWS_MAX_M``): tiled ``tl.dot`` GEMM dequantizing each weight tile in
  registers. With one row tile of 16 ("rows" settings) every weight tile is read once for all rows: on an
  H200 (``benchmarks/tune_quant_rows.py``, CUDA-graph replays, 873e842) INT8 gate/up 18944x3584 takes 23.8 us at
  4-16 rows (2.85 TB/s of weights) against 36.6 us for bf16 cuBLAS, 103-391 us for the per-row GEMV and
  95.8 us for dequant + cuBLAS. NF4 does not gain there: its select-tree decode is ALU-bound (gate/up 103 us).
* ``"dequant"`` (auto otherwise): a Triton kernel dequantizes the whole weight (row chunks only past
  ``DEQUANT_CHUNK`` elements) to x.dtype, then ``F.linear`` (cuBLAS). At M ~ 8k rows this costs the GEMM
  plus ~4% (gate/up: dequant 0.06 ms, GEMM 1.58 ms); NF4 at 2-16 rows 91 us vs 313-1232 us for its GEMV.
  The fused GEMM loses at many rows because it re-dequantizes every weight tile once per row tile.

NF4 codes are looked up with a tree of selects over the 16 code values (held as scalars): on GPUs a per-element
gather from the 16-entry table is several times slower. Accumulation is fp32; the result has the dtype of ``x``
(fp16, bf16 or fp32). The ``*_ref`` functions (same signatures) dequantize to fp32 and call ``F.linear``.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "GEMV_MAX_M",
    "DEQUANT_CHUNK",
    "int8_matmul",
    "int8_matmul_ref",
    "int8_dequant",
    "nf4_matmul",
    "nf4_matmul_ref",
    "nf4_dequant",
    "nf4_dequant_ref",
]

GEMV_MAX_M = 1  # NF4 rows up to which the GEMV beats dequant + cuBLAS (H200: 81 vs 96 us at 1 row)
DEQUANT_CHUNK = 1 << 28  # elements of dequantized weight materialized at once by the "dequant" path (512 MB bf16)


def _default_nf4_code(device: torch.device) -> Tensor:
    from .nf4 import nf4_code  # nf4.py imports this module

    return nf4_code(device)


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def int8_matmul_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ (qweight [N, K] int8 * scale [N])^T (+ bias [N]) in fp32 -> [M, N] in x.dtype."""
    w = qweight.float() * scale.float().unsqueeze(1)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def nf4_dequant_ref(packed: Tensor, absmax: Tensor, blocksize: int, shape: tuple[int, int],
                    quant_map: Tensor | None = None) -> Tensor:
    """fp32 [N, K] weight from the packed NF4 bytes and fp32 per-block absmax."""
    n = math.prod(shape)
    code = (_default_nf4_code(packed.device) if quant_map is None else quant_map).float()
    p = packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    blk = torch.arange(n, device=p.device) // blocksize
    return (code[idx] * absmax.float()[blk]).reshape(shape)


def nf4_matmul_ref(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, shape: tuple[int, int],
                   quant_map: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ dequant_nf4(packed, absmax)^T (+ bias [N]) in fp32 -> [M, N] in x.dtype."""
    w = nf4_dequant_ref(packed, absmax, blocksize, shape, quant_map)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, GROUP_M row tiles at a time so that weight tiles stay in L2."""
    i_pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    n_in_group = GROUP_M * n_n
    first_m = (i_pid // n_in_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (i_pid % n_in_group) % group_m, (i_pid % n_in_group) // group_m


@triton.jit
def _select16(idx, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15):
    """q[idx] for a tensor of 4-bit indices, as a binary tree of 15 selects over the scalars q0..q15 (in the
    compute-heavy kernels this is several times faster than a per-element gather from the table)."""
    b0 = (idx & 1) != 0
    b1 = (idx & 2) != 0
    b2 = (idx & 4) != 0
    b3 = (idx & 8) != 0
    v01, v23 = tl.where(b0, q1, q0), tl.where(b0, q3, q2)
    v45, v67 = tl.where(b0, q5, q4), tl.where(b0, q7, q6)
    v89, vab = tl.where(b0, q9, q8), tl.where(b0, q11, q10)
    vcd, vef = tl.where(b0, q13, q12), tl.where(b0, q15, q14)
    v03, v47 = tl.where(b1, v23, v01), tl.where(b1, v67, v45)
    v8b, vcf = tl.where(b1, vab, v89), tl.where(b1, vef, vcd)
    return tl.where(b3, tl.where(b2, vcf, v8b), tl.where(b2, v47, v03))


# ----------------------------------------------------------------------------------------------------------------
# INT8 kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, N, K, stride_xm, stride_om, HAS_BIAS: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr):
    i_n, i_m = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_row = o_n.to(tl.int64) * K
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        # [BK]
        b_x = tl.load(x_ptr + i_m * stride_xm + o_k, mask=m_k, other=0).to(tl.float32)
        # [BN, BK]
        b_w = tl.load(w_ptr + o_row[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0)
        acc += b_w.to(tl.float32) * b_x[None, :]
    b_s = tl.load(s_ptr + o_n, mask=m_n, other=0)
    out = tl.sum(acc, axis=1) * b_s
    if HAS_BIAS:
        out += tl.load(b_ptr + o_n, mask=m_n, other=0).to(tl.float32)
    tl.store(o_ptr + i_m * stride_om + o_n, out.to(o_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_om, HAS_BIAS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    i_m, i_n = _grouped_tile(M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    o_row = o_n.to(tl.int64) * K
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        # [BM, BK]
        b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0)
        # [BN, BK]: |q| <= 127 is exact in fp16/bf16
        b_w = tl.load(w_ptr + o_row[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0)
        acc = tl.dot(b_x, tl.trans(b_w.to(b_x.dtype)), acc, input_precision=DOT_PRECISION)
    b_s = tl.load(s_ptr + o_n, mask=m_n, other=0)
    acc = acc * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_n, mask=m_n, other=0).to(tl.float32)[None, :]
    tl.store(o_ptr + o_m[:, None] * stride_om + o_n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (o_n < N)[:, None] & (o_k < K)[None, :]
    o = o_n.to(tl.int64)[:, None] * K + o_k[None, :]
    # [BN, BK]
    b_w = tl.load(w_ptr + o, mask=m, other=0).to(tl.float32)
    b_s = tl.load(s_ptr + o_n, mask=o_n < N, other=0)
    tl.store(o_ptr + o, (b_w * b_s[:, None]).to(o_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# NF4 kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _nf4_gemv_kernel(x_ptr, p_ptr, a_ptr, c_ptr, b_ptr, o_ptr, N, K, stride_xm, stride_om, HAS_BIAS: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # BK is a multiple of BLOCKSIZE; K is a multiple of BLOCKSIZE (so even: rows start on a byte boundary)
    NB: tl.constexpr = BK // BLOCKSIZE
    i_n, i_m = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_row = o_n.to(tl.int64) * K
    o_j = tl.arange(0, BK // 2)  # byte j of the K chunk holds elements 2j (high nibble) and 2j + 1 (low nibble)
    o_b = tl.arange(0, NB)
    q0, q1, q2, q3 = tl.load(c_ptr), tl.load(c_ptr + 1), tl.load(c_ptr + 2), tl.load(c_ptr + 3)
    q4, q5, q6, q7 = tl.load(c_ptr + 4), tl.load(c_ptr + 5), tl.load(c_ptr + 6), tl.load(c_ptr + 7)
    q8, q9, q10, q11 = tl.load(c_ptr + 8), tl.load(c_ptr + 9), tl.load(c_ptr + 10), tl.load(c_ptr + 11)
    q12, q13, q14, q15 = tl.load(c_ptr + 12), tl.load(c_ptr + 13), tl.load(c_ptr + 14), tl.load(c_ptr + 15)
    acc = tl.zeros([BN, NB, BLOCKSIZE // 2], dtype=tl.float32)
    for k0 in range(0, K, BK):
        m_k = k0 + 2 * o_j < K
        # [BN, BK // 2]
        b_p = tl.load(p_ptr + (o_row + k0)[:, None] // 2 + o_j[None, :], mask=m_n[:, None] & m_k[None, :], other=0)
        b_p = b_p.to(tl.int32)
        # [BK // 2]
        b_xe = tl.load(x_ptr + i_m * stride_xm + k0 + 2 * o_j, mask=m_k, other=0).to(tl.float32)
        b_xo = tl.load(x_ptr + i_m * stride_xm + k0 + 2 * o_j + 1, mask=m_k, other=0).to(tl.float32)
        b_hi = _select16(b_p >> 4, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15)
        b_lo = _select16(b_p & 15, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15)
        b_s = b_hi * b_xe[None, :] + b_lo * b_xo[None, :]
        # [BN, NB]: one absmax per quantization block
        m_b = m_n[:, None] & (k0 + o_b * BLOCKSIZE < K)[None, :]
        b_a = tl.load(a_ptr + (o_row + k0)[:, None] // BLOCKSIZE + o_b[None, :], mask=m_b, other=0)
        acc += tl.reshape(b_s, [BN, NB, BLOCKSIZE // 2]) * b_a[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + o_n, mask=m_n, other=0).to(tl.float32)
    tl.store(o_ptr + i_m * stride_om + o_n, out.to(o_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _nf4_gemm_kernel(x_ptr, p_ptr, a_ptr, c_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # BK divides BLOCKSIZE (one absmax per weight row and K step) or is a multiple of it (NB absmax per row and
    # K step); either way BK divides K: no K tail
    NB: tl.constexpr = BK // BLOCKSIZE if BK > BLOCKSIZE else 1
    i_m, i_n = _grouped_tile(M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    o_row = o_n.to(tl.int64) * K
    o_j = tl.arange(0, BK // 2)
    o_k = tl.arange(0, BK)
    q0, q1, q2, q3 = tl.load(c_ptr), tl.load(c_ptr + 1), tl.load(c_ptr + 2), tl.load(c_ptr + 3)
    q4, q5, q6, q7 = tl.load(c_ptr + 4), tl.load(c_ptr + 5), tl.load(c_ptr + 6), tl.load(c_ptr + 7)
    q8, q9, q10, q11 = tl.load(c_ptr + 8), tl.load(c_ptr + 9), tl.load(c_ptr + 10), tl.load(c_ptr + 11)
    q12, q13, q14, q15 = tl.load(c_ptr + 12), tl.load(c_ptr + 13), tl.load(c_ptr + 14), tl.load(c_ptr + 15)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        # [BM, BK]
        b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + k0 + o_k[None, :], mask=m_m[:, None], other=0)
        # [BN, BK // 2] packed bytes
        b_p = tl.load(p_ptr + (o_row + k0)[:, None] // 2 + o_j[None, :], mask=m_n[:, None], other=0).to(tl.int32)
        b_hi = _select16(b_p >> 4, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15)
        b_lo = _select16(b_p & 15, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15)
        if NB == 1:  # [BN]: one absmax per row
            b_a = tl.load(a_ptr + (o_row + k0) // BLOCKSIZE, mask=m_n, other=0)
            b_hi, b_lo = b_hi * b_a[:, None], b_lo * b_a[:, None]
        else:  # [BN, NB]: one absmax per quantization block of the K step
            o_b = tl.arange(0, NB)
            b_a = tl.load(a_ptr + (o_row + k0)[:, None] // BLOCKSIZE + o_b[None, :], mask=m_n[:, None], other=0)
            b_hi = tl.reshape(tl.reshape(b_hi, [BN, NB, BLOCKSIZE // 2]) * b_a[:, :, None], [BN, BK // 2])
            b_lo = tl.reshape(tl.reshape(b_lo, [BN, NB, BLOCKSIZE // 2]) * b_a[:, :, None], [BN, BK // 2])
        # [BN, BK]: interleave (element 2j = high nibble, 2j + 1 = low nibble)
        b_w = tl.reshape(tl.join(b_hi, b_lo), [BN, BK]).to(b_x.dtype)
        acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_n, mask=m_n, other=0).to(tl.float32)[None, :]
    tl.store(o_ptr + o_m[:, None] * stride_om + o_n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _nf4_dequant_kernel(p_ptr, a_ptr, c_ptr, o_ptr, n_bytes, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK bytes = 2 * BLOCK elements per program; element 2j is the high nibble of byte j
    o_j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o_j < n_bytes
    b_p = tl.load(p_ptr + o_j, mask=m, other=0).to(tl.int32)
    b_a = tl.load(a_ptr + (2 * o_j) // BLOCKSIZE, mask=m, other=0)  # BLOCKSIZE is even: both nibbles share it
    # a gather from the 16-entry table (L1-resident) is the fastest lookup in this memory-bound kernel
    b_w = tl.join(tl.load(c_ptr + (b_p >> 4)), tl.load(c_ptr + (b_p & 15))) * b_a[:, None]
    o_e = 2 * o_j[:, None] + tl.arange(0, 2)[None, :]
    tl.store(o_ptr + o_e, b_w.to(o_ptr.dtype.element_ty), mask=m[:, None])


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

# Launch settings, chosen by shape (the interpreter cannot autotune over several configs). Measured on H200.
# "rows": few rows (the image-marker rows of a denoising step, decode): one row tile of 16, so each weight tile
# is read once for all rows (the GEMV re-reads the weights once per row).
GEMM_SETTINGS = {"large": dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
                 "small": dict(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=3),
                 "rows": dict(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4)}  # BN, BK by shape
GEMV_SETTINGS = {"int8": dict(BN=8, BK=512, num_warps=4), "nf4": dict(BN=8, BK=512, num_warps=4)}
ROWS_MAX_M = 16  # "rows" settings up to this many rows


def rows_settings(N: int, K: int) -> dict:
    """Few-rows GEMM settings for a [N, K] weight: more programs for few output channels, longer K steps for
    long rows (``benchmarks/tune_quant_rows.py`` on an H200)."""
    return dict(GEMM_SETTINGS["rows"], BN=16 if N <= 1024 else 32, BK=256 if K >= 8192 else 128)


def _gemm_settings(M: int, N: int, K: int) -> dict:
    if M <= ROWS_MAX_M:
        return rows_settings(N, K)
    return dict(GEMM_SETTINGS["large" if M >= 128 and N >= 128 else "small"])


def _check_x(x: Tensor, K: int) -> None:
    assert x.ndim == 2 and x.shape[1] == K, f"x must be [M, {K}], got {tuple(x.shape)}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert x.stride(1) == 1, "x must be contiguous along K"


def _check_bias(bias: Tensor | None, N: int) -> None:
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), "bias must be a contiguous [N]"


def _path(M: int, mode: str, fmt: str) -> str:
    assert mode in ("auto", "gemv", "gemm", "dequant"), mode
    if mode != "auto":
        return mode
    if fmt == "int8":
        return "gemm" if M <= ROWS_MAX_M else "dequant"
    return "gemv" if M <= GEMV_MAX_M else "dequant"


def _dequant_linear(x: Tensor, N: int, K: int, dequant_rows, bias: Tensor | None) -> Tensor:
    """x @ W^T + bias with W dequantized by ``dequant_rows(n0, n1)`` -> [n1 - n0, K].

    The whole weight at once up to ``DEQUANT_CHUNK`` elements: row chunks of a weight made cuBLAS pick a
    slower kernel for the odd-sized chunks and cost a concatenation of the outputs (H200, 8196 rows, gate/up
    18944x3584 as 2 chunks: 4.57 ms vs 1.58 ms for the bf16 GEMM; whole: dequant 0.06 ms + the same GEMM)."""
    rows = max(1, DEQUANT_CHUNK // K)
    if rows >= N:
        return F.linear(x, dequant_rows(0, N), bias)
    parts = [F.linear(x, dequant_rows(n0, min(n0 + rows, N))) for n0 in range(0, N, rows)]
    out = torch.cat(parts, dim=1)
    return out if bias is None else out + bias


def int8_dequant(qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Triton: qweight [N, K] int8 * scale [N] -> [N, K] in ``dtype``."""
    N, K = qweight.shape
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    BN, BK = 16, 256
    _int8_dequant_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](qweight, scale, out, N, K, BN=BN, BK=BK)
    return out


def nf4_dequant(packed: Tensor, absmax: Tensor, blocksize: int, shape: tuple[int, int],
                quant_map: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Triton: packed NF4 [(N*K)//2, 1] with fp32 absmax -> [N, K] in ``dtype`` (N*K even, blocksize even)."""
    n = math.prod(shape)
    assert n % 2 == 0 and blocksize % 2 == 0 and packed.numel() == n // 2 and packed.is_contiguous()
    code = _default_nf4_code(packed.device) if quant_map is None else quant_map
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    BLOCK = 1024
    _nf4_dequant_kernel[(triton.cdiv(n // 2, BLOCK),)](packed, absmax, code, out, n // 2, BLOCKSIZE=blocksize,
                                                        BLOCK=BLOCK)
    return out


def int8_matmul(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                mode: str = "auto") -> Tensor:
    """x [M, K] (fp16/bf16/fp32) @ (qweight [N, K] int8 * scale [N] fp32)^T (+ bias [N]) -> [M, N] in x.dtype.

    ``mode``: "auto" (few-rows GEMM up to ROWS_MAX_M rows, else dequant + cuBLAS), "gemv", "gemm" or
    "dequant". The bias is added in fp32 in the kernels' epilogue (in cuBLAS's on the dequant path).
    """
    N, K = qweight.shape
    _check_x(x, K)
    _check_bias(bias, N)
    assert qweight.dtype == torch.int8 and qweight.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (N,) and scale.is_contiguous()
    M = x.shape[0]
    path = _path(M, mode, "int8")
    if path == "dequant":
        return _dequant_linear(x, N, K, lambda n0, n1: int8_dequant(qweight[n0:n1], scale[n0:n1], x.dtype),
                               None if bias is None else bias.to(x.dtype))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    b = dict(b_ptr=bias if bias is not None else scale, HAS_BIAS=bias is not None)
    if path == "gemv":
        cfg = GEMV_SETTINGS["int8"]
        _int8_gemv_kernel[(triton.cdiv(N, cfg["BN"]), M)](x, qweight, scale, o_ptr=out, N=N, K=K,
                                                          stride_xm=x.stride(0), stride_om=out.stride(0), **b,
                                                          **cfg)
    else:
        cfg = _gemm_settings(M, N, K)
        grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
        _int8_gemm_kernel[grid](x, qweight, scale, o_ptr=out, M=M, N=N, K=K, stride_xm=x.stride(0),
                                stride_om=out.stride(0), **b,
                                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return out


def nf4_matmul(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, shape: tuple[int, int],
               quant_map: Tensor | None = None, bias: Tensor | None = None, mode: str = "auto") -> Tensor:
    """x [M, K] (fp16/bf16/fp32) @ dequant_nf4(packed, absmax)^T (+ bias [N]) -> [M, N] in x.dtype.

    packed: uint8 [(N*K)//2, 1] (bitsandbytes layout); absmax: fp32 [N*K // blocksize]; shape: (N, K) with K a
    multiple of ``blocksize`` (a power of two >= 32); quant_map: fp32 [16] (default: the NF4 code).
    ``mode`` and ``bias`` as in ``int8_matmul``.
    """
    N, K = shape
    _check_x(x, K)
    _check_bias(bias, N)
    assert blocksize >= 32 and blocksize & (blocksize - 1) == 0, blocksize
    assert K % blocksize == 0, f"K ({K}) must be a multiple of the NF4 blocksize {blocksize}"
    assert packed.dtype == torch.uint8 and packed.numel() == N * K // 2 and packed.is_contiguous()
    assert absmax.dtype == torch.float32 and absmax.numel() == N * K // blocksize and absmax.is_contiguous()
    code = _default_nf4_code(x.device) if quant_map is None else quant_map
    assert code.dtype == torch.float32 and code.numel() == 16 and code.is_contiguous()
    M = x.shape[0]
    path = _path(M, mode, "nf4")
    if path == "dequant":
        p, a, bpr = packed.reshape(-1), absmax.reshape(-1), K // blocksize  # bpr: absmax blocks per row

        def rows(n0: int, n1: int) -> Tensor:
            return nf4_dequant(p[n0 * K // 2: n1 * K // 2], a[n0 * bpr: n1 * bpr], blocksize, (n1 - n0, K), code,
                               x.dtype)

        return _dequant_linear(x, N, K, rows, None if bias is None else bias.to(x.dtype))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    b = dict(b_ptr=bias if bias is not None else absmax, HAS_BIAS=bias is not None)
    if path == "gemv":
        cfg = dict(GEMV_SETTINGS["nf4"])
        cfg["BK"] = max(cfg["BK"], blocksize)
        _nf4_gemv_kernel[(triton.cdiv(N, cfg["BN"]), M)](x, packed, absmax, code, o_ptr=out, N=N, K=K,
                                                         stride_xm=x.stride(0), stride_om=out.stride(0), **b,
                                                         BLOCKSIZE=blocksize, **cfg)
    else:
        cfg = _gemm_settings(M, N, K)
        if K % cfg["BK"]:  # BK must divide K (no K tail): one quantization block per step does
            cfg["BK"] = blocksize
        grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
        _nf4_gemm_kernel[grid](x, packed, absmax, code, o_ptr=out, M=M, N=N, K=K, stride_xm=x.stride(0),
                               stride_om=out.stride(0), **b, BLOCKSIZE=blocksize,
                               DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return out
