"""Size and escape rate of the Exp4 resident form (``bagel_rt.quant.exp4``) of a bf16 weight, on the CPU.

    python benchmarks/exp4_size.py [--shape 18944,3584] [--std 0.02] [--out results/exp4_size_cpu.jsonl]

A normal(0, std) weight (the random model's kind), encoded and decoded back (bits checked): bytes against bf16
and the fraction of weights escaped (exponents outside the unit's 15-exponent window).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bagel_rt.quant.exp4 import exp4_decode_ref, exp4_encode

from bagel_rt.bench import environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="18944,3584")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--out")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    torch.manual_seed(0)
    w = (torch.randn(shape) * a.std).to(torch.bfloat16).reshape(-1)
    b = exp4_encode(w)
    assert torch.equal(exp4_decode_ref(b, torch.empty_like(w)).view(torch.int16), w.view(torch.int16))
    n = w.numel()
    row = dict(diag="exp4_size", shape=list(shape), std=a.std, exp_base=int(b["exp_base"]),
               escapes=b["escape_index"].numel(), escaped_fraction=b["escape_index"].numel() / n,
               of_bf16=round(sum(t.numel() * t.element_size() for t in b.values()) / (2 * n), 4),
               command="python benchmarks/exp4_size.py " + " ".join(sys.argv[1:]), **environment())
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
