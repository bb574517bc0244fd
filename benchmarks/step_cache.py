"""Step-caching settings: speed, memory and deviation from the uncached run of the same seed.

For each task (app defaults) and each setting, one JSON line: the schedule that ran, full forwards, seconds
(median of the timed runs, ``gen_image``: denoising + VAE decode), the speed-up over the uncached run, peak GPU
memory of the request and of its denoising alone and what step caching adds to them (per computed branch for
the denoising), the derivative buffers' size (triton backend), and the deviation from the uncached
run: relative L2 of the final latents and of every step's combined velocity.

    # CPU smoke test (tiny random model, torch backend)
    python benchmarks/step_cache.py --random-weights tiny --device cpu --tasks t2i --size 64 --steps 20 \
        --runs 1 --out /tmp/sc.jsonl
    # full size (random 7B weights, triton backend)
    python benchmarks/step_cache.py --random-weights 7b --size 1024 --steps 50 \\
        --out benchmarks/results/step_cache_h200.jsonl

Random weights are only a proxy for image quality: a trained model's hidden states move differently along the
trajectory, so its deviations (and whether they are visible) must be measured on the real checkpoint
(``--model DIR``). The rows say so (``quality_proxy``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from bagel_rt.bench import environment, test_image
from bagel_rt.random_weights import random_bagel
from bagel_rt.sampler import CFGSettings
from bagel_rt.step_cache import StepCacheSettings

GIB = 2**30
APP_CFG = {"t2i": CFGSettings(4.0, 1.5, (0.4, 1.0)),
           "edit": CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel")}
#: name -> settings (None: the uncached reference)
SETTINGS = {
    "uncached": None,
    "official": StepCacheSettings(),
    "fora": StepCacheSettings(max_order=0),
    "order1": StepCacheSettings(max_order=1),
    "order2": StepCacheSettings(max_order=2),
    "threshold2": StepCacheSettings(fresh_threshold=2),
    "threshold4": StepCacheSettings(fresh_threshold=4),
    "first_enhance3": StepCacheSettings(first_enhance=3),
}
PROXY = "random weights: the deviations are a proxy, not a measure of image quality"


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def request(pipe, task: str, size: int, steps: int, settings: StepCacheSettings | None, record: bool = False,
            decode: bool = True):
    """One image request of ``task`` (seed 0): (Result, seconds of ``gen_image``). ``decode=False`` skips the
    VAE decode (a blank image), so that a peak-memory reading sees the denoising alone."""
    s = pipe.session(seed=0)
    if not decode:
        from PIL import Image

        s.decode_latents = lambda latents, h, w: Image.new("RGB", (16 * w, 16 * h))
    if task == "edit":
        s.add(test_image(size, size))
        s.add("Make the sky purple and add a moon.")
    else:
        s.add("A red bagel on a white plate, studio light.")
    _sync()
    t0 = time.perf_counter()
    res = s.gen_image(s.image_shapes or (size, size), APP_CFG[task], num_timesteps=steps, timestep_shift=3.0,
                      record=record, enable_taylorseer=settings is not None, taylorseer_settings=settings)
    _sync()
    return res, time.perf_counter() - t0


def measure(pipe, task: str, size: int, steps: int, settings, runs: int, warmup: int) -> dict:
    """Median seconds and peak memory of timed runs after warm-up, then one recorded run (recording every
    step's velocity syncs the loop, so it is never timed)."""
    for _ in range(warmup):
        request(pipe, task, size, steps, settings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = [request(pipe, task, size, steps, settings)[1] for _ in range(runs)]
    peak = denoise_peak = None
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        request(pipe, task, size, steps, settings, decode=False)
        denoise_peak = torch.cuda.max_memory_allocated() / GIB
    res, _ = request(pipe, task, size, steps, settings, record=True)
    return dict(seconds=statistics.median(times), peak=peak, denoise_peak=denoise_peak, res=res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random-weights", choices=["7b", "tiny"], default=None)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint instead of random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    ap.add_argument("--tasks", default="t2i,edit")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma-separated names of " + ", ".join(SETTINGS))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compute", choices=["auto", "bf16", "fp8", "int8"], default="auto",
                    help="denoising GEMM precision (auto: what the weights compute)")
    ap.add_argument("--out", type=Path, required=True, help="append the JSON lines here")
    ap.add_argument("--commit", default=None)
    a = ap.parse_args(argv)
    names = [n for n in a.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if "uncached" not in names:
        names.insert(0, "uncached")  # the reference of every deviation
    if a.model is not None:
        import bagel_rt

        pipe = bagel_rt.load(a.model, device=a.device, backend=a.backend)
        proxy = None
    else:
        from bagel_rt.tiny import TINY_PARAMS

        weights = a.random_weights or ("7b" if a.device.startswith("cuda") else "tiny")
        pipe = random_bagel("bagel-7b-mot" if weights == "7b" else TINY_PARAMS, device=a.device,
                            backend=a.backend)
        proxy = PROXY
    if a.compute != "auto":
        pipe.compute = a.compute
    command = " ".join(shlex.quote(x) for x in ["python", sys.argv[0], *(argv or sys.argv[1:])])
    env = dict(environment(a.commit), command=command)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for task in a.tasks.split(","):
        ref = None
        for name in names:
            m = measure(pipe, task, a.size, a.steps, SETTINGS[name], a.runs, a.warmup)
            res = m["res"]
            info = res.info.get("step_cache")
            row = dict(task=task, setting=name, backend=pipe.backend, compute=pipe.compute,
                       height=res.image.height, width=res.image.width, num_timesteps=a.steps,
                       step_cache=None if info is None else {k: info[k]
                                                             for k in ("method", "settings", "schedule")},
                       full_evaluations=None if info is None else info["full_evaluations"],
                       seconds=round(m["seconds"], 3), peak_gib=m["peak"] and round(m["peak"], 3),
                       denoise_peak_gib=m["denoise_peak"] and round(m["denoise_peak"], 3))
            if ref is None:
                ref = m
            else:
                v = [rel(x, y) for x, y in zip(res.velocities, ref["res"].velocities)]
                branches = len(info["full_by_branch"])
                row.update(speedup_vs_uncached=round(ref["seconds"] / m["seconds"], 2),
                           rel_l2_latents=rel(res.latents, ref["res"].latents),
                           rel_l2_velocity_max=max(v), rel_l2_velocity_mean=statistics.fmean(v),
                           rel_l2_velocity_steps=[round(x, 5) for x in v])
                if m["peak"] is not None:  # what step caching adds: to the request's peak, to the denoising's
                    extra = m["peak"] - ref["peak"]
                    extra_denoise = m["denoise_peak"] - ref["denoise_peak"]
                    row.update(extra_peak_gib=round(extra, 3), extra_denoise_peak_gib=round(extra_denoise, 3),
                               extra_denoise_peak_gib_per_branch=round(extra_denoise / branches, 3))
                den = pipe.fast_cache.get("denoiser")
                if den is not None and den.derivatives is not None:  # the triton backend's derivative buffers
                    d = den.derivatives.d
                    row.update(derivatives_gib_per_branch=round(d[0].numel() * d.element_size() / GIB, 3))
            row.update(quality_proxy=proxy, runs=a.runs, **env)
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task:5s} {name:15s} {row['seconds']:8.3f} s  full {row['full_evaluations']}  "
                  f"x{row.get('speedup_vs_uncached', 1.0)}  latents {row.get('rel_l2_latents', 0):.3e}  "
                  f"velocity max {row.get('rel_l2_velocity_max', 0):.3e}  "
                  f"denoising peak +{row.get('extra_denoise_peak_gib_per_branch')} GiB/branch", file=sys.stderr)
    if proxy:
        print(f"note: {proxy}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
