"""Opt-in FP8 compute for the generation expert (Hopper/Ada): ``compute="fp8"``.

Approximate, so opt-in and reported with its measured deviation (DESIGN §3). Each generation-expert Linear
gets an FP8 (e4m3) copy of its weight with one fp32 scale per output channel (absmax / 448); at run time the
activations are quantized per token (row absmax / 448) by the kernel that produces them — the RMSNorms in
front of q/k/v and gate/up and the SwiGLU in front of the down projection write FP8 rows directly — or, for
the o projection, one Triton kernel over the attention output; the product runs as an FP8 tensor-core GEMM with
both scales applied in the epilogue (``torch._scaled_mm`` with row-wise scales), output bf16. The und expert
(which sees only the two marker tokens per branch while denoising), attention, norms and everything else stay
bf16. The bf16 weights are kept, so the exact path stays available: FP8 costs one byte per generation-expert
weight (about 6.5 GB at full size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quant.fp8 import quantize_rows  # noqa: F401 (fast.py imports it from here)


class Fp8Weight:
    """An FP8 copy of a Linear's weight: ``w ≈ q * scale[:, None]``; q [N, K] e4m3, scale [N] fp32."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = False):
        # per output channel = per row of W [N, K]: the same quantizer as the activations' rows
        self.q, scale = quantize_rows(linear.weight.detach())
        self.scale = scale.view(1, -1).contiguous()  # [1, N] for _scaled_mm
        self.bias = linear.bias
        #: Hopper FP8 "fast accumulation" (no periodic promotion of the tensor-core partial sums to fp32)
        self.fast_accum = fast_accum


def fp8_linear(x: Tensor | None, w: Fp8Weight, xq: tuple[Tensor, Tensor] | None = None,
               out_dtype: torch.dtype | None = None) -> Tensor:
    """x [M, K] bf16 -> x @ W.T (+ bias) [M, N] in ``out_dtype`` (default x.dtype), per-token activation scales.

    ``xq`` is ``quantize_rows(x)`` when the caller already has it (q/k/v and gate/up share their input; a
    fused kernel may produce it without ever writing x, which may then be None)."""
    if xq is None and x is None:
        raise ValueError("fp8_linear needs x or its FP8 rows xq")
    q, sx = xq if xq is not None else quantize_rows(x)
    dt = out_dtype or x.dtype
    # the bias rides in the GEMM epilogue (an extra pass over q/k/v's outputs otherwise: ~1 ms per guided step)
    return torch._scaled_mm(q, w.q.t(), scale_a=sx, scale_b=w.scale, bias=w.bias, out_dtype=dt,
                            use_fast_accum=w.fast_accum)


def gen_expert_fp8(model, fast_accum: bool = True) -> dict[int, Fp8Weight]:
    """FP8 copies of every generation-expert Linear, keyed by ``id(module)``.

    ``fast_accum`` (default on): the FP8 GEMMs skip the periodic fp32 promotion of their partial sums. Measured
    on an H200 (``benchmarks/fp8_accum.py``, ``benchmarks/results/fp8_accum_h200.jsonl``): GEMMs 7-12% faster,
    1024² text-to-image 7.51 -> 7.04 s in that script, deviation from bf16 unchanged (latents rel. L2 0.2397 vs
    0.2391, random weights)."""
    out = {}
    for layer in model.language_model.model.layers:
        a = layer.self_attn
        mods = [a.q_proj_moe_gen, a.k_proj_moe_gen, a.v_proj_moe_gen, a.o_proj_moe_gen,
                layer.mlp_moe_gen.gate_proj, layer.mlp_moe_gen.up_proj, layer.mlp_moe_gen.down_proj]
        for m in mods:
            if type(m) is nn.Linear:  # quantized modules keep their own (weight-only) path
                out[id(m)] = Fp8Weight(m, fast_accum)
    return out
