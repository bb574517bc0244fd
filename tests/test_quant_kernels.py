"""Triton kernels of bagel_rt.quant against their references: W8A16 / W4A16-NF4 matmuls and the DFloat11 decoder.

On a CPU-only machine the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), in fp16/fp32;
on a GPU bf16 is tested too.
"""

import numpy as np
import pytest
import torch
from bagel_rt.quant import (
    DF11Linear,
    Int8Linear,
    NF4Linear,
    compress_units,
    df11_decode,
    df11_decode_ref,
    df11_first_level,
    df11_window_counts,
    int8,
    int8_matmul,
    int8_matmul_ref,
    matmul,
    nf4,
    nf4_matmul,
    nf4_matmul_ref,
)
from bagel_rt.quant.exp4 import exp4_decode, exp4_decode_ref, exp4_encode
from bagel_rt.quant.matmul import int8_dequant, nf4_dequant, nf4_dequant_ref
from test_quant import assert_bits_equal, bf16_from_fields, fibonacci_counts, skewed_bf16

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2 error vs the fp32 reference


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def make_case(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(N, K, generator=g) * 0.05
    return x, w


SHAPES = [(M, N, K) for M in (1, 3, 37) for N, K in ((48, 64), (100, 192))]


@pytest.mark.parametrize("mode", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_matmul(M, N, K, dtype, mode):
    x, w = make_case(M, N, K, dtype)
    q = int8.quantize(w.to(DEVICE))
    out = int8_matmul(x, q.qweight, q.scale, mode=mode)
    ref = int8_matmul_ref(x, q.qweight, q.scale)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("mode", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_nf4_matmul(M, N, K, dtype, mode):
    x, w = make_case(M, N, K, dtype, seed=1)
    q = nf4.quantize(w.to(DEVICE))
    out = nf4_matmul(x, q.packed, q.absmax, 64, (N, K), mode=mode)
    ref = nf4_matmul_ref(x, q.packed, q.absmax, 64, (N, K))
    assert out.shape == (M, N) and out.dtype == dtype
    # the GEMM rounds the dequantized weights to the activation dtype before tl.dot
    assert rel_err(out, ref) < TOL[dtype] * (1 if mode == "gemv" else 2)


def test_matmuls_accept_strided_rows_and_reject_bad_k(monkeypatch):
    monkeypatch.setattr(matmul, "DEQUANT_CHUNK", 64 * 10)  # the "dequant" path in chunks of 10 rows
    x_full, w = make_case(5, 48, 128, torch.float16, seed=2)
    x = x_full[:, :64]  # row stride 128
    w = w[:, :64].contiguous()
    qi, qn = int8.quantize(w.to(DEVICE)), nf4.quantize(w.to(DEVICE))
    for mode in ("gemv", "gemm", "dequant"):
        assert rel_err(int8_matmul(x, qi.qweight, qi.scale, mode=mode),
                       int8_matmul_ref(x, qi.qweight, qi.scale)) < TOL[torch.float16]
        assert rel_err(nf4_matmul(x, qn.packed, qn.absmax, 64, (48, 64), mode=mode),
                       nf4_matmul_ref(x, qn.packed, qn.absmax, 64, (48, 64))) < 2 * TOL[torch.float16]
    q96 = nf4.quantize(torch.randn(8, 96, device=DEVICE))
    with pytest.raises(AssertionError, match="multiple of the NF4 blocksize"):
        nf4_matmul(torch.randn(1, 96, device=DEVICE), q96.packed, q96.absmax, 64, (8, 96))


@pytest.mark.parametrize("M", [1, 5, 20])
def test_matmuls_with_bias_and_several_absmax_per_k_step(M):
    """The bias rides in each path's epilogue; K = 256 lets the few-rows NF4 GEMM take two quantization blocks
    per K step (BK 128 > blocksize 64); N = 40 leaves a partial column tile."""
    x, w = make_case(M, 40, 256, torch.float16, seed=4)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    qi, qn = int8.quantize(w.to(DEVICE)), nf4.quantize(w.to(DEVICE))
    ref_i = int8_matmul_ref(x, qi.qweight, qi.scale, bias)
    ref_n = nf4_matmul_ref(x, qn.packed, qn.absmax, 64, (40, 256), bias=bias)
    assert rel_err(ref_i, int8_matmul_ref(x, qi.qweight, qi.scale)) > 1e-2  # the bias shows
    for mode in ("gemv", "gemm", "dequant"):
        assert rel_err(int8_matmul(x, qi.qweight, qi.scale, bias, mode=mode), ref_i) < TOL[torch.float16]
        assert rel_err(nf4_matmul(x, qn.packed, qn.absmax, 64, (40, 256), bias=bias, mode=mode),
                       ref_n) < 2 * TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_kernels(dtype):
    w = torch.randn(40, 192, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    qi, qn = int8.quantize(w), nf4.quantize(w)
    ref_i = qi.qweight.float() * qi.scale[:, None]
    torch.testing.assert_close(int8_dequant(qi.qweight, qi.scale, dtype), ref_i.to(dtype), rtol=0, atol=0)
    ref_n = nf4_dequant_ref(qn.packed, qn.absmax, 64, (40, 192))
    torch.testing.assert_close(nf4_dequant(qn.packed, qn.absmax, 64, (40, 192), dtype=dtype), ref_n.to(dtype),
                               rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Int8Linear, NF4Linear, DF11Linear])
def test_linear_modules_kernel_path_matches_reference(cls):
    lin = torch.nn.Linear(128, 40).to(DEVICE)
    mod = cls.from_linear(lin)
    x = torch.randn(2, 3, 128, device=DEVICE, dtype=torch.float16 if cls is not DF11Linear else torch.float32)
    mod.use_kernel = False
    ref = mod(x)
    mod.use_kernel = True
    out = mod(x)
    assert out.shape == (2, 3, 40) and out.dtype == x.dtype
    assert rel_err(out, ref) < 2 * TOL[x.dtype]


# ----------------------------------------------------------------------------------------------------------------
# DFloat11 decoder
# ----------------------------------------------------------------------------------------------------------------


def decode_both(buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's decode and the reference's; the kernel also with the window counts computed once (the
    resident store's way), which must give the same bits."""
    n = buffers["sign_mantissa"].numel()
    ref = df11_decode_ref(buffers, torch.empty(n, dtype=torch.bfloat16))
    dev = {k: v.to(DEVICE) for k, v in buffers.items()}
    out = df11_decode(dev, torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEVICE))
    counts = df11_window_counts(dev)
    assert counts.dtype == torch.uint8 and int(counts.sum()) >= n  # every code starts in some window
    counted = df11_decode({**dev, "window_counts": counts}, torch.full((n,), 7.0, dtype=torch.bfloat16,
                                                                         device=DEVICE))
    assert torch.equal(counted.view(torch.int16), out.view(torch.int16))
    # the first level joined with the code lengths (the resident store's way too): the same bits
    first = df11_first_level(dev)
    short = dev["luts"][0].to(torch.int32) < 240
    assert first.dtype == torch.int32 and torch.equal(first[short] & 0xFF, dev["luts"][0][short].to(torch.int32))
    assert bool((first[short] >> 8 >= 1).all()) and bool((first[~short] < 256).all())
    for extra in ({"first_level": first}, {"first_level": first, "window_counts": counts}):
        for wide in (False, True):  # the four-element reads and writes too (the unit's last group partial)
            fresh = torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEVICE)
            joined = df11_decode({**dev, **extra}, fresh, wide)
            assert torch.equal(joined.view(torch.int16), out.view(torch.int16))
    # wide, into an output that is not 8-byte aligned (it falls back to element accesses)
    shifted = torch.full((n + 1,), 7.0, dtype=torch.bfloat16, device=DEVICE)[1:]
    assert torch.equal(df11_decode(dev, shifted, True).view(torch.int16), out.view(torch.int16))
    return out.cpu(), ref


def test_df11_kernel_skewed_multi_block():
    w = skewed_bf16(60_000, seed=7)
    b = compress_units(w.reshape(300, 200))
    assert b["output_positions"].numel() // 4 - 1 >= 5 and b["luts"][-1].max() > 8
    out, ref = decode_both(b)
    assert_bits_equal(out, w)
    assert_bits_equal(ref, w)


def test_df11_kernel_three_weights_long_codes():
    counts, symbols = fibonacci_counts()
    w = bf16_from_fields(np.random.default_rng(1).choice(symbols, 12_000), seed=1)
    parts = [w[:4_000].reshape(40, 100), w[4_000:4_500], w[4_500:].reshape(3, 2500)]
    b = compress_units(parts, counts=counts)
    assert b["luts"][-1].max() == 32 and b["split_positions"].tolist() == [4_000, 4_500]
    out, _ = decode_both(b)
    for o, p in zip(torch.tensor_split(out, b["split_positions"]), parts):
        assert_bits_equal(o.view(p.shape), p)


def test_df11_kernel_same_exponent_and_tiny():
    g = torch.Generator().manual_seed(0)
    w = ((1 + 0.9 * torch.rand(9_000, generator=g)) * torch.randn(9_000, generator=g).sign()).to(torch.bfloat16)
    out, _ = decode_both(compress_units(w))
    assert_bits_equal(out, w)
    for n in (1, 5, 33):
        w = skewed_bf16(64, seed=n)[:n]
        out, _ = decode_both(compress_units(w))
        assert_bits_equal(out, w)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_df11_kernel_large_unit_gpu():
    w = (torch.randn(4096, 4096) * 0.02).to(torch.bfloat16)
    b = {k: v.cuda() for k, v in compress_units(w).items()}
    out = df11_decode(b, torch.empty(w.numel(), dtype=torch.bfloat16, device="cuda"))
    assert_bits_equal(out.cpu().view(w.shape), w)
    b["window_counts"] = df11_window_counts(b)
    out = df11_decode(b, torch.empty(w.numel(), dtype=torch.bfloat16, device="cuda"))
    assert_bits_equal(out.cpu().view(w.shape), w)


# ----------------------------------------------------------------------------------------------------------------
# Exp4 (the resident form of DF11 units: 4-bit exponent codes + escapes)
# ----------------------------------------------------------------------------------------------------------------


def exp4_round_trip(w: torch.Tensor, sign_mantissa: torch.Tensor | None = None) -> dict:
    """Encode ``w`` (bf16), decode with the kernel and the reference: both must give its bits back."""
    b = exp4_encode(w.to(DEVICE), None if sign_mantissa is None else sign_mantissa.to(DEVICE))
    n = w.numel()
    assert b["exp_codes"].numel() == (n + 1) // 2 and b["sign_mantissa"].numel() == n
    ref = exp4_decode_ref({k: v.cpu() for k, v in b.items()}, torch.empty(n, dtype=torch.bfloat16))
    out = exp4_decode(b, torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEVICE))
    assert_bits_equal(ref, w.reshape(-1))
    assert_bits_equal(out.cpu(), w.reshape(-1))
    return b


@pytest.mark.parametrize("n", [1, 2, 3, 255, 256, 257, 1023, 5001])
def test_exp4_kernel_odd_sizes(n):
    g = torch.Generator().manual_seed(n)
    exp4_round_trip((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16))


def test_exp4_escapes_and_special_values():
    """Zeros, subnormals, huge values, infinities, NaNs, negative zero: escapes or not, every bit comes back;
    a unit of one exponent has no escapes; DF11's sign + mantissa bytes are reused as they are."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3000, generator=g) * 0.02).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-39, 3e38, float("inf"), -float("inf"), float("nan"), 1.0, -2.0])
    w[::300] = special.to(torch.bfloat16)
    b = exp4_round_trip(w)
    assert 10 <= b["escape_index"].numel() < 300  # the specials (and the far tails) escape, the bulk does not
    same = ((1 + torch.rand(999, generator=g)) * torch.randn(999, generator=g).sign()).to(torch.bfloat16)
    assert exp4_round_trip(same)["escape_index"].numel() == 0
    bits = w.view(torch.int16).to(torch.int32)
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)
    sm = sm.to(DEVICE)
    assert exp4_round_trip(w, sm)["sign_mantissa"] is sm


def test_exp4_from_a_df11_unit_and_size():
    """The DF11 unit's weights transcoded: bits identical, 12 bits per weight plus the escapes."""
    w = skewed_bf16(60_000, seed=5)
    b = compress_units(w.reshape(300, 200))
    e = exp4_round_trip(w, b["sign_mantissa"])
    size = sum(t.numel() * t.element_size() for t in e.values())
    assert size <= 1.5 * w.numel() + 10 * e["escape_index"].numel() + 16


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_exp4_kernel_large_unit_gpu():
    w = (torch.randn(4096, 4099) * 0.02).to(torch.bfloat16)
    w.view(-1)[::7919] = 0.0
    exp4_round_trip(w)
