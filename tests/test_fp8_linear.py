"""FP8 weight format (quant.fp8): the e4m3 decode, the FP8 GEMV / dequant kernels against their references, the
``FP8Linear`` module (codes, state_dict, every forward path) and ``quantize_model(..., "fp8")``.

On a CPU-only machine the kernels run in the Triton interpreter (fp16/fp32); the GPU tests add bf16, the W8A8
path on FP8 tensor cores and the dispatch of ``FP8Linear.forward`` on CUDA.
"""

import pytest
import torch
from bagel_rt.kernels import quantize_rows_fp8_ref
from bagel_rt.quant import FP8Linear, fp8, load_fp8, quantize_model
from bagel_rt.quant.fp8_matmul import (
    fp8_dequant,
    fp8_dequant_ref,
    fp8_gemv,
    fp8_gemv_ref,
    fp8_linear_dequant,
    fp8_scaled_mm,
    fp8_scaled_mm_ref,
)
from conftest import rel_l2, requires_cuda

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # rel. L2 vs the fp32 reference


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float(20 * torch.log10(ref.norm() / (out - ref).norm()))


def fp8_case(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = fp8.quantize(w.to(DEVICE))
    return q.qweight, q.scale


def test_e4m3_decode_every_code():
    """The kernels' integer decode of e4m3 bit patterns equals PyTorch's cast for all 254 non-NaN codes."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128).to(DEVICE)
    ref = codes.float()
    ones = torch.ones(2, dtype=torch.float32, device=DEVICE)
    for dtype in DTYPES:
        out = fp8_dequant(codes, ones, dtype).float()
        finite = ~torch.isnan(ref)
        assert finite.sum() == 254
        assert torch.equal(out[finite], ref[finite].to(dtype).float()), dtype


SHAPES = [(48, 64), (100, 192), (37, 129), (8, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", SHAPES)
def test_fp8_dequant_matches_reference(N, K, dtype):
    q, s = fp8_case(N, K, seed=N + K)
    assert torch.equal(fp8_dequant(q, s, dtype), fp8_dequant_ref(q, s, dtype))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
def test_fp8_gemv_matches_reference(M, N, K, dtype, bias):
    q, s = fp8_case(N, K, seed=M)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    out = fp8_gemv(x, q, s, b)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_l2(out, fp8_gemv_ref(x, q, s, b)) < TOL[dtype]


def test_fp8_gemv_strided_rows_and_row_limit():
    q, s = fp8_case(40, 64)
    x_full = torch.randn(2, 128, dtype=torch.float16, device=DEVICE)
    x = x_full[:, :64]  # row stride 128
    assert rel_l2(fp8_gemv(x, q, s), fp8_gemv_ref(x, q, s)) < TOL[torch.float16]
    with pytest.raises(AssertionError, match="at most 4 rows"):
        fp8_gemv(torch.randn(5, 64, dtype=torch.float16, device=DEVICE), q, s)


def test_fp8_linear_dequant_chunks(monkeypatch):
    from bagel_rt.quant import matmul

    monkeypatch.setattr(matmul, "DEQUANT_CHUNK", 64 * 10)  # rows of 10 channels at a time
    q, s = fp8_case(48, 64, seed=3)
    x = torch.randn(9, 64, dtype=torch.float32, device=DEVICE)
    b = torch.randn(48, device=DEVICE)
    assert rel_l2(fp8_linear_dequant(x, q, s, b), fp8_gemv_ref(x, q, s, b)) < TOL[torch.float32]


def test_scaled_mm_matches_reference():
    """The W8A8 GEMM (``torch._scaled_mm``, which also runs on the CPU) against its fp32 reference."""
    q, s = fp8_case(48, 64, seed=4)
    x = torch.randn(37, 64, device=DEVICE)
    b = torch.randn(48, device=DEVICE).to(torch.bfloat16)
    xq = quantize_rows_fp8_ref(x)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = fp8_scaled_mm(*xq, q, s, b, out_dtype)
        ref = fp8_scaled_mm_ref(*xq, q, s, b, out_dtype)
        assert out.dtype == out_dtype and out.shape == (37, 48)
        # on CUDA the row-scaled GEMM itself outputs bf16 (cast to fp32 after)
        assert rel_l2(out, ref) < (1e-5 if out_dtype == torch.float32 and not CUDA else 8e-3)


# ----------------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------------


def test_fp8_linear_codes_state_dict_and_round_trip():
    lin = torch.nn.Linear(96, 40).to(torch.bfloat16)
    mod = FP8Linear.from_linear(lin)
    q, scale = quantize_rows_fp8_ref(lin.weight.detach())  # the activations' row quantizer
    assert torch.equal(mod.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(mod.weight_scale, scale)
    sd = mod.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "weight": (torch.float8_e4m3fn, (40, 96)), "weight_scale": (torch.float32, (40, 1)),
        "bias": (torch.bfloat16, (40,))}
    again = FP8Linear(96, 40)
    again.load_state_dict(sd)
    assert torch.equal(again.weight.view(torch.uint8), mod.weight.view(torch.uint8))
    assert torch.equal(again.weight_scale, mod.weight_scale) and torch.equal(again.bias, mod.bias)
    # the reference forward is close to the bf16 Linear: e4m3 keeps 3 mantissa bits (~30 dB)
    x = torch.randn(5, 96)
    assert sqnr_db(mod(x.bfloat16()).float(), lin.float()(x)) > 25


def test_load_fp8_names_the_bad_tensor():
    good = fp8.fp8_state("m", torch.randn(8, 16))
    assert load_fp8("m", good).shape == (8, 16)
    with pytest.raises(ValueError, match="'m.weight' must be float8_e4m3fn"):
        load_fp8("m", {**good, "m.weight": torch.zeros(8, 16, dtype=torch.int8)})
    with pytest.raises(ValueError, match=r"'m.weight_scale' must be float32 \[8, 1\]"):
        load_fp8("m", {**good, "m.weight_scale": torch.ones(8)})
    with pytest.raises(ValueError, match="missing tensor 'm.weight_scale'"):
        load_fp8("m", {"m.weight": good["m.weight"]})


@pytest.mark.parametrize("rows", [2, 37])
def test_fp8_linear_kernel_paths_match_reference(rows):
    """Forced kernels on this device: the GEMV for a few rows, W8A8 (forced on) or the dequant path otherwise."""
    lin = torch.nn.Linear(128, 48).to(DEVICE)
    mod = FP8Linear.from_linear(lin)
    x = torch.randn(rows, 128, device=DEVICE).reshape(1, rows, 128)
    mod.use_kernel = False
    ref = mod(x)
    mod.use_kernel = True
    mod.w8a8 = False
    out = mod(x)
    assert out.shape == (1, rows, 48) and out.dtype == x.dtype
    assert rel_l2(out, ref) < TOL[torch.float32] * 10
    mod.w8a8 = True  # activations quantized per token too: a second e4m3 rounding
    assert mod.act_format == "fp8"
    w8a8 = mod(x)
    assert rel_l2(w8a8, ref) < (TOL[torch.float32] * 10 if rows <= 4 else 0.06)
    if rows > 4:
        xq = fp8.quantize_rows(x.reshape(rows, 128))
        assert torch.equal(w8a8.reshape(rows, 48), mod.forward_quantized(xq, x.dtype))


def test_act_format_auto():
    mod = FP8Linear(64, 32)
    assert mod.act_format is None  # CPU: weight-only
    assert FP8Linear(60, 32).act_format is None  # never W8A8 where _scaled_mm cannot take the shape
    mod.w8a8 = True
    assert mod.act_format == "fp8"


def test_quantize_model_fp8_swaps_linears():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16, bias=False))
    x = torch.randn(3, 32)
    ref = model(x)
    quantize_model(model, "fp8", filter_fn=lambda m, name: name != "2")
    assert isinstance(model[0], FP8Linear) and type(model[2]) is torch.nn.Linear
    assert model[0].bias is not None and sqnr_db(model(x), ref) > 25
    assert set(model.state_dict()) == {"0.weight", "0.weight_scale", "0.bias", "2.weight"}


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16, and FP8Linear's own dispatch on CUDA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 4, 5, 300])
def test_fp8_linear_cuda_dispatch(rows, dtype):
    from bagel_rt.kernels._device import has_capability

    lin = torch.nn.Linear(3584, 512).cuda().to(dtype)
    mod = FP8Linear.from_linear(lin)
    x = torch.randn(rows, 3584, device="cuda", dtype=dtype)
    mod.use_kernel = False
    ref = mod(x)
    mod.use_kernel = None
    out = mod(x)
    w8a8 = rows > 4 and has_capability(8, 9)
    assert mod.act_format == ("fp8" if has_capability(8, 9) else None)
    assert rel_l2(out, ref) < (0.06 if w8a8 else 8e-3)
    assert sqnr_db(out.float(), lin(x).float()) > (25 if w8a8 else 28)
    # the codes are those of the activations' Triton row quantizer too (bit-identical to the reference)
    q, _ = quantize_rows_fp8_ref(lin.weight.detach())
    assert torch.equal(mod.weight.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.gpu
@requires_cuda
def test_fp8_gemv_bf16_real_shape():
    q, s = fp8_case(3584, 18944, seed=5)
    x = torch.randn(1, 18944, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3584, device="cuda", dtype=torch.bfloat16)
    assert rel_l2(fp8_gemv(x, q, s, b), fp8_gemv_ref(x, q, s, b)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@requires_cuda
def test_native_and_bit_decodes_agree():
    """The conversion instruction (sm_89+) and the integer bit decode give the same bits, in both kernels."""
    from bagel_rt.kernels._device import has_capability

    if not has_capability(8, 9):
        pytest.skip("no fp8 conversion instruction before compute capability 8.9")
    q, s = fp8_case(3584, 3584, seed=6)
    x = torch.randn(2, 3584, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(fp8_gemv(x, q, s, native=True), fp8_gemv(x, q, s, native=False))
    assert torch.equal(fp8_dequant(q, s, native=True), fp8_dequant(q, s, native=False))
