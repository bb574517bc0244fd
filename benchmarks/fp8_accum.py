"""FP8 text-to-image with and without Hopper fast accumulation (random 7B weights): latency and deviation.

    python benchmarks/fp8_accum.py --out fp8_accum.jsonl [--size 1024] [--steps 50]

Runs bf16, FP8 and FP8 with ``use_fast_accum`` on the same weights, prompt and seed (triton backend, one
warm-up each) and reports seconds and the relative L2 of the final latents against the bf16 run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bagel_rt.bench import environment
from bagel_rt.compute import gen_linears
from bagel_rt.random_weights import random_bagel

PROMPT = "A red bagel on a white plate, studio light."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    pipe = random_bagel("bagel-7b-mot", device="cuda", backend="triton")
    pipe.keep_bf16 = True  # back to bf16 after the FP8 variants
    env = environment(a.commit)
    out, ref = [], None
    for variant in ("bf16", "fp8", "fp8_fast_accum"):
        pipe.compute = "bf16" if variant == "bf16" else "fp8"
        for _, _, mod in gen_linears(pipe.model):
            if variant != "bf16":
                mod.fast_accum = variant == "fp8_fast_accum"
        pipe.fast_cache.clear()
        pipe.generate("warm up", image_shapes=(a.size, a.size), num_timesteps=a.steps, seed=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = pipe.generate(PROMPT, image_shapes=(a.size, a.size), num_timesteps=a.steps, seed=0)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        lat = res.latents.double()
        ref = lat if ref is None else ref
        row = dict(task="t2i", variant=variant, size=a.size, steps=a.steps, seconds=round(sec, 3),
                   rel_l2_latents_vs_bf16=float((lat - ref).norm() / ref.norm()), **env)
        out.append(row)
        print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
