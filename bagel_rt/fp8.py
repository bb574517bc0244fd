"""Opt-in FP8 compute for the generation expert (Hopper/Ada): ``compute="fp8"``.

Approximate, so opt-in and reported with its measured deviation (DESIGN §3). Each generation-expert Linear
gets an FP8 (e4m3) copy of its weight with one fp32 scale per output channel (absmax / 448); at run time the
activations are quantized per token (row absmax / 448) and the product runs as an FP8 tensor-core GEMM with
both scales applied in the epilogue (``torch._scaled_mm`` with row-wise scales), output bf16. The und expert
(which sees only the two marker tokens per branch while denoising), attention, norms and everything else stay
bf16. The bf16 weights are kept, so the exact path stays available: FP8 costs one byte per generation-expert
weight (about 6.5 GB at full size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Weight:
    """An FP8 copy of a Linear's weight: ``w ≈ q * scale[:, None]``; q [N, K] e4m3, scale [N] fp32."""

    def __init__(self, linear: nn.Linear):
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
        self.q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.scale = scale[None, :].contiguous()  # [1, N] for _scaled_mm
        self.bias = linear.bias


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 per-token scales [M, 1]) with ``x ≈ q * scale``."""
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / sx).to(FP8), sx


def fp8_linear(x: Tensor, w: Fp8Weight, xq: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """x [M, K] bf16 -> x @ W.T (+ bias) [M, N] bf16, with per-token activation scales.

    ``xq`` is ``quantize_rows(x)`` when the caller already has it (q/k/v and gate/up share their input)."""
    q, sx = xq if xq is not None else quantize_rows(x)
    y = torch._scaled_mm(q, w.q.t(), scale_a=sx, scale_b=w.scale, out_dtype=x.dtype)
    return y if w.bias is None else y + w.bias


def gen_expert_fp8(model) -> dict[int, Fp8Weight]:
    """FP8 copies of every generation-expert Linear, keyed by ``id(module)``."""
    out = {}
    for layer in model.language_model.model.layers:
        a = layer.self_attn
        mods = [a.q_proj_moe_gen, a.k_proj_moe_gen, a.v_proj_moe_gen, a.o_proj_moe_gen,
                layer.mlp_moe_gen.gate_proj, layer.mlp_moe_gen.up_proj, layer.mlp_moe_gen.down_proj]
        for m in mods:
            if type(m) is nn.Linear:  # quantized modules keep their own (weight-only) path
                out[id(m)] = Fp8Weight(m)
    return out
