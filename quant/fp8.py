"""FP8 weights (e4m3, one fp32 scale per output channel): W8A8 on FP8 tensor cores, weight-only elsewhere.

Per output channel (row ``n`` of a ``[N, K]`` weight): ``scale[n] = max(absmax(w[n, :]) * fp32(1/448), 1e-12)``,
``q = e4m3(w / scale)`` rounded to nearest, ties to even: the row quantizer of the activations
(``bagel_rt.kernels.quantize_rows_fp8``, bit-identical to its reference), so weights and activations share one
arithmetic. Dequantization is ``q * scale[:, None]``.

On disk a Linear named ``X`` is ``X.weight`` (F8_E4M3 ``[N, K]``) and ``X.weight_scale`` (F32 ``[N, 1]``): the
keys and shapes of the channel-wise FP8 scheme of compressed-tensors / vLLM. ``FP8Linear`` holds buffers with
exactly those names, so ``model.state_dict()`` of a quantized model is that checkpoint.

``FP8Linear.forward(x)`` (x [..., K] fp16/bf16/fp32 -> [..., N] in x.dtype):

* CPU: the reference (dequantize to fp32, ``F.linear``).
* CUDA, at most ``GEMV_MAX_M`` rows (decode): the Triton FP8 weight-only GEMV.
* CUDA with FP8 tensor cores (compute capability >= 8.9): rows quantized per token, then ``torch._scaled_mm``
  with both scales and the bias in its epilogue (W8A8, approximate: opt-in by choosing this format).
* CUDA below 8.9: weight-only, the weight dequantized by a Triton kernel to x.dtype, then cuBLAS.

``act_format`` is ``"fp8"`` where the W8A8 path runs: callers that share one input between several Linears
quantize it once (``quantize_rows``) and call ``forward_quantized``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bagel_rt.kernels import quantize_rows_fp8, quantize_rows_fp8_ref
from bagel_rt.kernels._device import has_capability
from torch import Tensor, nn

from .fp8_matmul import (
    FP8,
    GEMV_MAX_M,
    fp8_dequant_ref,
    fp8_gemv,
    fp8_gemv_ref,
    fp8_linear_dequant,
    fp8_scaled_mm,
)

__all__ = [
    "FP8Config",
    "FP8Weights",
    "FP8Linear",
    "quantize_rows",
    "quantize",
    "dequantize",
    "fp8_state",
    "load_fp8",
]


@dataclass(frozen=True)
class FP8Config:
    """FP8 e4m3 weights, one scale per output channel. ``fast_accum``: the W8A8 GEMMs use Hopper's fast
    accumulation (no periodic fp32 promotion; measured 7-12% faster at an unchanged deviation, see
    ``bagel_rt.fp8``)."""

    fast_accum: bool = True


@dataclass
class FP8Weights:
    """``qweight`` float8_e4m3fn ``[N, K]``; ``scale`` fp32 ``[N]``."""

    qweight: Tensor
    scale: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 per-row scales [M, 1]) with ``x ≈ q * scale``: the Triton kernel on a GPU,
    the (bit-identical) reference elsewhere."""
    return quantize_rows_fp8(x) if x.is_cuda else quantize_rows_fp8_ref(x)


def quantize(w: Tensor, cfg: FP8Config | None = None) -> FP8Weights:
    """Quantizes a ``[N, K]`` float weight to e4m3 with one scale per output channel."""
    if w.ndim != 2:
        raise ValueError(f"FP8 quantization expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype == FP8:
        raise TypeError(f"FP8 quantization expects a bf16/fp16/fp32 weight, got {w.dtype}")
    q, scale = quantize_rows(w.detach())
    return FP8Weights(qweight=q, scale=scale.reshape(-1))


def dequantize(q: FP8Weights, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference dequantization: ``qweight * scale[:, None]`` in fp32, cast to ``dtype``. [N, K]"""
    return fp8_dequant_ref(q.qweight, q.scale, dtype)


def fp8_state(name: str, weight: Tensor) -> dict[str, Tensor]:
    """Quantizes ``weight`` [N, K] and returns the checkpoint tensors of the Linear ``name``."""
    q = quantize(weight)
    return {f"{name}.weight": q.qweight.contiguous(), f"{name}.weight_scale": q.scale.reshape(-1, 1).contiguous()}


def load_fp8(prefix: str, tensors: dict[str, Tensor]) -> FP8Weights:
    """Reads and checks the Linear ``prefix`` (``prefix.weight`` e4m3 [N, K], ``prefix.weight_scale`` fp32
    [N, 1]) from ``tensors``; a problem raises ``ValueError`` naming the key."""
    wkey, skey = f"{prefix}.weight", f"{prefix}.weight_scale"
    for key in (wkey, skey):
        if key not in tensors:
            raise ValueError(f"FP8 checkpoint: missing tensor {key!r}")
    q, s = tensors[wkey], tensors[skey]
    if q.dtype != FP8 or q.ndim != 2:
        raise ValueError(f"FP8 checkpoint: {wkey!r} must be float8_e4m3fn [N, K], got {q.dtype} {tuple(q.shape)}")
    if s.dtype != torch.float32 or tuple(s.shape) != (q.shape[0], 1):
        raise ValueError(f"FP8 checkpoint: {skey!r} must be float32 [{q.shape[0]}, 1] (one scale per row of "
                         f"{wkey!r}), got {s.dtype} {tuple(s.shape)}")
    return FP8Weights(qweight=q, scale=s.reshape(-1))


class FP8Linear(nn.Module):
    """``nn.Linear`` with FP8 weights. Buffers: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` fp32 [N, 1],
    ``bias`` (or None).

    ``use_kernel``: ``None`` = the kernels on CUDA inputs and the reference elsewhere; ``True``/``False`` force it.
    ``w8a8``: ``None`` = W8A8 where the device has FP8 tensor cores (CUDA, capability >= 8.9) and N, K are
    multiples of 16 (``torch._scaled_mm``); ``True``/``False`` force it (``torch._scaled_mm`` runs on CPUs too).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device=None, fast_accum: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.fast_accum = fast_accum
        self.use_kernel: bool | None = None
        self.w8a8: bool | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = True) -> FP8Linear:
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype,
                  device=w.device, fast_accum=fast_accum)
        mod.set_weights(quantize(w))
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def set_weights(self, q: FP8Weights) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"FP8 weights of shape {list(q.shape)} do not fit "
                             f"{self.out_features}x{self.in_features}")
        self.weight = q.qweight
        self.weight_scale = q.scale.reshape(-1, 1)

    def weights(self) -> FP8Weights:
        return FP8Weights(qweight=self.weight, scale=self.weight_scale.reshape(-1))

    @property
    def act_format(self) -> str | None:
        """"fp8" when ``forward`` runs W8A8 on this module's device (then ``forward_quantized`` is its GEMM),
        else None (weight-only)."""
        if self.w8a8 is not None:
            return "fp8" if self.w8a8 else None
        dev = self.weight.device
        aligned = self.in_features % 16 == 0 and self.out_features % 16 == 0
        return "fp8" if aligned and dev.type == "cuda" and has_capability(8, 9, dev) else None

    def forward_quantized(self, xq: tuple[Tensor, Tensor], out_dtype: torch.dtype) -> Tensor:
        """W8A8 GEMM of rows already quantized by ``quantize_rows``: xq = (e4m3 [M, K], fp32 [M, 1]) ->
        [M, N] in ``out_dtype``, bias added in the GEMM epilogue."""
        q, sx = xq
        return fp8_scaled_mm(q, sx, self.weight, self.weight_scale, self.bias, out_dtype, self.fast_accum)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        use_kernel = x.is_cuda if self.use_kernel is None else self.use_kernel
        scale = self.weight_scale.reshape(-1)
        if not use_kernel:
            out = fp8_gemv_ref(x2, self.weight, scale, self.bias)
        elif x2.shape[0] <= GEMV_MAX_M:
            out = fp8_gemv(x2, self.weight, scale, self.bias)
        elif self.act_format == "fp8":
            out = self.forward_quantized(quantize_rows(x2), x.dtype)
        else:
            out = fp8_linear_dequant(x2, self.weight, scale, self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fast_accum={self.fast_accum}")
