"""Per-token (row) FP8 e4m3 quantization of GEMM activations: one read of x, one write of fp8 + scales.

Feeds the opt-in FP8 GEMMs of the generation expert (:mod:`bagel_rt.quant.fp8`): ``x ≈ q * scale`` with
``scale = max(row absmax * fp32(1/448), 1e-12)``. Kept because it removes passes over memory: the eager twin
converts x to fp32, takes abs, reduces, divides and casts (five full passes, two of them in fp32, at M ≈ 8k
rows and up to 18944 columns per GEMM input); the kernel reads each row twice and writes one byte per
element. Measured on an H200 (``bench_kernels.py --only fp8_quant --graph``):
8196 x 3584 in 29-44 us vs 360 us eager, 8196 x 18944 in 168 us vs 1.82 ms (commits ae6c31f, 3dbb2e8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import is_interpreting

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_MIN = 1e-12  # an all-zero row gets this scale (its codes are all zero)
# scale = absmax * fp32(1/448): a product is correctly rounded everywhere, while "absmax / 448" is not the same
# operation on every device (PyTorch's CUDA division by a scalar multiplies by its reciprocal)
INV_FP8_MAX = float(torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))
# the same constants for kernels (here and in the fused producers of rms_norm.py / swiglu.py)
_FP8_MAX_C = tl.constexpr(FP8_MAX)
_INV_FP8_MAX_C = tl.constexpr(INV_FP8_MAX)
_SCALE_MIN_C = tl.constexpr(SCALE_MIN)
# fp8_codes' rounding: the GPU's conversion instruction, or an fp32 emulation in the interpreter (which must be
# switched on before this module is imported, like every Triton kernel here)
_INTERPRETING = tl.constexpr(is_interpreting())


def quantize_rows_fp8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference. x [M, K] (bf16/fp16/fp32) -> (q [M, K] float8_e4m3fn, scale [M, 1] fp32), x ≈ q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) * INV_FP8_MAX).clamp_min(SCALE_MIN)
    inv = torch.ones_like(scale) / scale  # tensor / tensor: a true (correctly rounded) division
    return (xf * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _round_to_e4m3_grid(v):
    # Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32: the interpreter's
    # fp32 -> fp8 cast slips at binade edges and ties (and Triton's cast has rounded through fp16 on GPUs:
    # 18.99998 -> 19.0 -> 20, where PyTorch gives 18); after this step the cast is exact.
    # e4m3: 3 mantissa bits, so the grid step at exponent e is 2^(e-3); below 2^-6 (subnormals) it is 2^-9.
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): one grid step becomes 1.0
    down = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    t = tl.abs(v) * up  # exact (a power-of-two scaling), t < 16
    r = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: round to an integer, ties to even, in fp32 hardware
    return tl.where(v < 0, -r, r) * down  # the sign restored after rounding: tiny negatives give -0.0


@triton.jit
def fp8_row_scale(amax):
    """A row's fp32 scale from its fp32 absmax: ``max(absmax * fp32(1/448), 1e-12)``."""
    return tl.maximum(amax * _INV_FP8_MAX_C, _SCALE_MIN_C)


@triton.jit
def fp8_row_inv(scale):
    """The reciprocal of a row's scale, correctly rounded (div_rn; Triton's plain fp32 "/" is approximate).
    Codes are ``x * inv`` as in the reference: one IEEE division per row instead of one per element, which
    made the FP8 producers ALU-bound."""
    return tl.math.div_rn(1.0, scale)


@triton.jit
def _e4m3_native(v):
    # fp32 -> e4m3 with the conversion instruction of sm_89+: one correctly rounded step (nearest, ties to
    # even, saturating), four values per asm block: two cvt pairs (the first value in the low byte) packed
    # into one 32-bit register
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b16 lo, hi;
        cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
        cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
        mov.b32 $0, {lo, hi};
        }""",
        constraints="=r,f,f,f,f", args=[v], dtype=tl.int8, is_pure=True, pack=4,
    ).to(tl.float8e4nv, bitcast=True)


@triton.jit
def fp8_codes(b_x, b_inv):
    """fp32 values and a same-shape block holding their row's inverse scale -> their e4m3 codes (the product
    clamped to +-448 and rounded to nearest e4m3, ties to even). On a GPU one conversion instruction per pair
    of values; in the interpreter, which has no inline assembly, the rounding is emulated in fp32 and the
    store's cast is then exact (in both cases the codes equal PyTorch's cast of the clamped product)."""
    b_q = tl.minimum(tl.maximum(b_x * b_inv, -_FP8_MAX_C), _FP8_MAX_C)
    if _INTERPRETING:
        return _round_to_e4m3_grid(b_q).to(tl.float8e4nv)
    return _e4m3_native(b_q)


@triton.jit
def row_absmax(p_x, K, BLOCK_K: tl.constexpr):
    """fp32 absmax of the K values at ``p_x`` (one pass, BLOCK_K at a time)."""
    b_amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        b_x = tl.load(p_x + o_k, mask=o_k < K, other=0.0).to(tl.float32)
        b_amax = tl.maximum(b_amax, tl.abs(b_x))
    return tl.max(b_amax, axis=0)


@triton.jit
def _quantize_rows_kernel(x, q, s, stride_x, stride_q, K, BLOCK_K: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    p_x = x + i_m * stride_x
    # pass 1: row absmax in fp32
    scale = fp8_row_scale(row_absmax(p_x, K, BLOCK_K))
    tl.store(s + i_m, scale)
    b_inv = tl.zeros([BLOCK_K], dtype=tl.float32) + fp8_row_inv(scale)
    # pass 2: scale and round to e4m3
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(p_x + o_k, mask=m_k, other=0.0).to(tl.float32)
        tl.store(q + i_m * stride_q + o_k, fp8_codes(b_x, b_inv).to(q.dtype.element_ty), mask=m_k)


def empty_fp8_rows(M: int, K: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Outputs of a row quantizer: (e4m3 [M, K], fp32 scales [M, 1]); with K = 0 the scales are already final
    (the minimum scale, as the reference gives for an empty row)."""
    q = torch.empty((M, K), dtype=FP8, device=device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=device)
    return q, (scale.fill_(SCALE_MIN) if K == 0 else scale)


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row FP8 quantization: x [M, K] -> (q [M, K] float8_e4m3fn contiguous, scale [M, 1] fp32).

    ``x`` may be bf16, fp16 or fp32 with a contiguous last dim and any row stride. Same arithmetic as
    :func:`quantize_rows_fp8_ref` (fp32 absmax times fp32(1/448), times the correctly rounded 1/scale,
    round-to-nearest-even to e4m3), so the results are identical, on a GPU and in the interpreter.
    ``scale`` is laid out [M, 1] as ``torch._scaled_mm`` wants it.
    """
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be 2-D with a contiguous last dim, got {tuple(x.shape)}"
    M, K = x.shape
    q, scale = empty_fp8_rows(M, K, x.device)
    if M == 0 or K == 0:
        return q, scale
    block_k = min(triton.next_power_of_2(K), 2048)
    num_warps = 8 if block_k >= 2048 else 4
    _quantize_rows_kernel[(M,)](x, q, scale, x.stride(0), q.stride(0), K, BLOCK_K=block_k, num_warps=num_warps)
    return q, scale
