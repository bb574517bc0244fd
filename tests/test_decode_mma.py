"""Decode GEMVs on the tensor cores (bagel_rt.quant.decode_mma) against their references and the fp32 product.

CPU: the Triton interpreter (fp32 / fp16 rows, odd shapes; the interpreter's dots are exact here: int8 digits
in int32, fp16 digits times fp16 codes in fp32). GPU: bf16 rows at BAGEL's decode shapes and the graph
decoder's greedy tokens with ``gemv="triton-mma"``.
"""

import math

import pytest
import torch
from bagel_rt.quant.decode_gemv import qgemv_ref, qgemv_swiglu_ref, swiglu_pair
from bagel_rt.quant.decode_mma import (
    add_rms_norm_digits,
    add_rms_norm_digits_ref,
    digit_kind,
    mma_gemv,
    mma_gemv_parts,
    mma_gemv_parts_ref,
    mma_gemv_ref,
    mma_gemv_swiglu,
    mma_gemv_swiglu_ref,
    wgmma_on,
    x_digits,
    x_digits_ref,
)
from conftest import requires_cuda, same_prefix_rel_l2
from test_decode_gemv import make_weight, one_code_per_row
from test_fast_decode import prompted, quantized_pipe, rel_l2
from test_kernels import assert_close

import bagel_rt
from bagel_rt.errors import InputError
from bagel_rt.fast_decode import GraphDecoder
from bagel_rt.tiny import write_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def rows(M: int, K: int, dtype) -> torch.Tensor:
    """Rows with a wide dynamic range: a zero row (when M > 2), an outlier, tiny values."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = torch.randn(M, K, generator=g) * torch.logspace(-6, 2, K)[torch.randperm(K, generator=g)]
    if M > 2:
        x[1] = 0
    x[0, K // 2] = 300.0
    return x.to(DEV, dtype)


def digit_values(d: torch.Tensor) -> torch.Tensor:
    """Digits as fp64 values (e4m3 digits are stored as their codes' bytes)."""
    return (d.view(torch.float8_e4m3fn).float() if d.dtype == torch.uint8 else d).double()


@pytest.mark.parametrize("kind", ["int8", "fp16", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K", [(1, 1), (1, 333), (3, 130), (4, 64)])
def test_x_digits(kind, dtype, M, K):
    """The kernel's digits and units equal the reference's bit for bit, and they reconstruct the rows: INT8 to
    below 2^-26 of each row's largest magnitude, fp16 digits exactly for fp16 rows (hi + lo for fp32), the four
    e4m3 digits to 2^-15 of it (each digit leaves at most 2^-4 of its remainder, or a value below 2^-6)."""
    x = rows(M, K, dtype)
    d, u = x_digits(x, kind)
    dr, ur = x_digits_ref(x, kind)
    assert d.dtype == {"int8": torch.int8, "fp16": torch.float16, "e4m3": torch.uint8}[kind] and d.shape == (16, K)
    assert torch.equal(u, ur) and torch.equal(d, dr)
    back = (digit_values(d) * u.double()[:, None]).reshape(4, 4, K).sum(dim=1)[:M]
    err = (back - x.double()).abs().amax(dim=1)
    amax = x.double().abs().amax(dim=1)
    if kind == "int8":
        assert (d.int().abs() <= 127).all()
        assert (err <= amax * 2.0**-26).all(), (err / amax.clamp_min(1e-300)).max()
    elif kind == "e4m3":
        assert not ((d & 0x7F) == 0x7F).any()  # no NaN codes
        assert (err <= amax * 2.0**-15).all(), (err / amax.clamp_min(1e-300)).max()
    elif dtype == torch.float16:
        assert (err == 0).all(), err.max()
    else:
        assert (err <= amax * 2.0**-21).all(), (err / amax.clamp_min(1e-300)).max()
    assert (u[4 * M:] == 0).all() and (d[4 * M:] == 0).all()  # rows past M: nothing


def tol(dtype, e4m3: bool = False):
    """Against the fp32 product; e4m3 digits (FP8 under wgmma_on) carry the rows to ~2^-16, not exactly."""
    return (1e-4 if e4m3 else 1e-5) if dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("fmt, N, K", [("int8", 37, 123), ("fp8", 5, 200), ("int8", 130, 64), ("fp8", 70, 33)])
def test_mma_gemv(fmt, N, K, M, dtype, wgmma):
    """Against its reference and against the fp32 product of the dequantized weight (the FMA kernels' ref);
    ``wgmma``: the weights-first kernels (64-channel tiles, FP8 against e4m3 digits)."""
    w, bias = make_weight(fmt, N, K, bias=True)
    x = rows(M, K, dtype)
    with wgmma_on(wgmma):
        for b in (None, bias.to(dtype)):
            got = mma_gemv(x, w, b)
            assert_close(f"{fmt} mma_gemv vs ref", mma_gemv_ref(x, w, b), got, tol(dtype))
            assert_close(f"{fmt} mma_gemv vs fp32", qgemv_ref(x, w, b), got, tol(dtype, wgmma and fmt == "fp8"))


@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("parts", [1, 3, 4])
@pytest.mark.parametrize("fmt, N, K", [("int8", 37, 300), ("fp8", 21, 200), ("int8", 40, 64)])
def test_mma_gemv_parts(fmt, N, K, parts, dtype, wgmma):
    """Split-K: each part against its reference (same column ranges, the whole row's digits), the parts'
    sum against the unsplit kernel and the fp32 product; the bias lands in part 0 only."""
    with wgmma_on(wgmma):
        _check_parts(fmt, N, K, parts, dtype, tol(dtype, wgmma and fmt == "fp8"))


def _check_parts(fmt, N, K, parts, dtype, tol_fp32):
    from bagel_rt.kernels.rms_norm import add_rms_norm_parts, add_rms_norm_parts_ref

    w, bias = make_weight(fmt, N, K, bias=True)
    x = rows(2, K, dtype)
    for b in (None, bias.to(dtype)):
        got = mma_gemv_parts(x, w, b, cfg=dict(parts=parts))
        ref = mma_gemv_parts_ref(x, w, b, cfg=dict(parts=parts))
        assert got.dtype == torch.float32 and got.shape == ref.shape and got.shape[1:] == (2, N)
        per = math.ceil(math.ceil(K / parts) / 64) * 64  # whole interpreter tiles (BK 64) per part
        assert got.shape[0] == math.ceil(K / per) <= parts, got.shape
        assert_close(f"{fmt} parts vs ref", ref, got, 1e-5)
        total = got.sum(dim=0)
        assert_close(f"{fmt} parts sum vs unsplit", mma_gemv(x.float(), w, b if b is None else b.float()), total,
                     1e-5)
        assert_close(f"{fmt} parts sum vs fp32", qgemv_ref(x.float(), w, b if b is None else b.float()), total,
                     tol_fp32)
        if b is not None:
            assert torch.equal(mma_gemv_parts(x, w, b, cfg=dict(parts=parts))[1:],
                               mma_gemv_parts(x, w, None, cfg=dict(parts=parts))[1:])
        # the residual add that consumes the parts: their sum, rounded to the residual's dtype, then the norm
        res = torch.randn(2, N, device=DEV, dtype=dtype)
        wn = torch.rand(N, device=DEV, dtype=dtype) + 0.5
        h, r = add_rms_norm_parts(got, res, wn, 1e-6)
        h_ref, r_ref = add_rms_norm_parts_ref(got, res, wn, 1e-6)
        assert torch.equal(r, r_ref)
        assert_close("add_rms_norm_parts", h_ref, h, tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, N", [(1, 77), (3, 130), (4, 64)])
@pytest.mark.parametrize("parts", [0, 3])
def test_add_rms_norm_digits(M, N, parts, dtype):
    """The residual add + RMSNorm that writes its normed rows as digits: bit for bit the unfused chain's digits,
    units and new residual (a block output or fp32 split-K parts; both digit kinds), and a tensor-core GEMV fed
    those digits gives what it gives fed the normed rows."""
    from bagel_rt.kernels import add_rms_norm, add_rms_norm_parts

    g = torch.Generator().manual_seed(M * 100 + N + parts)
    x = (torch.randn(parts, M, N, generator=g) if parts else torch.randn(M, N, generator=g).to(dtype)).to(DEV)
    res = torch.randn(M, N, generator=g).to(DEV, dtype)
    w = (torch.rand(N, generator=g) + 0.5).to(DEV, dtype)
    h = (add_rms_norm_parts(x, res, w, 1e-6) if parts else add_rms_norm(x, res, w, 1e-6))[0]
    for kind in ("int8", "fp16", "e4m3"):
        d, r = add_rms_norm_digits(x, res, w, 1e-6, kind)
        dr, rr = add_rms_norm_digits_ref(x, res, w, 1e-6, kind)
        assert torch.equal(r, rr) and d.rows == M and d.dtype == dtype
        # the Triton chain (same norm arithmetic) bit for bit; the PyTorch reference to its norm's rounding
        chain = x_digits(h, kind)
        assert torch.equal(d.digits, chain[0]) and torch.equal(d.units, chain[1]), kind
        back = [(digit_values(v.digits) * v.units.double()[:, None]).reshape(4, 4, N).sum(dim=1)[:M]
                for v in (d, dr)]
        assert_close(f"{kind} digits vs reference", back[1], back[0], tol(dtype))
    for fmt, wgmma in (("int8", False), ("fp8", False), ("fp8", True)):
        gate, _ = make_weight(fmt, 24, N, seed=1)
        up, _ = make_weight(fmt, 24, N, seed=2)
        gate, up = swiglu_pair(gate, up)
        with wgmma_on(wgmma):
            d, _ = add_rms_norm_digits(x, res, w, 1e-6, digit_kind(gate))
            assert torch.equal(mma_gemv_swiglu(d, gate, up), mma_gemv_swiglu(h, gate, up)), fmt
            assert torch.equal(mma_gemv(d, gate), mma_gemv(h, gate)), fmt


@requires_cuda
@pytest.mark.gpu
def test_add_rms_norm_digits_bf16():
    """bf16 at the decode width (3584), plain and split-K parts: the fused norm's digits are the chain's."""
    from bagel_rt.kernels import add_rms_norm, add_rms_norm_parts

    res = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(3584, device="cuda", dtype=torch.bfloat16) + 0.5
    for x in (torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16), torch.randn(4, 1, 3584, device="cuda")):
        h = (add_rms_norm_parts(x, res, w, 1e-6) if x.dim() == 3 else add_rms_norm(x, res, w, 1e-6))[0]
        for kind in ("int8", "fp16", "e4m3"):
            d, _ = add_rms_norm_digits(x, res, w, 1e-6, kind, True)
            chain = x_digits(h, kind)
            assert torch.equal(d.digits, chain[0]) and torch.equal(d.units, chain[1]), kind


@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt, N, K", [("int8", 45, 77), ("fp8", 19, 130)])
def test_mma_gemv_swiglu(fmt, N, K, dtype, wgmma):
    gate, _ = make_weight(fmt, N, K, seed=1)
    up, _ = make_weight(fmt, N, K, seed=2)
    gate, up = swiglu_pair(gate, up)
    x = rows(2, K, dtype)
    with wgmma_on(wgmma):
        got = mma_gemv_swiglu(x, gate, up)
        assert_close(f"{fmt} swiglu vs ref", mma_gemv_swiglu_ref(x, gate, up), got, tol(dtype))
    assert_close(f"{fmt} swiglu vs fp32", qgemv_swiglu_ref(x, gate, up), got, tol(dtype, wgmma and fmt == "fp8"))


@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_every_code_exact(fmt, wgmma):
    """Every code of the format alone in its row, times a ones row: each output is that code times its scale,
    rounded once — the tensor-core path sees the codes exactly (no fp16 rounding of e4m3, no int8 loss; ones are
    exact e4m3 digits)."""
    w = one_code_per_row(fmt, 96)
    x = torch.ones(1, 96, device=DEV)
    want = qgemv_ref(x, w)
    with wgmma_on(wgmma):
        assert torch.equal(mma_gemv(x, w), want)


@pytest.mark.parametrize("gemv, min_n", [("triton-mma", None), ("triton-split", None), ("triton-split", 0),
                                         ("triton", "split"), ("triton-fsplit", "fsplit"),
                                         ("triton-wgmma-split", 0)])
def test_decoder_with_mma_gemvs_matches_session(tiny_dir, gemv, min_n, monkeypatch):
    """gemv="triton-mma" / "triton-split" (o and down split-K, summed by the residual add; with every weight
    "wide" (min_n 0), gate/up and lm_head fed digits by the norms before them), and the default "triton" with
    FP8 down split-K (here every FP8 o/down: SPLIT_MIN_K 0): INT8 and FP8 weights through the tensor-core GEMVs
    give the torch backend's greedy tokens and logits (NF4 keeps its FMA kernels under the same options)."""
    import bagel_rt.quant.decode_mma as dm

    import bagel_rt.fast_decode as fd

    if min_n == "fsplit":  # every INT8 / FP8 / NF4 o and down on the split-K FMA kernels
        monkeypatch.setattr(fd, "SPLIT_MIN_K", 0)
        fsplit = []
        real_fsplit = fd.qgemv_parts
        monkeypatch.setattr(fd, "qgemv_parts", lambda x, w, *a: fsplit.append(w.fmt) or real_fsplit(x, w, *a))
        min_n = None
    if min_n == "split":
        monkeypatch.setattr(dm, "SPLIT_MIN_K", 0)
        monkeypatch.setattr(fd, "SPLIT_MIN_K", 0)
        fsplit = []
        real_fsplit = fd.qgemv_parts
        monkeypatch.setattr(fd, "qgemv_parts", lambda x, w, *a: fsplit.append(w.fmt) or real_fsplit(x, w, *a))
        split = []
        real_parts = fd.mma_gemv_parts
        monkeypatch.setattr(fd, "mma_gemv_parts", lambda x, w, *a: split.append(w.fmt) or real_parts(x, w, *a))
        min_n = None
    if min_n is not None:
        monkeypatch.setattr(dm, "MMA_MIN_N", min_n)
        fused = []
        real = fd.add_rms_norm_digits
        monkeypatch.setattr(fd, "add_rms_norm_digits", lambda *a: fused.append(a[4]) or real(*a))
    for fmt in ("int8", "fp8", "nf4"):
        pipe = quantized_pipe(tiny_dir, fmt)
        s = prompted(pipe)
        res = s.gen_text(max_length=8, record=True)
        ids, logits = GraphDecoder(pipe.model, gemv=gemv).generate(s.gen.fork(extra=8), 8, record=True)
        assert ids == res.token_ids, fmt
        assert rel_l2(logits, res.logits) < 1e-3, fmt
    if min_n is not None:  # per step: one per layer (gate/up) and one for lm_head, INT8 and FP8 runs only
        kinds = {"int8", "e4m3" if gemv == "triton-wgmma-split" else "fp16"}
        assert set(fused) == kinds and len(fused) % (pipe.model.params.llm.num_layers + 1) == 0
    if gemv == "triton":  # o and down of every layer, FP8 only
        assert set(split) == {"fp8"} and len(split) % (2 * pipe.model.params.llm.num_layers) == 0
        assert set(fsplit) == {"nf4"}  # NF4's down split on its FMA kernel by default
    if gemv == "triton-fsplit":  # o and down of every layer, INT8, FP8 and NF4
        assert set(fsplit) == {"int8", "fp8", "nf4"} and len(fsplit) % (2 * pipe.model.params.llm.num_layers) == 0


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_mma_decode_shapes_bf16(fmt, wgmma):
    """bf16 rows at BAGEL-7B's decode shapes, against the FMA kernels' reference (``wgmma``: the weights-first
    kernels, split-K too, against the fp64 reference of the same digits as well)."""
    if wgmma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma is Hopper's")
    with wgmma_on(wgmma):
        for N, K in ((4608, 3584), (3584, 3584), (3584, 18944), (40000, 3584)):
            w, _ = make_weight(fmt, N, K)
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            got = mma_gemv(x, w)
            assert_close(f"{fmt} {N}x{K}", qgemv_ref(x, w), got, 1e-2)
            if wgmma:
                assert_close(f"{fmt} {N}x{K} vs its digits", mma_gemv_ref(x, w), got, 1e-2)
                # fp32 parts: Hopper sums FP8 products with less than fp32 precision (5.1e-4 measured at 4608 x
                # 3584, H100, a0527a6), still 4x below the bf16 rounding of the unsplit output
                assert_close(f"{fmt} {N}x{K} parts", qgemv_ref(x.float(), w),
                             mma_gemv_parts(x, w).sum(dim=0), 2e-3)
        gate, _ = make_weight(fmt, 18944, 3584, seed=1)
        up, _ = make_weight(fmt, 18944, 3584, seed=2)
        gate, up = swiglu_pair(gate, up)
        x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
        assert_close(f"{fmt} gate/up", qgemv_swiglu_ref(x, gate, up), mma_gemv_swiglu(x, gate, up), 1e-2)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_mma_greedy_matches_fma_bf16(tiny_dir, fmt):
    """In bf16 with CUDA graphs: the tensor-core decoder's logits within 2e-2 of the FMA decoder's."""
    pipe = quantized_pipe(tiny_dir, fmt, torch.bfloat16, "cuda")
    s = prompted(pipe)
    runs = {g: GraphDecoder(pipe.model, num_splits=4, gemv=g).generate(s.gen.fork(extra=24), 24, record=True,
                                                                        stop_tokens=())
            for g in ("triton-fma", "triton-mma", "triton-split", "triton-fsplit", "triton-wgmma",
                      "triton-wgmma-split")}
    for g in ("triton-mma", "triton-split", "triton-fsplit", "triton-wgmma", "triton-wgmma-split"):
        assert same_prefix_rel_l2(runs[g], runs["triton-fma"]) < 2e-2, g


def test_default_gemvs_choose_by_shape():
    """"triton" (the default) puts INT8 / FP8 weights of more than MMA_MIN_N channels on the tensor cores and the
    rest on the FMA kernels; "triton-fma" / "triton-mma" force one kind; NF4 never takes the tensor cores."""
    from bagel_rt.quant.decode_mma import MMA_MIN_N

    from bagel_rt.fast_decode import _on_mma

    for fmt in ("int8", "fp8"):
        wide, _ = make_weight(fmt, MMA_MIN_N + 8, 32)
        narrow, _ = make_weight(fmt, 64, 32)
        assert _on_mma(wide, "triton") and _on_mma(wide, "cublas") and not _on_mma(narrow, "triton"), fmt
        assert _on_mma(narrow, "triton-mma") and not _on_mma(wide, "triton-fma"), fmt
    nf4, _ = make_weight("nf4", MMA_MIN_N + 8, 64)
    assert not any(_on_mma(nf4, g) for g in ("triton", "triton-mma"))


def test_default_split_by_shape():
    """"triton" splits FP8 weights of more than SPLIT_MIN_K columns (down) over K on the tensor cores; INT8 and
    NF4 keep their kernels (NF4's long rows split on its FMA kernel under every name); "triton-split" splits every
    one-byte weight it is given on the tensor cores, "triton-fsplit" the long ones of INT8 / FP8 on the FMA
    kernels too; "triton-fma" / "triton-mma" never split one-byte weights."""
    from bagel_rt.quant.decode_mma import SPLIT_MIN_K

    from bagel_rt.fast_decode import _split

    long8, _ = make_weight("fp8", 16, SPLIT_MIN_K + 64)
    short8, _ = make_weight("fp8", 16, 64)
    assert _split(long8, "triton") == _split(long8, "cublas") == "mma" and _split(short8, "triton") is None
    assert _split(long8, "triton-fma") is None and _split(long8, "triton-mma") is None
    long_int8, _ = make_weight("int8", 16, SPLIT_MIN_K + 64)
    assert _split(long_int8, "triton") is None and _split(long_int8, "triton-split") == "mma"
    assert _split(long_int8, "triton-fsplit") == _split(long8, "triton-fsplit") == "fma"
    assert _split(short8, "triton-fsplit") is None
    long_nf4, _ = make_weight("nf4", 16, SPLIT_MIN_K + 64)
    short_nf4, _ = make_weight("nf4", 16, 128)
    # NF4 has no tensor-core GEMV, but a split FMA one, its default for long rows (the down projection)
    assert all(_split(long_nf4, g) == "fma" for g in ("triton", "triton-split", "triton-fma", "triton-fsplit"))
    assert not any(_split(short_nf4, g) for g in ("triton", "triton-fsplit"))


def test_unknown_gemv_is_refused(tiny_dir):
    pipe = bagel_rt.load(tiny_dir, device=DEV, backend="torch")
    with pytest.raises(InputError, match="triton-mma"):
        GraphDecoder(pipe.model, gemv="mma")


def test_pipeline_decode_gemv_setting(tiny_dir):
    """``Bagel.decode_gemv`` rebuilds the decoder with those GEMVs; an unknown name is refused."""
    pipe = bagel_rt.load(tiny_dir, device=DEV, backend="triton")
    assert pipe.decode_gemv == "triton" and pipe.decoder.gemv == "triton"
    pipe.decode_gemv = "triton-mma"
    assert pipe.decoder.gemv == "triton-mma"
    with pytest.raises(InputError, match="gemv must be one of"):
        pipe.decode_gemv = "mma"
    assert pipe.decode_gemv == "triton-mma"
