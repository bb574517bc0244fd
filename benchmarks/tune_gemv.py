"""Time the decode GEMV kernels under each candidate launch setting at BAGEL-7B-MoT's decode shapes, so the
fixed per-shape settings in ``kernels/gemv.py`` (``_settings``, ``SWIGLU_SETTINGS``) are chosen from data.

    python benchmarks/tune_gemv.py [--out tune.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

CANDIDATES = [(4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 4), (16, 512, 8), (4, 1024, 8),
              (2, 1024, 4), (1, 2048, 4), (2, 2048, 8), (4, 2048, 8), (8, 1024, 8), (2, 512, 4), (4, 1024, 4),
              (1, 1024, 4), (2, 2048, 4), (4, 256, 4)]  # (BN, BK, num_warps)
SHAPES = [("qkv", 4608, 3584), ("o", 3584, 3584), ("down", 3584, 18944), ("lm_head", 152064, 3584)]
FFN, HIDDEN = 18944, 3584


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from bagel_rt.bench import environment

    G = importlib.import_module("bagel_rt.kernels.gemv")
    configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=nw) for bn, bk, nw in CANDIDATES]
    gemv_tuned = triton.autotune(configs, key=["N", "K", "HAS_BIAS"])(G._gemv_kernel)
    swiglu_tuned = triton.autotune(configs, key=["N", "K"])(G._gemv_swiglu_kernel)

    def grid(N):
        return lambda meta: (triton.cdiv(N, meta["BN"]), 1)

    rows = []
    for name, N, K in [*SHAPES, ("gate_up+swiglu", FFN, HIDDEN)]:
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        if name == "gate_up+swiglu":
            wg, wu = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
            y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
            tuner = swiglu_tuned

            def run(x=x, wg=wg, wu=wu, y=y, N=N, K=K):
                swiglu_tuned[grid(N)](x, wg, wu, y, N, K, x.stride(0), y.stride(0), USE_GDC=False)
        else:
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
            tuner = gemv_tuned

            def run(x=x, w=w, y=y, N=N, K=K):
                gemv_tuned[grid(N)](x, w, w, y, N, K, x.stride(0), y.stride(0), HAS_BIAS=False, USE_GDC=False)
        tuner.cache.clear()
        run()
        torch.cuda.synchronize()
        timings = {str(c): t for c, t in getattr(tuner, "configs_timings", {}).items()}
        best = str(tuner.best_config)
        rows.append(dict(shape=name, N=N, K=K, best=best, timings_ms=timings, **environment(None)))
        print(f"{name:16s} best {best}")
        for c, t in sorted(timings.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else kv[1][0]):
            print(f"    {c}  {t}")
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
