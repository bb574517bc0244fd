"""RMSNorm (Qwen2 flavour) and fused residual-add + RMSNorm.

Qwen2RMSNorm normalises in fp32, casts the result back to the input dtype and only then multiplies by the
weight, in the input dtype. The kernels reproduce exactly that rounding order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import gdc_wait, pdl_kwargs
from .fp8_quant import empty_fp8_rows, fp8_codes, fp8_row_inv, fp8_row_scale, quantize_rows_fp8_ref


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float, pdl: bool = False) -> Tensor:
    """Reference RMSNorm. x: [M, N], weight: [N] (same dtype as x) -> [M, N] in x.dtype (``pdl`` unused)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                     pdl: bool = False) -> tuple[Tensor, Tensor]:
    """Reference residual add + RMSNorm. x, residual: [M, N] -> (rms_norm(x + residual), x + residual)
    (``pdl`` unused)."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rms_norm_fp8_ref(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Reference. x: [M, N] -> FP8 rows of rms_norm(x): (e4m3 [M, N], fp32 scales [M, 1])."""
    return quantize_rows_fp8_ref(rms_norm_ref(x, weight, eps))


def add_rms_norm_parts_ref(parts: Tensor, residual: Tensor, weight: Tensor, eps: float,
                           pdl: bool = False) -> tuple[Tensor, Tensor]:
    """Reference of :func:`add_rms_norm_parts`: the parts summed in order in fp32, rounded to the residual's
    dtype, then :func:`add_rms_norm_ref` (``pdl`` unused)."""
    total = parts[0].float()
    for p in parts[1:]:
        total = total + p.float()
    return add_rms_norm_ref(total.to(residual.dtype), residual, weight, eps)


def add_rms_norm_fp8_ref(x: Tensor, residual: Tensor, weight: Tensor,
                         eps: float) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Reference. x, residual: [M, N] -> (FP8 rows of rms_norm(x + residual), x + residual)."""
    h, new_residual = add_rms_norm_ref(x, residual, weight, eps)
    return quantize_rows_fp8_ref(h), new_residual


def _settings(n: int) -> tuple[int, int]:
    """One row per program: the block covers the whole row; more warps for longer rows."""
    block_n = triton.next_power_of_2(n)
    assert block_n <= 65536, f"rows of {n} elements are too long for a single-block RMSNorm"
    num_warps = 16 if block_n >= 16384 else 8 if block_n >= 2048 else 4
    return block_n, num_warps


@triton.jit
def _rms_norm_row(b_x, p_w, o_n, m_n, N, eps):
    # b_x: [BLOCK_N] fp32 row (zeros past N); returns the normed row in fp32, already rounded as Qwen does
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / N + eps)
    # [BLOCK_N]
    b_w = tl.load(p_w + o_n, mask=m_n, other=0.0)
    # normalise in fp32, round to the input dtype, then multiply by the weight in the input dtype
    b_y = (b_x * b_rstd).to(b_w.dtype)
    return (b_y.to(tl.float32) * b_w.to(tl.float32)).to(b_w.dtype)


@triton.jit
def _store_row(y, s, i_m, stride_y, o_n, m_n, b_y, FP8_OUT: tl.constexpr):
    # the normed row as is, or (FP8_OUT) its per-row e4m3 codes + fp32 scale, with fp8_quant's arithmetic
    if FP8_OUT:
        b_f = b_y.to(tl.float32)
        scale = fp8_row_scale(tl.max(tl.abs(b_f), axis=0))
        tl.store(s + i_m, scale)
        b_q = fp8_codes(b_f, tl.zeros_like(b_f) + fp8_row_inv(scale))
        tl.store(y + i_m * stride_y + o_n, b_q.to(y.dtype.element_ty), mask=m_n)
    else:
        tl.store(y + i_m * stride_y + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


@triton.jit
def _rms_norm_kernel(x, w, y, s, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr, FP8_OUT: tl.constexpr,
                     USE_GDC: tl.constexpr):
    gdc_wait(USE_GDC)
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    # [BLOCK_N]
    b_x = tl.load(x + i_m * stride_x + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_y = _rms_norm_row(b_x, w, o_n, m_n, N, eps)
    _store_row(y, s, i_m, stride_y, o_n, m_n, b_y, FP8_OUT)


@triton.jit
def _added_row(x, r, r_out, i_m, stride_x, stride_r, stride_xp, o_n, m_n, PARTS: tl.constexpr):
    # [BLOCK_N] row i_m of the new residual x + r, rounded to r_out's dtype (the norm reads the rounded value);
    # x: the block output, or (PARTS > 0) the first of PARTS fp32 partial sums of a split-K GEMV, added in order
    # and rounded as the GEMV's output would be
    b_x = tl.load(x + i_m * stride_x + o_n, mask=m_n, other=0.0).to(tl.float32)
    if PARTS > 0:
        for p in range(1, PARTS):
            b_x += tl.load(x + p * stride_xp + i_m * stride_x + o_n, mask=m_n, other=0.0)
        b_x = b_x.to(r_out.dtype.element_ty).to(tl.float32)
    b_r = tl.load(r + i_m * stride_r + o_n, mask=m_n, other=0.0).to(tl.float32)
    return (b_x + b_r).to(r_out.dtype.element_ty)


@triton.jit
def _add_rms_norm_kernel(x, r, w, y, s, r_out, stride_x, stride_r, stride_y, stride_ro, N, eps,
                         BLOCK_N: tl.constexpr, FP8_OUT: tl.constexpr, USE_GDC: tl.constexpr,
                         PARTS: tl.constexpr = 0, stride_xp=0):
    gdc_wait(USE_GDC)
    i_m = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    # [BLOCK_N]
    b_h = _added_row(x, r, r_out, i_m, stride_x, stride_r, stride_xp, o_n, m_n, PARTS)
    tl.store(r_out + i_m * stride_ro + o_n, b_h, mask=m_n)
    b_y = _rms_norm_row(b_h.to(tl.float32), w, o_n, m_n, N, eps)
    _store_row(y, s, i_m, stride_y, o_n, m_n, b_y, FP8_OUT)


def _check(x: Tensor, weight: Tensor) -> None:
    assert x.dim() == 2, f"x must be [M, N], got {tuple(x.shape)}"
    assert x.stride(-1) == 1, "x rows must be contiguous"
    assert weight.shape == (x.shape[1],) and weight.is_contiguous(), "weight must be a contiguous [N]"
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    assert weight.device == x.device


def _outputs(x: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    # (normed rows, scales): FP8 rows + their scales, or rows in x.dtype (the scale pointer then unused)
    if fp8:
        return empty_fp8_rows(*x.shape, x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, y


def _norm(x: Tensor, weight: Tensor, eps: float, pdl: bool, fp8: bool):
    _check(x, weight)
    M, N = x.shape
    y, s = _outputs(x, fp8)
    if M > 0:
        block_n, num_warps = _settings(N)
        _rms_norm_kernel[(M,)](x, weight, y, s, x.stride(0), y.stride(0), N, eps, BLOCK_N=block_n, FP8_OUT=fp8,
                               num_warps=num_warps, **pdl_kwargs(pdl, x.device))
    return (y, s) if fp8 else y


def _add_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, pdl: bool, fp8: bool):
    # x: [M, N] in the residual's dtype, or fp32 split-K parts [P, M, N]
    _check(residual, weight)
    parts = x.dim() == 3
    if parts:
        assert x.dtype == torch.float32 and x.stride(-1) == 1 and x.shape[0] >= 1, (x.dtype, tuple(x.shape))
        assert x.shape[1:] == residual.shape, (tuple(x.shape), tuple(residual.shape))
    else:
        _check(x, weight)
        assert residual.shape == x.shape and residual.dtype == x.dtype
    M, N = residual.shape
    y, s = _outputs(residual, fp8)
    r_out = torch.empty((M, N), dtype=residual.dtype, device=residual.device)
    if M > 0:
        block_n, num_warps = _settings(N)
        _add_rms_norm_kernel[(M,)](
            x, residual, weight, y, s, r_out, x.stride(-2), residual.stride(0), y.stride(0), r_out.stride(0), N,
            eps, BLOCK_N=block_n, FP8_OUT=fp8, PARTS=x.shape[0] if parts else 0,
            stride_xp=x.stride(0) if parts else 0,
            num_warps=num_warps, **pdl_kwargs(pdl, residual.device),
        )
    return ((y, s) if fp8 else y), r_out


def rms_norm(x: Tensor, weight: Tensor, eps: float, pdl: bool = False) -> Tensor:
    """RMSNorm over the last dim, Qwen2 rounding order, one read and one write of x.

    Args:
        x: [M, N] activations (bf16 / fp16 / fp32), rows contiguous (any row stride).
        weight: [N], same dtype as x.
        eps: added to mean(x^2).
        pdl: programmatic dependent launch (Hopper+, see ``_device.pdl_kwargs``).
    Returns:
        [M, N] in x.dtype: ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``.

    Memory passes removed: the fp32 upcast copy, the separate squared-mean reduction pass and the separate
    weight multiply (eager PyTorch reads / writes the row 4-5 times).
    """
    return _norm(x, weight, eps, pdl, False)


def rms_norm_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm straight to the FP8 rows an FP8 GEMM reads: ``quantize_rows_fp8(rms_norm(x, weight, eps))``.

    Args: as :func:`rms_norm`.
    Returns:
        (e4m3 [M, N] contiguous, fp32 scales [M, 1]): the unfused chain's codes (the row's absmax is taken
        over the bf16-rounded normed values, as the chain sees them; see :func:`add_rms_norm_fp8` on exactness).

    Memory passes removed: the normed row's write and the quantizer's two reads of it.
    """
    return _norm(x, weight, eps, False, True)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 pdl: bool = False) -> tuple[Tensor, Tensor]:
    """Residual add fused with RMSNorm.

    Args:
        x: [M, N] block output (bf16 / fp16 / fp32), rows contiguous.
        residual: [M, N] residual stream, same dtype as x.
        weight: [N], same dtype as x.
        eps: added to mean(h^2).
        pdl: programmatic dependent launch (Hopper+, see ``_device.pdl_kwargs``).
    Returns:
        (normed, new_residual), both [M, N] in x.dtype, with ``new_residual = x + residual`` (rounded to
        x.dtype) and ``normed = rms_norm(new_residual, weight, eps)``.

    Memory passes removed: the add's write + re-read of the new residual before the norm, plus everything
    :func:`rms_norm` removes (2 reads and 2 writes in total).
    """
    return _add_norm(x, residual, weight, eps, pdl, False)


def add_rms_norm_parts(parts: Tensor, residual: Tensor, weight: Tensor, eps: float,
                       pdl: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`add_rms_norm` whose block output comes as the fp32 partial sums of a split-K GEMV
    (``bagel_rt.quant.decode_mma.mma_gemv_parts``): the reduction happens here, in the norm's one pass over
    the row, instead of in a launch of its own.

    Args:
        parts: [P, M, N] fp32, rows contiguous. residual: [M, N] (bf16 / fp16 / fp32). weight: [N], the
            residual's dtype. eps, pdl: as :func:`add_rms_norm`.
    Returns:
        as :func:`add_rms_norm` with ``x = (parts[0] + parts[1] + ...)`` (fp32, in order) rounded to the
        residual's dtype — what the unsplit GEMV would have output.
    """
    return _add_norm(parts, residual, weight, eps, pdl, False)


def add_rms_norm_fp8(x: Tensor, residual: Tensor, weight: Tensor,
                     eps: float) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """:func:`add_rms_norm` with the normed rows written as FP8 for an FP8 GEMM.

    Returns:
        ((e4m3 [M, N], fp32 scales [M, 1]), new_residual [M, N] in x.dtype); the codes are those of
        ``quantize_rows_fp8(add_rms_norm(...)[0])`` (on the GPU up to a rare one-step difference where the
        compiler sums the row's squares in another order; exact in the interpreter).

    Measured on an H200 at M = 8196, N = 3584 (``bench_kernels.py --only fp8_quant --graph``, commit ef1f105):
    66 us vs 107 us for add+RMSNorm and a separate quantize launch.
    """
    return _add_norm(x, residual, weight, eps, False, True)
