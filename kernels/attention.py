"""Variable-length packed attention (FlashAttention-2 style forward) with GQA and bottom-right causal masks.

Sequence b's queries ``q[cu_q[b]:cu_q[b+1]]`` attend to its keys ``k[cu_k[b]:cu_k[b+1]]``, or with
``seqused_k`` to ``k[cu_k[b]:cu_k[b] + seqused_k[b]]`` (then cu_k holds starts only: key ranges may overlap or
leave gaps, as the denoiser's arena does where two CFG branches share a cached prefix). With ``causal``
the mask is aligned bottom-right: query i of a sequence with Lq queries and Lk keys sees keys
j <= Lk - Lq + i (text prefill against a KV cache in front of it). Non-causal is full attention (image
blocks, denoising forwards).

Design:
* GQA packing: the G = Hq / Hk query heads that share a kv head are packed into the M dimension of one
  program (row r = query r // G, head r % G), so each K/V tile is loaded once for all G heads. This also
  makes decode (Lq = 1, G = 7) fill a 16-row tensor-core tile instead of wasting 15 of 16 rows.
* Two loop stages per query block: key blocks every row sees entirely (no masking work), then the
  few blocks on the causal diagonal and the ragged end of the keys (masked).
* Split-K (flash-decoding) when the grid is too small to fill the GPU (decode, short text prefill against a
  long cache): each program handles a slice of the keys and writes a partial output + log-sum-exp; a
  second kernel combines the slices.
* Launch settings: a short autotuned ``CONFIGS`` list for the plain path on GPU; a single fixed config in
  the interpreter (autotune with several configs does not run there) and for the split path.

Where it is used: prefill, decode (split path) and the denoiser's marker queries everywhere, and the
denoiser's latent queries off Hopper. On Hopper the latent queries (4098 per branch, non-causal) go to
cuDNN's fused attention by default (``bagel_rt.fast.resolve_attention``): in place in the denoiser it ran
them 12-17% faster than this kernel (H200: 0.84 vs 1.00 ms per layer for t2i, 3.09 vs 3.51 ms for edit;
``benchmarks/diagnose.py --only-attention-ab``), while this kernel beats SDPA's flash backend at every shape
and cuDNN cannot take the causal / decode shapes in one varlen launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import gdc_wait, is_interpreting, num_sms, pdl_kwargs

# Plain path, tuned on the GPU; key = (query rows bucket, group size, head dim, causal) + dtypes.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
]
# Interpreter: one small config (tests then also cover several query blocks and key blocks per program).
INTERPRET_BLOCK_M, INTERPRET_BLOCK_N = 16, 16
# Split path: fixed settings (memory-bound: few query rows against many keys).
SPLIT_BLOCK_N, SPLIT_NUM_WARPS, SPLIT_NUM_STAGES = 64, 4, 3
SPLIT_MIN_KEYS = 256  # at least this many keys per split
MAX_SPLITS = 128
_LOG2E = 1.4426950408889634


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool,
    sm_scale: float,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int | None = None,
    pdl: bool = False,
    seqused_k: Tensor | None = None,
) -> Tensor:
    """Reference: per-sequence explicit softmax in fp32. Same arguments as :func:`varlen_attention`.

    ``max_seqlen_*``, ``num_splits`` and ``pdl`` only steer the kernel and are ignored. Query rows that see no
    key give zeros.
    """
    Hq, Hk = q.shape[1], k.shape[1]
    out = torch.zeros_like(q)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    ends = cu_k[1:] if seqused_k is None else [s + n for s, n in zip(cu_k, seqused_k.tolist())]
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].float()  # [Lq, Hq, D]
        kb = k[cu_k[b]:ends[b]].float().repeat_interleave(Hq // Hk, dim=1)  # [Lk, Hq, D]
        vb = v[cu_k[b]:ends[b]].float().repeat_interleave(Hq // Hk, dim=1)
        Lq, Lk = qb.shape[0], kb.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * sm_scale  # [Hq, Lq, Lk]
        visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if causal:  # bottom-right: query i sees keys j <= Lk - Lq + i
            i = torch.arange(Lq, device=q.device)[:, None]
            j = torch.arange(Lk, device=q.device)[None, :]
            visible = j <= Lk - Lq + i
        p = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        p = torch.where(visible.any(dim=-1)[:, None], p, 0.0)  # rows with no visible key -> 0, not NaN
        out[cu_q[b]:cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", p, vb).to(q.dtype)
    return out


@triton.jit
def seq_bounds(cu_q, cu_k, i_b, used_k=None, HAS_USED: tl.constexpr = False):
    """Sequence ``i_b``'s first query row, query count, first key row and key count from the cu_seqlens (the
    key count from ``used_k`` [B] where HAS_USED: key ranges that overlap)."""
    bos_q = tl.load(cu_q + i_b)
    bos_k = tl.load(cu_k + i_b)
    if HAS_USED:
        Lk = tl.load(used_k + i_b)
    else:
        Lk = tl.load(cu_k + i_b + 1) - bos_k
    return bos_q, tl.load(cu_q + i_b + 1) - bos_q, bos_k, Lk


@triton.jit
def load_packed_q(q, bos_q, Lq, i_m, i_hk, stride_qm, stride_qh,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """GQA packing: block ``i_m`` of the rows (query, q head of kv head ``i_hk``), row r = query r // G, head
    i_hk * G + r % G. Returns the [BLOCK_M, D] query block (zeros past the end), each row's query index and q
    head, and the row mask. Also used by the FP8 attention experiment in ``benchmarks/ceilings.py``."""
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_qi = o_r // G
    o_h = i_hk * G + o_r % G
    m_r = o_r < Lq * G
    o_d = tl.arange(0, D)
    p_q = q + (bos_q + o_qi).to(tl.int64)[:, None] * stride_qm + o_h[:, None] * stride_qh + o_d[None, :]
    return tl.load(p_q, mask=m_r[:, None], other=0.0), o_qi, o_h, m_r


@triton.jit
def _attn_block(acc, m_i, l_i, b_q, k, v, start_n, bos_k, Lk, diag, o_qi, o_n, o_d, stride_km, stride_vm,
                qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    # one key block [start_n, start_n + BLOCK_N) of the online softmax (exp2 domain)
    o_k = start_n + o_n
    m_k = o_k < Lk
    p_k = k + (bos_k + o_k).to(tl.int64)[:, None] * stride_km + o_d[None, :]
    p_v = v + (bos_k + o_k).to(tl.int64)[:, None] * stride_vm + o_d[None, :]
    if MASKED:
        # [BLOCK_N, D]
        b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)
    else:
        b_k = tl.load(p_k)
    # [BLOCK_M, BLOCK_N] raw scores; the scale is applied inside exp2's argument (one FMA per score)
    b_s = tl.dot(b_q, tl.trans(b_k))
    if MASKED:
        m_s = m_k[None, :]
        if CAUSAL:
            m_s = m_s & (o_k[None, :] <= diag + o_qi[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1) * qk_scale)
        # a row can have seen no key yet (-inf everywhere): subtract 0 instead of -inf to avoid NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1) * qk_scale)
        m_use = m_new
    b_p = tl.math.exp2(b_s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(b_p, axis=1)
    if MASKED:
        # [BLOCK_N, D]
        b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
    else:
        b_v = tl.load(p_v)
    # [BLOCK_M, D]
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    q, k, v, o, o_part, lse_part, cu_q, cu_k, used_k,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    sm_scale, Mq, NUM_SPLITS, ROWS_BUCKET,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, HAS_USED: tl.constexpr = False, USE_GDC: tl.constexpr = False,
):
    # grid: (query-row blocks, kv heads, sequences * NUM_SPLITS); ROWS_BUCKET only keys the autotuner
    gdc_wait(USE_GDC)  # programmatic dependent launch
    i_m, i_hk, i_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bs // NUM_SPLITS
    i_s = i_bs % NUM_SPLITS
    bos_q, Lq, bos_k, Lk = seq_bounds(cu_q, cu_k, i_b, used_k, HAS_USED)
    if i_m * BLOCK_M >= Lq * G:
        return
    # [BLOCK_M, D] packed rows: query o_qi, q head o_h
    b_q, o_qi, o_h, m_r = load_packed_q(q, bos_q, Lq, i_m, i_hk, stride_qm, stride_qh, G, D, BLOCK_M)
    o_d = tl.arange(0, D)
    o_n = tl.arange(0, BLOCK_N)
    k += i_hk * stride_kh
    v += i_hk * stride_vh

    # key range of this block: [0, end_full) is visible to every row, [end_full, end_all) needs masks
    diag = Lk - Lq
    if CAUSAL:
        q_lo = (i_m * BLOCK_M) // G
        q_hi = tl.minimum((i_m * BLOCK_M + BLOCK_M - 1) // G, Lq - 1)
        end_full = tl.maximum(tl.minimum(diag + q_lo + 1, Lk), 0)
        end_all = tl.maximum(tl.minimum(diag + q_hi + 1, Lk), 0)
    else:
        end_full = Lk
        end_all = Lk
    end_full = (end_full // BLOCK_N) * BLOCK_N
    lo = 0
    hi = end_all
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(end_all, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = i_s * chunk
        hi = tl.minimum(lo + chunk, end_all)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(lo, tl.minimum(hi, end_full), BLOCK_N):
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, b_q, k, v, start_n, bos_k, Lk, diag, o_qi, o_n, o_d,
                                    stride_km, stride_vm, qk_scale, False, CAUSAL)
    for start_n in range(tl.maximum(lo, end_full), hi, BLOCK_N):
        acc, m_i, l_i = _attn_block(acc, m_i, l_i, b_q, k, v, start_n, bos_k, Lk, diag, o_qi, o_n, o_d,
                                    stride_km, stride_vm, qk_scale, True, CAUSAL)

    # rows that saw no key (l = 0) give zeros
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    o_row = (bos_q + o_qi).to(tl.int64)
    if SPLIT:
        # partials: o_part [NUM_SPLITS, Mq, Hq, D] fp32, lse_part [NUM_SPLITS, Mq, Hq] (log2 domain)
        Hq = G * tl.num_programs(1)
        o_part_row = (i_s.to(tl.int64) * Mq + o_row) * Hq + o_h
        tl.store(o_part + o_part_row[:, None] * D + o_d[None, :], b_o, mask=m_r[:, None])
        b_lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(lse_part + o_part_row, b_lse, mask=m_r)
    else:
        p_o = o + o_row[:, None] * stride_om + o_h[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _attn_combine_kernel(o_part, lse_part, o, stride_om, stride_oh, R, Hq, NUM_SPLITS,
                         D: tl.constexpr, BLOCK_S: tl.constexpr, USE_GDC: tl.constexpr = False):
    gdc_wait(USE_GDC)  # programmatic dependent launch
    # one program per (query, q head) row r of R = Mq * Hq: o = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max)
    i_r = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, D)
    m_s = o_s < NUM_SPLITS
    # [BLOCK_S]
    b_lse = tl.load(lse_part + o_s * R + i_r, mask=m_s, other=float("-inf"))
    b_max = tl.max(b_lse, axis=0)
    b_w = tl.math.exp2(b_lse - tl.where(b_max == float("-inf"), 0.0, b_max))
    # [BLOCK_S, D]
    b_o = tl.load(o_part + (o_s.to(tl.int64) * R + i_r)[:, None] * D + o_d[None, :], mask=m_s[:, None], other=0.0)
    b_sum = tl.sum(b_w, axis=0)
    b_out = tl.sum(b_o * b_w[:, None], axis=0) / tl.where(b_sum == 0.0, 1.0, b_sum)
    i_q = i_r // Hq
    i_h = i_r % Hq
    tl.store(o + i_q * stride_om + i_h * stride_oh + o_d, b_out.to(o.dtype.element_ty))


_attn_fwd_kernel_tuned = triton.autotune(CONFIGS, key=["ROWS_BUCKET", "G", "D", "CAUSAL"])(_attn_fwd_kernel)


def _choose_splits(rows: int, n_kv_heads: int, batch: int, max_seqlen_k: int, sms: int) -> int:
    """About two programs per SM, each with at least SPLIT_MIN_KEYS keys."""
    split_programs = triton.cdiv(rows, 64 if rows > 16 else 16) * n_kv_heads * batch
    return max(1, min(triton.cdiv(2 * sms, split_programs), triton.cdiv(max_seqlen_k, SPLIT_MIN_KEYS), MAX_SPLITS))


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool,
    sm_scale: float,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int | None = None,
    pdl: bool = False,
    seqused_k: Tensor | None = None,
) -> Tensor:
    """Packed variable-length attention with GQA, online softmax in fp32.

    Args:
        q: [Mq, Hq, D]; k, v: [Mk, Hk, D]; same dtype (bf16 / fp16 / fp32), last dim contiguous, any row and
            head strides (views into a fused qkv output are fine). Hq % Hk == 0; D a power of 2, 16..256.
        cu_seqlens_q: [B+1] int32 on q's device, cumulative query lengths (cu[0] = 0, cu[B] = Mq).
        cu_seqlens_k: [B+1] int32, cumulative key lengths (cu[B] = Mk).
        causal: bottom-right aligned causal mask (query i sees keys j <= Lk - Lq + i); False = full.
        sm_scale: softmax scale, usually 1 / sqrt(D).
        max_seqlen_q, max_seqlen_k: max lengths over the sequences, or upper bounds of them (e.g. the cache
            capacity, so that a captured CUDA graph stays valid while lengths grow). Pass them to avoid a host
            sync (needed for CUDA-graph capture); if None they are read from the cu_seqlens tensors.
        num_splits: split the keys into this many slices (flash-decoding); None = heuristic, 1 = never.
        pdl: launch the split path's kernels with programmatic dependent launch (Hopper+, see
            ``_device.pdl_kwargs``; decode). The autotuned plain path ignores it.
        seqused_k: [B] int32 or None: sequence b's keys are rows ``cu_k[b] .. cu_k[b] + seqused_k[b]`` (cu_k's
            last entry unused; ranges may overlap). The denoiser's arena lets an edit's text-unconditional branch
            read its cache inside the conditional branch's (``bagel_rt.arena``). ``max_seqlen_k`` bounds these.
    Returns:
        [Mq, Hq, D] in q.dtype, contiguous. Query rows that see no key (Lk = 0, or causal with Lk < Lq)
        give zeros. fp32 inputs use TF32 tensor-core dots on the GPU (bf16 is the intended dtype).

    Memory passes removed: the [H, Lq, Lk] score and probability matrices are never written (eager
    attention writes and re-reads them), and K/V are read once per kv head for all G query heads instead of
    being repeat_interleave'd G times.
    """
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [M, H, D]"
    Mq, Hq, D = q.shape
    Mk, Hk, _ = k.shape
    assert v.shape == k.shape and k.shape[2] == D, f"k {tuple(k.shape)} / v {tuple(v.shape)} vs q {tuple(q.shape)}"
    assert Hq % Hk == 0, f"Hq {Hq} is not a multiple of Hk {Hk}"
    assert D in (16, 32, 64, 128, 256), f"head_dim {D} not supported"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must be contiguous"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1
    assert cu_seqlens_q.device == q.device and cu_seqlens_k.device == q.device
    B = cu_seqlens_q.shape[0] - 1
    if seqused_k is not None:
        assert seqused_k.dtype == torch.int32 and seqused_k.shape == (B,) and seqused_k.device == q.device
    used = {"HAS_USED": seqused_k is not None}
    G = Hq // Hk
    o = torch.empty((Mq, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0 or Mq == 0:
        return o
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    rows = max_seqlen_q * G  # packed (query, head) rows of the longest sequence
    if num_splits is None:
        num_splits = 1
        sms = num_sms(q.device)
        if sms is not None and triton.cdiv(rows, 128) * Hk * B < sms:  # the plain grid cannot fill the GPU
            if max_seqlen_k is None:
                lk = cu_seqlens_k[1:] - cu_seqlens_k[:-1] if seqused_k is None else seqused_k
                max_seqlen_k = int(lk.max())
            num_splits = _choose_splits(rows, Hk, B, max_seqlen_k, sms)
    assert num_splits >= 1
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               o.stride(0), o.stride(1))

    if num_splits == 1 and not is_interpreting():
        bucket = min(triton.next_power_of_2(rows), 1 << 16)

        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]), Hk, B)

        _attn_fwd_kernel_tuned[grid](q, k, v, o, o, o, cu_seqlens_q, cu_seqlens_k, seqused_k, *strides, sm_scale,
                                     Mq, 1, bucket, G=G, D=D, CAUSAL=causal, SPLIT=False, **used)
        return o

    if is_interpreting():
        block_m, block_n, launch = INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, {}
    else:
        block_m = 16 if rows <= 16 else 64
        block_n, launch = SPLIT_BLOCK_N, {"num_warps": SPLIT_NUM_WARPS, "num_stages": SPLIT_NUM_STAGES,
                                          **pdl_kwargs(pdl, q.device)}
    grid = (triton.cdiv(rows, block_m), Hk, B * num_splits)
    if num_splits == 1:
        _attn_fwd_kernel[grid](q, k, v, o, o, o, cu_seqlens_q, cu_seqlens_k, seqused_k, *strides, sm_scale, Mq, 1,
                               0, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, SPLIT=False, **used,
                               **launch)
        return o
    o_part = torch.empty((num_splits, Mq, Hq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, Mq, Hq), dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[grid](q, k, v, o, o_part, lse_part, cu_seqlens_q, cu_seqlens_k, seqused_k, *strides,
                           sm_scale, Mq, num_splits, 0, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                           SPLIT=True, **used, **launch)
    _attn_combine_kernel[(Mq * Hq,)](o_part, lse_part, o, o.stride(0), o.stride(1), Mq * Hq, Hq, num_splits,
                                     D=D, BLOCK_S=triton.next_power_of_2(num_splits), **pdl_kwargs(pdl, q.device))
    return o

