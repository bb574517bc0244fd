"""``bagel-rt bench``: end-to-end latency, throughput and memory of text-to-image, editing and decoding.

Every result is one JSON line with the fields of ``benchmarks/results/*.jsonl``: task, backend, weights,
height, width, num_timesteps, seconds (median of the timed runs), seconds_per_step, peak_gib,
tokens_per_s, tflops (achieved, analytic FLOP count of the denoising forwards / denoising time),
tflops_share (of the measured bf16 matmul peak: a ~15 ms burst), tflops_share_sustained (of the bf16 matmul
rate held over seconds, which a power-capped GPU keeps lower), warmup_seconds, step_cache (what step caching
ran, or null), full_evaluations (full branch forwards per image), gpu, torch, commit, date.
Warm-up runs are excluded from the median and reported separately.
"""

from __future__ import annotations

import datetime
import statistics
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from .fast import resolve_attention
from .sampler import CFGSettings, schedule, velocity_sources


def environment(commit: str | None = None) -> dict:
    import triton

    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float | None:
    """Measured bf16 matmul rate (TFLOP/s) of an n^3 product on random data; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def graph_of(fn, calls: int) -> torch.cuda.CUDAGraph:
    """``fn`` run once (warm-up), then ``calls`` calls of it captured in one CUDA graph."""
    fn()
    _sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def replay_rates(graph: torch.cuda.CUDAGraph, flop_per_replay: float, seconds: float,
                 replays_per_window: int = 1) -> list[tuple[float, float]]:
    """Replay ``graph`` back to back for ``seconds``: (seconds since the start, TFLOP/s) of each window of
    ``replays_per_window`` replays, timed with CUDA events."""
    t0, windows = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays_per_window):
            graph.replay()
        end.record()
        end.synchronize()
        windows.append((time.perf_counter() - t0,
                        flop_per_replay * replays_per_window / (start.elapsed_time(end) * 1e9)))
    return windows


def matmul_sustained_tflops(seconds: float = 3.0, n: int = 8192) -> float | None:
    """bf16 matmul rate (TFLOP/s) held over ``seconds`` of back-to-back n^3 products (a CUDA graph replayed),
    measured over the second half; None without CUDA.

    A GPU at its power limit lowers its clocks within milliseconds: the short burst of
    :func:`matmul_peak_tflops` then overstates what a long request can get (H200: ~795 burst vs ~672 held,
    ``benchmarks/ceilings.py``).
    """
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    graph = graph_of(lambda: torch.mm(a, b, out=c), 10)
    rates = [r for t, r in replay_rates(graph, 10 * 2 * n**3, seconds) if t >= seconds / 2]
    # equal work per window: the rate over all of them is the harmonic mean
    return len(rates) / sum(1 / r for r in rates) if rates else None


def full_forwards(dedup: dict[str, bool], num_timesteps: int, shift: float, cfg: CFGSettings) -> dict[str, int]:
    """Full denoiser forwards per branch of an uncached request, per the exact-skip rules (``dedup``: the flags
    of :meth:`bagel_rt.session.Session.branches`)."""
    n = {}
    for t in schedule(num_timesteps, shift)[:-1].tolist():
        for b in set(velocity_sources(*cfg.scales_at(t), dedup["text_is_cond"], dedup["img_is_cond"]).values()):
            n[b] = n.get(b, 0) + 1
    return n


def denoise_flops(model, ctx_lens: dict[str, int], forwards: dict[str, int], h: int, w: int) -> float:
    """Analytic FLOPs of the denoising forwards actually run (GEMMs + attention): ``forwards[b]`` full
    forwards of branch b (:func:`full_forwards`, or a step-cached request's ``full_by_branch``)."""
    p = model.params.llm
    H, inter, hd = p.hidden_size, p.intermediate_size, p.head_dim
    kv = p.num_kv_heads * hd
    lin = 2 * (H * H * 2 + H * kv * 2 + 3 * H * inter)  # FLOPs per token per layer (q, o, k, v, gate/up/down)
    N, L = h * w, h * w + 2
    total = 0.0
    for b, n in forwards.items():
        total += n * p.num_layers * (L * lin + 4 * L * (ctx_lens[b] + L) * H)
        total += n * 2 * N * (64 * H * 2)  # vae2llm + llm2vae
    return total


def _timed(fn, runs: int, warmup: int):
    warm = []
    for _ in range(warmup):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        warm.append(time.perf_counter() - t0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(runs):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return out, statistics.median(times), warm, peak


def test_image(h: int, w: int) -> Image.Image:
    """A deterministic textured RGB test image (a gradient plus noise)."""
    rng = np.random.default_rng(0)
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return Image.fromarray(np.clip(grad + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def run_bench(pipe, tasks=("t2i", "edit", "decode"), size: int = 1024, steps: int = 50, runs: int = 1,
              warmup: int = 1, tokens: int = 256, compare_torch: bool = False, weights: str = "bf16",
              commit: str | None = None, log=print, taylorseer: bool = False) -> list[dict]:
    """Time the requested tasks on ``pipe`` (app defaults); returns one dict per result.

    ``taylorseer``: image tasks with step caching (official settings); rows then carry ``step_cache`` (the
    method, settings and schedule that ran) and ``full_evaluations`` (full branch forwards per image; also
    given without step caching)."""
    env = environment(commit)
    peak_mm = matmul_peak_tflops()
    held_mm = matmul_sustained_tflops()
    rows = []
    backend = pipe.backend

    def image_task(task: str):
        if task == "t2i":
            cfg = CFGSettings(4.0, 1.5, (0.4, 1.0), 0.0, "global")
            inputs = ["A red bagel on a white plate, studio light."]
        else:
            cfg = CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel")
            inputs = [test_image(size, size), "Make the sky purple and add a moon."]

        def once():
            s = pipe.session(seed=0)
            for x in inputs:
                s.add(x)
            shapes = s.image_shapes or (size, size)
            t0 = time.perf_counter()
            res = s.gen_image(shapes, cfg, num_timesteps=steps, timestep_shift=3.0, enable_taylorseer=taylorseer)
            _sync()
            res.info["denoise_seconds"] = time.perf_counter() - t0
            res.info["shape"] = tuple(shapes)
            ds = pipe.model.params.latent_downsample
            lens = {"cond": s.gen.length, "text": s.cfg_text.length, "img": s.cfg_img.length}
            if taylorseer:
                forwards = res.info["step_cache"]["full_by_branch"]
            else:
                forwards = full_forwards(s.branches()[1], steps, 3.0, cfg)
            res.info["full_evaluations"] = sum(forwards.values())
            res.info["flops"] = denoise_flops(pipe.model, lens, forwards, shapes[0] // ds, shapes[1] // ds)
            return res

        res, sec, warm, peak = _timed(once, runs, warmup)
        extra = []
        tflops = res.info["flops"] / res.info["denoise_seconds"] / 1e12
        attention = (resolve_attention(pipe.attention, pipe.device, pipe.model.dtype) if backend == "triton"
                     else "sdpa")
        row = dict(task=task, backend=pipe.backend, weights=weights, compute=pipe.compute, attention=attention,
                   height=res.info["shape"][0],
                   width=res.info["shape"][1],
                   num_timesteps=steps, seconds=round(sec, 3), seconds_per_step=round(sec / (steps - 1), 4),
                   denoise_seconds=round(res.info["denoise_seconds"], 3), peak_gib=peak and round(peak, 2),
                   tokens_per_s=None, tflops=round(tflops, 1),
                   tflops_share=peak_mm and round(tflops / peak_mm, 3), matmul_peak_tflops=peak_mm and
                   round(peak_mm, 1), tflops_share_sustained=held_mm and round(tflops / held_mm, 3),
                   matmul_sustained_tflops=held_mm and round(held_mm, 1),
                   warmup_seconds=[round(x, 2) for x in warm], runs=runs,
                   step_cache=_step_cache_field(res.info.get("step_cache")),
                   full_evaluations=res.info["full_evaluations"], **env)
        if compare_torch and backend != "torch":
            compute = pipe.compute
            pipe.compute, pipe.backend = "bf16", "torch"
            try:
                ref, sec_t, _, peak_t = _timed(once, 1, 0)
            finally:
                pipe.backend = backend
                pipe.compute = compute
            tflops_t = ref.info["flops"] / ref.info["denoise_seconds"] / 1e12
            a, b = res.latents.double(), ref.latents.double()
            row.update(torch_seconds=round(sec_t, 3), speedup_vs_torch=round(sec_t / sec, 2),
                       torch_peak_gib=peak_t and round(peak_t, 2),
                       rel_l2_latents_vs_torch=float((a - b).norm() / b.norm()))
            extra.append(dict(row, backend="torch", compute="bf16", attention="sdpa", seconds=round(sec_t, 3),
                             seconds_per_step=round(sec_t / (steps - 1), 4),
                             denoise_seconds=round(ref.info["denoise_seconds"], 3), peak_gib=peak_t and
                             round(peak_t, 2), tflops=round(tflops_t, 1),
                             tflops_share=peak_mm and round(tflops_t / peak_mm, 3),
                             tflops_share_sustained=held_mm and round(tflops_t / held_mm, 3), warmup_seconds=[],
                             runs=1,
                             note="torch backend run of --compare-torch (after the triton runs warmed the GPU)"))
        return [row, *extra]

    for task in tasks:
        if task in ("t2i", "edit"):
            new = image_task(task)
        elif task == "decode":
            def once():
                s = pipe.session(understanding_only=True, seed=0)
                s.add_text("Describe a bagel in detail.")
                return s.gen_text(tokens)

            res, sec, warm, peak = _timed(once, runs, warmup)
            n = len(res.token_ids)
            row = dict(task="decode", backend=pipe.backend, weights=weights, decode_gemv=pipe.decode_gemv,
                       height=None, width=None,
                       num_timesteps=None, seconds=round(sec, 3), peak_gib=peak and round(peak, 2), tokens=n,
                       tokens_per_s=round(n / sec, 1), tflops=None, warmup_seconds=[round(x, 2) for x in warm],
                       runs=runs, **env)
            if compare_torch and backend != "torch":
                pipe.backend = "torch"
                try:
                    ref, sec_t, _, _ = _timed(once, 1, 0)
                finally:
                    pipe.backend = backend
                same = sum(1 for a, b in zip(res.token_ids, ref.token_ids) if a == b)
                row.update(torch_seconds=round(sec_t, 3), speedup_vs_torch=round(sec_t / sec, 2),
                           torch_tokens_per_s=round(len(ref.token_ids) / sec_t, 1),
                           greedy_ids_equal_prefix=_common_prefix(res.token_ids, ref.token_ids), ids_equal=same)
            new = [row]
        else:
            raise ValueError(f"unknown bench task {task!r} (t2i, edit, decode)")
        for r in new:
            log(format_row(r))
        rows += new
    return rows


def _step_cache_field(info: dict | None) -> dict | None:
    """A bench row's ``step_cache``: what ran (None without step caching)."""
    if info is None:
        return None
    return {k: info[k] for k in ("method", "settings", "schedule")}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def format_row(r: dict) -> str:
    compute = r.get("compute") or "bf16"
    parts = [f"{r['task']:6s} {r['backend']:6s} {r['weights']:5s} {compute:4s}"]
    if r.get("height"):
        parts.append(f"{r['height']}x{r['width']} {r['num_timesteps']} steps")
    parts.append(f"{r['seconds']:.2f} s")
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.1f} tok/s")
    if r.get("tflops"):
        # the share is of the bf16 matmul peak: meaningless for FP8 GEMMs, so not printed for them
        share = ""
        if r.get("tflops_share") and compute == "bf16":
            share = f" ({100 * r['tflops_share']:.0f}% of the bf16 matmul burst peak"
            if r.get("tflops_share_sustained"):
                share += f", {100 * r['tflops_share_sustained']:.0f}% of its sustained rate"
            share += ")"
        parts.append(f"{r['tflops']:.0f} TFLOP/s{share}")
    if r.get("step_cache"):
        parts.append(f"{r['step_cache']['method']} ({r['full_evaluations']} full forwards)")
    if r.get("peak_gib") is not None:
        parts.append(f"peak {r['peak_gib']:.1f} GiB")
    if "speedup_vs_torch" in r:
        parts.append(f"x{r['speedup_vs_torch']} vs torch")
    if "rel_l2_latents_vs_torch" in r:
        parts.append(f"rel L2 vs torch {r['rel_l2_latents_vs_torch']:.2e}")
    return "  ".join(parts)
