"""Per-token (row) INT8 quantization of GEMM activations for INT8 W8A8 (``bagel_rt.quant.int8_w8a8``).

``x ≈ q * scale`` with ``scale = max(row absmax * fp32(1/127), 1e-12)`` and ``q = round(x * (1 / scale))``
(nearest, ties to even) clamped to [-127, 127]: the arithmetic of the FP8 row quantizer (``fp8_quant.py``: fp32
absmax times fp32(1/127), the correctly rounded reciprocal of the scale, one product per element) with INT8's
grid, so the kernel and its reference give the same codes and scales. One read of x for the absmax, one for
the codes, one byte written per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fp8_quant import row_absmax

INT8_MAX = 127.0
SCALE_MIN = 1e-12  # an all-zero row gets this scale (its codes are all zero)
INV_INT8_MAX = float(torch.tensor(1.0 / INT8_MAX, dtype=torch.float32))  # fp32(1/127), as the FP8 quantizer
_INV_INT8_MAX_C = tl.constexpr(INV_INT8_MAX)
_SCALE_MIN_C = tl.constexpr(SCALE_MIN)


def quantize_rows_int8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference. x [M, K] (bf16/fp16/fp32) -> (q [M, K] int8, scale [M, 1] fp32), x ≈ q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) * INV_INT8_MAX).clamp_min(SCALE_MIN)
    inv = torch.ones_like(scale) / scale  # tensor / tensor: a true (correctly rounded) division
    return torch.round(xf * inv).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


@triton.jit
def _round_half_even(v):
    # fp32 |v| < 2^22 -> the nearest integer, ties to even, in fp32 (the hardware's rounding of the sum)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_rows_int8_kernel(x, q, s, stride_x, stride_q, K, BLOCK_K: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    p_x = x + i_m * stride_x
    # pass 1: row absmax in fp32
    scale = tl.maximum(row_absmax(p_x, K, BLOCK_K) * _INV_INT8_MAX_C, _SCALE_MIN_C)
    tl.store(s + i_m, scale)
    # the correctly rounded reciprocal (div_rn; Triton's plain fp32 "/" is approximate), once per row
    b_inv = tl.zeros([BLOCK_K], dtype=tl.float32) + tl.math.div_rn(1.0, scale)
    # pass 2: scale, clamp, round. Clamping to the integers +-127 before rounding gives the reference's
    # round-then-clamp, and keeps the product from being contracted with the rounding's add into one FMA
    # (which would skip the product's own rounding)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(p_x + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_q = _round_half_even(tl.minimum(tl.maximum(b_x * b_inv, -127.0), 127.0))
        tl.store(q + i_m * stride_q + o_k, b_q.to(tl.int8), mask=m_k)


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row INT8 quantization: x [M, K] -> (q [M, K] int8 contiguous, scale [M, 1] fp32).

    ``x`` may be bf16, fp16 or fp32 with a contiguous last dim and any row stride. Same arithmetic as
    :func:`quantize_rows_int8_ref`, so the results are identical (on a GPU and in the interpreter).
    """
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be 2-D with a contiguous last dim, got {tuple(x.shape)}"
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if K == 0:
        return q, scale.fill_(SCALE_MIN)
    if M == 0:
        return q, scale
    block_k = min(triton.next_power_of_2(K), 2048)
    num_warps = 8 if block_k >= 2048 else 4
    _quantize_rows_int8_kernel[(M,)](x, q, scale, x.stride(0), q.stride(0), K, BLOCK_K=block_k,
                                     num_warps=num_warps)
    return q, scale
