"""Full-size (random 7B) text-to-image with compressed weights: latency, peak GPU memory, deviation from bf16.

    python benchmarks/quant_full_size.py --out quant.jsonl [--formats bf16,int8,nf4] [--steps 50]

Weights are quantized in place on the GPU from the random bf16 model (the same conversion the quantize
command applies tensor by tensor), then a 1024x1024 text-to-image request runs with app defaults on the
triton backend. Peak memory is measured for the request alone (weights + activations); with --cap-gib the
process is limited by ``torch.cuda.set_per_process_memory_fraction`` to emulate a smaller card. Deviation
from bf16 (relative L2 of the final latents, PSNR of the images) on random weights is only a proxy for
real-weight quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch
from bagel_rt.quant import quantize_model

import bagel_rt
from bagel_rt.bench import environment
from bagel_rt.random_weights import random_bagel

CAPS = {"nf4": 12, "int8": 24, "bf16": 32}  # emulated cards (GiB) for each format; targets: 10 / 17 GiB peak


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def weights_gib(model, vae) -> float:
    n = sum(t.numel() * t.element_size() for m in (model, vae) for t in list(m.parameters()) + list(m.buffers()))
    return n / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--formats", default="bf16,int8,nf4")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cap", action="store_true", help="cap the process memory at the card size of the format")
    a = ap.parse_args()
    env = environment(a.commit)
    ref = None
    rows = []
    for fmt in a.formats.split(","):
        pipe = random_bagel("bagel-7b-mot", device="cuda", backend="triton")
        if fmt != "bf16":
            # the ViT, connector and glue stay bf16 here (small); the LLM's Linears of both experts + lm_head
            quantize_model(pipe.model.language_model, fmt)
            # building 29 GB of bf16 and quantizing in place leaves the allocator fragmented (a real load
            # quantizes tensor by tensor): a round trip through host memory packs the weights again
            pipe.model.to("cpu")
            gc.collect()
            torch.cuda.empty_cache()
            pipe.model.to("cuda")
        gc.collect()
        torch.cuda.empty_cache()
        w_gib = weights_gib(pipe.model, pipe.vae)
        cap = CAPS.get(fmt) if a.cap else None
        placement = None
        if cap:
            placement = pipe.limit_gpu_memory(cap)  # ViT/VAE/embeddings off the GPU between uses + the cap
        row = dict(task="t2i", backend="triton", weights=fmt, height=a.size, width=a.size, num_timesteps=a.steps,
                   weights_gib=round(w_gib, 2), cap_gib=cap, placement=placement, **env)
        try:
            pipe.generate("warm up", image_shapes=(a.size, a.size), num_timesteps=3, seed=1)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = pipe.generate("A red bagel on a white plate, studio light.", image_shapes=(a.size, a.size),
                                num_timesteps=a.steps, seed=0)
            torch.cuda.synchronize()
            row.update(seconds=round(time.perf_counter() - t0, 3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), tokens_per_s=None)
            img = np.asarray(res.image)
            if ref is None and fmt == "bf16":
                ref = (res.latents, img)
            elif ref is not None:
                lat = res.latents.double()
                row.update(rel_l2_latents_vs_bf16=float((lat - ref[0].double()).norm() / ref[0].double().norm()),
                           psnr_vs_bf16_db=round(psnr(img, ref[1]), 2),
                           note="deviation on random weights: a proxy, not real-weight quality")
        except (torch.cuda.OutOfMemoryError, bagel_rt.InputError) as e:
            row.update(error=f"does not fit under the cap: {str(e).splitlines()[0][:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.set_per_process_memory_fraction(1.0)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for r in rows:
        print(f"{r['weights']:5s} weights {r['weights_gib']:6.2f} GiB  peak {r.get('peak_gib', '-')} GiB  "
              f"{r.get('seconds', '-')} s  rel L2 {r.get('rel_l2_latents_vs_bf16', '-')}  "
              f"PSNR {r.get('psnr_vs_bf16_db', '-')}  {r.get('error', '')}")


if __name__ == "__main__":
    main()
