"""INT8 / NF4 matmuls at few rows (image-marker rows of a denoising step, decode): every path and launch setting.

    python benchmarks/tune_quant_rows.py --out benchmarks/results/quant_rows_h200.jsonl [--commit abc]

For each weight shape of an LLM layer and M in 1..16 rows, times (CUDA-graph replays, so launch overhead is
what a captured step pays) the bf16 cuBLAS GEMM, the per-row GEMV, weight dequantization + cuBLAS, and the
dequantizing GEMM (``mode="gemm"``) under each candidate few-rows setting (``quant.matmul.rows_settings``);
one JSON row per (shape, M) with the best setting and the effective weight bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bagel_rt.quant import Int8Linear, NF4Linear, matmul  # noqa: E402
from diagnose import emit  # noqa: E402

from bagel_rt.bench import environment, graph_of  # noqa: E402

SHAPES = {"q/o": (3584, 3584), "k/v": (512, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)}
CANDIDATES = [dict(BM=16, BN=bn, BK=bk, GROUP_M=1, num_warps=4, num_stages=st)
              for bn, bk, st in itertools.product((16, 32, 64), (128, 256), (4,))]
CANDIDATES += [dict(BM=16, BN=32, BK=64, GROUP_M=1, num_warps=4, num_stages=6),
               dict(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=6)]


def replay_us(fn, calls: int = 20) -> float:
    g = graph_of(fn, calls)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


def format_row(fmt: str, q, x, n: int, k: int) -> dict:
    """One format's timings at the rows x [M, k]: GEMV, dequant + cuBLAS, the best few-rows GEMM setting."""
    if fmt == "int8":
        scale = q.SCB / 127.0

        def call(mode):
            return matmul.int8_matmul(x, q.weight, scale, mode=mode)
    else:
        def call(mode):
            return matmul.nf4_matmul(x, q.weight, q.absmax, q.blocksize, (n, k), q.quant_map, mode=mode)
    row = {f"{fmt}_gemv_us": round(replay_us(partial(call, "gemv")), 1),
           f"{fmt}_dequant_us": round(replay_us(partial(call, "dequant")), 1)}
    best = None
    for cfg in CANDIDATES:
        matmul.rows_settings = lambda N, K, cfg=cfg: dict(cfg)  # noqa: E731
        try:
            t = replay_us(partial(call, "gemm"))
        except Exception as e:  # a setting the compiler rejects (shared memory): skip it
            print(f"skip {cfg}: {str(e).splitlines()[0][:120]}")
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    wbytes = n * k * (1 if fmt == "int8" else 0.5)
    row.update({f"{fmt}_rows_us": round(best[0], 1), f"{fmt}_rows_cfg": best[1],
                f"{fmt}_rows_tb_s": round(wbytes / best[0] / 1e6, 2)})
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--rows", default="1,4,6,16")
    a = ap.parse_args()
    env = environment(a.commit)
    for name, (n, k) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        mods = {"int8": Int8Linear.from_linear(lin), "nf4": NF4Linear.from_linear(lin)}
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = dict(diag="quant_rows", shape=name, M=m, N=n, K=k,
                       bf16_cublas_us=round(replay_us(partial(lin, x)), 1))
            for fmt, q in mods.items():
                row.update(format_row(fmt, q, x, n, k))
            row.update(env)
            emit(row, a.out)


if __name__ == "__main__":
    main()
