"""Batched text-to-image throughput: images/s and per-step milliseconds by batch size and image size.

    # full size (random 7B weights, triton backend): 512² and 1024², batches 1, 2, 4, 8, app defaults
    python benchmarks/batch_throughput.py --random-weights 7b \\
        --out benchmarks/results/batch_throughput.jsonl
    # CPU smoke test (tiny random model, torch backend)
    python benchmarks/batch_throughput.py --random-weights tiny --device cpu --sizes 64 --batches 1,2 \\
        --steps 3 --out /tmp/bt.jsonl

One process, one model. For each size and batch size B, ``generate`` makes B images of B different prompts
(different token counts, as in serving: each image's branches have their own cache length) in one call:
app defaults (text CFG 4.0, implicit image CFG 1.5 = its branch deduplicated, interval 0.4-1.0, 50 steps).
A warm-up call of the same shape comes first (other seeds: its first forward per branch set runs eagerly and
the second captures the CUDA graph), then ``--runs`` timed calls (median). Per row:

* ``seconds``: the whole call (prefill of B prompts, denoising, B VAE decodes), ``images_per_s = B / seconds``;
* ``denoise_seconds`` (the batch's packed denoising loop, ``Result.info["denoise_seconds"]``) and
  ``step_ms = denoise_seconds / (steps - 1)``: one packed forward over all B images' branches + their CFG
  updates; ``denoise_images_per_s``;
* ``speedup_vs_b1``: images/s over the same size's batch-1 row; ``peak_gib``: the call's peak GPU memory.

A batch that does not fit is a row with ``error``. The weights are random: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import emit  # noqa: E402

from bagel_rt.bench import environment  # noqa: E402
from bagel_rt.random_weights import random_bagel  # noqa: E402

GIB = 2**30
PROMPTS = ["A red bagel on a white plate, studio light.", "Two dogs play in a park.",
           "A lighthouse on a cliff at dusk, waves crashing below, oil painting.", "A cat.",
           "An astronaut riding a horse on the moon, photorealistic.", "Sushi on a wooden board.",
           "A futuristic city skyline at night with flying cars and neon signs, cinematic.", "A bowl of ramen."]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(pipe, prompts: list[str], size: int, steps: int, seed: int, device: str) -> tuple[float, list]:
    _sync(device)
    t0 = time.perf_counter()
    res = pipe.generate(prompts, image_shapes=(size, size), num_timesteps=steps, seed=seed)
    _sync(device)
    return time.perf_counter() - t0, res


def measure(pipe, size: int, b: int, steps: int, runs: int, device: str) -> dict:
    """Warm-up once for this shape, then ``runs`` timed calls of B images."""
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(b)]
    timed_call(pipe, prompts, size, steps, 1000, device)  # eager first forwards + graph captures
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    secs, denoise = [], []
    for r in range(runs):
        sec, res = timed_call(pipe, prompts, size, steps, r * b, device)
        secs.append(sec)
        denoise.append(res[0].info["denoise_seconds"])
    sec, den = statistics.median(secs), statistics.median(denoise)
    row = dict(seconds=round(sec, 3), images_per_s=round(b / sec, 4), denoise_seconds=round(den, 3),
               denoise_images_per_s=round(b / den, 4), step_ms=round(1000 * den / (steps - 1), 2),
               seconds_runs=[round(s, 3) for s in secs])
    if device.startswith("cuda"):
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-weights", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    ap.add_argument("--sizes", default="512,1024", help="square image sides, comma-separated")
    ap.add_argument("--batches", default="1,2,4,8", help="images per call, comma-separated")
    ap.add_argument("--steps", type=int, default=50, help="num_timesteps (50: app default; fewer to shorten)")
    ap.add_argument("--runs", type=int, default=2, help="timed calls per shape (median)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_throughput.jsonl"),
                    help="append the JSON lines here")
    ap.add_argument("--commit", default=None)
    a = ap.parse_args(argv)
    from bagel_rt.tiny import TINY_PARAMS

    pipe = random_bagel("bagel-7b-mot" if a.random_weights == "7b" else TINY_PARAMS, device=a.device,
                        backend=a.backend)
    command = " ".join(shlex.quote(x) for x in ["python", sys.argv[0], *(argv or sys.argv[1:])])
    env = dict(environment(a.commit), command=command)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for size in (int(s) for s in a.sizes.split(",")):
        base = None
        for b in (int(x) for x in a.batches.split(",")):
            row = dict(bench="batch_throughput", task="t2i", size=size, batch=b, steps=a.steps,
                       weights=f"random-{a.random_weights}", backend=pipe.backend, compute=pipe.compute)
            try:
                row.update(measure(pipe, size, b, a.steps, a.runs, a.device))
                base = base or (row["images_per_s"] if b == 1 else None)
                if base:
                    row["speedup_vs_b1"] = round(row["images_per_s"] / base, 3)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
                pipe.fast_cache.clear()
                torch.cuda.empty_cache()
            emit(dict(row, **env), str(a.out))
            table.append(row)
    print(f"\n{'size':>5} {'batch':>5} {'s/call':>8} {'img/s':>7} {'step ms':>8} {'x b1':>5} {'peak GiB':>8}",
          file=sys.stderr)
    for r in table:
        if "error" in r:
            print(f"{r['size']:>5} {r['batch']:>5}  {r['error']}", file=sys.stderr)
            continue
        nan = float("nan")
        print(f"{r['size']:>5} {r['batch']:>5} {r['seconds']:>8.2f} {r['images_per_s']:>7.3f} "
              f"{r['step_ms']:>8.1f} {r.get('speedup_vs_b1', nan):>5.2f} {r.get('peak_gib', nan):>8.2f}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
