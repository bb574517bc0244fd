"""Quality proxy per weight format: the signal-to-quantization-noise ratio of every LLM Linear's output on the
model's own activations during a request.

    python benchmarks/quant_quality.py --out benchmarks/results/quant_quality_h200.jsonl [--formats int8,nf4,fp8]
    python benchmarks/quant_quality.py --out /tmp/q.jsonl --tiny      # CPU smoke run on the tiny model

A text-to-image request (app defaults, a few steps) runs on the bf16 model with the ``torch`` backend (which
calls every Linear as a module). A forward hook on each Linear of the LLM (both experts, ``lm_head``) takes its
input rows x at that call and compares the bf16 output ``y = linear(x)`` with the output of the same Linear in
each format (its own module: INT8/NF4 weight-only, FP8 W8A8 with per-token activation scales where the GPU
has FP8 tensor cores, weight-only elsewhere): ``SQNR = 10 log10(|y|^2 / |y - y_q|^2)`` dB, aggregated per
expert and projection over all calls. Random weights are only a proxy: trained weights have outliers and
structure that random ones lack, and what matters is the image, not one Linear's output.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bagel_rt.quant import quantize_model  # noqa: E402
from diagnose import emit  # noqa: E402

from bagel_rt.bench import environment  # noqa: E402
from bagel_rt.random_weights import random_bagel  # noqa: E402
from bagel_rt.tiny import TINY_PARAMS  # noqa: E402


def group_of(name: str) -> str:
    """'gen.mlp.gate_proj', 'und.self_attn.q_proj', 'lm_head' ... for a Linear's qualified name."""
    if name.endswith("lm_head"):
        return "lm_head"
    leaf = name.rsplit(".", 1)[-1]
    expert = "gen" if "moe_gen" in name else "und"
    return f"{expert}.{leaf.replace('_moe_gen', '')}"


def _copy(lin: torch.nn.Linear) -> torch.nn.Linear:
    new = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                          dtype=lin.weight.dtype).requires_grad_(False)
    new.load_state_dict(lin.state_dict())
    return new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--formats", default="int8,nf4,fp8")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=2048, help="rows of each call's input kept for the check")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a smoke run)")
    a = ap.parse_args()
    env = environment(a.commit)
    formats = a.formats.split(",")
    if a.tiny:
        pipe = random_bagel(TINY_PARAMS, device="cpu", dtype=torch.float32, backend="torch")
        size = 64
    else:
        pipe = random_bagel("bagel-7b-mot", device="cuda", backend="torch")
        size = a.size
    lm = pipe.model.language_model
    signal, noise = defaultdict(float), {f: defaultdict(float) for f in formats}
    twins: dict[tuple[str, str], torch.nn.Module] = {}

    def hook(name):
        def run(mod, args, out):
            x = args[0].reshape(-1, mod.in_features)[: a.max_rows]
            y = torch.nn.functional.linear(x, mod.weight, mod.bias).float()
            g = group_of(name)
            signal[g] += float(y.square().sum())
            for f in formats:
                if (name, f) not in twins:  # quantized once, on first use (the weights never change)
                    try:
                        twins[(name, f)] = quantize_model(_copy(mod), f)
                    except ValueError:  # e.g. NF4 needs in_features % 64 == 0 (the tiny model's 160)
                        twins[(name, f)] = None
                if twins[(name, f)] is not None:
                    noise[f][g] += float((y - twins[(name, f)](x).float()).square().sum())
        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in lm.named_modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        pipe.generate("A red bagel on a white plate, studio light.", image_shapes=(size, size),
                      num_timesteps=a.steps, seed=0)  # generate's defaults are the app's
    for h in handles:
        h.remove()
    for f in formats:
        sqnr = {g: round(10 * math.log10(signal[g] / noise[f][g]), 2) for g in sorted(signal) if noise[f][g]}
        row = dict(diag="linear_sqnr_db", weights=f, size=size, steps=a.steps, model="tiny" if a.tiny else "7b",
                   sqnr_db=sqnr, note="random weights: a proxy, not real-weight quality", **env)
        emit(row, a.out)


if __name__ == "__main__":
    main()
