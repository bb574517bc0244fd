"""Matrix-vector products of text decoding (batch 1): ``y = x @ W.T`` and the MLP's fused gate/up + SwiGLU.

A decoding step is memory bound: every weight byte is read once per token, so what matters is how close a
GEMV gets to the GPU's memory bandwidth. One program owns ``BN`` output channels of one input row and
streams their weight rows in ``BK``-wide tiles; fp32 partial products stay per lane and are reduced once at
the end. Launch settings are fixed per shape class from measured timings (``_settings``; the interpreter runs
one small setting).

:func:`gemv_swiglu` reads the gate and up weights of the same output channels in one program and applies
``silu(gate) * up`` in the epilogue: one launch instead of three, and the [I] gate/up vectors never go to
memory. Its rounding follows the unfused chain (each projection rounded to the activation dtype, then the
SwiGLU in fp32, rounded once).

The loop is rotated (each weight tile is requested one iteration ahead of its use): that alone took the
summed GEMV time of a decode step from 3.77 to 3.61 ms (eager profile, H200). With ``pdl`` the kernel is
launched with programmatic dependent launch and requests its first weight tile before it waits for the
previous kernel (weights are never written), so it streams weights while the previous kernel drains.

Measured against cuBLAS (``F.linear``) at the decode shapes (``benchmarks/bench_kernels.py --only gemv
--graph``, H200, bf16, commit c39c2f7): o 6.3 vs 9.1 us, down 34.2 vs 37.8 us, lm_head 242 vs 258 us (8 x 512),
gate/up + SwiGLU 64.8 vs 75.6 us (4.0-4.2 TB/s); greedy decode 218 (cuBLAS) -> 247 (rotated loop) -> 259
tokens/s (with PDL; ``benchmarks/diagnose.py --only-decode``). So
:class:`bagel_rt.fast_decode.GraphDecoder` uses it by default (``gemv="triton"``). A split-K variant for the
long rows of the down projection lost to the single pass (39 us) and was removed, and so was an RMSNorm in
the GEMV prologue (each program re-reading the input row to compute its RMS before streaming weights): the
q/k/v GEMV with it took 12.4 us against 9.8 us for a separate RMSNorm launch + GEMV, and greedy decode fell
from 259 to 249 tokens/s (commit fda21a5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._device import gdc_wait, is_interpreting, l2_prefetch, prefetch_kwargs
from .swiglu import swiglu_ref

MAX_M = 4  # rows handled by the GEMV path (decode is M = 1)


def gemv_ref(x: Tensor, w: Tensor, bias: Tensor | None = None, pdl: bool = False) -> Tensor:
    """Reference. x [M, K], w [N, K] (same dtype), bias [N] or None -> [M, N] in x.dtype (``pdl`` unused)."""
    return F.linear(x, w, bias)


def gemv_swiglu_ref(x: Tensor, w_gate: Tensor, w_up: Tensor, pdl: bool = False) -> Tensor:
    """Reference. x [M, K], w_gate / w_up [I, K] -> silu(x @ w_gate.T) * (x @ w_up.T), [M, I] in x.dtype
    (``pdl`` unused)."""
    return swiglu_ref(F.linear(x, w_gate), F.linear(x, w_up))


# Launch settings by shape, fixed (autotuning at the first decode cost ~6 s per process, more than it saves in
# a one-shot request). Chosen from the timings of every candidate setting at the decode shapes on an H200
# (``benchmarks/tune_gemv.py``, ``benchmarks/results/gemv_tune_h200.jsonl``, rotated loop, commit c39c2f7):
# for q/k/v, o and down the best settings are within 1 us of each other, two channels x 2048-wide tiles
# among them; the 152064-row lm_head prefers 8 channels x 512 (253 vs 275 us for 2 x 1024); the
# gate/up + SwiGLU kernel, which streams two weights at once, 8 channels x 512 (75 us; 4 x 512: 74 us).
def _settings(n: int) -> dict:
    return dict(BN=2, BK=2048, num_warps=8) if n <= 32768 else dict(BN=8, BK=512, num_warps=4)


SWIGLU_SETTINGS = dict(BN=8, BK=512, num_warps=4)
INTERPRETER_CONFIG = dict(BN=8, BK=64, num_warps=4)


@triton.jit
def _w_tile(p_w_rows, m_n, k0, K, BK: tl.constexpr):
    # [BN, BK] weight tile at columns [k0, k0 + BK) (zeros past K; a tile wholly past K reads nothing)
    o_k = k0 + tl.arange(0, BK)
    return tl.load(p_w_rows[:, None] + o_k[None, :], mask=m_n[:, None] & (o_k < K)[None, :], other=0.0)


@triton.jit
def _x_tile(p_x, k0, K, BK: tl.constexpr):
    # [BK] fp32 input tile at columns [k0, k0 + BK)
    o_k = k0 + tl.arange(0, BK)
    return tl.load(p_x + o_k, mask=o_k < K, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x, w, b, y, N, K, stride_xm, stride_ym, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, USE_GDC: tl.constexpr, PREFETCH: tl.constexpr = False):
    i_n, i_m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_x = x + i_m * stride_xm
    p_w = w + o_n.to(tl.int64) * K
    # the loop is rotated: each weight tile is requested one iteration ahead, and the first one before the
    # wait for the previous kernel (no kernel writes weights), so a PDL launch streams weights meanwhile
    b_w = _w_tile(p_w, m_n, 0, K, BK)
    l2_prefetch(p_w, m_n, 0, K, PREFETCH)  # an A/B option: the rest of the rows too (_device._L2_PREFETCH)
    gdc_wait(USE_GDC)
    # [BN, BK] fp32 partial products per lane, reduced once at the end
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        b_x = _x_tile(p_x, k0, K, BK)
        acc += b_w.to(tl.float32) * b_x[None, :]
        b_w = _w_tile(p_w, m_n, k0 + BK, K, BK)
    # [BN]
    b_y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        # cuBLAS adds the bias to the fp32 accumulator too (one rounding at the end)
        b_y += tl.load(b + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(y + i_m * stride_ym + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


@triton.jit
def _gemv_swiglu_kernel(x, wg, wu, y, N, K, stride_xm, stride_ym, BN: tl.constexpr, BK: tl.constexpr,
                        USE_GDC: tl.constexpr, PREFETCH: tl.constexpr = False):
    i_n, i_m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_x = x + i_m * stride_xm
    rows = o_n.to(tl.int64) * K
    # one loop over both weights (twice the bytes in flight per iteration), rotated as in _gemv_kernel
    b_g = _w_tile(wg + rows, m_n, 0, K, BK)
    b_u = _w_tile(wu + rows, m_n, 0, K, BK)
    l2_prefetch(wg + rows, m_n, 0, K, PREFETCH)
    l2_prefetch(wu + rows, m_n, 0, K, PREFETCH)
    gdc_wait(USE_GDC)
    acc_g = tl.zeros([BN, BK], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        b_x = _x_tile(p_x, k0, K, BK)
        acc_g += b_g.to(tl.float32) * b_x[None, :]
        acc_u += b_u.to(tl.float32) * b_x[None, :]
        b_g = _w_tile(wg + rows, m_n, k0 + BK, K, BK)
        b_u = _w_tile(wu + rows, m_n, k0 + BK, K, BK)
    swiglu_store(y + i_m * stride_ym + o_n, tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), m_n)


@triton.jit
def swiglu_store(p_y, g, u, m_n):
    """Store ``silu(g) * u`` of the fp32 [BN] projections at ``p_y``, rounded as the unfused chain: each
    projection to the output dtype first (as it would be stored), the SwiGLU in fp32, rounded once."""
    g = g.to(p_y.dtype.element_ty).to(tl.float32)
    u = u.to(p_y.dtype.element_ty).to(tl.float32)
    tl.store(p_y, (g / (1.0 + tl.exp(-g)) * u).to(p_y.dtype.element_ty), mask=m_n)


def _check(x: Tensor, *ws: Tensor) -> tuple[int, int, int]:
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}"
    M, K = x.shape
    assert M <= MAX_M, f"gemv handles at most {MAX_M} rows, got {M}"
    for w in ws:
        assert w.dim() == 2 and w.shape[1] == K and w.is_contiguous(), f"weight {tuple(w.shape)} vs x {(M, K)}"
        assert w.dtype == x.dtype and w.device == x.device
    return M, ws[0].shape[0], K


def _launch(kernel, settings: dict, grid_n: int, args, pdl: bool, **kw) -> None:
    cfg = dict(INTERPRETER_CONFIG) if is_interpreting() else settings
    kernel[(triton.cdiv(grid_n, cfg["BN"]), args[-1])](*args[:-1], **kw, **cfg,
                                                       **prefetch_kwargs(pdl, args[0].device))


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, pdl: bool = False) -> Tensor:
    """``x @ w.T (+ bias)`` for a few rows (decode).

    Args:
        x: [M, K], M <= 4, bf16 / fp16 / fp32, last dim contiguous.
        w: [N, K] contiguous, x's dtype. bias: [N] or None.
        pdl: launch with programmatic dependent launch (Hopper+; see ``_device.pdl_kwargs``): the kernel
            starts streaming its weights while the previous kernel finishes.
    Returns:
        [M, N] in x.dtype; fp32 accumulation, bias added before the one rounding.
    """
    M, N, K = _check(x, w)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    _launch(_gemv_kernel, _settings(N), N, (x, w, bias if bias is not None else w, y, N, K, x.stride(0),
                                            y.stride(0), M), pdl, HAS_BIAS=bias is not None)
    return y


def gemv_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, pdl: bool = False) -> Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)`` for a few rows, in one kernel.

    Args:
        x: [M, K], M <= 4, last dim contiguous. w_gate, w_up: [I, K] contiguous, x's dtype.
        pdl: programmatic dependent launch, as in :func:`gemv`.
    Returns:
        [M, I] in x.dtype (each projection rounded to x.dtype, SwiGLU in fp32, rounded once).
    """
    assert w_gate.shape == w_up.shape, f"gate {tuple(w_gate.shape)} / up {tuple(w_up.shape)}"
    M, N, K = _check(x, w_gate, w_up)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    _launch(_gemv_swiglu_kernel, SWIGLU_SETTINGS, N, (x, w_gate, w_up, y, N, K, x.stride(0), y.stride(0), M), pdl)
    return y
