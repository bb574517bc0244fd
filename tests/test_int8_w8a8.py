"""INT8 W8A8 compute: the per-token INT8 row quantizer and the INT8 tensor-core GEMM (int8 tl.dot, int32
accumulator, scales and bias in the epilogue) against their references, and ``Int8Linear`` with INT8 compute
enabled. The interpreter runs int8 ``tl.dot`` (int32 accumulation); bf16 and real shapes are GPU tests."""

import pytest
import torch
from bagel_rt.kernels import quantize_rows_int8, quantize_rows_int8_ref
from bagel_rt.quant import Int8Linear, enable_int8_compute, int8_w8a8_matmul, int8_w8a8_matmul_ref
from conftest import rel_l2, requires_cuda

import bagel_rt

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float(20 * torch.log10(ref.norm() / (out - ref).norm()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", [(1, 64), (5, 123), (3, 3000)])
def test_quantize_rows_int8_matches_reference(M, K, dtype):
    g = torch.Generator().manual_seed(M * K)
    x = (torch.randn(M, K, generator=g) * torch.linspace(0.01, 30, M).unsqueeze(1)).to(dtype).to(DEVICE)
    x[0, :7] = 0.5 * x[0].abs().max()  # ties of x * inv at .5 are possible; several equal values per row
    q, s = quantize_rows_int8(x)
    qr, sr = quantize_rows_int8_ref(x)
    assert q.dtype == torch.int8 and s.shape == (M, 1) and s.dtype == torch.float32
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert int(q.abs().max()) == 127  # the absmax element maps to +-127
    assert sqnr_db(q.float() * s, x.float()) > 35


def test_quantize_rows_int8_zero_row_and_strides():
    x = torch.randn(4, 256, dtype=torch.float16, device=DEVICE)[:, :100]  # row stride 256
    x[2] = 0
    q, s = quantize_rows_int8(x)
    qr, sr = quantize_rows_int8_ref(x)
    assert torch.equal(q, qr) and torch.equal(s, sr) and not q[2].any() and s[2, 0] == 1e-12


def w8a8_case(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(DEVICE)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    sx = (torch.rand(M, 1, generator=g) * 0.01 + 1e-3).to(DEVICE)
    sw = (torch.rand(N, generator=g) * 0.01 + 1e-3).to(DEVICE)
    b = torch.randn(N, generator=g).to(DEVICE)
    return q, sx, w, sw, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 48, 64), (37, 100, 192), (70, 48, 129)])
def test_int8_w8a8_matmul_matches_reference(M, N, K, out_dtype, bias):
    q, sx, w, sw, b = w8a8_case(M, N, K, seed=M + N + K)
    b = b.to(torch.bfloat16 if CUDA else torch.float16) if bias else None
    out = int8_w8a8_matmul(q, sx, w, sw, b, out_dtype)
    ref = int8_w8a8_matmul_ref(q, sx, w, sw, b, out_dtype)
    assert out.shape == (M, N) and out.dtype == out_dtype
    # the int32 products are exact; only the fp32 epilogue (and the output rounding) can differ
    assert rel_l2(out, ref) < (1e-6 if out_dtype == torch.float32 else 4e-3)


def test_int8_w8a8_strided_rows():
    q, sx, w, sw, b = w8a8_case(9, 40, 128, seed=7)
    qs = torch.cat([q, q], dim=1)[:, :128]  # row stride 256
    assert torch.equal(int8_w8a8_matmul(qs, sx, w, sw, b, torch.float32),
                       int8_w8a8_matmul(q.contiguous(), sx, w, sw, b, torch.float32))


def test_int8_linear_w8a8():
    lin = torch.nn.Linear(128, 48).to(DEVICE)
    model = torch.nn.Sequential(Int8Linear.from_linear(lin), torch.nn.Identity())
    mod = model[0]
    x = torch.randn(2, 19, 128, device=DEVICE)
    weight_only = mod(x)
    x_few = x[:1, :3]
    few = mod(x_few)
    assert mod.act_format is None
    assert enable_int8_compute(model) == 1 and mod.act_format == "int8"
    mod.use_kernel = False
    ref = mod(x)
    mod.use_kernel = True
    out = mod(x)
    assert out.shape == (2, 19, 48) and rel_l2(out, ref) < 1e-6
    assert not torch.equal(out, weight_only) and sqnr_db(out, lin(x)) > 30  # activations rounded to int8 too
    xq = quantize_rows_int8(x.reshape(-1, 128))
    assert torch.equal(mod.forward_quantized(xq, x.dtype), out.reshape(-1, 48))
    mod.use_kernel = None
    assert torch.equal(mod(x_few), few)  # decode rows keep the weight-only GEMV
    enable_int8_compute(model, False)
    assert mod.act_format is None and torch.equal(mod(x), weight_only)


def test_int8_compute_on_the_tiny_model(tiny):
    """End to end on the torch backend (the modules' own forwards): W8A8 stays close to the weight-only INT8."""
    d = tiny
    gen = dict(image_shapes=(96, 96), num_timesteps=3, seed=0)  # 36 latent rows: W8A8 runs above 16 rows
    bf16 = bagel_rt.load(d, device="cpu", backend="torch").generate("a red bagel", **gen).latents
    pipe = bagel_rt.load(d, device="cpu", backend="torch", weights="int8")
    w8a16 = pipe.generate("a red bagel", **gen).latents
    assert enable_int8_compute(pipe.model) > 0
    w8a8 = pipe.generate("a red bagel", **gen).latents
    gap, gap_wo = rel_l2(w8a8, bf16), rel_l2(w8a16, bf16)
    print(f"int8 W8A8 latents rel. L2 vs bf16 {gap:.4f} (weight-only int8 {gap_wo:.4f}; tiny random weights)")
    assert 0 < rel_l2(w8a8, w8a16) and gap < 0.1


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("M,N,K", [(300, 512, 3584), (8196, 3584, 3584)])
def test_int8_w8a8_real_shapes_bf16(M, N, K):
    q, sx, w, sw, b = w8a8_case(M, N, K, seed=3)
    b = b.bfloat16()
    out = int8_w8a8_matmul(q, sx, w, sw, b, torch.bfloat16)
    ref = int8_w8a8_matmul_ref(q, sx, w, sw, b, torch.bfloat16)
    assert rel_l2(out, ref) < 4e-3
    # and the int32 accumulation agrees with cuBLAS's int8 GEMM (torch._int_mm)
    acc = torch._int_mm(q, w.t())
    assert rel_l2(out.float(), (acc.float() * sx * sw + b.float())) < 4e-3
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(quantize_rows_int8(x)[0], quantize_rows_int8_ref(x)[0])
