"""Decode GEMVs from one-byte weights on the tensor cores: the weights go to the MMA undecoded (INT8) or
through one packed conversion (FP8), and the activation row is split into exact *digits* instead.

:mod:`bagel_rt.quant.decode_gemv` decodes every weight to fp32 in registers and multiplies on the FMA pipe:
5.7 (INT8) and 6.4 (FP8) instructions per weight in its sm_90 loop (``benchmarks/decode_sass.py``), issue-bound
below the one-byte bandwidth (H200: ~2.2-2.4 TB/s measured against bf16's 3.3-4.1). Here the product runs on
the tensor cores, which take a 16-row operand; a decode step has one row (at most ``MAX_M`` = 4), so the 16
rows carry *digits* of the activation rows instead of padding:

* INT8: ``x[m] ~= sum_d u[m, d] * X[m, d]`` with int8 digits ``X[m, d]`` (d = 0..3) on a per-row power-of-two
  grid (``u[m, d] = 2^(E_m - 7 - 7 d)``, ``|x[m]| < 2^E_m``), so ``x @ W.T`` is four exact int8 x int8 MMAs
  (int32 sums: 127 * 127 * 18944 < 2^31) combined in fp32 in the epilogue. The digits telescope (``X_d =
  R_d - 128 R_{d-1}``, ``R_d = trunc(x / u_d)``), so they reconstruct ``x`` truncated to ``u[m, 3]``: an error
  below ``2^-27`` of the row's largest element, under the fp32 rounding of the sums themselves.
* FP8 (e4m3): the weight becomes fp16 exactly (every e4m3 value is an fp16 value; one conversion instruction
  per two weights on sm_89+), the row two fp16 digits (hi + lo) of ``x / 2^(E_m - 14)``: exact for bf16 and
  fp16 rows (fp16 holds their 8 / 11 significant bits in range), fp32 rows to ~22 bits; fp16 x fp16 products
  are exact in the fp32 accumulators.

* With :func:`wgmma_on` (an A/B candidate, Hopper): the weight tile is the MMA's first operand (64 channels, so
  Triton issues Hopper's asynchronous ``wgmma`` from shared memory, loads pipelined) and the digits the second.
  INT8 keeps its digits; FP8 takes four e4m3 digits of ``x / 2^(E_m - 8)`` (each the rounded remainder of the
  last, times 16: units ``2^(E_m - 8 - 4 d)``), so the e4m3 weights multiply undecoded on the FP8 tensor cores
  (``wgmma ... e4m3.e4m3``; Triton's MMAv2 path converts FP8 to fp16 first on sm_90). The rounding of each
  digit leaves at most 2^-4 of the remainder, so the row is carried to ~2^-16 of its largest element (values
  below 2^-6 of a digit's range wait for the next digit); the tensor cores sum FP8 products with less than fp32
  precision (Hopper's FP8 accumulation, ~2^-14 relative), far below bf16's 2^-9.

Row ``4 m + d`` of the digit operand holds digit d of row m (unused rows are zero with unit 0).
:func:`x_digits` computes them once per call (one small launch); the GEMV's loop then only streams weight
tiles into the MMA: 0.85-1.84 sm_90 loop instructions per INT8 weight and 2.3-3.3 per FP8 weight, against 5.7
and 6.4 for the FMA kernels (offline SASS, see :data:`SETTINGS`). Measured on the H200 (CUDA-graph replay,
digits launch included): faster than the FMA kernels for the wide weights (gate/up + SwiGLU, lm_head: INT8 37.4
vs 42.0 us and 126.8 vs 151.2 us), slower for the 3584-channel projections, which fill too few programs per SM
(down 30.3 vs 21.8 us); so the decoder's default takes these kernels above :data:`MMA_MIN_N` channels only
(:func:`prefers_mma`; greedy decode INT8 1.484x, FP8 1.287x bf16, against 1.45x / 1.13x on the FMA kernels
alone, ``compressed_speed.py --tasks decode --decode-gemvs triton,triton-fma``, 7928ef3).

Each launcher has a ``*_ref`` twin with the same signature (digits by PyTorch, the same combination in fp64),
and ``tests/test_decode_mma.py`` compares both with the fp32 product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from bagel_rt.kernels._device import Switch, gdc_wait, is_interpreting, l2_prefetch, pdl_kwargs, prefetch_kwargs
from bagel_rt.kernels.gemv import MAX_M, swiglu_store
from bagel_rt.kernels.rms_norm import _added_row, _rms_norm_row, add_rms_norm_parts_ref, add_rms_norm_ref
from bagel_rt.kernels.swiglu import swiglu_ref
from torch import Tensor

# the same argument checks, code views, widths and split-K column ranges
from .decode_gemv import WIDE_N, DecodeWeight, _check, _codes, _part_columns, _parts_ref
from .fp8_matmul import e4m3_to_f32, e4m3_unit

__all__ = ["MMA_FORMATS", "Digits", "digit_kind", "prefers_mma", "prefers_split", "wgmma_on", "x_digits",
           "x_digits_ref",
           "add_rms_norm_digits", "add_rms_norm_digits_ref", "mma_gemv", "mma_gemv_ref", "mma_gemv_parts",
           "mma_gemv_parts_ref", "mma_gemv_swiglu", "mma_gemv_swiglu_ref"]

MMA_FORMATS = ("int8", "fp8")  # the formats these kernels take (NF4 keeps bagel_rt.quant.decode_gemv)
ROWS = 16  # the MMA's row count: MAX_M rows x DIGITS digits
DIGITS = 4
assert MAX_M * DIGITS == ROWS

# Launch settings (BN output channels x BK columns per program and iteration, warps, pipeline stages), by format
# and by kind: measured (``benchmarks/bench_kernels.py --only qgemv --graph``, H200, CUDA-graph replay, 5094047,
# nine candidates each; microseconds, INT8 / FP8): gate/up + SwiGLU 32 x 256 / 4 warps / 4 stages 37.4 / 42.4
# (64 x 256: 39.1 / 48.3; 16-channel tiles 46-218), lm_head 64 x 256 / 4 126.8 / 131.0 (16-channel tiles
# 156-566), down at best 30.3 / 35.4 (32 x 512), still slower than the FMA kernels' 21.8 / 29.2. Offline sm_90
# SASS (Triton 3.9, ``benchmarks/decode_sass.py``): INT8 BN 16 x BK 512 1.84 loop instructions per weight,
# 32 x 512 1.02, 64 x 256 0.85; FP8 32 x 256 3.25, 64 x 512 2.31; the FMA kernels 5.69 / 6.41. "narrow" (N <=
# WIDE_N) serves the A/B option "triton-mma" only (see MMA_MIN_N).
SETTINGS = {
    "int8": {"narrow": dict(BN=32, BK=512, num_warps=4), "wide": dict(BN=64, BK=256, num_warps=4),
             "swiglu": dict(BN=32, BK=256, num_warps=4, num_stages=4),
             "split": dict(BN=64, BK=256, num_warps=4, parts=4)},
    "fp8": {"narrow": dict(BN=32, BK=512, num_warps=4), "wide": dict(BN=64, BK=256, num_warps=4),
            "swiglu": dict(BN=32, BK=256, num_warps=4, num_stages=4),
            "split": dict(BN=64, BK=256, num_warps=4, parts=4)},
}
#: the decoder's default ("triton") takes these kernels for a one-byte weight of more than ``MMA_MIN_N`` output
#: channels and the FMA kernels below it. Measured (H200, CUDA-graph replay, 186c6be, results/kernels_h200.jsonl,
#: microseconds, digits launch included), INT8 mma vs the best FMA setting: gate/up + SwiGLU 39.6 vs 42.3,
#: lm_head 129.3 vs 162.4, but qkv 10.1 vs 6.2, o 8.5 vs 5.4, down 32.7 vs 22.0; FP8: 46.1 vs 53.9, 136.5 vs
#: 199.8, and 10.9 vs 8.5, 8.5 vs 6.9, 44.7 vs 29.2. The narrow projections fill too few programs per SM.
MMA_MIN_N = 8192
#: ... and the split-K kernels (:func:`mma_gemv_parts`, 4 parts of 64 x 256 / 4 warps) for FP8 weights of more
#: than ``SPLIT_MIN_K`` columns (down). Measured (same sweep, 9c4a67a, microseconds): FP8 down 26.2 split against
#: 29.2 on the FMA kernel; INT8 down 25.1 against 21.9 (the FMA kernel stays); o: FP8 7.1 vs 7.2, INT8 6.4 vs
#: 5.3; qkv no better. The parts cost no launch: the residual add that follows sums them.
SPLIT_MIN_K = 8192
INTERPRETER_SETTINGS = dict(BN=16, BK=64, num_warps=4)
#: the settings of the weights-first (wgmma) kernels, by kind: 64 channels (one warpgroup's wgmma rows) per
#: program; the split cuts o and down into column ranges so that 3584 channels fill the SMs. Per kernel not
#: measured yet (``bench_kernels.py --only qgemv --graph --providers wgmma,wsplit`` sweeps them); the decoder with
#: them is no faster (see fast_decode.GEMVS "triton-wgmma").
WGMMA_SETTINGS = {"narrow": dict(BN=64, BK=256, num_warps=4, num_stages=3),
                  "wide": dict(BN=64, BK=256, num_warps=4, num_stages=3),
                  "swiglu": dict(BN=64, BK=128, num_warps=4, num_stages=3),
                  "split": dict(BN=64, BK=256, num_warps=4, num_stages=3, parts=4)}
INTERPRETER_WGMMA_SETTINGS = dict(BN=64, BK=64, num_warps=4)
_WGMMA = Switch()
#: within the block, the INT8 / FP8 tensor-core GEMVs put the weight tile first (wgmma; FP8 with e4m3 digits:
#: see the module docstring), an A/B candidate (fast_decode "triton-wgmma")
wgmma_on = _WGMMA.on
#: the digit kinds: int8 (INT8 weights), fp16 (FP8 weights converted to fp16), e4m3 (FP8 weights undecoded)
DIGIT_KINDS = ("int8", "fp16", "e4m3")
_KIND = {k: i for i, k in enumerate(DIGIT_KINDS)}
_DIGIT_DTYPE = {"int8": torch.int8, "fp16": torch.float16, "e4m3": torch.uint8}  # e4m3: the codes' bytes


def digit_kind(w: DecodeWeight) -> str:
    """The digits a tensor-core GEMV of ``w`` reads now (INT8: int8; FP8: e4m3 under :func:`wgmma_on`, else
    fp16)."""
    if w.fmt == "int8":
        return "int8"
    return "e4m3" if _WGMMA.value else "fp16"


def _e4m3_codes_ref(v: Tensor) -> Tensor:
    """fp32 values (|v| <= 2^8) -> e4m3 codes (uint8): rounded half up in magnitude to 3 mantissa bits, values
    below 2^-6 (e4m3's subnormals) flushed to a signed zero. Integer operations, as the kernels do them."""
    b = v.view(torch.int32)
    mag = (b & 0x7FFFFFFF) + (1 << 19)
    e = (mag >> 23) - 127
    code = torch.where(e >= -6, ((e + 7) << 3) | ((mag >> 20) & 7), torch.zeros_like(e))
    return (code | ((b >> 24) & 0x80)).to(torch.uint8)


def _e4m3_values(codes: Tensor) -> Tensor:
    """uint8 e4m3 codes -> their fp32 values (exact)."""
    return codes.view(torch.float8_e4m3fn).float()


# -- the digits of the activation rows --------------------------------------------------------------------------
def _exponent(amax: Tensor) -> Tensor:
    """E with ``amax < 2^E`` (int32; from the fp32 exponent bits, 0 for a zero row)."""
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 126
    return torch.where(amax > 0, e, torch.zeros_like(e))


def _pow2(e: Tensor) -> Tensor:
    """2^e as fp32 for int32 e, clamped into the normal range (exact)."""
    return ((e.clamp(-126, 127) + 127) << 23).view(torch.float32)


def x_digits_ref(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Reference. x [M, K] (M <= 4) -> (digits [16, K] int8 ("int8"), fp16 ("fp16") or uint8 e4m3 codes
    ("e4m3"), units [16] fp32): ``x[m] ~= sum_d units[4 m + d] * digits[4 m + d]`` (see the module docstring)."""
    M, K = x.shape
    xf = x.float()
    amax = xf.abs().amax(dim=1) if K else torch.zeros(M, device=x.device)
    E = _exponent(amax)
    digits = torch.zeros(ROWS, K, dtype=_DIGIT_DTYPE[kind], device=x.device)
    units = torch.zeros(ROWS, dtype=torch.float32, device=x.device)
    for m in range(M):
        if kind == "int8":
            prev = torch.zeros(K, dtype=torch.int32, device=x.device)
            for d in range(DIGITS):
                u = _pow2(E[m] - 7 - 7 * d)
                r = torch.trunc(xf[m] / u).to(torch.int32)
                digits[DIGITS * m + d] = (r - 128 * prev).to(torch.int8)
                units[DIGITS * m + d] = u
                prev = r
        elif kind == "e4m3":
            v = xf[m] * _pow2(8 - E[m])
            for d in range(DIGITS):
                code = _e4m3_codes_ref(v)
                digits[DIGITS * m + d] = code
                units[DIGITS * m + d] = _pow2(E[m] - 8 - 4 * d)
                v = (v - _e4m3_values(code)) * 16.0
        else:
            u = _pow2(E[m] - 14)
            v = xf[m] / u
            hi = v.to(torch.float16)
            digits[DIGITS * m] = hi
            digits[DIGITS * m + 1] = (v - hi.float()).to(torch.float16)
            units[DIGITS * m: DIGITS * m + 2] = u
    return digits, units


@triton.jit
def _pow2_f32(e):
    return ((tl.minimum(tl.maximum(e, -126), 127) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_exponent(a):
    # E with a < 2^E for a row's largest magnitude a (0 for a zero row): from the fp32 exponent bits
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    return tl.where(a > 0, e, 0)


@triton.jit
def _e4m3_code(v):
    # _e4m3_codes_ref: fp32 (|v| <= 2^8) -> e4m3 code (uint8), rounded half up in magnitude, below 2^-6 flushed
    b = v.to(tl.int32, bitcast=True)
    mag = (b & 0x7FFFFFFF) + (1 << 19)
    e = (mag >> 23) - 127
    code = tl.where(e >= -6, ((e + 7) << 3) | ((mag >> 20) & 7), 0)
    return (code | ((b >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _store_digits(b_x, e, live, p_d, p_u, o_k, m_k, K, first, KIND: tl.constexpr):
    # the digits of the values b_x (fp32, zeros for a dead row) at columns o_k of one row slot, written to its
    # four digit rows at p_d (K columns each); ``first``: this program also writes the slot's four units at p_u.
    # KIND: the index of the digit kind in DIGIT_KINDS (int8, fp16, e4m3)
    o_d = tl.arange(0, 4)
    if KIND == 2:
        # four e4m3 digits of x / 2^(E - 8), each the rounded remainder of the last times 16
        if first:
            tl.store(p_u + o_d, tl.where(live, _pow2_f32(e - 8 - 4 * o_d), 0.0))
        v = b_x * _pow2_f32(8 - e)
        for d in tl.static_range(4):
            c = _e4m3_code(v)
            tl.store(p_d + d * K + o_k, c, mask=m_k)
            v = (v - e4m3_to_f32(c, False) * 256.0) * 16.0  # the bit-move decode is value * 2^-8, exactly
    elif KIND == 0:
        # units 2^(E - 7 - 7 d); R_d = trunc(x / u_d); digit d = R_d - 128 R_{d-1}
        if first:
            tl.store(p_u + o_d, tl.where(live, _pow2_f32(e - 7 - 7 * o_d), 0.0))
        inv = _pow2_f32(7 - e + 7 * o_d)  # 1 / u_d, exact
        # [4, BK]
        r = (b_x[None, :] * inv[:, None]).to(tl.int32)
        prev = (b_x[None, :] * (inv[:, None] * 0.0078125)).to(tl.int32)  # R_{d-1} (1 / u_{d-1} = inv / 128)
        prev = tl.where(o_d[:, None] == 0, 0, prev)
        tl.store(p_d + o_d[:, None] * K + o_k[None, :], (r - 128 * prev).to(tl.int8), mask=m_k[None, :])
    else:
        # two fp16 digits of x / 2^(E - 14): hi, then the fp32 remainder rounded
        if first:
            tl.store(p_u + o_d, tl.where((o_d < 2) & live, _pow2_f32(e - 14), 0.0))
        v = b_x * _pow2_f32(14 - e)
        hi = v.to(tl.float16)
        tl.store(p_d + o_k, hi, mask=m_k)
        tl.store(p_d + K + o_k, (v - hi.to(tl.float32)).to(tl.float16), mask=m_k)
        zero = tl.zeros_like(hi)  # digit rows 2 and 3: unused
        tl.store(p_d + 2 * K + o_k, zero, mask=m_k)
        tl.store(p_d + 3 * K + o_k, zero, mask=m_k)


@triton.jit
def _x_digits_kernel(x, dg, un, M, K, stride_xm, KIND: tl.constexpr, BK: tl.constexpr, BKA: tl.constexpr,
                     USE_GDC: tl.constexpr):
    # program (m, j): row m's largest magnitude (each program reads the whole row: a few KB from L2), then the
    # digits of its columns [j BK, (j + 1) BK) into rows 4m .. 4m + 3; rows m >= M get zeros (no memset launch)
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    live = i_m < M
    K_live = tl.where(live, K, 0)  # the columns read: none for a row past M
    p_x = x + tl.minimum(i_m, M - 1).to(tl.int64) * stride_xm
    gdc_wait(USE_GDC)
    # wide tiles (BKA): a dependent chain of a few loads for the longest rows (18944: 5), not one per 1024
    amax = tl.zeros([BKA], dtype=tl.float32)
    for k0 in range(0, K, BKA):
        o_k = k0 + tl.arange(0, BKA)
        amax = tl.maximum(amax, tl.abs(tl.load(p_x + o_k, mask=o_k < K_live, other=0.0).to(tl.float32)))
    e = _row_exponent(tl.max(amax, axis=0))
    o_k = i_k * BK + tl.arange(0, BK)
    b_x = tl.load(p_x + o_k, mask=o_k < K_live, other=0.0).to(tl.float32)
    _store_digits(b_x, e, live, dg + (4 * i_m).to(tl.int64) * K, un + 4 * i_m, o_k, o_k < K, K, i_k == 0, KIND)


def x_digits(x: Tensor, kind: str, pdl: bool = False) -> tuple[Tensor, Tensor]:
    """Triton :func:`x_digits_ref`: a program per row slot and column tile (``pdl``: programmatic dependent
    launch, as :func:`bagel_rt.kernels._device.pdl_kwargs`)."""
    M, K = x.shape
    assert M <= MAX_M and x.stride(-1) == 1 and kind in DIGIT_KINDS, (x.shape, kind)
    dt = _DIGIT_DTYPE[kind]
    if M == 0 or K == 0:
        return torch.zeros(ROWS, K, dtype=dt, device=x.device), torch.zeros(ROWS, device=x.device)
    # every row slot written by the kernel (rows past M: zero digits and units)
    digits = torch.empty(ROWS, K, dtype=dt, device=x.device)
    units = torch.empty(ROWS, dtype=torch.float32, device=x.device)
    BK, BKA = (64, 64) if is_interpreting() else (1024, 4096)
    _x_digits_kernel[(MAX_M, triton.cdiv(K, BK))](x, digits, units, M, K, x.stride(0), KIND=_KIND[kind], BK=BK,
                                                  BKA=BKA, num_warps=8, **pdl_kwargs(pdl, x.device))
    return digits, units


class Digits(NamedTuple):
    """The digits of a few activation rows (:func:`x_digits`), made by the kernel that produced the rows
    (:func:`add_rms_norm_digits`): the tensor-core GEMVs take them in place of ``x`` and skip their own digits
    launch. digits [16, K], units [16], rows M, dtype of the rows (the GEMV's output dtype)."""

    digits: Tensor
    units: Tensor
    rows: int
    dtype: torch.dtype


@triton.jit
def _add_rms_norm_digits_kernel(x, r, w, r_out, dg, un, M, N, stride_x, stride_r, stride_ro, eps, stride_xp,
                                PARTS: tl.constexpr, KIND: tl.constexpr, BLOCK_N: tl.constexpr,
                                USE_GDC: tl.constexpr):
    # program m (of MAX_M): kernels.rms_norm's residual add + RMSNorm of row m (x: the block output, or PARTS
    # fp32 split-K parts summed in order and rounded), then the digits of the normed row, rounded to the residual
    # dtype as x_digits would read it; slots m >= M write zero digits and units
    i_m = tl.program_id(0)
    live = i_m < M
    m = tl.minimum(i_m, M - 1).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    gdc_wait(USE_GDC)
    b_h = _added_row(x, r, r_out, m, stride_x, stride_r, stride_xp, o_n, m_n, PARTS)
    tl.store(r_out + m * stride_ro + o_n, b_h, mask=o_n < tl.where(live, N, 0))  # live rows only
    b_y = tl.where(live, _rms_norm_row(b_h.to(tl.float32), w, o_n, m_n, N, eps).to(tl.float32), 0.0)
    e = _row_exponent(tl.max(tl.abs(b_y), axis=0))
    _store_digits(b_y, e, live, dg + (4 * i_m).to(tl.int64) * N, un + 4 * i_m, o_n, m_n, N, True, KIND)


def add_rms_norm_digits(x: Tensor, residual: Tensor, weight: Tensor, eps: float, kind: str,
                        pdl: bool = False) -> tuple[Digits, Tensor]:
    """``kernels.add_rms_norm`` (or ``add_rms_norm_parts`` for fp32 parts [P, M, N]) whose normed rows come out
    as the digits a tensor-core GEMV reads: one launch instead of the norm's and :func:`x_digits`'.

    Args:
        x: [M, N] block output in the residual's dtype, or fp32 split-K parts [P, M, N]. residual: [M, N],
            M <= 4. weight: [N]. eps: the norm's. kind: one of DIGIT_KINDS (the weights' digits:
            :func:`digit_kind`).
        pdl: programmatic dependent launch.
    Returns:
        (:class:`Digits` of ``rms_norm(x + residual)``, the new residual [M, N]): bit for bit the digits of the
        unfused chain's normed rows.
    """
    M, N = residual.shape
    parts = x.dim() == 3
    assert M <= MAX_M and residual.stride(-1) == 1 and x.stride(-1) == 1 and kind in DIGIT_KINDS
    assert weight.shape == (N,) and weight.dtype == residual.dtype, (weight.shape, weight.dtype)
    assert (x.dtype == torch.float32 and x.shape[1:] == (M, N)) if parts else (x.shape == (M, N)
                                                                                and x.dtype == residual.dtype)
    digits = torch.empty(ROWS, N, dtype=_DIGIT_DTYPE[kind], device=residual.device)
    units = torch.empty(ROWS, dtype=torch.float32, device=residual.device)
    r_out = torch.empty((M, N), dtype=residual.dtype, device=residual.device)
    if M == 0:
        return Digits(digits.zero_(), units.zero_(), 0, residual.dtype), r_out
    block_n = triton.next_power_of_2(N)
    _add_rms_norm_digits_kernel[(MAX_M,)](
        x, residual, weight, r_out, digits, units, M, N, x.stride(-2), residual.stride(0), r_out.stride(0), eps,
        x.stride(0) if parts else 0, PARTS=x.shape[0] if parts else 0, KIND=_KIND[kind], BLOCK_N=block_n,
        num_warps=16 if block_n >= 16384 else 8, **pdl_kwargs(pdl, residual.device))
    return Digits(digits, units, M, residual.dtype), r_out


def add_rms_norm_digits_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float, kind: str,
                            pdl: bool = False) -> tuple[Digits, Tensor]:
    """Reference of :func:`add_rms_norm_digits`: the unfused chain (``pdl`` unused)."""
    ref = add_rms_norm_parts_ref if x.dim() == 3 else add_rms_norm_ref
    h, r = ref(x, residual, weight, eps)
    return Digits(*x_digits_ref(h, kind), residual.shape[0], residual.dtype), r


# -- the GEMVs --------------------------------------------------------------------------------------------------
@triton.jit
def _w_rows(p_w_rows, m_n, k0, K, BK: tl.constexpr, CODE: tl.constexpr):
    # [BN, BK] weight columns [k0, k0 + BK) as an MMA operand: int8 as stored, e4m3 undecoded ("e4m3") or as
    # exact fp16
    o_k = k0 + tl.arange(0, BK)
    b_w = tl.load(p_w_rows[:, None] + o_k[None, :], mask=m_n[:, None] & (o_k < K)[None, :], other=0)
    if CODE == "int8":
        b = b_w
    elif CODE == "e4m3":
        b = b_w.to(tl.float8e4nv, bitcast=True)
    elif CODE == "fp8_native":
        b = b_w.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:  # bit moves (the interpreter): value * 2^-8, times 256 exactly in fp32, then fp16 (exact)
        b = (e4m3_to_f32(b_w, False) * e4m3_unit(False)).to(tl.float16)
    return b


@triton.jit
def _w_operand(p_w_rows, m_n, k0, K, BK: tl.constexpr, CODE: tl.constexpr):
    # [BK, BN]: the second MMA operand (digits first)
    return tl.trans(_w_rows(p_w_rows, m_n, k0, K, BK, CODE))


@triton.jit
def _d_operand(dg, k0, K, BK: tl.constexpr, CODE: tl.constexpr = "int8"):
    # [16, BK] digit rows of columns [k0, k0 + BK) (e4m3 codes as fp8 for the "e4m3" weights)
    o_k = k0 + tl.arange(0, BK)
    o_r = tl.arange(0, 16)
    b_d = tl.load(dg + o_r[:, None] * K + o_k[None, :], mask=(o_k < K)[None, :], other=0)
    if CODE == "e4m3":
        b_d = b_d.to(tl.float8e4nv, bitcast=True)
    return b_d


@triton.jit
def _dot(acc, dg, p_w_rows, m_n, k0, K, BK: tl.constexpr, CODE: tl.constexpr, W_A: tl.constexpr):
    # acc += digits x weights^T for columns [k0, k0 + BK): [16, BN], or with W_A the weights first, [BN, 16]
    # (one return per helper: the compiler rejects a return inside a constexpr branch)
    ACC: tl.constexpr = tl.int32 if CODE == "int8" else tl.float32
    if W_A:
        acc = tl.dot(_w_rows(p_w_rows, m_n, k0, K, BK, CODE), tl.trans(_d_operand(dg, k0, K, BK, CODE)), acc,
                     out_dtype=ACC)
    else:
        acc = tl.dot(_d_operand(dg, k0, K, BK, CODE), _w_operand(p_w_rows, m_n, k0, K, BK, CODE), acc,
                     out_dtype=ACC)
    return acc


@triton.jit
def _acc_init(BN: tl.constexpr, CODE: tl.constexpr, W_A: tl.constexpr):
    ACC: tl.constexpr = tl.int32 if CODE == "int8" else tl.float32
    if W_A:
        acc = tl.zeros([BN, 16], dtype=ACC)
    else:
        acc = tl.zeros([16, BN], dtype=ACC)
    return acc


@triton.jit
def _digit_sums(acc, W_A: tl.constexpr):
    # [16, BN] digit sums (the weights-first accumulator transposed once, after the loop)
    if W_A:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _combine(acc, un, s, o_n, m_n):
    # [16, BN] digit sums -> [4, BN] fp32 rows: sum over each row's digits of unit * sum, times the channel scale
    BN: tl.constexpr = acc.shape[1]
    part = acc.to(tl.float32) * tl.load(un + tl.arange(0, 16))[:, None]
    rows = tl.sum(tl.reshape(part, [4, 4, BN]), axis=1)
    return rows * tl.load(s + o_n, mask=m_n, other=0.0)[None, :]


@triton.jit
def _mma_gemv_kernel(dg, un, w, s, b, y, N, K, M, stride_ym, HAS_BIAS: tl.constexpr, CODE: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr, K_PER=0, stride_yp=0,
                     SPLIT: tl.constexpr = False, PREFETCH: tl.constexpr = False, W_A: tl.constexpr = False):
    # SPLIT: program (n, p) sums columns [p K_PER, (p + 1) K_PER) only and stores its fp32 partial rows at
    # y + p stride_yp (the bias in part 0); the consumer adds the parts (kernels.add_rms_norm_parts)
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_w = w + o_n.to(tl.int64) * K
    k_lo, k_hi = 0, K
    if SPLIT:  # the masks stay against K (the last part's tail): bounds the compiler knows to be aligned
        k_lo = tl.program_id(1) * K_PER
        k_hi = k_lo + K_PER
    l2_prefetch(p_w, m_n, k_lo, tl.minimum(k_hi, K), PREFETCH)  # an A/B option (kernels._device._L2_PREFETCH)
    gdc_wait(USE_GDC)  # the digits are the previous kernel's output
    acc = _acc_init(BN, CODE, W_A)
    for k0 in range(k_lo, k_hi, BK):
        # out_dtype spelled out (in _dot): Triton 3.6 checks an int32 accumulator against the float32 default
        acc = _dot(acc, dg, p_w, m_n, k0, K, BK, CODE, W_A)
    b_y = _combine(_digit_sums(acc, W_A), un, s, o_n, m_n)
    if HAS_BIAS:
        b_b = tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)
        if SPLIT:
            b_b = tl.where(tl.program_id(1) == 0, b_b, 0.0)
        b_y += b_b[None, :]
    o_m = tl.arange(0, 4)
    p_y = y
    if SPLIT:
        p_y = y + tl.program_id(1).to(tl.int64) * stride_yp
    tl.store(p_y + o_m[:, None] * stride_ym + o_n[None, :], b_y.to(y.dtype.element_ty),
             mask=(o_m < M)[:, None] & m_n[None, :])


@triton.jit
def _mma_gemv_swiglu_kernel(dg, un, wg, wu, sg, su, y, N, K, M, stride_ym, CODE: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr,
                            PREFETCH: tl.constexpr = False, W_A: tl.constexpr = False):
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    rows = o_n.to(tl.int64) * K
    l2_prefetch(wg + rows, m_n, 0, K, PREFETCH)
    l2_prefetch(wu + rows, m_n, 0, K, PREFETCH)
    gdc_wait(USE_GDC)
    acc_g = _acc_init(BN, CODE, W_A)
    acc_u = _acc_init(BN, CODE, W_A)
    for k0 in range(0, K, BK):
        acc_g = _dot(acc_g, dg, wg + rows, m_n, k0, K, BK, CODE, W_A)
        acc_u = _dot(acc_u, dg, wu + rows, m_n, k0, K, BK, CODE, W_A)
    g = _combine(_digit_sums(acc_g, W_A), un, sg, o_n, m_n)
    u = _combine(_digit_sums(acc_u, W_A), un, su, o_n, m_n)
    o_m = tl.arange(0, 4)
    swiglu_store(y + o_m[:, None] * stride_ym + o_n[None, :], g, u, (o_m < M)[:, None] & m_n[None, :])


def _code(w: DecodeWeight) -> tuple[str, str]:
    """(the weight operand's decode, the digit kind)."""
    assert w.fmt in ("int8", "fp8"), f"the MMA decode GEMVs take int8 / fp8 weights, not {w.fmt}"
    kind = digit_kind(w)
    if kind in ("int8", "e4m3"):
        return kind, kind
    return ("fp8" if is_interpreting() else "fp8_native"), "fp16"


def prefers_mma(w: DecodeWeight) -> bool:
    """Whether the decoder's default GEMVs take these kernels for ``w`` (see :data:`MMA_MIN_N`)."""
    return w.fmt in MMA_FORMATS and w.shape[0] > MMA_MIN_N


def prefers_split(w: DecodeWeight) -> bool:
    """Whether the decoder's default takes the split-K kernels for ``w`` (see :data:`SPLIT_MIN_K`)."""
    return w.fmt == "fp8" and w.shape[1] > SPLIT_MIN_K


def settings(w: DecodeWeight, kind: str = "gemv") -> dict:
    """The launch settings of ``w`` for ``kind`` ("gemv", "swiglu" or "split"; see :data:`SETTINGS`, and
    :data:`WGMMA_SETTINGS` under :func:`wgmma_on`, which add ``W_A=True``)."""
    table = WGMMA_SETTINGS if _WGMMA.value else SETTINGS[w.fmt]
    c = dict(table[kind] if kind in ("swiglu", "split") else table["wide" if w.shape[0] > WIDE_N else "narrow"])
    return dict(c, W_A=True) if _WGMMA.value else c


def _settings(w: DecodeWeight, cfg: dict | None, kind: str) -> dict:
    if is_interpreting():  # small tiles (the interpreter's time), the split's parts and the orientation as asked
        c = cfg or settings(w, kind)
        tiles = INTERPRETER_WGMMA_SETTINGS if c.get("W_A") else INTERPRETER_SETTINGS
        return dict(tiles, **{k: c[k] for k in ("parts", "W_A") if k in c})
    return dict(cfg or settings(w, kind))


def _launch(kernel, x: Tensor | Digits, w: DecodeWeight, weight_args: tuple, pdl: bool, cfg: dict | None,
            kind: str, **kw) -> Tensor:
    """The [M, N] output of ``kernel`` (``_mma_gemv_kernel`` or ``_mma_gemv_swiglu_kernel``: digits, units, the
    weights' ``weight_args``, then y, N, K, M, y's row stride) over the digits of ``x`` (made here, or given as
    :class:`Digits`; w: the first weight, for the format and the settings of ``kind``; kind "split": [P, M, N]
    fp32 partial sums over P column ranges)."""
    code, kind_of_digits = _code(w)
    if isinstance(x, Digits):
        M, K, dtype, device = x.rows, x.digits.shape[1], x.dtype, x.digits.device
        assert x.digits.dtype == _DIGIT_DTYPE[kind_of_digits], "digits of another kind"
    else:
        M, K, dtype, device = x.shape[0], x.shape[1], x.dtype, x.device
    N = w.shape[0]
    c = _settings(w, cfg, kind)
    nw = c.pop("num_warps")
    grid, split = (triton.cdiv(N, c["BN"]),), {}
    if kind == "split":
        per = _part_columns(K, c["BK"], c.pop("parts"))
        parts = max(1, triton.cdiv(K, per))
        y = torch.empty((parts, M, N), dtype=torch.float32, device=device)
        grid, split = (grid[0], parts), dict(K_PER=per, stride_yp=y.stride(0), SPLIT=True)
    else:
        y = torch.empty((M, N), dtype=dtype, device=device)
    if M == 0 or N == 0:
        return y.zero_()
    dg, un = (x.digits, x.units) if isinstance(x, Digits) else x_digits(x, kind_of_digits, pdl)
    kernel[grid](dg, un, *weight_args, y, N, K, M, y.stride(-2), CODE=code, num_warps=nw, **c, **split, **kw,
                 **prefetch_kwargs(pdl, device))
    return y


def _check_rows(x: Tensor | Digits, *ws: DecodeWeight) -> None:
    # decode_gemv's checks for rows; for digits, that the weights take their columns
    if isinstance(x, Digits):
        assert all(w.shape[1] == x.digits.shape[1] for w in ws), "digits and weights differ in K"
    else:
        _check(x, *ws)


def mma_gemv(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
             cfg: dict | None = None) -> Tensor:
    """``x @ dequantize(w).T (+ bias)`` for a few rows on the tensor cores (see the module docstring).

    Args:
        x: [M, K], M <= 4, bf16 / fp16 / fp32, last dim contiguous (or their :class:`Digits`, made by the
            kernel that produced them). w: an int8 or fp8 :class:`DecodeWeight`
            [N, K]. bias: [N] or None. pdl: programmatic dependent launch of both kernels (the digits and
            the GEMV), as the other decode GEMVs. cfg: launch settings (BN, BK, num_warps[, num_stages]), A/B.
    Returns:
        [M, N] in x.dtype: fp32 combination of the digit sums, scale and bias applied before one rounding.
    """
    _check_rows(x, w)
    return _launch(_mma_gemv_kernel, x, w, (_codes(w), w.scale, bias if bias is not None else w.scale), pdl, cfg,
                   "gemv", HAS_BIAS=bias is not None)


def mma_gemv_parts(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
                   cfg: dict | None = None) -> Tensor:
    """:func:`mma_gemv` split over column ranges (split-K) for the narrow projections (o, down: 3584 output
    channels fill too few programs per SM otherwise): returns the fp32 partial products [P, M, N], whose sum
    (in order) is ``x @ dequantize(w).T (+ bias)``; ``bagel_rt.kernels.add_rms_norm_parts`` adds them in the
    residual add that follows, so the split costs no launch of its own. ``cfg``: as :func:`mma_gemv` plus
    ``parts`` (the number of column ranges asked for; P may come out smaller for short rows)."""
    _check_rows(x, w)
    return _launch(_mma_gemv_kernel, x, w, (_codes(w), w.scale, bias if bias is not None else w.scale), pdl, cfg,
                   "split", HAS_BIAS=bias is not None)


def mma_gemv_parts_ref(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
                       cfg: dict | None = None) -> Tensor:
    """Reference of :func:`mma_gemv_parts`: the same column ranges (from ``cfg`` / the settings), each range's
    digit products summed in fp64 and combined as the kernel does (``pdl`` unused)."""
    c = _settings(w, cfg, "split")
    K = x.shape[1]
    return _parts_ref(K, _part_columns(K, c["BK"], c["parts"]), lambda lo, hi: _ref_rows(x, w, lo, hi), bias)


def mma_gemv_swiglu(x: Tensor, gate: DecodeWeight, up: DecodeWeight, pdl: bool = False,
                    cfg: dict | None = None) -> Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` on the tensor cores (gate and up: same format and shape), rounded as
    :func:`bagel_rt.quant.decode_gemv.qgemv_swiglu`. Returns [M, I] in x.dtype."""
    assert (gate.fmt, gate.shape) == (up.fmt, up.shape), "gate / up differ"
    _check_rows(x, gate, up)
    return _launch(_mma_gemv_swiglu_kernel, x, gate, (_codes(gate), _codes(up), gate.scale, up.scale), pdl, cfg,
                   "swiglu")


def _ref_rows(x: Tensor, w: DecodeWeight, lo: int = 0, hi: int | None = None) -> Tensor:
    # the digits' products summed in fp64 (exact for int8 digits, to fp64 for fp16), combined as the kernel does;
    # columns [lo, hi) only (a split-K part: the digits are still those of the whole row)
    kind = digit_kind(w)
    dg, un = x_digits_ref(x, kind)
    dv = _e4m3_values(dg) if kind == "e4m3" else dg  # the digits' values
    codes = w.codes.double() if w.fmt == "int8" else w.codes.float().double()  # the codes' values
    sums = dv[:, lo:hi].double() @ codes[:, lo:hi].T  # [16, N]
    rows = (sums * un.double()[:, None]).reshape(MAX_M, DIGITS, -1).sum(dim=1)[: x.shape[0]]
    return rows * w.scale.double()[None, :]


def mma_gemv_ref(x: Tensor, w: DecodeWeight, bias: Tensor | None = None, pdl: bool = False,
                 cfg: dict | None = None) -> Tensor:
    """Reference of :func:`mma_gemv` (``pdl``, ``cfg`` unused)."""
    y = _ref_rows(x, w)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def mma_gemv_swiglu_ref(x: Tensor, gate: DecodeWeight, up: DecodeWeight, pdl: bool = False,
                        cfg: dict | None = None) -> Tensor:
    """Reference of :func:`mma_gemv_swiglu` (``pdl``, ``cfg`` unused)."""
    return swiglu_ref(_ref_rows(x, gate).to(x.dtype), _ref_rows(x, up).to(x.dtype))
