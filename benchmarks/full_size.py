"""Full-size (random-weight 7B) run of the torch backend: text-to-image, edit and greedy decoding.

    python benchmarks/full_size.py --out results.jsonl [--commit abc123] [--steps 50]

Builds the real BAGEL-7B-MoT configuration with random weights on the GPU (through the strict
``load_state_dict`` path), then times, with app defaults: text-to-image 1024x1024, an edit of a 1024x1024
image, and 256 tokens of greedy decoding. Records wall time and peak GPU memory as JSON lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, timed, write_jsonl  # noqa: E402

from bagel_rt.random_weights import random_bagel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/full_size.jsonl")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--tasks", default="t2i,edit,decode")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("full_size.py needs a CUDA GPU (the 7B model is 29 GB in bf16)")
    env = environment(a.commit)
    pipe, build_s, build_peak = timed(lambda: random_bagel("bagel-7b-mot", device="cuda"))
    print(f"built random 7B in {build_s:.1f}s, {build_peak:.1f} GiB")
    base = dict(backend="torch", weights="bf16", **env)
    rows = [dict(task="build_random_7b", seconds=round(build_s, 3), peak_gib=round(build_peak, 2), **base)]
    tasks = a.tasks.split(",")
    # warm-up (kernels, allocator) excluded from the numbers
    _, warm_s, _ = timed(lambda: pipe.generate("warm up", image_shapes=(256, 256), num_timesteps=3, seed=0))
    rows.append(dict(task="warmup_t2i_256_3steps", seconds=round(warm_s, 3), **base))
    H = W = a.size
    if "t2i" in tasks:
        res, s, peak = timed(lambda: pipe.generate("A red bagel on a white plate, studio light.",
                                                   image_shapes=(H, W), num_timesteps=a.steps, seed=0))
        rows.append(dict(task="t2i", height=H, width=W, num_timesteps=a.steps, seconds=round(s, 3),
                         peak_gib=round(peak, 2), tokens_per_s=None, settings="app defaults: cfg_text 4, "
                         "cfg_img 1.5 (implicit), interval 0.4-1, global renorm, shift 3", **base))
        assert res.image.size == (W, H) and torch.isfinite(res.latents).all()
    if "edit" in tasks:
        rng = np.random.default_rng(0)
        grad = np.linspace(0, 255, W, dtype=np.float32)[None, :, None] * np.ones((H, 1, 3), np.float32)
        src = Image.fromarray(np.clip(grad + rng.normal(0, 20, (H, W, 3)), 0, 255).astype(np.uint8))
        res, s, peak = timed(lambda: pipe.edit(src, "Make the sky purple and add a moon.",
                                               num_timesteps=a.steps, seed=0))
        rows.append(dict(task="edit", height=H, width=W, num_timesteps=a.steps, seconds=round(s, 3),
                         peak_gib=round(peak, 2), tokens_per_s=None, settings="app defaults: cfg_text 4, "
                         "cfg_img 2, interval 0-1, text_channel, shift 3", **base))
        assert res.image.size == (W, H)
    if "decode" in tasks:
        s_ = pipe.session(understanding_only=True, seed=0)
        s_.add_text("Describe a bagel in detail.")
        s_.gen_text(4)  # warm-up of the decode path
        res, s, peak = timed(lambda: s_.gen_text(a.tokens))
        n = len(res.token_ids)
        rows.append(dict(task="decode", height=None, width=None, num_timesteps=None, seconds=round(s, 3),
                         peak_gib=round(peak, 2), tokens=n, tokens_per_s=round(n / s, 2),
                         settings="greedy, batch 1, prompt of 1 segment", **base))
    write_jsonl(a.out, rows)
    print(f"{'task':24s} {'seconds':>9s} {'peak GiB':>9s} {'tok/s':>8s}")
    for r in rows:
        print(f"{r['task']:24s} {r.get('seconds', 0):9.2f} {r.get('peak_gib') or 0:9.2f} "
              f"{r.get('tokens_per_s') or 0:8.1f}")


if __name__ == "__main__":
    main()
