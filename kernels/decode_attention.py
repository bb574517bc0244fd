"""One decoding token's attention in one launch: the q/k/v epilogue (bias, q/k RMSNorm, RoPE, K/V cache write),
split-K attention over the cache (flash-decoding), and the combine of the splits.

The unfused chain is three launches per layer (:func:`qkv_rope_cache`, the split path of
:func:`varlen_attention`, its combine kernel), 84 per token for BAGEL's 28 layers. Here each program (kv head,
key split) normalises and rotates its G query heads and the token's key itself (a few hundred flops), attends
over its slice of the cached keys, and the new key from registers; the program of the split holding the new
row writes it to the cache. The last program of a kv head to finish (an atomic counter per kv head, reset by
that program, so a captured CUDA graph replays it) combines the splits' partials.

Numerics follow the chain: q and the new key rounded to the activation dtype after norm and RoPE (as the
reference rounds them), scores and softmax in fp32 (exp2 domain), probabilities rounded to the value dtype
before the product with V, the output rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import gdc_wait, is_interpreting, num_sms, pdl_kwargs
from .attention import (
    INTERPRET_BLOCK_N,
    SPLIT_BLOCK_N,
    SPLIT_NUM_WARPS,
    _attn_block,
    _choose_splits,
    varlen_attention_ref,
)
from .qkv_rope_cache import qkv_rope_cache_ref

BLOCK_M = 16  # the packed query rows (G heads of one kv head, padded): the smallest tensor-core tile


def decode_splits(G: int, Hk: int, capacity: int, device: torch.device) -> int:
    """The key splits :func:`varlen_attention` would choose for one token against ``capacity`` cached keys (its
    split heuristic; 1 off the GPU)."""
    sms = num_sms(device)
    return 1 if sms is None else _choose_splits(G, Hk, 1, capacity, sms)


def decode_attention_ref(qkv: Tensor, bias: Tensor | None, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                         sin: Tensor, eps: float, k_cache: Tensor, v_cache: Tensor, length: Tensor,
                         sm_scale: float, num_splits: int, counters: Tensor, pdl: bool = False) -> Tensor:
    """Reference of :func:`decode_attention` (same arguments; the unfused chain's references; writes the cache
    row too; ``num_splits``, ``counters`` and ``pdl`` unused)."""
    Hk, D = k_cache.shape[1:]
    Hq = qkv.numel() // D - 2 * Hk
    q, k, v = qkv.view(-1, D).split([Hq, Hk, Hk])
    q_out = qkv_rope_cache_ref(q, k, v, bias, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, length)
    n = int(length) + 1
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=qkv.device)
    cu_k = torch.tensor([0, n], dtype=torch.int32, device=qkv.device)
    return varlen_attention_ref(q_out[0][None], k_cache[:n], v_cache[:n], cu_q, cu_k, True, sm_scale)[0]


@triton.jit
def _norm_rope(p_x, p_b, p_w, o_r, o_d, m_r, b_cos, b_sin, eps, D: tl.constexpr, HAS_BIAS: tl.constexpr):
    # heads ``o_r`` [R] of D channels at p_x (+ bias at p_b) -> RMS-normed, weighted, rotated [R, D] fp32, rounded
    # to the activation dtype. RoPE's rotate-half as a permuted load: y[d] = n[d] cos[d] + sign(d) n[d'] sin[d],
    # d' = (d + D/2) mod D, sign -1 for the first half
    o_rot = (o_d + D // 2) % D
    p_h = p_x + o_r[:, None] * D
    b_x = tl.load(p_h + o_d[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    b_xr = tl.load(p_h + o_rot[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:  # the projection output is rounded to the activation dtype, as nn.Linear returns it
        p_bh = p_b + o_r[:, None] * D
        b_x = (b_x + tl.load(p_bh + o_d[None, :], mask=m_r[:, None], other=0.0).to(tl.float32))
        b_xr = (b_xr + tl.load(p_bh + o_rot[None, :], mask=m_r[:, None], other=0.0).to(tl.float32))
        b_x = b_x.to(p_x.dtype.element_ty).to(tl.float32)
        b_xr = b_xr.to(p_x.dtype.element_ty).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_n = b_x * b_rstd[:, None] * tl.load(p_w + o_d).to(tl.float32)[None, :]
    b_nr = b_xr * b_rstd[:, None] * tl.load(p_w + o_rot).to(tl.float32)[None, :]
    sign = tl.where(o_d < D // 2, -1.0, 1.0)
    b_y = b_n * b_cos[None, :] + (sign[None, :] * b_nr) * b_sin[None, :]
    return b_y.to(p_x.dtype.element_ty)


@triton.jit
def _decode_attention_kernel(qkv, bias, q_w, k_w, cos, sin, k_cache, v_cache, length, o, o_part, lse_part,
                             counters, stride_kc, stride_vc, Hq, eps, sm_scale, NUM_SPLITS,
                             G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             HAS_BIAS: tl.constexpr, USE_GDC: tl.constexpr):
    # grid (Hk, NUM_SPLITS): program (kv head i_h, key split i_s)
    gdc_wait(USE_GDC)  # programmatic dependent launch: the q/k/v GEMV's output
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    Hk = tl.num_programs(0)
    o_d = tl.arange(0, D)
    o_m = tl.arange(0, BLOCK_M)
    m_r = o_m < G
    row = tl.load(length)  # the token's cache row; keys [0, row] attend
    b_cos = tl.load(cos + o_d).to(tl.float32)
    b_sin = tl.load(sin + o_d).to(tl.float32)
    # [BLOCK_M, D] the kv head's G queries (rows past G zero), normed and rotated, in the activation dtype
    o_q = i_h * G + o_m
    b_q = _norm_rope(qkv, bias, q_w, o_q, o_d, m_r, b_cos, b_sin, eps, D, HAS_BIAS)
    b_q = tl.where(m_r[:, None], b_q, 0.0).to(b_q.dtype)
    # the token's key and value [D] (as [1, D] rows of the same helper)
    o_one = tl.arange(0, 1)
    m_one = o_one < 1
    b_kn = _norm_rope(qkv, bias, k_w, Hq + i_h + o_one, o_d, m_one, b_cos, b_sin, eps, D, HAS_BIAS)
    p_v = qkv + (Hq + Hk + i_h) * D + o_d
    b_vn = tl.load(p_v).to(tl.float32)
    if HAS_BIAS:
        b_vn = (b_vn + tl.load(bias + (Hq + Hk + i_h) * D + o_d).to(tl.float32))
    b_vn = b_vn.to(qkv.dtype.element_ty)

    # this split's keys: whole BLOCK_N tiles, as the split path of varlen_attention cuts them
    n_keys = row + 1
    chunk = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = i_s * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    k_h = k_cache + i_h * D
    v_h = v_cache + i_h * D
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    o_n = tl.arange(0, BLOCK_N)
    o_qi = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start_n in range(lo, tl.minimum(hi, row), BLOCK_N):  # cached keys (the new row masked off: Lk = row)
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, b_q, k_h, v_h, start_n, 0, row, 0, o_qi, o_n, o_d,
                                    stride_kc, stride_vc, qk_scale, True, False)
    if (lo <= row) & (row < hi):  # this split holds the new row: write it, and attend to it from registers
        tl.store(k_h + row.to(tl.int64) * stride_kc + o_d[None, :], b_kn)
        tl.store(v_h + row.to(tl.int64) * stride_vc + o_d, b_vn)
        b_sn = tl.sum(b_q.to(tl.float32) * b_kn.to(tl.float32), axis=1)  # [BLOCK_M]
        m_new = tl.maximum(m_i, b_sn * qk_scale)
        b_pn = tl.math.exp2(b_sn * qk_scale - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + b_pn
        acc = acc * alpha[:, None] + b_pn.to(qkv.dtype.element_ty).to(tl.float32)[:, None] * \
            b_vn.to(tl.float32)[None, :]
        m_i = m_new

    # partials [Hk, NUM_SPLITS, BLOCK_M, D] fp32 and log2-sum-exp [Hk, NUM_SPLITS, BLOCK_M]; a split without keys
    # gives lse -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    part = (i_h * NUM_SPLITS + i_s).to(tl.int64) * BLOCK_M
    tl.store(o_part + (part + o_m)[:, None] * D + o_d[None, :], acc / l_safe[:, None])
    tl.store(lse_part + part + o_m, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)))
    # every thread's stores before the one atomic (release at GPU scope covers them); the last program of this
    # kv head combines (acquire), then resets the counter for the next launch
    tl.debug_barrier()
    done = tl.atomic_add(counters + i_h, 1, sem="acq_rel", scope="gpu")
    if done == NUM_SPLITS - 1:
        b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for s in range(0, NUM_SPLITS):
            p_s = (i_h * NUM_SPLITS + s).to(tl.int64) * BLOCK_M
            # past L1: other programs wrote these
            b_lse = tl.load(lse_part + p_s + o_m, cache_modifier=".cg")
            b_os = tl.load(o_part + (p_s + o_m)[:, None] * D + o_d[None, :], cache_modifier=".cg")
            m_new = tl.maximum(b_max, b_lse)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.math.exp2(b_max - m_use)
            w = tl.math.exp2(b_lse - m_use)
            b_sum = b_sum * scale + w
            b_acc = b_acc * scale[:, None] + b_os * w[:, None]
            b_max = m_new
        b_out = b_acc / tl.where(b_sum == 0.0, 1.0, b_sum)[:, None]
        tl.store(o + (i_h * G + o_m)[:, None] * D + o_d[None, :], b_out.to(o.dtype.element_ty), mask=m_r[:, None])
        tl.atomic_xchg(counters + i_h, 0)


def decode_attention(qkv: Tensor, bias: Tensor | None, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                     sin: Tensor, eps: float, k_cache: Tensor, v_cache: Tensor, length: Tensor, sm_scale: float,
                     num_splits: int, counters: Tensor, pdl: bool = False) -> Tensor:
    """One decoding token's q/k/v epilogue, attention over the cache and split combine in one launch.

    Args:
        qkv: [(Hq + 2 Hk) * D] the fused q/k/v projection output (contiguous).
        bias: [(Hq + 2 Hk) * D] fused bias added here (fp32 add, rounded like a Linear output), or None.
        q_weight, k_weight: [D] per-head RMSNorm weights. cos, sin: [D] (or [1, D]) RoPE tables of the token's
            position, in the activation dtype. eps: RMSNorm epsilon.
        k_cache, v_cache: this layer's [capacity, Hk, D] buffers; row ``length`` receives the token's normed +
            rotated key and its value, and keys [0, length] are attended to.
        length: [1] int32 on the device (the cache row of the token), so a captured graph replays as it grows.
        sm_scale: softmax scale. num_splits: key splits (programs per kv head), >= 1.
        counters: [>= Hk] int32 zeros owned by the caller, one per kv head; the kernel leaves them zero.
        pdl: programmatic dependent launch (Hopper+).
    Returns:
        [Hq, D] attention output in qkv.dtype.
    """
    Hk, D = k_cache.shape[1], k_cache.shape[2]
    Hq = qkv.numel() // D - 2 * Hk
    G = Hq // Hk
    assert qkv.is_contiguous() and qkv.numel() == (Hq + 2 * Hk) * D and Hq % Hk == 0, tuple(qkv.shape)
    assert G <= BLOCK_M, f"{G} query heads per kv head; at most {BLOCK_M}"
    assert D in (16, 32, 64, 128, 256), f"head_dim {D} not supported"
    assert qkv.dtype == k_cache.dtype == v_cache.dtype
    assert bias is None or (bias.numel() == qkv.numel() and bias.is_contiguous())
    assert q_weight.shape == (D,) and k_weight.shape == (D,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    assert cos.numel() == D and sin.numel() == D and cos.is_contiguous() and sin.is_contiguous()
    for c in (k_cache, v_cache):
        assert c.dim() == 3 and c.stride(2) == 1 and c.stride(1) == D
    assert length.dtype == torch.int32 and length.numel() == 1 and length.device == qkv.device
    assert counters.dtype == torch.int32 and counters.numel() >= Hk and counters.is_contiguous()
    assert num_splits >= 1
    o = torch.empty((Hq, D), dtype=qkv.dtype, device=qkv.device)
    o_part = torch.empty((Hk, num_splits, BLOCK_M, D), dtype=torch.float32, device=qkv.device)
    lse_part = torch.empty((Hk, num_splits, BLOCK_M), dtype=torch.float32, device=qkv.device)
    launch = {"num_warps": SPLIT_NUM_WARPS} if not is_interpreting() else {}
    _decode_attention_kernel[(Hk, num_splits)](
        qkv, bias if bias is not None else qkv, q_weight, k_weight, cos, sin, k_cache, v_cache, length, o, o_part,
        lse_part, counters, k_cache.stride(0), v_cache.stride(0), Hq, eps, sm_scale, num_splits, G=G, D=D,
        BLOCK_M=BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N if is_interpreting() else SPLIT_BLOCK_N,
        HAS_BIAS=bias is not None, **launch, **pdl_kwargs(pdl, qkv.device))
    return o
