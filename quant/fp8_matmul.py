"""FP8 (e4m3) weight matmuls: ``out[M, N] = x[M, K] @ (q[N, K] * scale[N])^T (+ bias)``.

* ``fp8_gemv`` (decode, M <= ``GEMV_MAX_M``): weight-only, one byte per weight streamed once, each e4m3 code
  decoded to fp32 in registers, activations in x.dtype, fp32 partial sums per lane, the per-channel scale and
  the bias in the epilogue: the one-byte decode GEMV of :mod:`quant.decode_gemv` (which the decoder also uses
  for INT8 and FP8 weights). Memory bound, so it should take about half the time of the bf16 GEMV.
* ``fp8_dequant``: a Triton kernel writes the weight in x.dtype (the weight-only path of many rows below compute
  capability 8.9, where there are no FP8 tensor cores: dequantize, then cuBLAS).
* ``fp8_scaled_mm``: W8A8 on FP8 tensor cores (``torch._scaled_mm`` with a per-token and a per-channel scale and
  the bias in its epilogue), for rows already quantized by ``bagel_rt.kernels.quantize_rows_fp8``.

The kernels read the weight as uint8 bit patterns and decode e4m3 (:func:`e4m3_to_f32`) with the conversion
instruction of compute capability >= 8.9 (``native``), else with integer bit moves: Triton's ``float8e4nv``
type compiles only from 8.9 on, and the interpreter cannot convert fp8 ("cannot cast"), while the bit decode
runs everywhere. The bit decode costs ~6 ALU operations per weight byte, about the H200's whole ALU budget per
byte of bandwidth, so the GEMV was no faster than the bf16 one with it (H200, ``bench_kernels.py --only
fp8_gemv``, commit ed3be34: down projection 51 vs 45 us); the instruction converts two codes at once. Both
decodes are exact, and give the same bits. Each launcher has a ``*_ref`` twin with the same signature that
dequantizes to fp32 and calls ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bagel_rt.kernels._device import has_capability, is_interpreting
from torch import Tensor

from .matmul import _dequant_linear

GEMV_MAX_M = 4  # rows handled by the FP8 GEMV (one program per row and column tile)

__all__ = [
    "GEMV_MAX_M",
    "e4m3_to_f32",
    "fp8_dequant",
    "fp8_dequant_ref",
    "fp8_gemv",
    "fp8_gemv_ref",
    "fp8_linear_dequant",
    "fp8_scaled_mm",
    "fp8_scaled_mm_ref",
]

FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def fp8_dequant_ref(qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32,
                    native: bool | None = None) -> Tensor:
    """qweight [N, K] e4m3 * scale [N] fp32 -> [N, K] in ``dtype`` (computed in fp32; ``native`` unused)."""
    return (qweight.float() * scale.float().reshape(-1, 1)).to(dtype)


def fp8_gemv_ref(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
                 native: bool | None = None) -> Tensor:
    """x [M, K] @ (qweight [N, K] e4m3 * scale [N])^T + bias in fp32 -> [M, N] in x.dtype (``native`` unused)."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), fp8_dequant_ref(qweight, scale), b).to(x.dtype)


def fp8_scaled_mm_ref(q: Tensor, sx: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                      out_dtype: torch.dtype, fast_accum: bool = True) -> Tensor:
    """(q [M, K] e4m3 * sx [M, 1]) @ (qweight [N, K] e4m3 * scale [N])^T + bias in fp32 -> [M, N] out_dtype
    (``fast_accum`` unused)."""
    x = q.float() * sx.float().reshape(-1, 1)
    b = None if bias is None else bias.float()
    return F.linear(x, fp8_dequant_ref(qweight, scale), b).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def e4m3_to_f32(b, NATIVE: tl.constexpr):
    """uint8 e4m3 bit patterns -> fp32, exactly (NaN codes excepted), times ``e4m3_unit(NATIVE)``: the
    callers fold that power of two into their per-channel scale (exact), saving one multiply per weight.

    NATIVE: the hardware conversion (sm_89+), the value itself. Otherwise sign and the 7 exponent/mantissa bits
    moved into an fp16's bits give e4m3's value times 2^-8 (the fp16 exponent bias is 8 above e4m3's, and e4m3
    subnormals land on fp16 subnormals): integer ops and exact conversions, on any GPU and in the interpreter."""
    if NATIVE:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    b = b.to(tl.int32)
    h = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e4m3_unit(NATIVE: tl.constexpr):
    """The factor by which :func:`e4m3_to_f32` divides the values (1 or 2^-8), as the scale's multiplier."""
    return 1.0 if NATIVE else 256.0


@triton.jit
def _fp8_dequant_kernel(w, s, o, N, K, NATIVE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (o_n < N)[:, None] & (o_k < K)[None, :]
    o_e = o_n.to(tl.int64)[:, None] * K + o_k[None, :]
    # [BN, BK]
    b_w = e4m3_to_f32(tl.load(w + o_e, mask=m, other=0), NATIVE)
    b_s = tl.load(s + o_n, mask=o_n < N, other=0.0) * e4m3_unit(NATIVE)
    tl.store(o + o_e, (b_w * b_s[:, None]).to(o.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------


def _check_weight(qweight: Tensor, scale: Tensor) -> tuple[int, int]:
    N, K = qweight.shape
    assert qweight.dtype == FP8 and qweight.is_contiguous(), (qweight.dtype, qweight.stride())
    assert scale.dtype == torch.float32 and scale.numel() == N and scale.is_contiguous(), (scale.dtype,
                                                                                           scale.shape)
    return N, K


#: the conversion-instruction decode is off by default until a GPU has run its test
#: (tests/test_fp8_linear.py::test_native_and_bit_decodes_agree): the bit decode ran on an H200 (FP8 decode
#: 208 tok/s, ed3be34); the native one has only been compiled offline for sm_90
NATIVE_DEFAULT = False


def _native(device: torch.device, native: bool | None) -> bool:
    """Decode e4m3 with the conversion instruction (``native``; default :data:`NATIVE_DEFAULT`, where there is
    one: CUDA, capability >= 8.9) or by bit moves."""
    if native is None:
        return NATIVE_DEFAULT and device.type == "cuda" and has_capability(8, 9, device)
    assert not native or not is_interpreting(), "the interpreter cannot convert fp8 (use native=False)"
    return native


def fp8_dequant(qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16,
                native: bool | None = None) -> Tensor:
    """Triton: qweight [N, K] e4m3 * scale [N] fp32 (any shape of N elements) -> [N, K] in ``dtype``.
    ``native``: e4m3 decode by the conversion instruction (default: where the GPU has one) or by bit moves."""
    N, K = _check_weight(qweight, scale)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    if N and K:
        BN, BK = 16, 256
        _fp8_dequant_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](qweight.view(torch.uint8), scale, out, N, K,
                                                                       NATIVE=_native(qweight.device, native),
                                                                       BN=BN, BK=BK)
    return out


def fp8_gemv(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None,
             native: bool | None = None) -> Tensor:
    """``x @ (qweight * scale[:, None]).T (+ bias)`` for a few rows (decode), weight-only.

    Args:
        x: [M, K], M <= ``GEMV_MAX_M``, fp16 / bf16 / fp32, last dim contiguous (any row stride).
        qweight: [N, K] float8_e4m3fn contiguous. scale: fp32, N elements. bias: [N] (any float dtype) or None.
        native: e4m3 decode by the conversion instruction (default: where the GPU has one) or by bit moves.
    Returns:
        [M, N] in x.dtype; fp32 accumulation, scale and bias applied before the one rounding.
    """
    from .decode_gemv import DecodeWeight, qgemv  # the decode GEMVs' kernel (it imports this module)

    N, K = _check_weight(qweight, scale)
    assert x.dim() == 2 and x.shape[1] == K and x.stride(1) == 1, f"x must be [M, {K}], got {tuple(x.shape)}"
    assert x.shape[0] <= GEMV_MAX_M, f"fp8_gemv handles at most {GEMV_MAX_M} rows, got {x.shape[0]}"
    w = DecodeWeight("fp8", qweight, scale.reshape(-1).float().contiguous(), (N, K))
    return qgemv(x, w, bias, native=native)


def fp8_linear_dequant(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Weight-only for many rows: :func:`fp8_dequant` to x.dtype (in row chunks, as the INT8/NF4 "dequant"
    path) and ``F.linear`` (cuBLAS); x [M, K] -> [M, N] in x.dtype."""
    N, K = _check_weight(qweight, scale)
    s = scale.reshape(-1)
    return _dequant_linear(x, N, K, lambda n0, n1: fp8_dequant(qweight[n0:n1], s[n0:n1], x.dtype),
                           None if bias is None else bias.to(x.dtype))


def fp8_scaled_mm(q: Tensor, sx: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None,
                  out_dtype: torch.dtype, fast_accum: bool = True) -> Tensor:
    """W8A8: ``(q * sx) @ (qweight * scale[:, None]).T + bias`` on FP8 tensor cores (``torch._scaled_mm``,
    row-wise scales, the bias in the epilogue).

    Args:
        q: [M, K] e4m3 rows, sx: [M, 1] fp32 (``quantize_rows_fp8``).
        qweight: [N, K] e4m3, scale: fp32, N elements.
        bias: [N] or None (cast to ``out_dtype`` if it differs). fast_accum: Hopper "fast accumulation".
    Returns:
        [M, N] in ``out_dtype``. On CUDA, K and N must be multiples of 16, and the GEMM's own output is bf16
        (cast to ``out_dtype`` after), as ``_scaled_mm`` requires with row-wise scales.
    """
    N, K = _check_weight(qweight, scale)
    mm_dtype = torch.bfloat16 if q.is_cuda else out_dtype
    if bias is not None and bias.dtype != mm_dtype:
        bias = bias.to(mm_dtype)
    out = torch._scaled_mm(q, qweight.t(), scale_a=sx, scale_b=scale.reshape(1, N), bias=bias,
                           out_dtype=mm_dtype, use_fast_accum=fast_accum)
    return out if out.dtype == out_dtype else out.to(out_dtype)
