"""Full-size diagnostics on a GPU (random 7B weights): memory by phase, backend agreement, a bf16-noise
reference, and a kernel-time profile of one packed denoising forward.

    python benchmarks/diagnose.py --out diag.jsonl [--commit abc] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bagel_rt.bench import environment, test_image
from bagel_rt.fast import PackedDenoiser, resolve_attention
from bagel_rt.random_weights import random_bagel
from bagel_rt.sampler import CFGSettings

GIB = 2**30
#: the official app's defaults per task
APP_CFG = {"t2i": CFGSettings(4.0, 1.5, (0.4, 1.0)),
           "edit": CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel")}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def mem_phases(pipe, size):
    """Peak GPU memory of each phase of an edit request (torch backend prefill, triton denoise)."""
    out = {}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    s = pipe.session(seed=0)
    img = test_image(size, size)
    for name, fn in [("add_image (VAE encode + VAE block + ViT block)", lambda: s.add_image(img)),
                     ("add_text", lambda: s.add_text("Make the sky purple and add a moon.")),
                     ("gen_image (denoise + VAE decode)", lambda: s.gen_image(
                         None, APP_CFG["edit"], num_timesteps=3))]:
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        out[name] = dict(peak_over_weights_gib=round((torch.cuda.max_memory_allocated() - base) / GIB, 2),
                         held_after_gib=round((torch.cuda.memory_allocated() - base) / GIB, 2))
    out["context_rows"] = dict(gen=s.gen.length, cfg_text=s.cfg_text.length, cfg_img=s.cfg_img.length)
    # VAE alone
    x = torch.rand(1, 3, size, size, device="cuda") * 2 - 1
    torch.cuda.reset_peak_memory_stats()
    base2 = torch.cuda.memory_allocated()
    z = pipe.vae.encode(x, None)
    torch.cuda.synchronize()
    out["vae_encode_peak_gib"] = round((torch.cuda.max_memory_allocated() - base2) / GIB, 2)
    torch.cuda.reset_peak_memory_stats()
    pipe.vae.decode(z)
    torch.cuda.synchronize()
    out["vae_decode_peak_gib"] = round((torch.cuda.max_memory_allocated() - base2) / GIB, 2)
    return out


def t2i_phases(pipe, size):
    """Peak GPU memory over the weights of a text-to-image request's denoising and its VAE decode, apart."""
    from PIL import Image

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    s = pipe.session(seed=0)
    s.add_text("A red bagel on a white plate.")
    real_decode = s.decode_latents
    s.decode_latents = lambda *a: Image.new("RGB", (8, 8))
    torch.cuda.reset_peak_memory_stats()
    res = s.gen_image((size, size), APP_CFG["t2i"], num_timesteps=3)
    torch.cuda.synchronize()
    den = (torch.cuda.max_memory_allocated() - base) / GIB
    pipe.fast_cache.clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base2 = torch.cuda.memory_allocated()
    real_decode(res.latents, size // 16, size // 16)
    torch.cuda.synchronize()
    dec = (torch.cuda.max_memory_allocated() - base2) / GIB
    return {"denoise_peak_over_weights_gib": round(den, 2), "vae_decode_peak_gib": round(dec, 2)}


def profile_forward(pipe, size):
    """CUDA kernel time of one eager packed forward (2 branches, t2i contexts), grouped by kind."""
    s = pipe.session(seed=0)
    s.add_text("A red bagel on a white plate, studio light.")
    h = w = size // 16
    den = PackedDenoiser(pipe.model, [s.gen, s.cfg_text], h, w, use_graphs=False)
    den.x_in.normal_()
    for _ in range(2):
        den._forward("full", (0, 1))
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        den._forward("full", (0, 1))
        torch.cuda.synchronize()
    groups = defaultdict(float)
    for e in prof.key_averages():
        name = e.key.lower()
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        kind = _kind(name)
        groups[kind] += t / 1000.0
    total = sum(groups.values())
    out = {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    return out | {"total_ms": round(total, 2)}


def decode_probe(pipe, tokens: int = 256, runs: int = 3):
    """Greedy decode tokens/s with each GEMV implementation, with and without programmatic dependent launch
    (CUDA graphs), and an eager kernel profile of one decode step per variant, grouped by kind."""
    from torch.profiler import ProfilerActivity, profile

    from bagel_rt.fast_decode import GraphDecoder, decode_step_kernels

    s = pipe.session(understanding_only=True, seed=0)
    s.add_text("Describe a bagel in detail.")
    out = {}
    for name, impl, pdl in (("cublas", "cublas", False), ("triton", "triton", False),
                            ("triton_pdl", "triton", True)):
        dec = GraphDecoder(pipe.model, gemv=impl, pdl=pdl)
        dec.generate(s.gen.fork(extra=tokens), tokens, stop_tokens=())  # warm-up: compile + capture
        times = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids, _ = dec.generate(s.gen.fork(extra=tokens), tokens, stop_tokens=())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        out[f"{name}_tokens_per_s"] = round(len(ids) / sec, 1)
        ctx = s.gen.fork(extra=4)
        dev = pipe.model.device
        tok, pos = torch.tensor([5], device=dev), torch.tensor([ctx.rope], device=dev)
        length = torch.tensor([ctx.length], dtype=torch.int32, device=dev)
        for _ in range(2):
            decode_step_kernels(pipe.model, ctx.cache, tok, pos, length, dec.layers, gemv_impl=impl, pdl=pdl)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode_step_kernels(pipe.model, ctx.cache, tok, pos, length, dec.layers, gemv_impl=impl, pdl=pdl)
            torch.cuda.synchronize()
        groups = defaultdict(float)
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            groups[_kind(e.key.lower())] += t / 1000.0
        ranked = sorted(groups.items(), key=lambda kv: -kv[1])
        out[f"{name}_eager_step_kernel_ms"] = {k: round(v, 3) for k, v in ranked}
        del dec
    return out


def request_timeline(pipe, size, task):
    """Wall time of each phase of one warm request (t2i or edit, app defaults) and the CUDA kernel time of
    its denoising loop by kind (graph replays included), to find where time goes outside the step."""
    from torch.profiler import ProfilerActivity, profile

    img = test_image(size, size)
    cfg = APP_CFG[task]

    def run(prof_denoise: bool):
        t = {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = pipe.session(seed=0)
        if task == "edit":
            s.add_image(img)
            torch.cuda.synchronize()
            t["add_image"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        s.add_text("Make the sky purple and add a moon." if task == "edit" else "A red bagel on a white plate.")
        torch.cuda.synchronize()
        t["add_text"] = time.perf_counter() - t1
        real_decode, kept = s.decode_latents, {}
        s.decode_latents = lambda x, h, w: kept.update(x=x, h=h, w=w)
        prof = None
        t2 = time.perf_counter()
        if prof_denoise:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                s.gen_image((size, size), cfg)
                torch.cuda.synchronize()
        else:
            s.gen_image((size, size), cfg)
            torch.cuda.synchronize()
        t["denoise"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        real_decode(kept["x"], kept["h"], kept["w"])
        torch.cuda.synchronize()
        t["vae_decode"] = time.perf_counter() - t3
        t["total"] = time.perf_counter() - t0
        return {k: round(v, 3) for k, v in t.items()}, prof

    warm, _ = run(False)
    timed, _ = run(False)
    _, prof = run(True)
    groups, counts = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t:
            k = _kind(e.key.lower())
            groups[k] += t / 1000.0
            counts[k] += e.count
    events = prof.key_averages()
    top = sorted(((getattr(e, "device_time_total", 0.0) / 1000.0, e.count, e.key[:90]) for e in events),
                 reverse=True)[:25]
    return dict(task=task, size=size, first_request_s=warm, warm_request_s=timed,
                denoise_kernel_ms={k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
                denoise_kernel_total_ms=round(sum(groups.values()), 1), kernel_counts=dict(counts),
                top_kernels=[[round(a, 1), b, c] for a, b, c in top])


def attention_ab(pipe, size, rounds: int = 1):
    """Latent-query attention, our Triton kernel vs cuDNN (SDPA, native GQA): the attention call alone at the
    in-situ shapes of t2i (2 branches) and edit (3 branches), and whole warm requests with each."""
    img = test_image(size, size)
    h = w = size // 16
    out = {"kernel_ms": {}, "kernel_rel_l2": {}, "request_s": defaultdict(list), "latents_rel_l2": {}}
    for task in ("t2i", "edit"):
        s = pipe.session(seed=0)
        if task == "edit":
            s.add_image(img)
        s.add_text("A red bagel on a white plate.")
        ctxs = [s.gen, s.cfg_text] + ([s.cfg_img] if task == "edit" else [])
        outs = {}
        for impl in ("triton", "cudnn"):
            den = PackedDenoiser(pipe.model, ctxs, h, w, use_graphs=False, attention=impl)
            nb, m = den.B, den.branch_meta(tuple(range(den.B)))
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(nb * den.N, den.Hq, den.D, device="cuda", dtype=den.dtype, generator=g)
            den.arena_k[0].normal_(generator=g)
            den.arena_v[0].normal_(generator=g)
            K, V = den.arena_k[0], den.arena_v[0]
            for _ in range(3):
                outs[impl] = den._latent_attention(q, K, V, m)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(50):
                den._latent_attention(q, K, V, m)
            e1.record()
            torch.cuda.synchronize()
            out["kernel_ms"][f"{task}/{impl}"] = round(e0.elapsed_time(e1) / 50, 3)
            den = K = V = None  # free the arena before the next one
        out["kernel_rel_l2"][task] = rel(outs["cudnn"], outs["triton"])
    for task in ("t2i", "edit"):
        lat = {}
        for _ in range(rounds):
            for impl in ("triton", "cudnn"):
                pipe.attention = impl
                pipe.fast_cache.clear()
                torch.cuda.empty_cache()
                for i in range(3):  # one warm-up (captures), two timed
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if task == "t2i":
                        r = pipe.generate("A red bagel on a white plate.", image_shapes=(size, size), seed=0)
                    else:
                        r = pipe.edit(img, "Make the sky purple and add a moon.", seed=0)
                    torch.cuda.synchronize()
                    if i:
                        out["request_s"][f"{task}/{impl}"].append(round(time.perf_counter() - t0, 3))
                lat[impl] = r.latents
        out["latents_rel_l2"][task] = rel(lat["cudnn"], lat["triton"])
    pipe.attention = "triton"
    pipe.fast_cache.clear()
    out["request_s"] = dict(out["request_s"])
    return out


#: same-process A/B sets of PackedDenoiser tuning options: {set: {variant: options}}
DENOISER_AB = {
    "marker_stream": {"one_stream": dict(marker_stream=False), "two_streams": dict(marker_stream=True)},
}


def denoiser_ab(pipe, size, which: str, rounds: int = 1):
    """Variants of the packed denoiser (``DENOISER_AB[which]``): whole denoising loops (50 steps, app defaults)
    of t2i and edit in one process, alternated; per variant the first loop of a fresh denoiser (eager first
    step per branch count, then capture) and two warm loops (graph replays only), and the final latents'
    distance between the first two variants."""
    from bagel_rt.fast import denoise_packed

    img = test_image(size, size)
    h = w = size // 16
    out = {"first_loop_s": defaultdict(list), "warm_loop_s": defaultdict(list), "latents_rel_l2": {}}
    for task in ("t2i", "edit"):
        s = pipe.session(seed=0)
        if task == "edit":
            s.add_image(img)
        s.add_text("Make the sky purple and add a moon." if task == "edit" else "A red bagel on a white plate.")
        cfg = APP_CFG[task]
        ctxs, dedup = s.branches()
        noise = torch.randn(h * w, pipe.model.params.patch_latent_dim, generator=torch.Generator().manual_seed(0))
        lat = {}
        for _ in range(rounds):
            for name, options in DENOISER_AB[which].items():
                cache = {}
                for i in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    lat[name] = denoise_packed(pipe.model, ctxs, noise, h, w, 50, 3.0, cfg, cache=cache,
                                               attention=pipe.attention, **options,
                                               **dedup)
                    torch.cuda.synchronize()
                    (out["first_loop_s"] if i == 0 else out["warm_loop_s"])[f"{task}/{name}"].append(
                        round(time.perf_counter() - t0, 3))
                cache.clear()
                torch.cuda.empty_cache()
        a, b = list(lat.values())[:2]
        out["latents_rel_l2"][task] = rel(b, a)
    out["first_loop_s"], out["warm_loop_s"] = dict(out["first_loop_s"]), dict(out["warm_loop_s"])
    return out


def t2i_loop_timed(pipe, s, h: int, w: int):
    """The session's t2i denoising loop (50 steps, app defaults, seed-0 noise) with the GPU synchronised after
    every step, so the steps that run eagerly, capture or replay show apart: (latents, seconds, step seconds)."""
    from bagel_rt.fast import denoise_packed

    noise = torch.randn(h * w, pipe.model.params.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    steps = []
    torch.cuda.synchronize()
    t0 = last = time.perf_counter()

    def on_step(i, v):
        nonlocal last
        torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append(now - last)
        last = now

    ctxs, dedup = s.branches()
    x = denoise_packed(pipe.model, ctxs, noise, h, w, 50, 3.0, APP_CFG["t2i"], cache=pipe.fast_cache,
                       attention=pipe.attention, on_step=on_step, **dedup)
    torch.cuda.synchronize()
    return x, time.perf_counter() - t0, steps


def prompt_change(pipe, size):
    """What a new prompt costs a warm process: t2i requests whose prompts alternate between token counts. A
    new context length means a new packed denoiser (arena, an eager first step with cuDNN/cuBLAS first use
    of the new shapes, a graph capture); the same length again refills the captured one."""
    h = w = size // 16
    prompts = {"A": "A red bagel on a white plate.",
               "B": "A lighthouse on a rocky coast at dawn, waves breaking, seagulls, soft orange light.",
               "C": "Two dogs."}

    def run(prompt):
        s = pipe.session(seed=0)
        s.add_text(prompt)
        _, seconds, steps = t2i_loop_timed(pipe, s, h, w)
        return dict(denoise_s=round(seconds, 3), ctx_len=s.gen.length,
                    first_steps_s=[round(x, 4) for x in steps[:3]],
                    median_step_s=round(sorted(steps)[len(steps) // 2], 4))

    run(prompts["A"])  # the process's first request (Triton compiles etc.), not counted
    seq = ["A", "A", "B", "B", "C", "C", "A"]
    out = [dict(prompt=p, **run(prompts[p])) for p in seq]
    warm = [r["denoise_s"] for i, r in enumerate(out) if i and seq[i] == seq[i - 1]]
    new = [r["denoise_s"] for i, r in enumerate(out) if i and seq[i] != seq[i - 1]]
    return dict(requests=out, new_prompt_extra_s=round(sum(new) / len(new) - sum(warm) / len(warm), 3))


def first_request(pipe, size):
    """Where a fresh process's first t2i request spends its extra time: wall time of each phase of the first
    and second requests, each denoising step's wall time, and the first request's Python profile (top
    functions by cumulative and own time)."""
    import cProfile
    import pstats

    h = w = size // 16

    def run():
        t = {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = pipe.session(seed=0)
        s.add_text("A red bagel on a white plate.")
        torch.cuda.synchronize()
        t["add_text"] = time.perf_counter() - t0
        x, t["denoise"], steps = t2i_loop_timed(pipe, s, h, w)
        t2 = time.perf_counter()
        s.decode_latents(x, h, w)
        torch.cuda.synchronize()
        t["vae_decode"] = time.perf_counter() - t2
        t["total"] = time.perf_counter() - t0
        return {k: round(v, 3) for k, v in t.items()}, [round(x, 4) for x in steps]

    prof = cProfile.Profile()
    prof.enable()
    first, first_steps = run()
    prof.disable()
    second, second_steps = run()
    st = pstats.Stats(prof)

    def top(key: int, n: int = 30):
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][key])[:n]
        return [[round(v[key], 3), v[1], f"{Path(f).name}:{line}:{fn}"] for (f, line, fn), v in rows]

    return dict(first_request_s=first, second_request_s=second, first_steps_s=first_steps,
                second_steps_s=second_steps, top_cumulative=top(3), top_own=top(2))


def _kind(name: str) -> str:
    if "attn" in name or "sdpa" in name:  # ours, cuDNN's (cudnn_generated_fort_native_sdpa_...)
        return "attention"
    if "gemv" in name:
        return "gemv"
    if any(k in name for k in ("gemm", "nvjet", "sm90", "cutlass", "xmma", "matmul")):
        return "gemm"
    if any(k in name for k in ("rms", "rope")):
        return "norm/rope"
    if "swiglu" in name:
        return "swiglu"
    if any(k in name for k in ("copy", "index", "cat", "elementwise", "vectorized")):
        return "copy/index/elementwise"
    return "other"


def agreement(pipe, size, steps):
    """First-step velocity and final latents: triton vs torch (bf16), t2i app defaults."""
    res = {}
    for backend in ("triton", "torch"):
        pipe.backend = backend
        r1 = pipe.generate("A red bagel on a white plate.", image_shapes=(size, size), num_timesteps=2, seed=0,
                           record=True)
        rN = pipe.generate("A red bagel on a white plate.", image_shapes=(size, size), num_timesteps=steps,
                           seed=0, record=True)
        res[backend] = (r1.velocities[0], rN.latents, rN.velocities)
    pipe.backend = "triton"
    v_steps = [rel(a, b) for a, b in zip(res["triton"][2], res["torch"][2])]
    return res, dict(first_velocity_rel_l2=rel(res["triton"][0], res["torch"][0]),
                     final_latents_rel_l2=rel(res["triton"][1], res["torch"][1]),
                     per_step_velocity_rel_l2=[round(x, 4) for x in v_steps])


def emit(row: dict, out: str) -> None:
    """Print one result row and append it to the JSON-lines file ``out``."""
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--fp32-reference", action="store_true")
    ap.add_argument("--only-phases", action="store_true", help="only the t2i memory phases")
    ap.add_argument("--only-timeline", action="store_true",
                    help="only the phase wall times and denoising-loop kernel profile of t2i and edit requests")
    ap.add_argument("--compute", choices=["bf16", "fp8"], default="bf16", help="denoising GEMM precision")
    ap.add_argument("--only-attention-ab", action="store_true",
                    help="only the Triton-vs-cuDNN latent attention A/B (kernel alone and whole requests)")
    ap.add_argument("--only-denoiser-ab", choices=list(DENOISER_AB), default=None,
                    help="only a same-process A/B of packed-denoiser options (whole denoising loops)")
    ap.add_argument("--only-first-request", action="store_true",
                    help="only the first-vs-second t2i request phases and the first one's Python profile "
                         "(run it in a fresh process)")
    ap.add_argument("--only-prompt-change", action="store_true",
                    help="only the cost of a new prompt length in a warm process (t2i denoising loops)")
    ap.add_argument("--only-decode", action="store_true",
                    help="only the decode probe (tokens/s per GEMV implementation, kernel profile)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    env = environment(a.commit)
    rows = []
    pipe = random_bagel("bagel-7b-mot", device="cuda", backend="triton")
    pipe.compute = a.compute
    t0 = time.time()
    if a.only_timeline:
        for task in ("t2i", "edit"):
            emit(dict(diag="request_timeline", compute=a.compute,
                      attention=resolve_attention(pipe.attention, pipe.device, pipe.model.dtype),
                      **request_timeline(pipe, a.size, task), **env), a.out)
        return
    if a.only_attention_ab:
        emit(dict(diag="attention_triton_vs_cudnn", size=a.size, **attention_ab(pipe, a.size), **env), a.out)
        return
    if a.only_denoiser_ab:
        emit(dict(diag=f"{a.only_denoiser_ab}_ab", size=a.size, compute=a.compute,
                  **denoiser_ab(pipe, a.size, a.only_denoiser_ab), **env), a.out)
        return
    if a.only_first_request:
        emit(dict(diag="first_request_t2i", size=a.size, **first_request(pipe, a.size), **env), a.out)
        return
    if a.only_prompt_change:
        emit(dict(diag="prompt_change_t2i", size=a.size, **prompt_change(pipe, a.size), **env), a.out)
        return
    if a.only_decode:
        emit(dict(diag="decode_gemv_probe", **decode_probe(pipe), **env), a.out)
        return
    rows.append(dict(diag="memory_phases_t2i", size=a.size, **t2i_phases(pipe, a.size), **env))
    print(json.dumps(rows[-1]), flush=True)
    if a.only_phases:
        with open(a.out, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        return
    rows.append(dict(diag="memory_phases_edit", size=a.size, **mem_phases(pipe, a.size), **env))
    print(json.dumps(rows[-1]), flush=True)
    prof = profile_forward(pipe, a.size)
    rows.append(dict(diag="profile_packed_forward_2_branches_ms", size=a.size, **prof, **env))
    print(json.dumps(rows[-1]), flush=True)
    res, agree = agreement(pipe, a.size, a.steps)
    rows.append(dict(diag="triton_vs_torch_bf16", size=a.size, steps=a.steps, **agree, **env))
    print(json.dumps(rows[-1]), flush=True)
    if a.fp32_reference:
        # the same weights (bf16 values) in fp32: how far is each bf16 backend from exact arithmetic?
        p32 = random_bagel("bagel-7b-mot", device="cuda", dtype=torch.float32, backend="torch")
        with torch.no_grad():
            for p in p32.model.parameters():
                p.copy_(p.bfloat16().float())
        r32 = p32.generate("A red bagel on a white plate.", image_shapes=(a.size, a.size), num_timesteps=a.steps,
                           seed=0)
        rows.append(dict(diag="bf16_vs_fp32_reference", size=a.size, steps=a.steps,
                         torch_bf16_vs_fp32=rel(res["torch"][1], r32.latents),
                         triton_bf16_vs_fp32=rel(res["triton"][1], r32.latents), **env))
        print(json.dumps(rows[-1]), flush=True)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
