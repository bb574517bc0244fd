"""The FP8 attention experiment in ``benchmarks/ceilings.py`` computes attention (Triton interpreter on the CPU,
the GPU when there is one): its README number is a speed, so its output must first be right."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from bagel_rt.kernels import varlen_attention_ref
from conftest import rel_l2

_path = Path(__file__).parents[1] / "benchmarks" / "ceilings.py"
_spec = importlib.util.spec_from_file_location("ceilings", _path)
ceilings = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceilings)


@pytest.mark.parametrize("lq,lk", [((5, 17), (9, 40)), ((3,), (130,))])
def test_fp8_attention_experiment_matches_reference(lq, lk):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 tensor-core dots need Ada or Hopper")
    g = torch.Generator().manual_seed(0)
    hq, hk, d = 14, 2, 64  # GQA 7:1 as in BAGEL, a smaller head dim for the interpreter
    q = torch.randn(sum(lq), hq, d, generator=g).to(dev)
    k = torch.randn(sum(lk), hk, d, generator=g).to(dev)
    v = torch.randn(sum(lk), hk, d, generator=g).to(dev)
    cu_q = [0, *torch.tensor(lq).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(lk).cumsum(0).tolist()]
    cq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    scale = 1 / math.sqrt(d)
    ref = varlen_attention_ref(q, k, v, cq, ck, False, scale)
    inputs = ceilings.fp8_attention_inputs(q, k, v, cu_k)
    out = ceilings.fp8_attention(*inputs, cq, ck, max(lq), scale, block_m=16, block_n=32,
                                 out_dtype=torch.float32)
    # e4m3 keeps 3 mantissa bits: ~5-8% is the format on random data; a wrong mask or scale is O(1)
    assert rel_l2(out, ref) < 0.1
    # against exact attention on the kernel's own dequantized q, k, v only the e4m3 probabilities differ
    q8, qs, k8, ks, vt, vs, _ = inputs
    vd = torch.cat([vt[i, :, :, :n].permute(2, 0, 1) for i, n in enumerate(lk)]).float() * vs[None, :, None]
    ref_d = varlen_attention_ref(q8.float() * qs[..., None], k8.float() * ks[..., None], vd, cq, ck, False, scale)
    assert rel_l2(out, ref_d) < 0.08
