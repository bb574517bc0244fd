"""INT8 W8A8 GEMM: ``out[M, N] = (q[M, K] * sx[M]) @ (qweight[N, K] * sw[N])^T + bias``, for GPUs without FP8
(Ampere: INT8 tensor cores run at 4x the bf16 rate there, 2x on Ada and Hopper).

The activations come quantized per token (``bagel_rt.kernels.quantize_rows_int8``: scale = row absmax / 127),
the weights per output channel (``Int8Linear``: ``SCB / 127``). The Triton kernel multiplies int8 tiles with
``tl.dot`` into an int32 accumulator (exact: |sum| <= K * 127^2 < 2^31 for K < 133k) and applies, in its
epilogue, both scales and the bias to the accumulator before the one rounding to the output dtype: there is no
pass over an int32 [M, N] tensor, which an eager ``torch._int_mm`` followed by the scaling needs.

:func:`int8_w8a8_matmul_ref` (same signature) multiplies exactly in float64 and applies the epilogue in fp32 in
the same order as the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bagel_rt.kernels._device import is_interpreting
from torch import Tensor

from .matmul import _grouped_tile

__all__ = ["int8_w8a8_matmul", "int8_w8a8_matmul_ref", "W8A8_SETTINGS"]

# Launch settings by shape (the interpreter cannot autotune over several configs). Int8 tiles are half the
# bytes of bf16 ones, so the K step is twice as long for the same shared memory. Not yet tuned on a GPU.
W8A8_SETTINGS = {"large": dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3),
                 "small": dict(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=3)}


def int8_w8a8_matmul_ref(q: Tensor, sx: Tensor, qweight: Tensor, sw: Tensor, bias: Tensor | None,
                         out_dtype: torch.dtype) -> Tensor:
    """Reference. q [M, K] int8, sx [M, 1] fp32, qweight [N, K] int8, sw [N] fp32, bias [N] or None ->
    ``(q @ qweight.T) * sx * sw (+ bias)`` [M, N] in ``out_dtype`` (exact products, fp32 epilogue)."""
    acc = (q.double() @ qweight.double().t()).float()
    out = acc * sx.float().reshape(-1, 1) * sw.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@triton.heuristics({"HAS_BIAS": lambda args: args["b"] is not None})
@triton.jit
def _int8_w8a8_kernel(x, w, sx, sw, b, o, M, N, K, stride_xm, stride_om, HAS_BIAS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    i_m, i_n = _grouped_tile(M, N, BM, BN, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    p_x = x + o_m.to(tl.int64)[:, None] * stride_xm
    p_w = w + o_n.to(tl.int64)[:, None] * K
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        # [BM, BK] int8
        b_x = tl.load(p_x + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0)
        # [BN, BK] int8
        b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0)
        # [BM, BK] @ [BK, BN] -> [BM, BN] int32
        acc = tl.dot(b_x, tl.trans(b_w), acc, out_dtype=tl.int32)
    # epilogue: per-token scale, per-channel scale, bias, one rounding
    b_sx = tl.load(sx + o_m, mask=m_m, other=0.0)
    b_sw = tl.load(sw + o_n, mask=m_n, other=0.0)
    out = acc.to(tl.float32) * b_sx[:, None] * b_sw[None, :]
    if HAS_BIAS:
        out += tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(o + o_m.to(tl.int64)[:, None] * stride_om + o_n[None, :], out.to(o.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def int8_w8a8_matmul(q: Tensor, sx: Tensor, qweight: Tensor, sw: Tensor, bias: Tensor | None,
                     out_dtype: torch.dtype) -> Tensor:
    """INT8 W8A8 GEMM with both scales and the bias in the epilogue.

    Args:
        q: [M, K] int8 activations (last dim contiguous, any row stride); sx: [M, 1] (or [M]) fp32 per-token
            scales (``quantize_rows_int8``).
        qweight: [N, K] int8 contiguous; sw: [N] fp32 per-channel scales (``Int8Linear``: ``SCB / 127``).
        bias: [N] (any float dtype) or None. out_dtype: fp16, bf16 or fp32.
    Returns:
        [M, N] in ``out_dtype``.
    """
    M, K = q.shape
    N = qweight.shape[0]
    assert q.dtype == torch.int8 and q.stride(1) == 1, (q.dtype, q.stride())
    assert qweight.dtype == torch.int8 and qweight.shape == (N, K) and qweight.is_contiguous(), qweight.shape
    assert sx.dtype == torch.float32 and sx.numel() == M and sx.is_contiguous(), (sx.dtype, sx.shape)
    assert sw.dtype == torch.float32 and sw.numel() == N and sw.is_contiguous(), (sw.dtype, sw.shape)
    assert bias is None or bias.shape == (N,), bias.shape
    out = torch.empty(M, N, dtype=out_dtype, device=q.device)
    if M == 0 or N == 0:
        return out
    big = M >= 128 and N >= 128 and not is_interpreting()
    cfg = dict(W8A8_SETTINGS["large" if big else "small"])
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _int8_w8a8_kernel[grid](q, qweight, sx, sw, bias, out, M, N, K, q.stride(0), out.stride(0), **cfg)
    return out
