"""Multi-GPU modes at full size: t2i / edit latency and peak memory per GPU, for each parallel mode.

    python benchmarks/multi_gpu.py --gpus 2 --out benchmarks/results/multi_gpu.jsonl \
        [--modes cfg,tp,layers] [--tasks t2i,edit] [--single] [--size 1024] [--steps 50] [--runs 2] [--warmup 1]
        [--weights auto|int8|nf4|fp8] [--taylorseer]

Random weights of the full-size configuration (seed 0, built on each GPU, then split for the mode), triton
backend, app defaults (t2i cfg_text 4.0 / interval 0.4-1.0; edit cfg_text 4.0, cfg_img 2.0, interval 0-1,
three branches), through :func:`bagel_rt.bench.run_bench`. ``--single`` first times one GPU in this process
(mode "single", the baseline of the layer split's ≤ 1.1x target). Then the script starts ``--gpus`` ranks of
itself (:mod:`bagel_rt.parallel.launch`; NCCL, ``NCCL_NVLS_ENABLE=0``) and each mode runs in turn in that one
process group. Every row is ``bagel-rt bench``'s row plus ``gpus``, ``mode``, ``peak_gib_per_gpu`` (each
rank's peak during the timed runs) and ``resident_gib_per_gpu`` (after loading); rank 0 prints the table and
appends the rows to ``--out``.

Targets (issue 16, 2x H200): CFG-parallel t2i <= 5.0 s (bf16) and edit <= 9.5 s; TP=2 t2i <= 5.3 s at
<= 16 GiB per GPU; layer split <= 1.1x the one-GPU time at <= 15 GiB per GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import emit  # noqa: E402

from bagel_rt.bench import format_row, run_bench  # noqa: E402
from bagel_rt.parallel import init_group, parallelize  # noqa: E402
from bagel_rt.parallel.group import env_world  # noqa: E402
from bagel_rt.parallel.launch import launch  # noqa: E402
from bagel_rt.quantized import quantize_in_place  # noqa: E402
from bagel_rt.random_weights import random_bagel  # noqa: E402
from bagel_rt.tiny import TINY_PARAMS  # noqa: E402

GIB = 2**30


def make_pipe(args, group=None):
    """The random full-size model on this rank's GPU (seed 0: the same weights on every rank), its LLM
    Linears quantized to ``args.weights`` (auto: bf16), split for ``group``'s mode. ``--tiny``: the tiny
    configuration on ``--device`` (a smoke test of this script on CPUs: torch backend, gloo)."""
    weights = args.weights
    device = group.device if group is not None else torch.device(args.device)
    cpu = device.type == "cpu"
    pipe = random_bagel(TINY_PARAMS if args.tiny else "bagel-7b-mot", device=device,
                        backend="torch" if cpu else "triton")
    if weights != "auto":
        quantize_in_place(pipe.model, weights)
        pipe.weights = weights
    if group is not None:
        parallelize(pipe.model, pipe.vae, group)
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    return pipe


def per_gpu(value: float | None, group) -> list:
    """``value`` of every rank, in rank order (on every rank)."""
    if group is None:
        return [value]
    out = [None] * group.world
    dist.all_gather_object(out, value)
    return out


def bench_mode(args, mode: str, group=None) -> None:
    first = group is None or group.is_first
    pipe = make_pipe(args, group)
    resident = torch.cuda.memory_allocated() / GIB if pipe.device.type == "cuda" else None
    rows = run_bench(pipe, args.tasks.split(","), size=args.size, steps=args.steps, runs=args.runs,
                     warmup=args.warmup, weights=pipe.weights, commit=args.commit, taylorseer=args.taylorseer,
                     log=(lambda line: print(line, file=sys.stderr, flush=True)) if first else (lambda line: None))
    for row in rows:
        peaks = per_gpu(row["peak_gib"], group)
        residents = per_gpu(resident and round(resident, 2), group)
        row.update(gpus=group.world if group is not None else 1, mode=mode, peak_gib_per_gpu=peaks,
                   resident_gib_per_gpu=residents, peak_gib=max((p for p in peaks if p is not None), default=None))
        if first:
            emit(row, args.out)
            print(f"# {mode} x{row['gpus']}: {format_row(row)}; peak per GPU {peaks} GiB", file=sys.stderr,
                  flush=True)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if group is not None:
        dist.barrier()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--modes", default="cfg,tp,layers")
    ap.add_argument("--tasks", default="t2i,edit")
    ap.add_argument("--single", action="store_true", help="also time one GPU first (mode 'single')")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--weights", default="auto", choices=["auto", "int8", "nf4", "fp8"])
    ap.add_argument("--taylorseer", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (NCCL), or cpu with --tiny (gloo; a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="the tiny configuration instead of the full size")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if env_world() is None:  # the launching process: the one-GPU baseline, then the ranks
        if args.single:
            bench_mode(args, "single")
        argv = [a for a in sys.argv[1:] if a != "--single"]
        return launch([sys.executable, os.path.abspath(__file__), *argv], args.gpus)
    groups = []  # the first joins the run; the later modes share its process group
    for mode in args.modes.split(","):
        groups.append(init_group(mode, args.device))
        bench_mode(args, mode, groups[-1])
    groups[0].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
