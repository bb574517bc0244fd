"""INT8 weight-only quantization (W8A16), stored in the bitsandbytes ``Linear8bitLt`` "row" layout.

Per output channel (row ``n`` of a ``[N, K]`` weight): ``absmax[n] = max|w[n, :]|``, ``scale = absmax / 127``,
``q = round(w * (127 / absmax))`` clamped to ``[-127, 127]`` (the same arithmetic as bitsandbytes
``int8_vectorwise_quant``, so the int8 values match it). Dequantization is ``q * (SCB / 127)``.

On disk, a Linear named ``X`` is ``X.weight`` (int8 ``[N, K]``), ``X.SCB`` (fp32 ``[N]`` = absmax) and
``X.weight_format`` (uint8 scalar 0 = "row"): the keys bitsandbytes reads and writes. ``Int8Linear`` holds
buffers with exactly those names, so ``model.state_dict()`` of a quantized model is that checkpoint.

INT8 compute (W8A8, opt-in: :func:`enable_int8_compute`): with ``Int8Linear.w8a8`` set, ``act_format`` is
"int8" and the forward of more than ``ROWS_MAX_M`` rows quantizes its input per token
(``bagel_rt.kernels.quantize_rows_int8``) and runs the INT8 tensor-core GEMM of :mod:`quant.int8_w8a8`, both
scales and the bias in its epilogue; a few rows (decode, memory bound) keep the weight-only GEMV.
"""

from dataclasses import dataclass

import torch
from bagel_rt.kernels import quantize_rows_int8, quantize_rows_int8_ref
from torch import Tensor, nn

from .int8_w8a8 import int8_w8a8_matmul, int8_w8a8_matmul_ref
from .matmul import ROWS_MAX_M, int8_dequant, int8_matmul, int8_matmul_ref

__all__ = [
    "Int8Config",
    "Int8Weights",
    "Int8Linear",
    "quantize",
    "dequantize",
    "int8_state",
    "load_int8",
    "enable_int8_compute",
]


@dataclass(frozen=True)
class Int8Config:
    """Weight-only INT8 with one absmax scale per output channel (no options: the layout is fixed)."""


@dataclass
class Int8Weights:
    """``qweight`` int8 ``[N, K]``; ``scale`` fp32 ``[N]`` (= absmax / 127)."""

    qweight: Tensor
    scale: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)


def _absmax_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (q int8 [N, K], absmax fp32 [N])."""
    if w.ndim != 2:
        raise ValueError(f"INT8 quantization expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"INT8 quantization expects a floating-point weight, got {w.dtype}")
    w = w.float()
    absmax = w.abs().amax(dim=1)
    # An all-zero row keeps absmax 0 (dequantizes to 0); guard the division only.
    q = torch.round(w * (127.0 / absmax.clamp_min(1e-30)).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, absmax


def quantize(w: Tensor, cfg: Int8Config | None = None) -> Int8Weights:
    """Quantizes a ``[N, K]`` float weight to per-output-channel absmax INT8."""
    q, absmax = _absmax_quantize(w)
    return Int8Weights(qweight=q, scale=absmax / 127.0)


def dequantize(q: Int8Weights, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference dequantization: ``qweight * scale[:, None]`` in fp32, cast to ``dtype``. [N, K]"""
    return (q.qweight.float() * q.scale.float().unsqueeze(1)).to(dtype)


def int8_state(name: str, weight: Tensor) -> dict[str, Tensor]:
    """Quantizes ``weight`` [N, K] and returns the bitsandbytes ``Linear8bitLt`` tensors of the Linear ``name``."""
    q, absmax = _absmax_quantize(weight)
    return {
        f"{name}.weight": q.contiguous(),
        f"{name}.SCB": absmax.contiguous(),
        f"{name}.weight_format": torch.tensor(0, dtype=torch.uint8),
    }


def load_int8(prefix: str, tensors: dict[str, Tensor]) -> Int8Weights:
    """Reads the Linear ``prefix`` (``prefix.weight``, ``prefix.SCB``[, ``prefix.weight_format``]) from
    ``tensors``."""
    wkey, skey, fkey = f"{prefix}.weight", f"{prefix}.SCB", f"{prefix}.weight_format"
    for key in (wkey, skey):
        if key not in tensors:
            raise ValueError(f"INT8 checkpoint: missing tensor {key!r}")
    q, scb = tensors[wkey], tensors[skey]
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"INT8 checkpoint: {wkey!r} must be int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    if scb.dtype not in (torch.float32, torch.float16, torch.bfloat16) or scb.shape != (q.shape[0],):
        raise ValueError(
            f"INT8 checkpoint: {skey!r} must be float [{q.shape[0]}] (one absmax per row of {wkey!r}), "
            f"got {scb.dtype} {tuple(scb.shape)}"
        )
    if fkey in tensors and int(tensors[fkey].item()) != 0:
        raise ValueError(f"INT8 checkpoint: {fkey!r} = {int(tensors[fkey].item())}; only 0 ('row') is supported")
    return Int8Weights(qweight=q, scale=scb.float() / 127.0)


class Int8Linear(nn.Module):
    """``nn.Linear`` with INT8 weights. Buffers: ``weight`` int8 [N, K], ``SCB`` fp32 [N], ``weight_format``,
    ``bias``.

    ``use_kernel``: ``None`` = the Triton kernel on CUDA inputs and the reference elsewhere; ``True``/``False``
    force it. ``w8a8``: INT8 compute (see :func:`enable_int8_compute`), off by default.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_format", torch.tensor(0, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16, device=device))
        else:
            self.bias = None
        self.use_kernel: bool | None = None
        self.w8a8 = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device)
        q, absmax = _absmax_quantize(linear.weight.detach())
        mod.weight.copy_(q)
        mod.SCB.copy_(absmax)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def weights(self) -> Int8Weights:
        return Int8Weights(qweight=self.weight, scale=self.SCB.float() / 127.0)

    @property
    def act_format(self) -> str | None:
        """"int8" when INT8 compute is enabled (then ``forward_quantized`` is its GEMM), else None."""
        return "int8" if self.w8a8 else None

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight [N, K] in ``dtype`` (Triton on CUDA, the reference elsewhere): for callers
        that reuse it over several calls (row chunks of one product)."""
        scale = self.SCB.float() / 127.0
        if self.weight.is_cuda:
            return int8_dequant(self.weight, scale, dtype)
        return dequantize(Int8Weights(self.weight, scale), dtype)

    def _use_kernel(self, x: Tensor) -> bool:
        return x.is_cuda if self.use_kernel is None else self.use_kernel

    def forward_quantized(self, xq: tuple[Tensor, Tensor], out_dtype: torch.dtype) -> Tensor:
        """INT8 W8A8 GEMM of rows already quantized by ``quantize_rows_int8``: xq = (int8 [M, K], fp32 [M, 1])
        -> [M, N] in ``out_dtype``, both scales and the bias applied in the GEMM epilogue."""
        q, sx = xq
        fn = int8_w8a8_matmul if self._use_kernel(q) else int8_w8a8_matmul_ref
        return fn(q, sx, self.weight, self.SCB.float() / 127.0, self.bias, out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        scale = self.SCB.float() / 127.0
        use_kernel = self._use_kernel(x)
        if self.w8a8 and x2.shape[0] > ROWS_MAX_M:  # few rows: weight-only is memory-bound and as fast
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            xq = quantize_rows_int8(x2) if use_kernel else quantize_rows_int8_ref(x2)
            return self.forward_quantized(xq, x.dtype).reshape(*shape[:-1], self.out_features)
        out = (int8_matmul if use_kernel else int8_matmul_ref)(x2, self.weight, scale, self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def enable_int8_compute(model: nn.Module, enabled: bool = True) -> int:
    """Switches INT8 W8A8 compute on (or off) for every ``Int8Linear`` of ``model``; returns how many.

    Approximate (activations rounded to 8 bits per token), so opt-in: the weight-only path stays the default."""
    mods = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for m in mods:
        m.w8a8 = enabled
    return len(mods)
