"""The q/k/v epilogue of one decoding token: bias + fp32 q/k RMSNorm + RoPE + K/V cache write, one launch.

Used by :func:`bagel_rt.fast_decode.decode_step_kernels`; the cache row comes from a [1] device tensor, so the
step can be captured in a CUDA graph and replayed while the length grows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import gdc_wait, pdl_kwargs
from .qk_norm_rope import qk_norm_rope_ref


def qkv_rope_cache_ref(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, q_weight: Tensor, k_weight: Tensor,
                       cos: Tensor, sin: Tensor, eps: float, k_cache: Tensor, v_cache: Tensor,
                       length: Tensor, pdl: bool = False) -> Tensor:
    """Reference of :func:`qkv_rope_cache` (same arguments; writes the cache rows too; ``pdl`` unused)."""
    Hq, D = q.shape
    Hk = k.shape[0]
    if bias is not None:
        bq, bk, bv = bias.float().split([Hq * D, Hk * D, Hk * D])
        q = (q.float() + bq.view(Hq, D)).to(q.dtype)
        k = (k.float() + bk.view(Hk, D)).to(k.dtype)
        v = (v.float() + bv.view(Hk, D)).to(v.dtype)
    q_out, k_out = qk_norm_rope_ref(q[None], k[None], q_weight, k_weight, cos.view(1, D), sin.view(1, D), eps,
                                    q.dtype)
    row = int(length)
    k_cache[row] = k_out[0]
    v_cache[row] = v
    return q_out


@triton.jit
def _norm_rope_head(p_x, p_b, p_w, o_d, b_cos1, b_cos2, b_sin1, b_sin2, eps, HALF: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    # one head [2 * HALF] at p_x (+ bias at p_b) -> its RMS-normed, weighted, rotated halves in fp32
    # [HALF] each
    b_x1 = tl.load(p_x + o_d).to(tl.float32)
    b_x2 = tl.load(p_x + HALF + o_d).to(tl.float32)
    if HAS_BIAS:  # the projection output is rounded to the activation dtype, as nn.Linear returns it
        b_x1 = (b_x1 + tl.load(p_b + o_d).to(tl.float32)).to(p_x.dtype.element_ty).to(tl.float32)
        b_x2 = (b_x2 + tl.load(p_b + HALF + o_d).to(tl.float32)).to(p_x.dtype.element_ty).to(tl.float32)
    b_rstd = tl.rsqrt((tl.sum(b_x1 * b_x1, axis=0) + tl.sum(b_x2 * b_x2, axis=0)) / (2 * HALF) + eps)
    b_n1 = b_x1 * b_rstd * tl.load(p_w + o_d).to(tl.float32)
    b_n2 = b_x2 * b_rstd * tl.load(p_w + HALF + o_d).to(tl.float32)
    return b_n1 * b_cos1 - b_n2 * b_sin1, b_n2 * b_cos2 + b_n1 * b_sin2


@triton.jit
def _qkv_rope_cache_kernel(q, k, v, bias, q_w, k_w, cos, sin, q_out, k_cache, v_cache, length,
                           stride_kc, stride_vc, Hq, Hk, eps, HALF: tl.constexpr, HAS_BIAS: tl.constexpr,
                           USE_GDC: tl.constexpr):
    # one program per head of the token: q heads [0, Hq), k heads [Hq, Hq + Hk), v heads [Hq + Hk, Hq + 2 Hk)
    gdc_wait(USE_GDC)  # programmatic dependent launch
    i_h = tl.program_id(0)
    o_d = tl.arange(0, HALF)
    row = tl.load(length).to(tl.int64)  # cache row of the new token
    p_b = bias + i_h * (2 * HALF)  # the fused bias is laid out [q heads | k heads | v heads] like i_h
    # [HALF] each; the tables are stored in the activation dtype (as the reference rounds them)
    b_cos1 = tl.load(cos + o_d).to(tl.float32)
    b_cos2 = tl.load(cos + HALF + o_d).to(tl.float32)
    b_sin1 = tl.load(sin + o_d).to(tl.float32)
    b_sin2 = tl.load(sin + HALF + o_d).to(tl.float32)
    if i_h < Hq:
        b_y1, b_y2 = _norm_rope_head(q + i_h * (2 * HALF), p_b, q_w, o_d, b_cos1, b_cos2, b_sin1, b_sin2, eps,
                                     HALF, HAS_BIAS)
        p_y = q_out + i_h * (2 * HALF)
        tl.store(p_y + o_d, b_y1.to(q_out.dtype.element_ty))
        tl.store(p_y + HALF + o_d, b_y2.to(q_out.dtype.element_ty))
    elif i_h < Hq + Hk:
        j = i_h - Hq
        b_y1, b_y2 = _norm_rope_head(k + j * (2 * HALF), p_b, k_w, o_d, b_cos1, b_cos2, b_sin1, b_sin2, eps,
                                     HALF, HAS_BIAS)
        p_y = k_cache + row * stride_kc + j * (2 * HALF)
        tl.store(p_y + o_d, b_y1.to(q_out.dtype.element_ty))
        tl.store(p_y + HALF + o_d, b_y2.to(q_out.dtype.element_ty))
    else:
        j = i_h - Hq - Hk
        # [HALF] each
        b_v1 = tl.load(v + j * (2 * HALF) + o_d).to(tl.float32)
        b_v2 = tl.load(v + j * (2 * HALF) + HALF + o_d).to(tl.float32)
        if HAS_BIAS:
            b_v1 += tl.load(p_b + o_d).to(tl.float32)
            b_v2 += tl.load(p_b + HALF + o_d).to(tl.float32)
        p_y = v_cache + row * stride_vc + j * (2 * HALF)
        tl.store(p_y + o_d, b_v1.to(q_out.dtype.element_ty))
        tl.store(p_y + HALF + o_d, b_v2.to(q_out.dtype.element_ty))


def qkv_rope_cache(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, q_weight: Tensor, k_weight: Tensor,
                   cos: Tensor, sin: Tensor, eps: float, k_cache: Tensor, v_cache: Tensor,
                   length: Tensor, pdl: bool = False) -> Tensor:
    """One decode token's q/k/v epilogue in one launch.

    Args:
        q: [Hq, D], k, v: [Hk, D] projection outputs (each contiguous; views into one fused row are fine).
        bias: [(Hq + 2 Hk) * D] fused q/k/v bias added here (fp32 add, rounded like a Linear output), or None
            when the projections already added it.
        q_weight, k_weight: [D] per-head RMSNorm weights.
        cos, sin: [1, D] RoPE tables of the token's position, in the activation dtype.
        eps: RMSNorm epsilon.
        k_cache, v_cache: this layer's [capacity, Hk, D] buffers; row ``length`` receives the token's
            normed + rotated key and its value.
        length: [1] int32 on the device, the cache row to write.
        pdl: programmatic dependent launch (Hopper+, see ``_device.pdl_kwargs``).
    Returns:
        [1, Hq, D] normed + rotated queries in q.dtype.

    Memory passes removed: the bias add's write/re-read, the separate q/k norm + RoPE output of k and the
    two ``index_copy_`` launches into the cache (three launches become one).
    """
    Hq, D = q.shape
    Hk = k.shape[0]
    half = D // 2
    assert D % 2 == 0 and triton.next_power_of_2(half) == half, f"head_dim {D} must be 2 * a power of 2"
    assert k.shape == (Hk, D) and v.shape == (Hk, D), f"k {tuple(k.shape)} / v {tuple(v.shape)} vs D {D}"
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert bias is None or (bias.shape == ((Hq + 2 * Hk) * D,) and bias.is_contiguous())
    assert q_weight.shape == (D,) and k_weight.shape == (D,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    assert cos.numel() == D and sin.numel() == D and cos.is_contiguous() and sin.is_contiguous()
    for c in (k_cache, v_cache):
        assert c.dim() == 3 and c.shape[1:] == (Hk, D) and c.stride(2) == 1 and c.stride(1) == D
    assert length.dtype == torch.int32 and length.numel() == 1 and length.device == q.device
    q_out = torch.empty((1, Hq, D), dtype=q.dtype, device=q.device)
    _qkv_rope_cache_kernel[(Hq + 2 * Hk,)](
        q, k, v, bias if bias is not None else q, q_weight, k_weight, cos, sin, q_out, k_cache, v_cache, length,
        k_cache.stride(0), v_cache.stride(0), Hq, Hk, eps, HALF=half, HAS_BIAS=bias is not None, num_warps=1,
        **pdl_kwargs(pdl, q.device),
    )
    return q_out
