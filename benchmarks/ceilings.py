"""What one GPU sustains: the ceilings the speed targets are judged against.

1. ``gemm``: the denoiser's largest GEMM (gate/up projection of two CFG branches, 8196 x 37888 x 3584) in
   bf16 (cuBLAS) and in FP8 (``torch._scaled_mm``, row-wise scales, fast accumulation), replayed in a CUDA
   graph for ``--seconds`` each, with the rate over time and nvidia-smi's SM clock, power draw and power
   limit sampled alongside; plus ``bench.matmul_peak_tflops`` (the ~15 ms burst the bench reports against).
   A bf16 rate that holds from the first window at a clock far under the maximum, with the power at the
   limit, is the power-capped ceiling: no kernel change moves it.
2. ``attention``: an experiment, not used by the runtime. A prototype FP8 flash-attention kernel (below:
   e4m3 Q/K with per-(row, head) scales, V per-head scaled and transposed so that the P @ V dot is K-major,
   probabilities scaled by 2^8 into e4m3) against cuDNN's bf16 fused attention (what the denoiser runs on
   Hopper) and our bf16 kernel, at the t2i and edit latent-query shapes, with its deviation. Kept so the
   README's FP8-attention number can be reproduced; it did not earn a place in ``kernels/`` (see README).

    python benchmarks/ceilings.py --out benchmarks/results/ceilings_h200.jsonl --commit abc [--only gemm]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time

import torch
import triton
import triton.language as tl
from bagel_rt.kernels.attention import load_packed_q, seq_bounds

BF16, E4M3 = torch.bfloat16, torch.float8_e4m3fn
E4M3_MAX = 448.0
HQ, HK, D = 28, 4, 128
P_SHIFT = 8.0  # probabilities are exp2(s - max + 8) in [0, 256]: small ones stay normal in e4m3


@triton.jit
def _fp8_attn_kernel(q, qs, k, ks, vt, vs, o, cu_q, cu_k,
                     stride_qm, stride_qh, stride_km, stride_kh, stride_om, stride_oh, LKP, sm_scale,
                     G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     P_SHIFT: tl.constexpr):
    # grid: (packed query-row blocks, kv heads, sequences); rows pack (query, q head of this kv head) with
    # kernels/attention.py's helpers; non-causal only (the denoiser's latent queries)
    i_m, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Hk = tl.num_programs(1)
    bos_q, Lq, bos_k, Lk = seq_bounds(cu_q, cu_k, i_b)
    if i_m * BLOCK_M >= Lq * G:
        return
    b_q, o_qi, o_h, m_r = load_packed_q(q, bos_q, Lq, i_m, i_hk, stride_qm, stride_qh, G, D, BLOCK_M)
    o_d = tl.arange(0, D)
    o_n = tl.arange(0, BLOCK_N)
    row = (bos_q + o_qi).to(tl.int64)
    # per-row factor: the row's dequantization scale times the softmax scale, in the exp2 domain
    b_qf = tl.load(qs + row * (G * Hk) + o_h, mask=m_r, other=0.0) * (sm_scale * 1.4426950408889634)
    k += i_hk * stride_kh
    vt += ((i_b * Hk + i_hk) * D).to(tl.int64) * LKP  # this sequence's [D, LKP] slab of V^T
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        o_k = start_n + o_n
        m_k = o_k < Lk
        kr = (bos_k + o_k).to(tl.int64)
        b_k = tl.load(k + kr[:, None] * stride_km + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_ks = tl.load(ks + kr * Hk + i_hk, mask=m_k, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k)) * b_qf[:, None] * b_ks[None, :]
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        b_p = tl.math.exp2(b_s - m_new[:, None] + P_SHIFT)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        b_vt = tl.load(vt + o_d[:, None] * LKP + o_k[None, :])  # [D, BLOCK_N], zero-padded past Lk
        acc = tl.dot(b_p.to(tl.float8e4nv), tl.trans(b_vt), acc * alpha[:, None])
        m_i = m_new
    b_o = acc * (tl.load(vs + i_hk) / l_i)[:, None]
    tl.store(o + row[:, None] * stride_om + o_h[:, None] * stride_oh + o_d[None, :], b_o.to(o.dtype.element_ty),
             mask=m_r[:, None])


def fp8_attention_inputs(q, k, v, cu_k: list[int]):
    """Eager quantization for the experiment.

    Args:
        q: [Mq, Hq, D]; k, v: [Mk, Hk, D]; cu_k: cumulative key lengths (host list, [B+1]).
    Returns:
        (q8, q_scale [Mq, Hq], k8, k_scale [Mk, Hk], vt8 [B, Hk, D, LKP] zero-padded, v_scale [Hk], LKP):
        q and k scaled per (row, head), v per head, LKP = the longest key range rounded up to 128.
    """
    def rows(x):
        s = x.float().abs().amax(-1).clamp_min(1e-12) / E4M3_MAX
        return (x.float() / s[..., None]).to(E4M3), s.contiguous()

    q8, qs = rows(q)
    k8, ks = rows(k)
    vs = (v.float().abs().amax(dim=(0, 2)).clamp_min(1e-12) / E4M3_MAX).contiguous()
    lens = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
    lkp = triton.cdiv(max(lens), 128) * 128
    vt = torch.zeros(len(lens), v.shape[1], v.shape[2], lkp, dtype=E4M3, device=v.device)
    for i, (a, n) in enumerate(zip(cu_k[:-1], lens)):
        vt[i, :, :, :n] = (v[a:a + n].float() / vs[None, :, None]).to(E4M3).permute(1, 2, 0)
    return q8, qs, k8, ks, vt, vs, lkp


def fp8_attention(q8, qs, k8, ks, vt, vs, lkp, cu_q, cu_k, max_seqlen_q: int, sm_scale: float,
                  block_m: int = 64, block_n: int = 128, num_warps: int = 4, num_stages: int = 3,
                  out_dtype=BF16):
    """Non-causal packed FP8 attention (the experiment's kernel) on :func:`fp8_attention_inputs`' output.

    cu_q, cu_k: [B+1] int32 on the device. Returns [Mq, Hq, D] in ``out_dtype``.
    """
    Mq, Hq, Dh = q8.shape
    Hk = k8.shape[1]
    o = torch.empty((Mq, Hq, Dh), dtype=out_dtype, device=q8.device)
    grid = (triton.cdiv(max_seqlen_q * (Hq // Hk), block_m), Hk, cu_q.shape[0] - 1)
    launch = {} if q8.device.type == "cpu" else {"num_warps": num_warps, "num_stages": num_stages}
    _fp8_attn_kernel[grid](q8, qs, k8, ks, vt, vs, o, cu_q, cu_k, q8.stride(0), q8.stride(1), k8.stride(0),
                           k8.stride(1), o.stride(0), o.stride(1), lkp, sm_scale, G=Hq // Hk, D=Dh,
                           BLOCK_M=block_m, BLOCK_N=block_n, P_SHIFT=P_SHIFT, **launch)
    return o


# ------------------------------------------------------------------------------------------------ GPU probes


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _attention_case(K, label: str, lq: tuple, lk: tuple, env: dict) -> dict:
    import triton.testing
    from bench_kernels import sdpa_cudnn_loop  # benchmarks/ is on the path when this runs as a script

    configs = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2)]
    scale = 1 / math.sqrt(D)
    torch.manual_seed(0)
    q = (torch.randn(sum(lq), HQ, D, device="cuda") * 1.5).to(BF16)
    k = torch.randn(sum(lk), HK, D, device="cuda").to(BF16)
    v = torch.randn(sum(lk), HK, D, device="cuda").to(BF16)
    cu_q_h = [0, *torch.tensor(lq).cumsum(0).tolist()]
    cu_k_h = [0, *torch.tensor(lk).cumsum(0).tolist()]
    cq = torch.tensor(cu_q_h, dtype=torch.int32, device="cuda")
    ck = torch.tensor(cu_k_h, dtype=torch.int32, device="cuda")
    flops = sum(4 * a * b * HQ * D for a, b in zip(lq, lk))
    ref = sdpa_cudnn_loop(q, k, v, lq, lk, scale)
    exact = K.varlen_attention_ref(q, k, v, cq, ck, False, scale) if len(lq) == 2 else None  # t2i only: fast

    def ours():
        return K.varlen_attention(q, k, v, cq, ck, False, scale, max_seqlen_q=max(lq), max_seqlen_k=max(lk))

    t_cudnn = triton.testing.do_bench_cudagraph(lambda: sdpa_cudnn_loop(q, k, v, lq, lk, scale), rep=100)
    t_ours = triton.testing.do_bench_cudagraph(ours, rep=100)
    inputs = fp8_attention_inputs(q, k, v, cu_k_h)
    per_config = []
    for bm, bn, w, st in configs:
        def run(bm=bm, bn=bn, w=w, st=st):
            return fp8_attention(*inputs, cq, ck, max(lq), scale, bm, bn, w, st)
        try:
            out = run()
            torch.cuda.synchronize()
            t = triton.testing.do_bench_cudagraph(run, rep=100)
            per_config.append(dict(config=[bm, bn, w, st], ms=round(t, 4), tflops=round(flops / t / 1e9, 1),
                                   rel_l2_vs_cudnn=round(_rel(out, ref), 5),
                                   rel_l2_vs_fp32=None if exact is None else round(_rel(out, exact), 5)))
        except Exception as e:  # a config that does not compile is reported, not fatal
            per_config.append(dict(config=[bm, bn, w, st], error=f"{type(e).__name__}: {str(e)[:160]}"))
    best = min((c for c in per_config if "ms" in c), key=lambda c: c["ms"])
    return dict(ceiling="fp8_attention_experiment", case=label, Lq=list(lq), Lk=list(lk),
                cudnn_bf16_ms=round(t_cudnn, 4), cudnn_bf16_tflops=round(flops / t_cudnn / 1e9, 1),
                triton_bf16_ms=round(t_ours, 4), triton_bf16_tflops=round(flops / t_ours / 1e9, 1),
                triton_bf16_rel_l2_vs_cudnn=round(_rel(ours(), ref), 6),
                cudnn_rel_l2_vs_fp32=None if exact is None else round(_rel(ref, exact), 6),
                fp8_best=best, fp8_speedup_vs_cudnn=round(t_cudnn / best["ms"], 3), fp8_configs=per_config, **env)


def probe_attention(env: dict):
    from bagel_rt import kernels as K

    yield _attention_case(K, "t2i, 2 branches", (4098, 4098), (4098 + 30, 4098 + 5), env)
    yield _attention_case(K, "edit, 3 branches", (4098,) * 3, (13100, 13100, 4100), env)


def _smi(stop: threading.Event, samples: list):
    while not stop.is_set():
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,power.limit,clocks.max.sm",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            samples.append([float(x) for x in r.stdout.split("\n")[0].split(",")])
        except (OSError, ValueError, subprocess.SubprocessError):
            pass  # no nvidia-smi: the rates are still reported
        stop.wait(0.5)


def _sustained(fn, flop_per_call: int, seconds: float, calls_per_graph: int = 20):
    """Replay a graph of ``calls_per_graph`` calls of ``fn`` for ``seconds``; rate per ~5-graph window, with
    nvidia-smi sampled over the timed part only."""
    from bagel_rt.bench import graph_of, replay_rates

    g = graph_of(fn, calls_per_graph)
    time.sleep(2.0)  # let the clocks recover from whatever ran before
    stop, samples = threading.Event(), []
    th = threading.Thread(target=_smi, args=(stop, samples), daemon=True)
    th.start()
    windows = replay_rates(g, flop_per_call * calls_per_graph, seconds, replays_per_window=5)
    stop.set()
    th.join()
    rates = [r for _, r in windows]
    out = dict(first_window_tflops=round(rates[0], 1), median_tflops=round(statistics.median(rates), 1),
               last_half_median_tflops=round(statistics.median(rates[len(rates) // 2:]), 1),
               windows=len(rates), window_s=round(windows[0][0], 3))
    if samples:
        out.update(sm_clock_mhz_median=statistics.median(s[0] for s in samples),
                   sm_clock_mhz_range=[min(s[0] for s in samples), max(s[0] for s in samples)],
                   power_w_median=statistics.median(s[1] for s in samples), power_limit_w=samples[0][2],
                   sm_clock_max_mhz=samples[0][3])
    return out


def probe_gemm(env: dict, seconds: float):
    from bagel_rt import kernels as K
    from bagel_rt.bench import matmul_peak_tflops

    M, N, Kd = 8196, 37888, 3584
    x = torch.randn(M, Kd, device="cuda").to(BF16)
    w = (torch.randn(N, Kd, device="cuda") * 0.02).to(BF16)
    out = torch.empty(M, N, device="cuda", dtype=BF16)
    xq, xs = K.quantize_rows_fp8(x)
    wq, ws = K.quantize_rows_fp8(w)
    ws = ws.view(1, -1).contiguous()
    flop = 2 * M * N * Kd
    time.sleep(2.0)
    burst = matmul_peak_tflops()
    yield dict(ceiling="sustained_gemm", dtype="bf16", shape=[M, N, Kd], burst_8192_cubed_tflops=round(burst, 1),
               **_sustained(lambda: torch.mm(x, w.t(), out=out), flop, seconds), **env)
    yield dict(ceiling="sustained_gemm", dtype="fp8_rowwise_fast_accum", shape=[M, N, Kd],
               **_sustained(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=BF16,
                                                     use_fast_accum=True), flop, seconds), **env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON-lines file to append the rows to")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--only", default="gemm,attention", help="comma-separated subset of gemm,attention")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each sustained GEMM run")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from bagel_rt.bench import environment

    env = environment(a.commit)
    parts = a.only.split(",")
    rows = []
    if "gemm" in parts:
        rows += probe_gemm(env, a.seconds)
    if "attention" in parts:
        rows += probe_attention(env)
    with open(a.out, "a") as f:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "fp8_configs"}), flush=True)
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
