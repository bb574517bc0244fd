"""Per-head q/k RMSNorm followed by rotate-half RoPE, in fp32, for q and k in one launch.

This is BAGEL's "gen"-mode order (reference section 3.1 steps 3-4): q and k are converted to fp32, each head
is RMS-normed over head_dim and multiplied by the [head_dim] weight, then rotated with
``x * cos + rot(x) * sin``, ``rot([x1, x2]) = [-x2, x1]`` (halves, not interleaved), and cast to out_dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def qk_norm_rope_ref(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Reference. q: [M, Hq, D], k: [M, Hk, D], weights: [D], cos/sin: [M, D] -> ([M, Hq, D], [M, Hk, D])."""

    def norm_rope(x: Tensor, w: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
        return (x * cos.float()[:, None, :] + rot * sin.float()[:, None, :]).to(out_dtype)

    return norm_rope(q, q_weight), norm_rope(k, k_weight)


@triton.jit
def _norm_rope_heads(x, y, w, stride_xh, H, b_cos1, b_cos2, b_sin1, b_sin2, eps,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # x, y: pointers to head 0 of this row (input strided, output contiguous [H, 2 * HALF])
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, HALF)
    m_h = (o_h < H)[:, None]
    p_x1 = x + o_h[:, None] * stride_xh + o_d[None, :]
    # [BLOCK_H, HALF] each: first and second half of every head
    b_x1 = tl.load(p_x1, mask=m_h, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x1 + HALF, mask=m_h, other=0.0).to(tl.float32)
    # [BLOCK_H]
    b_rstd = tl.rsqrt((tl.sum(b_x1 * b_x1, axis=1) + tl.sum(b_x2 * b_x2, axis=1)) / (2 * HALF) + eps)
    # [HALF] each
    b_w1 = tl.load(w + o_d).to(tl.float32)
    b_w2 = tl.load(w + HALF + o_d).to(tl.float32)
    b_n1 = b_x1 * b_rstd[:, None] * b_w1[None, :]
    b_n2 = b_x2 * b_rstd[:, None] * b_w2[None, :]
    b_y1 = b_n1 * b_cos1[None, :] - b_n2 * b_sin1[None, :]
    b_y2 = b_n2 * b_cos2[None, :] + b_n1 * b_sin2[None, :]
    p_y1 = y + o_h[:, None] * (2 * HALF) + o_d[None, :]
    tl.store(p_y1, b_y1.to(y.dtype.element_ty), mask=m_h)
    tl.store(p_y1 + HALF, b_y2.to(y.dtype.element_ty), mask=m_h)


@triton.jit
def _qk_norm_rope_kernel(
    q, k, q_w, k_w, cos, sin, q_out, k_out,
    stride_qm, stride_qh, stride_km, stride_kh, stride_cm, stride_sm,
    Hq, Hk, eps,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, HALF)
    # [HALF] each; cos/sin rows are loaded once and shared by the q and k heads of this token
    b_cos1 = tl.load(cos + i_m * stride_cm + o_d).to(tl.float32)
    b_cos2 = tl.load(cos + i_m * stride_cm + HALF + o_d).to(tl.float32)
    b_sin1 = tl.load(sin + i_m * stride_sm + o_d).to(tl.float32)
    b_sin2 = tl.load(sin + i_m * stride_sm + HALF + o_d).to(tl.float32)
    _norm_rope_heads(q + i_m * stride_qm, q_out + i_m * (Hq * 2 * HALF), q_w, stride_qh, Hq,
                     b_cos1, b_cos2, b_sin1, b_sin2, eps, HALF, BLOCK_HQ)
    _norm_rope_heads(k + i_m * stride_km, k_out + i_m * (Hk * 2 * HALF), k_w, stride_kh, Hk,
                     b_cos1, b_cos2, b_sin1, b_sin2, eps, HALF, BLOCK_HK)


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """q/k RMSNorm + RoPE in fp32 for one token per program, q and k heads together.

    Args:
        q: [M, Hq, D], k: [M, Hk, D]; last dim contiguous, any row / head strides (views into a fused qkv
            projection output are fine). Any float dtype.
        q_weight, k_weight: [D] norm weights (shared by all heads).
        cos, sin: [M, D] per-token tables (the caller casts them to the activation dtype first, like the
            reference); last dim contiguous, any row stride (stride 0 broadcasts one position to all rows).
        eps: RMSNorm epsilon.
        out_dtype: dtype of the outputs (bf16 before attention).
    Returns:
        (q_out [M, Hq, D], k_out [M, Hk, D]), contiguous, out_dtype.

    Memory passes removed: the fp32 copies of q/k, the norm's reduction pass, the weight multiply, the
    rotate-half concatenation and the cos/sin products (eager runs ~10 elementwise kernels per tensor).
    """
    assert q.dim() == 3 and k.dim() == 3, "q and k must be [M, H, D]"
    M, Hq, D = q.shape
    assert k.shape[0] == M and k.shape[2] == D, f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)}"
    Hk = k.shape[1]
    assert D % 2 == 0 and triton.next_power_of_2(D // 2) == D // 2, f"head_dim {D} must be 2 * a power of 2"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k must have a contiguous last dim"
    assert q_weight.shape == (D,) and k_weight.shape == (D,), "q_weight and k_weight must be [D]"
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    assert cos.shape == (M, D) and sin.shape == (M, D), f"cos/sin must be [{M}, {D}]"
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    q_out = torch.empty((M, Hq, D), dtype=out_dtype, device=q.device)
    k_out = torch.empty((M, Hk, D), dtype=out_dtype, device=q.device)
    if M == 0:
        return q_out, k_out
    block_hq, block_hk = triton.next_power_of_2(Hq), triton.next_power_of_2(Hk)
    num_warps = 8 if block_hq * D >= 8192 else 4
    _qk_norm_rope_kernel[(M,)](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        Hq, Hk, eps,
        HALF=D // 2, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, num_warps=num_warps,
    )
    return q_out, k_out
