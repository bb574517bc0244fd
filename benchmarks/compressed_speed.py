"""Compressed weights against bf16 **in one process**: request latency, ``vs_bf16``, deviation, where time goes.

    python benchmarks/compressed_speed.py --out benchmarks/results/compressed_h200.jsonl \
        [--formats bf16,int8,nf4,fp8,int8:int8] [--tasks t2i,edit,decode] [--steps 50] [--cap]
        [--profile-steps 8] [--micro] [--taylorseer] [--fp8-native]

Every format starts from the same random full-size model (same seed, built on the GPU) and quantizes the
LLM's Linears of both experts + ``lm_head`` in place (what ``bagel-rt quantize`` does tensor by tensor), so
the rows of one run share machine, clocks and weights: ``vs_bf16`` is this process's seconds over the bf16
run's. ``--cap`` runs each compressed format under its card budget with memory placement (NF4 and the
fp8-gen-nf4-und recipe 12 GiB, FP8 15.5 GiB, INT8 16 GiB, DF11 24 GiB). ``--profile-steps N`` adds the
CUDA kernel time of an N-step denoising loop by
kind; ``--micro`` times each Linear shape of the generation expert alone (bf16 cuBLAS vs the format's
module, and the dequantization kernel alone). Deviation from bf16 on random weights is a proxy, not
real-weight quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import APP_CFG, _kind, emit  # noqa: E402
from quant_full_size import psnr, track_phase_peaks  # noqa: E402

from bagel_rt.bench import environment, test_image  # noqa: E402
from bagel_rt.errors import InputError  # noqa: E402
from bagel_rt.fast_decode import VARIANT_FORMATS, GraphDecoder  # noqa: E402
from bagel_rt.quantized import quantize_in_place  # noqa: E402
from bagel_rt.random_weights import random_bagel  # noqa: E402

CAPS = {"nf4": 12, "int8": 16, "df11": 24, "fp8": 15.5, "fp8-gen-nf4-und": 12}
PROMPTS = {"t2i": "A red bagel on a white plate, studio light.", "edit": "Make the sky purple and add a moon."}
GIB = 2**30


def make_pipe(fmt: str):
    """The random full-size model (seed 0) with its LLM Linears in ``fmt`` (bf16: as built)."""
    pipe = random_bagel("bagel-7b-mot", device="cuda", backend="triton")
    if fmt != "bf16":
        quantize_in_place(pipe.model, fmt)  # the Linears a converted checkpoint quantizes
        # quantizing 29 GB in place leaves the allocator fragmented (a real load quantizes tensor by tensor):
        # a round trip through host memory packs the weights again
        pipe.model.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        pipe.model.to("cuda")
        pipe.weights = fmt
    gc.collect()
    torch.cuda.empty_cache()
    return pipe


def request(pipe, task: str, size: int, steps: int, seed: int = 0, prof: bool = False, taylorseer: bool = False):
    """One app-defaults request: (seconds, final latents, image array, profiler or None, result info)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    s = pipe.session(seed=seed)
    if task == "edit":
        s.add_image(test_image(size, size))
    s.add_text(PROMPTS[task])
    if prof:
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            res = s.gen_image((size, size), APP_CFG[task], num_timesteps=steps, enable_taylorseer=taylorseer)
            torch.cuda.synchronize()
    else:
        p = None
        res = s.gen_image((size, size), APP_CFG[task], num_timesteps=steps, enable_taylorseer=taylorseer)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, res.latents, np.asarray(res.image), p, res.info


def kernel_groups(p) -> dict:
    groups, top = defaultdict(float), []
    for e in p.key_averages():
        t = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) / 1000.0
        if t:
            groups[_kind(e.key.lower())] += t
            top.append((round(t, 1), e.count, e.key[:80]))
    return dict(kernel_ms={k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
                kernel_total_ms=round(sum(groups.values()), 1), top_kernels=sorted(top, reverse=True)[:15])


def decode_rate(pipe, tokens: int = 256, prof_tokens: int = 0, repeats: int = 3):
    """Greedy decode tokens/s, the median of ``repeats`` timed decodes after a warm-up that captures the graphs
    (runs of one decode moved by +-2.5 % on the H200, as much as the gaps an A/B looks for), every run's rate,
    and with ``prof_tokens`` the profiler of a decode of that many tokens (None otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    def once(n=tokens):
        s = pipe.session(understanding_only=True, seed=0)
        s.add_text("Describe a bagel in detail.")
        return s.gen_text(n)

    once()
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = once()
        torch.cuda.synchronize()
        rates.append(len(r.token_ids) / (time.perf_counter() - t0))
    rate = sorted(rates)[len(rates) // 2]
    if not prof_tokens:
        return rate, rates, None
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        once(prof_tokens)
        torch.cuda.synchronize()
    return rate, rates, p


def micro(formats: list[str], rows: int = 8196) -> list[dict]:
    """Each generation-expert Linear shape alone: bf16 cuBLAS vs the format's module forward (graph-free
    ``do_bench``, allocations included), at the latent rows of a 2-branch 1024² step and at the marker rows."""
    from bagel_rt.quant import Int8Linear, NF4Linear
    from bagel_rt.quant.matmul import int8_dequant, nf4_dequant
    from triton.testing import do_bench

    out = []
    shapes = {"q/o": (3584, 3584), "k/v": (512, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)}
    us = lambda fn, *args: round(do_bench(partial(fn, *args)) * 1e3, 1)  # noqa: E731
    for m in (rows, 4, 6):
        for name, (n, k) in shapes.items():
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = dict(shape=name, M=m, N=n, K=k, bf16_us=us(lin, x))
            if "int8" in formats:
                q = Int8Linear.from_linear(lin)
                row.update(int8_us=us(q, x), int8_dequant_us=us(int8_dequant, q.weight, q.SCB / 127.0))
            if "nf4" in formats:
                q = NF4Linear.from_linear(lin)
                row.update(nf4_us=us(q, x),
                           nf4_dequant_us=us(nf4_dequant, q.weight, q.absmax, q.blocksize, (n, k), q.quant_map))
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--formats", default="bf16,int8,nf4")
    ap.add_argument("--tasks", default="t2i,edit")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cap", action="store_true", help="compressed formats under their card budgets")
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--fp8-native", action="store_true",
                    help="decode e4m3 with the conversion instruction (quant.fp8_matmul.NATIVE_DEFAULT)")
    ap.add_argument("--taylorseer", action="store_true",
                    help="every image request (bf16 included) with the official TaylorSeer step cache, so vs_bf16 "
                         "compares cached with cached")
    ap.add_argument("--decode-repeats", type=int, default=3,
                    help="timed decodes per row (tokens_per_s is their median; each run in runs_tokens_per_s)")
    ap.add_argument("--decode-gemvs", default="triton",
                    help="comma-separated decode GEMV implementations (bagel_rt.fast_decode.GEMVS) each decode "
                         "row is measured with, in this process (e.g. triton,triton-mma: the tensor-core GEMVs)")
    ap.add_argument("--phases", action="store_true",
                    help="record each phase's peak (prefill / denoise / VAE decode); with --cap, place the model "
                         "for the budget but lift the cap, to see what a request needs where it does not fit")
    a = ap.parse_args()
    if a.cap:  # as bagel_rt.load with max_gpu_memory: the budget's allocator from the first allocation (weights
        # quantized on the GPU from bf16 otherwise strand ~1.4 GiB in fixed segments the cap counts, H200 4db1cad)
        from bagel_rt.placement import expandable_segments

        expandable_segments()
    phase_peaks = track_phase_peaks() if a.phases else None
    if a.fp8_native:
        from bagel_rt.quant import fp8_matmul

        fp8_matmul.NATIVE_DEFAULT = True
    env = environment(a.commit)
    formats = a.formats.split(",")
    tasks = a.tasks.split(",")

    if a.micro:
        for r in micro(formats):
            emit(dict(diag="compressed_linear_micro", **r, **env), a.out)
    ref: dict = {}
    for spec in formats:  # "FORMAT" or "FORMAT:COMPUTE" (e.g. int8:int8 for INT8 W8A8, bf16:fp8)
        fmt, _, compute = spec.partition(":")
        pipe = make_pipe(fmt)
        if compute:
            pipe.compute = compute
        cap = CAPS.get(fmt) if a.cap else None
        if cap:
            pipe.limit_gpu_memory(cap)
            if a.phases:  # placement as under the budget, without the cap
                torch.cuda.set_per_process_memory_fraction(1.0)
        for task in tasks:
            row = dict(diag="compressed_vs_bf16", task=task, weights=fmt, compute=pipe.compute, cap_gib=cap,
                       fp8_native=a.fp8_native,
                       height=a.size, width=a.size, num_timesteps=a.steps, **env)
            try:
                if task == "decode":
                    for impl in a.decode_gemvs.split(","):
                        if impl in VARIANT_FORMATS and fmt not in VARIANT_FORMATS[impl]:
                            print(f"{fmt}: {impl} skipped (the same decode kernels: fast_decode.VARIANT_FORMATS)")
                            continue
                        pipe._decoder = GraphDecoder(pipe.model, gemv=impl)  # the others' graphs freed first
                        rate, rates, p = decode_rate(pipe, prof_tokens=a.profile_steps, repeats=a.decode_repeats)
                        r = dict(row, gemv=impl, tokens_per_s=round(rate, 1),
                                 runs_tokens_per_s=[round(x, 1) for x in rates])
                        if p is not None:
                            r.update(profile_tokens=a.profile_steps, **kernel_groups(p))
                        if spec == "bf16" and "decode" not in ref:
                            ref["decode"] = r["tokens_per_s"]
                        elif "decode" in ref:
                            r.update(vs_bf16_tokens_per_s=round(r["tokens_per_s"] / ref["decode"], 3))
                        emit(r, a.out)
                    pipe._decoder = None
                    continue
                # warm-up (captures, first-use costs): 10 steps reach every branch count of the 50-step schedule
                request(pipe, task, a.size, min(a.steps, 10), seed=1, taylorseer=a.taylorseer)
                torch.cuda.reset_peak_memory_stats()
                sec, lat, img, _, info = request(pipe, task, a.size, a.steps, taylorseer=a.taylorseer)
                row.update(seconds=round(sec, 3), peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                           cuda_graphs=pipe.use_graphs and not pipe.graphs_refused)  # False: a capture did not fit
                if a.taylorseer:
                    row.update(step_cache="taylorseer",
                               full_evaluations=info["step_cache"]["full_evaluations"])
                if phase_peaks is not None:  # the wrappers reset the peak between phases
                    row.update(phase_peaks_gib=dict(phase_peaks), peak_gib=max(phase_peaks.values()),
                               resident_gib=round(torch.cuda.memory_allocated() / GIB, 2))
                if spec == "bf16":
                    ref[task] = (sec, lat, img)
                elif task in ref:
                    s0, l0, i0 = ref[task]
                    dev = float((lat.double() - l0.double()).norm() / l0.double().norm())
                    row.update(vs_bf16=round(sec / s0, 3), rel_l2_latents_vs_bf16=dev,
                               psnr_vs_bf16_db=round(psnr(img, i0), 2),
                               note="deviation on random weights: a proxy, not real-weight quality")
                if a.profile_steps:
                    _, _, _, p, _ = request(pipe, task, a.size, a.profile_steps, prof=True)
                    row.update(profile_steps=a.profile_steps, **kernel_groups(p))
            except (torch.cuda.OutOfMemoryError, RuntimeError, InputError) as e:
                row.update(error=str(e).splitlines()[0][:300])
            emit(row, a.out)
        del pipe
        release_gpu()


def release_gpu() -> None:
    """After a format's runs (its pipe deleted): lift the cap and give the memory back for the next format."""
    torch.cuda.set_per_process_memory_fraction(1.0)
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
