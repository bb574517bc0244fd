"""Time every bagel-rt Triton kernel against the best alternatives at BAGEL-7B-MoT's real shapes.

Providers: ``triton`` (ours), ``eager`` (the ``*_ref`` function), ``compile`` (``torch.compile`` of the ref),
and for attention ``sdpa_flash`` (PyTorch SDPA restricted to its flash backend, one call per sequence, with
a bottom-right causal mask object where needed) and ``flash_attn`` (``flash_attn_varlen_func``, if installed).
Times are medians of ``triton.testing.do_bench``. One JSON line per (kernel, shape) goes to ``--out``.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.jsonl [--only attention,swiglu]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HIDDEN, FFN, HQ, HK, D = 3584, 18944, 28, 4, 128
M_GEN = 4098  # 1024x1024 image: 4096 latent tokens + 2 markers
BF16 = torch.bfloat16


def randn(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def bench(fn: Callable[[], object], graph: bool) -> float:
    import triton.testing

    if graph:  # replay a CUDA graph of the call: no Python / launch overhead (what a captured runtime sees)
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def try_bench(fn: Callable[[], object], graph: bool) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return bench(fn, graph)
    except Exception as e:  # a provider that cannot run a shape is reported as missing, not fatal
        print(f"    (provider failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return None


# ------------------------------------------------------------------ cases: name, shape, {provider: fn}, bytes


def cases_rms_norm(K):
    for M in (1, M_GEN, 3 * M_GEN):
        x, r, w = randn(M, HIDDEN), randn(M, HIDDEN), randn(HIDDEN)
        ref_c = torch.compile(K.rms_norm_ref)
        yield "rms_norm", {"M": M, "N": HIDDEN}, {
            "triton": lambda x=x, w=w: K.rms_norm(x, w, 1e-6),
            "eager": lambda x=x, w=w: K.rms_norm_ref(x, w, 1e-6),
            "compile": lambda x=x, w=w, f=ref_c: f(x, w, 1e-6),
        }, 2 * x.numel() * 2
        add_c = torch.compile(K.add_rms_norm_ref)
        yield "add_rms_norm", {"M": M, "N": HIDDEN}, {
            "triton": lambda x=x, r=r, w=w: K.add_rms_norm(x, r, w, 1e-6),
            "eager": lambda x=x, r=r, w=w: K.add_rms_norm_ref(x, r, w, 1e-6),
            "compile": lambda x=x, r=r, w=w, f=add_c: f(x, r, w, 1e-6),
        }, 4 * x.numel() * 2


def cases_qk_norm_rope(K):
    for M in (1, M_GEN, 3 * M_GEN):
        qkv = randn(M, (HQ + 2 * HK) * D)
        q, k = qkv[:, : HQ * D].view(M, HQ, D), qkv[:, HQ * D: (HQ + HK) * D].view(M, HK, D)
        qw, kw, cos, sin = randn(D), randn(D), randn(M, D), randn(M, D)
        args = (q, k, qw, kw, cos, sin, 1e-6, BF16)
        ref_c = torch.compile(K.qk_norm_rope_ref)
        yield "qk_norm_rope", {"M": M, "Hq": HQ, "Hk": HK, "D": D}, {
            "triton": lambda a=args: K.qk_norm_rope(*a),
            "eager": lambda a=args: K.qk_norm_rope_ref(*a),
            "compile": lambda a=args, f=ref_c: f(*a),
        }, 2 * (HQ + HK) * D * M * 2 + 4 * M * D * 2


def cases_swiglu(K):
    for M in (1, M_GEN, 3 * M_GEN):
        gate_up = randn(M, 2 * FFN)
        g, u = gate_up[:, :FFN], gate_up[:, FFN:]
        ref_c = torch.compile(K.swiglu_ref)
        yield "swiglu", {"M": M, "I": FFN}, {
            "triton": lambda g=g, u=u: K.swiglu(g, u),
            "eager": lambda g=g, u=u: K.swiglu_ref(g, u),
            "compile": lambda g=g, u=u, f=ref_c: f(g, u),
        }, 3 * M * FFN * 2


def cases_cfg_euler(K):
    N, C = 4096, 64
    x, v_c, v_t, v_i = randn(N, C, dtype=torch.float32), randn(N, C), randn(N, C), randn(N, C)
    for renorm_type in ("global", "channel", "text_channel"):
        for img_scale in (1.0, 2.0):
            args = (x, v_c, v_t, v_i, 4.0, img_scale, renorm_type, 0.0, 0.02)
            ref_c = torch.compile(K.cfg_euler_ref)
            yield "cfg_euler", {"N": N, "C": C, "renorm": renorm_type, "img_scale": img_scale}, {
                "triton": lambda a=args: K.cfg_euler(*a),
                "eager": lambda a=args: K.cfg_euler_ref(*a),
                "compile": lambda a=args, f=ref_c: f(*a),
            }, N * C * (4 + 2 * 3 + 8)


def sdpa_flash_loop(q, k, v, lq, lk, causal, scale):
    """One SDPA call per sequence, flash backend only, GQA via enable_gqa; bottom-right causal mask object."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    outs, iq, ik = [], 0, 0
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for a, b in zip(lq, lk):
            qb = q[iq:iq + a].transpose(0, 1)[None]
            kb, vb = k[ik:ik + b].transpose(0, 1)[None], v[ik:ik + b].transpose(0, 1)[None]
            if causal and a != b:
                mask = causal_lower_right(a, b)
                out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale,
                                                                       enable_gqa=True)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale,
                                                                       enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
            iq, ik = iq + a, ik + b
    return torch.cat(outs)


def sdpa_cudnn_loop(q, k, v, lq, lk, scale):
    """Non-causal only: one SDPA call per sequence on the cuDNN backend, native GQA on strided views (what the
    denoiser's ``attention="cudnn"`` runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    outs, iq, ik = [], 0, 0
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for a, b in zip(lq, lk):
            qb = q[iq:iq + a].transpose(0, 1)[None]
            kb, vb = k[ik:ik + b].transpose(0, 1)[None], v[ik:ik + b].transpose(0, 1)[None]
            out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
            iq, ik = iq + a, ik + b
    return torch.cat(outs)


def cases_attention(K):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    shapes = [
        ("denoise 3 CFG branches, t2i", (M_GEN,) * 3, (4150 + M_GEN, 40 + M_GEN, 4150 + M_GEN), False),
        ("denoise 3 CFG branches, edit 9k ctx", (M_GEN,) * 3, (9000 + M_GEN, 4600 + M_GEN, 4400 + M_GEN), False),
        ("denoise 1 branch, 14k keys", (M_GEN,), (14000,), False),
        ("image prefill 4098 vs cache", (M_GEN,), (40 + M_GEN,), False),
        ("text prefill 37 tok vs 4k cache", (37,), (4150 + 37,), True),
        ("text prefill 512 tok vs 9k cache", (512,), (9000 + 512,), True),
        ("decode Lk=2000", (1,), (2000,), True),
        ("decode Lk=9000", (1,), (9000,), True),
    ]
    scale = 1 / math.sqrt(D)
    for label, lq, lk, causal in shapes:
        q = randn(sum(lq), HQ, D)
        k, v = randn(sum(lk), HK, D), randn(sum(lk), HK, D)
        cq, ck = cu_seqlens(lq), cu_seqlens(lk)
        mq, mk = max(lq), max(lk)
        providers = {
            "triton": lambda q=q, k=k, v=v, cq=cq, ck=ck, c=causal, mq=mq, mk=mk: K.varlen_attention(
                q, k, v, cq, ck, c, scale, max_seqlen_q=mq, max_seqlen_k=mk),
            "sdpa_flash": lambda q=q, k=k, v=v, lq=lq, lk=lk, c=causal: sdpa_flash_loop(q, k, v, lq, lk, c, scale),
        }
        if not causal:
            providers["sdpa_cudnn"] = lambda q=q, k=k, v=v, lq=lq, lk=lk: sdpa_cudnn_loop(q, k, v, lq, lk, scale)
        if flash_attn_varlen_func is not None:
            providers["flash_attn"] = lambda q=q, k=k, v=v, cq=cq, ck=ck, c=causal, mq=mq, mk=mk: (
                flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=c))
        flops = sum(4 * a * b * HQ * D for a, b in zip(lq, lk))  # non-causal count (flash-attn convention)
        yield "varlen_attention", {"case": label, "Lq": list(lq), "Lk": list(lk), "causal": causal}, providers, (
            flops, "flop")


def cases_fp8_quant(K):
    for M, Kd in ((1, HIDDEN), (2 * M_GEN, HIDDEN), (2 * M_GEN, FFN)):
        x = randn(M, Kd, scale=3.0)
        ref_c = torch.compile(K.quantize_rows_fp8_ref)
        yield "quantize_rows_fp8", {"M": M, "K": Kd}, {
            "triton": lambda x=x: K.quantize_rows_fp8(x),
            "eager": lambda x=x: K.quantize_rows_fp8_ref(x),
            "compile": lambda x=x, f=ref_c: f(x),
        }, M * Kd * 3
    # the FP8 path's producers writing FP8 rows themselves vs the producer + a separate quantize launch
    M = 2 * M_GEN
    x, r, w = randn(M, HIDDEN), randn(M, HIDDEN), randn(HIDDEN)
    yield "add_rms_norm_fp8", {"M": M, "N": HIDDEN}, {
        "triton": lambda: K.add_rms_norm_fp8(x, r, w, 1e-6),
        "add_rms_norm+quantize": lambda: K.quantize_rows_fp8(K.add_rms_norm(x, r, w, 1e-6)[0]),
    }, M * HIDDEN * 2 * 3 + M * HIDDEN
    gu = randn(M, 2 * FFN)
    g, u = gu[:, :FFN], gu[:, FFN:]
    yield "swiglu_fp8", {"M": M, "N": FFN}, {
        "triton": lambda: K.swiglu_fp8(g, u),
        "swiglu+quantize": lambda: K.quantize_rows_fp8(K.swiglu(g, u)),
    }, M * FFN * 2 * 2 + M * FFN


def cases_fp8_gemm(K):
    """Not a kernel of ours: FP8 row-scaled GEMM (torch._scaled_mm) against the bf16 GEMM, at the
    generation expert's shapes for 2 CFG branches (M = 8196), plus the quantize kernel feeding it."""
    M = 2 * M_GEN
    for name, N, Kd in (("qkv", HIDDEN + 2 * HK * D, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate_up", 2 * FFN, HIDDEN),
                        ("down", HIDDEN, FFN)):
        x, w = randn(M, Kd), randn(N, Kd, scale=0.02)
        wq, ws = K.quantize_rows_fp8(w)
        ws = ws.view(1, -1).contiguous()
        xq, xs = K.quantize_rows_fp8(x)

        def fp8_mm(xq=xq, xs=xs, wq=wq, ws=ws):
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=BF16)

        def fp8_mm_fast_accum(xq=xq, xs=xs, wq=wq, ws=ws):
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=BF16, use_fast_accum=True)

        one = torch.ones((), device="cuda")

        def fp8_mm_tensorwise_fast_accum(xq=xq, wq=wq, one=one):
            # per-tensor scales (cuBLASLt's native scaling): would the row scales cost speed? (they do not)
            return torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=BF16, use_fast_accum=True)

        def fp8_mm_with_quant(x=x, wq=wq, ws=ws):
            q, s = K.quantize_rows_fp8(x)
            return torch._scaled_mm(q, wq.t(), scale_a=s, scale_b=ws, out_dtype=BF16)

        yield "fp8_gemm", {"proj": name, "M": M, "N": N, "K": Kd}, {
            "fp8": fp8_mm,
            "fp8_fast_accum": fp8_mm_fast_accum,
            "fp8_tensorwise_fast_accum": fp8_mm_tensorwise_fast_accum,
            "fp8+quant": fp8_mm_with_quant,
            "bf16": lambda x=x, w=w: torch.nn.functional.linear(x, w),
        }, (2 * M * N * Kd, "flop_gemm")


def cases_int8_w8a8(K):
    """INT8 W8A8 at the generation expert's shapes for 2 CFG branches (M = 8196): our Triton GEMM (int8 tl.dot,
    scales and bias in the epilogue) against cuBLAS's int8 GEMM (torch._int_mm) alone and with the eager
    epilogue it needs, and the bf16 GEMM with its bias; plus the per-token INT8 quantizer feeding it."""
    from bagel_rt.quant import int8, int8_w8a8_matmul

    M = 2 * M_GEN
    for name, N, Kd in (("o", HIDDEN, HIDDEN), ("k", HK * D, HIDDEN), ("gate_up", 2 * FFN, HIDDEN),
                        ("up", FFN, HIDDEN), ("down", HIDDEN, FFN)):
        x, w, b = randn(M, Kd), randn(N, Kd, scale=0.02), randn(N, scale=0.1)
        qw = int8.quantize(w)
        wq, ws = qw.qweight, qw.scale
        xq, xs = K.quantize_rows_int8(x)

        def int_mm_epilogue(xq=xq, xs=xs, wq=wq, ws=ws, b=b):
            return (torch._int_mm(xq, wq.t()).float() * xs * ws + b.float()).to(BF16)

        yield "int8_w8a8", {"proj": name, "M": M, "N": N, "K": Kd}, {
            "triton": lambda xq=xq, xs=xs, wq=wq, ws=ws, b=b: int8_w8a8_matmul(xq, xs, wq, ws, b, BF16),
            "triton+quant": lambda x=x, wq=wq, ws=ws, b=b: int8_w8a8_matmul(*K.quantize_rows_int8(x), wq, ws, b,
                                                                             BF16),
            "int_mm": lambda xq=xq, wq=wq: torch._int_mm(xq, wq.t()),
            "int_mm+epilogue": int_mm_epilogue,
            "bf16": lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b),
        }, (2 * M * N * Kd, "flop_gemm")
    for Kd in (HIDDEN, FFN):
        x = randn(M, Kd, scale=3.0)
        yield "quantize_rows_int8", {"M": M, "K": Kd}, {
            "triton": lambda x=x: K.quantize_rows_int8(x),
            "eager": lambda x=x: K.quantize_rows_int8_ref(x),
        }, M * Kd * 3


def cases_gemv(K):
    for name, N, Kd in (("qkv", HIDDEN + 2 * HK * D, HIDDEN), ("o", HIDDEN, HIDDEN), ("down", HIDDEN, FFN),
                        ("lm_head", 152064, HIDDEN)):
        x, w = randn(1, Kd), randn(N, Kd, scale=0.02)
        yield "gemv", {"proj": name, "N": N, "K": Kd}, {
            "triton": lambda x=x, w=w: K.gemv(x, w),
            "cublas": lambda x=x, w=w: torch.nn.functional.linear(x, w),
        }, N * Kd * 2
    x, wg, wu = randn(1, HIDDEN), randn(FFN, HIDDEN, scale=0.02), randn(FFN, HIDDEN, scale=0.02)
    yield "gemv_swiglu", {"proj": "gate_up+swiglu", "N": FFN, "K": HIDDEN}, {
        "triton": lambda: K.gemv_swiglu(x, wg, wu),
        "cublas+swiglu": lambda: K.swiglu(torch.nn.functional.linear(x, wg), torch.nn.functional.linear(x, wu)),
    }, 2 * FFN * HIDDEN * 2


def cases_df11(K):
    """DFloat11 decode of one MLP weight (18944 x 3584, the unit a layer decodes per step comes in seven such
    pieces): the kernel with its windows' counts and the joined first level given (what resident units do),
    with the counts only (two dependent table loads per code), without counts (the counting pass too), and a
    plain copy of the bf16 output (the bandwidth reference). Rate: the bf16 bytes written."""
    from bagel_rt.quant import compress_units, df11_decode, df11_first_level, df11_window_counts
    from bagel_rt.quant.exp4 import exp4_decode, exp4_encode

    w = (torch.randn(FFN, HIDDEN) * 0.02).to(BF16)  # on the CPU: compress_units works there
    unit = {k: v.cuda() for k, v in compress_units(w).items()}
    counted = {**unit, "window_counts": df11_window_counts(unit)}
    joined = {**counted, "first_level": df11_first_level(unit)}  # the resident store's buffers
    out = torch.empty(FFN * HIDDEN, dtype=BF16, device="cuda")
    ref = w.cuda().flatten()
    for b in (joined, counted, unit):
        assert torch.equal(df11_decode(b, out), ref)
    assert torch.equal(df11_decode(joined, out, True), ref)
    exp4 = exp4_encode(ref, unit["sign_mantissa"])  # the resident Exp4 form (bagel_rt.df11_resident.FORMS)
    assert torch.equal(exp4_decode(exp4, out), ref)
    print(f"    exp4: {exp4['escape_index'].numel()} escapes of {ref.numel()}, "
          f"{sum(t.numel() * t.element_size() for t in exp4.values()) / (2 * ref.numel()):.3f} of bf16 "
          f"(DF11: {sum(t.numel() * t.element_size() for t in unit.values()) / (2 * ref.numel()):.3f})")
    yield "df11_decode", {"N": FFN, "K": HIDDEN}, {
        "exp4": lambda: exp4_decode(exp4, out),
        "triton": lambda: df11_decode(joined, out),
        "wide": lambda: df11_decode(joined, out, True),  # four-element reads and writes
        "two_loads": lambda: df11_decode(counted, out),  # level 0, then the length table, per code
        "no_counts": lambda: df11_decode(unit, out),
        "bf16_copy": lambda: out.copy_(ref),
    }, FFN * HIDDEN * 2


def cases_fp8_gemv(K):
    """FP8 weight-only GEMV (decode from FP8 weights: one byte per weight) against the bf16 GEMV and cuBLAS."""
    from bagel_rt.quant import fp8
    from bagel_rt.quant.fp8_matmul import fp8_gemv

    for name, N, Kd in (("qkv", HIDDEN + 2 * HK * D, HIDDEN), ("o", HIDDEN, HIDDEN), ("down", HIDDEN, FFN),
                        ("lm_head", 152064, HIDDEN)):
        x, w = randn(1, Kd), randn(N, Kd, scale=0.02)
        q = fp8.quantize(w)
        yield "fp8_gemv", {"proj": name, "N": N, "K": Kd}, {
            "triton": lambda x=x, q=q: fp8_gemv(x, q.qweight, q.scale),
            "bf16_gemv": lambda x=x, w=w: K.gemv(x, w),
            "cublas": lambda x=x, w=w: torch.nn.functional.linear(x, w),
        }, N * Kd



QGEMV_CANDIDATES = {  # (BN, BK, num_warps) tried beside the default settings of bagel_rt.quant.decode_gemv
    "int8": [(4, 2048, 8), (4, 1024, 4), (8, 512, 4), (16, 512, 8), (4, 512, 4), (8, 256, 2)],
    "nf4": [(8, 1024, 8), (8, 512, 4), (4, 1024, 4), (4, 512, 4), (8, 256, 2), (4, 256, 2), (2, 512, 2),
            (16, 256, 4), (2, 1024, 4), (8, 512, 2), (16, 1024, 8)],
}
#: the byte-permute NF4 decode with packed bf16 products: settings whose offline sm_90 loops are the shortest
#: (benchmarks/decode_sass.py; single-warp programs keep the table planes in registers)
HFMA_CANDIDATES = {
    "nf4": [(4, 512, 1), (2, 512, 1), (8, 256, 1), (4, 256, 1), (8, 512, 1), (8, 512, 2), (4, 1024, 2),
            (16, 512, 4), (8, 1024, 4)],
    "fp8": [(8, 512, 1), (16, 512, 1), (4, 512, 1), (8, 1024, 2), (16, 512, 2), (8, 1024, 4)],
    # INT8 (added after the H100 sweep of 09db864, which had NF4 and FP8 only): the FP8 winners and neighbours
    "int8": [(4, 512, 1), (2, 512, 1), (8, 512, 2), (8, 1024, 4), (4, 1024, 2), (16, 512, 4)],
}
QGEMV_LONG_CANDIDATES = [(2, 1024, 2), (2, 2048, 4), (4, 2048, 4), (2, 1024, 4), (1, 2048, 2)]  # + for K > LONG_K
MMA_SPLIT_CANDIDATES = [  # (parts, BN, BK, num_warps) of the split-K tensor-core GEMV (o, down; qkv to compare)
    (2, 32, 512, 4), (4, 32, 512, 4), (8, 32, 256, 4), (4, 16, 512, 4), (4, 64, 256, 4), (6, 32, 512, 4),
]
FMA_SPLIT_CANDIDATES = [  # (parts, BN, BK, num_warps) of the split-K FMA GEMV (down)
    (2, 4, 1024, 4), (3, 4, 1024, 4), (4, 4, 1024, 4), (2, 8, 512, 4), (4, 8, 512, 4), (2, 2, 1024, 2),
]
NF4_SPLIT_CANDIDATES = [  # (parts, BN, BK, num_warps) of NF4's split-K FMA GEMV (down, packed products)
    (2, 4, 512, 1), (3, 4, 512, 1), (4, 4, 512, 1), (2, 4, 1024, 2), (2, 2, 512, 1), (4, 8, 512, 2),
]
MMA_CANDIDATES = [  # (BN, BK, num_warps, num_stages) tried beside bagel_rt.quant.decode_mma's settings
    (16, 256, 4, 3), (16, 1024, 4, 3), (16, 1024, 8, 3), (16, 512, 4, 5), (32, 512, 4, 3), (32, 256, 4, 4),
    (64, 256, 4, 3), (64, 512, 8, 3), (128, 256, 8, 3),
]

WGMMA_CANDIDATES = [  # (BN, BK, num_warps, num_stages) of the weights-first GEMVs (decode_mma.wgmma_on)
    (64, 128, 4, 3), (64, 128, 4, 5), (64, 256, 4, 3), (64, 256, 4, 4), (64, 512, 4, 2), (128, 128, 8, 3),
    (128, 256, 8, 3),
]
WGMMA_SPLIT_CANDIDATES = [  # (parts, BN, BK, num_warps) of their split-K form (o, down)
    (2, 64, 256, 4), (4, 64, 256, 4), (4, 64, 128, 4), (8, 64, 128, 4), (8, 64, 256, 4), (16, 64, 128, 4),
]


def cases_qgemv(K):
    """Compressed-weight decode GEMVs (bagel_rt.quant.decode_gemv: INT8 / FP8 / NF4, q/k/v as one, gate/up +
    SwiGLU as one) at the decode shapes, against each module's own forward (the path they replace) and the bf16
    GEMV; the extra providers are candidate launch settings (BN x BK / warps) and, for INT8 / FP8, the
    tensor-core GEMVs (``mma``: bagel_rt.quant.decode_mma, digits launch included; ``split<P>``: split-K into P
    fp32 parts, for the narrow projections; ``wgmma``: the weights-first kernels, FP8 against e4m3 digits,
    ``wsplit<P>`` their split-K form). Rate: the compressed bytes."""
    from bagel_rt.quant import FP8Linear, Int8Linear, NF4Linear
    from bagel_rt.quant.decode_gemv import (
        LONG_K,
        _qgemv,
        _qgemv_swiglu,
        concat,
        decode_weight,
        qgemv_parts,
        settings,
        swiglu_pair,
    )
    from bagel_rt.quant.decode_mma import (
        MMA_FORMATS,
        MMA_MIN_N,
        mma_gemv,
        mma_gemv_parts,
        mma_gemv_swiglu,
        wgmma_on,
    )

    def on_wgmma(fn, c):
        with wgmma_on():
            return fn(c)

    convert = {"int8": Int8Linear.from_linear, "fp8": FP8Linear.from_linear, "nf4": NF4Linear.from_linear}

    def modules(fmt, *shapes):
        lins = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=BF16) for n, k in shapes]
        return [convert[fmt](lin) for lin in lins], [lin.weight for lin in lins]

    def candidates(fmt, w, run, kind):
        out = {"triton": lambda: run(settings(kind, w))}
        long = QGEMV_LONG_CANDIDATES if w.shape[1] > LONG_K else []
        for bn, bk, nw in QGEMV_CANDIDATES["nf4" if fmt == "nf4" else "int8"] + long:
            out[f"{bn}x{bk}/{nw}"] = lambda c=dict(BN=bn, BK=bk, num_warps=nw): run(c)
            if fmt == "nf4":  # the word-wise and the byte-permute NF4 decodes (decode_gemv._nf4_acc) too
                out[f"wordwise {bn}x{bk}/{nw}"] = lambda c=dict(BN=bn, BK=bk, num_warps=nw, wordwise=True): run(c)
                out[f"prmt {bn}x{bk}/{nw}"] = lambda c=dict(BN=bn, BK=bk, num_warps=nw, prmt=True): run(c)
        for bn, bk, nw in HFMA_CANDIDATES.get(fmt, []):
            out[f"hfma {bn}x{bk}/{nw}"] = lambda c=dict(BN=bn, BK=bk, num_warps=nw, hfma=True): run(c)
        return out

    def mma_candidates(fmt, run):
        if fmt not in MMA_FORMATS:
            return {}
        out = {"mma": lambda: run(None)}
        for bn, bk, nw, ns in MMA_CANDIDATES:
            out[f"mma {bn}x{bk}/{nw}/{ns}"] = lambda c=dict(BN=bn, BK=bk, num_warps=nw, num_stages=ns): run(c)
        out["wgmma"] = lambda: on_wgmma(run, None)
        for bn, bk, nw, ns in WGMMA_CANDIDATES:
            c = dict(BN=bn, BK=bk, num_warps=nw, num_stages=ns, W_A=True)
            out[f"wgmma {bn}x{bk}/{nw}/{ns}"] = lambda c=c: on_wgmma(run, c)
        return out

    def swiglu_case(fmt, per_weight):
        (g, u), (wg, wu) = modules(fmt, (FFN, HIDDEN), (FFN, HIDDEN))
        dg, du = swiglu_pair(decode_weight(g), decode_weight(u))
        x = randn(1, HIDDEN)
        mma = mma_candidates(fmt, lambda c: mma_gemv_swiglu(x, dg, du, cfg=c))
        return f"qgemv_{fmt}", {"proj": "gate_up+swiglu", "N": FFN, "K": HIDDEN}, {
            **candidates(fmt, dg, lambda c: _qgemv_swiglu(x, dg, du, False, c), "swiglu"), **mma,
            "module": lambda: K.swiglu(g(x), u(x)),
            "bf16_gemv": lambda: K.gemv_swiglu(x, wg, wu),
        }, int(2 * FFN * HIDDEN * per_weight)

    for fmt in ("int8", "fp8", "nf4"):
        per_weight = 0.5 + 4 / 64 if fmt == "nf4" else 1.0  # bytes per weight (NF4: + an fp32 absmax per 64)
        projs = (("qkv", [(HQ * D, HIDDEN), (HK * D, HIDDEN), (HK * D, HIDDEN)]), ("o", [(HIDDEN, HIDDEN)]),
                 ("down", [(HIDDEN, FFN)]), ("lm_head", [(152064, HIDDEN)]))
        for name, shapes in projs:
            mods, ws = modules(fmt, *shapes)
            w = concat([decode_weight(m) for m in mods])
            N, Kd = w.shape
            x = randn(1, Kd)
            wb = torch.cat(ws)
            mma = mma_candidates(fmt, lambda c, x=x, w=w: mma_gemv(x, w, cfg=c))
            if fmt in MMA_FORMATS and N <= MMA_MIN_N:  # split-K parts (the next residual add sums them)
                for pp, bn, bk, nw in MMA_SPLIT_CANDIDATES:
                    cfg = dict(parts=pp, BN=bn, BK=bk, num_warps=nw)
                    mma[f"split{pp} {bn}x{bk}/{nw}"] = lambda x=x, w=w, c=cfg: mma_gemv_parts(x, w, cfg=c)
                for pp, bn, bk, nw in WGMMA_SPLIT_CANDIDATES:  # ... the weights-first kernels
                    cfg = dict(parts=pp, BN=bn, BK=bk, num_warps=nw, W_A=True)
                    mma[f"wsplit{pp} {bn}x{bk}/{nw}"] = lambda x=x, w=w, c=cfg: on_wgmma(
                        lambda c: mma_gemv_parts(x, w, cfg=c), c)
                if Kd > LONG_K:  # ... and on the FMA kernels (decode_gemv.qgemv_parts)
                    for pp, bn, bk, nw in FMA_SPLIT_CANDIDATES:
                        cfg = dict(parts=pp, BN=bn, BK=bk, num_warps=nw)
                        mma[f"fsplit{pp} {bn}x{bk}/{nw}"] = lambda x=x, w=w, c=cfg: qgemv_parts(x, w, cfg=c)
            if fmt == "nf4" and Kd > LONG_K:  # NF4's down split-K on its packed-product FMA kernel
                for pp, bn, bk, nw in NF4_SPLIT_CANDIDATES:
                    cfg = dict(parts=pp, BN=bn, BK=bk, num_warps=nw, hfma=True)
                    mma[f"fsplit{pp} {bn}x{bk}/{nw}"] = lambda x=x, w=w, c=cfg: qgemv_parts(x, w, cfg=c)
            yield f"qgemv_{fmt}", {"proj": name, "N": N, "K": Kd}, {
                **candidates(fmt, w, lambda c, x=x, w=w: _qgemv(x, w, None, False, c), "gemv"), **mma,
                "module": lambda x=x, mods=mods: [m(x) for m in mods],
                "bf16_gemv": lambda x=x, wb=wb: K.gemv(x, wb),
            }, int(N * Kd * per_weight)
        yield swiglu_case(fmt, per_weight)


GROUPS = {
    "rms_norm": cases_rms_norm,
    "qk_norm_rope": cases_qk_norm_rope,
    "swiglu": cases_swiglu,
    "cfg_euler": cases_cfg_euler,
    "attention": cases_attention,
    "fp8_quant": cases_fp8_quant,
    "fp8_gemm": cases_fp8_gemm,
    "gemv": cases_gemv,
    "int8_w8a8": cases_int8_w8a8,
    "fp8_gemv": cases_fp8_gemv,
    "qgemv": cases_qgemv,
    "df11": cases_df11,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per result to this file")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {list(GROUPS)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated substrings: only the cases whose shape (as JSON) holds one of them, "
                             "e.g. down,lm_head")
    parser.add_argument("--cases", default=None,
                        help="comma-separated substrings: only the cases whose name holds one of them, "
                             "e.g. qgemv_fp8")
    parser.add_argument("--providers", default=None,
                        help="comma-separated substrings: only the providers whose name holds one of them (the "
                             "first, the candidate, always runs), e.g. hfma,prmt; =NAME: that provider only, "
                             "e.g. =mma")
    parser.add_argument("--graph", action="store_true",
                        help="time CUDA-graph replays (excludes launch overhead; matters for small shapes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2

    from bagel_rt import kernels as K
    from bagel_rt.bench import environment

    meta = {**environment(args.commit), "timing": "cuda_graph_replay" if args.graph else "do_bench"}
    print(f"# {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}  "
          f"timing {meta['timing']} (median ms)")
    print(f"{'kernel':<18}{'shape':<62}{'provider':>12}{'ms':>10}{'speedup':>9}{'rate':>14}")
    out_file = args.out.open("a") if args.out else None
    torch.manual_seed(0)
    for group in args.only.split(","):
        for name, shape, providers, work in GROUPS[group](K):
            if args.shapes and not any(s in json.dumps(shape) for s in args.shapes.split(",")):
                continue
            if args.cases and not any(s in name for s in args.cases.split(",")):
                continue
            if args.no_compile:
                providers.pop("compile", None)
            if args.providers:
                first = next(iter(providers))
                providers = {p: fn for p, fn in providers.items()
                             if p == first or any(p == s[1:] if s.startswith("=") else s in p
                                                  for s in args.providers.split(","))}
            ms = {p: try_bench(fn, args.graph) for p, fn in providers.items()}
            ours = next(iter(ms))  # the first provider is the candidate; the rest are alternatives
            others = [t for p, t in ms.items() if p != ours and t is not None]
            best_other = min(others) if others else None
            speedup = best_other / ms[ours] if best_other and ms[ours] else None
            name_s, shape_s = name, json.dumps(shape, separators=(",", ":"))
            for p, t in ms.items():
                rate = ""
                if t is not None and isinstance(work, tuple):
                    rate = f"{work[0] / t / 1e9:.0f} TFLOP/s"
                elif t is not None:
                    rate = f"{work / t / 1e6:.0f} GB/s"
                sp = f"{speedup:.2f}x" if p == ours and speedup else ""
                t_s = f"{t:.4f}" if t is not None else "n/a"
                print(f"{name_s:<18}{shape_s[:60]:<62}{p:>12}{t_s:>10}{sp:>9}{rate:>14}")
                name_s, shape_s = "", ""  # print the kernel and shape on the first row only
            record = {**meta, "kernel": name, "shape": shape, "ms": ms, "best_alternative_ms": best_other,
                      "speedup_vs_best": speedup}
            if out_file:
                out_file.write(json.dumps(record) + "\n")
                out_file.flush()
    if out_file:
        out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
