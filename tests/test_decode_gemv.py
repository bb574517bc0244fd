"""Compressed-weight decode GEMVs (bagel_rt.quant.decode_gemv) against their references.

CPU: the Triton interpreter, fp32 / fp16 activations, odd shapes. GPU (when there is one): the same tests on the
device, plus bf16 at BAGEL's decode shapes. The exact-decode test puts one non-zero code per weight row, so each
output is that code's fp32 value times its scale, rounded once, on both sides: it compares bit for bit.
"""

import math
import struct
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
import triton
import triton.language as tl
from bagel_rt.quant import FP8Linear, Int8Linear, NF4Linear, decode_gemv
from bagel_rt.quant.decode_gemv import (
    DecodeWeight,
    _qgemv,
    _qgemv_swiglu,
    concat,
    decode_weight,
    dequantize_ref,
    fp8_hfma_on,
    int8_hfma_on,
    nf4_hfma_on,
    nf4_planes,
    nf4_prmt_on,
    qgemv,
    qgemv_parts,
    qgemv_parts_ref,
    qgemv_ref,
    qgemv_swiglu,
    qgemv_swiglu_ref,
    settings,
    swiglu_pair,
)
from bagel_rt.quant.fp8_matmul import FP8
from bagel_rt.quant.nf4 import NF4_CODE
from conftest import requires_cuda
from test_kernels import assert_close
from torch import nn

HFMA_ON = {"fp8": fp8_hfma_on, "int8": int8_hfma_on}  # the packed-product switch of each one-byte format
#: the NF4 decodes with fp32 products, as kernel options over any settings (the default: packed bf16 products)
NF4_FP32_DECODES = {"per-code": dict(wordwise=False, hfma=False), "word-wise": dict(wordwise=True, hfma=False)}

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("int8", "fp8", "nf4")


def make_weight(fmt: str, N: int, K: int, blocksize: int = 32, bias: bool = False, seed: int = 0):
    """A DecodeWeight (through the format's Linear module, as the decoder builds it) and the module's bias."""
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias).to(DEV)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[0, :3] *= 20  # an outlier channel
    mod = {"int8": Int8Linear.from_linear, "fp8": FP8Linear.from_linear,
           "nf4": lambda m: NF4Linear.from_linear(m, blocksize)}[fmt](lin)
    w = decode_weight(mod)
    assert w is not None and w.fmt == fmt and w.shape == (N, K)
    return w, (mod.bias if bias else None)


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("fmt, N, K", [("int8", 37, 123), ("fp8", 5, 200), ("int8", 130, 64),
                                       ("nf4", 37, 96), ("nf4", 9, 320), ("fp8", 70, 33)])
def test_qgemv(fmt, N, K, M, dtype):
    w, bias = make_weight(fmt, N, K, bias=True)
    x = torch.randn(M, K, device=DEV).to(dtype)
    for b in (None, bias.to(dtype)):
        assert_close(f"{fmt} qgemv", qgemv_ref(x, w, b), qgemv(x, w, b), tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt, N, K", [("int8", 45, 77), ("fp8", 19, 130), ("nf4", 23, 160)])
def test_qgemv_swiglu(fmt, N, K, dtype):
    gate, _ = make_weight(fmt, N, K, seed=1)
    up, _ = make_weight(fmt, N, K, seed=2)
    gate, up = swiglu_pair(gate, up)
    x = torch.randn(2, K, device=DEV).to(dtype)
    ref = qgemv_swiglu_ref(x, gate, up)
    assert_close(f"{fmt} qgemv_swiglu", ref, qgemv_swiglu(x, gate, up), tol(dtype))
    # the rounding of the unfused chain: each projection in x.dtype, then the SwiGLU
    g, u = qgemv_ref(x, gate).float(), qgemv_ref(x, up).float()
    chain = (g * torch.sigmoid(g) * u).to(dtype)
    assert_close("swiglu chain", chain, ref, 1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K, blocksize", [(37, 96, 32), (9, 320, 64), (16, 64, 64)])
@pytest.mark.parametrize("decode", ["wordwise", "per-code", "prmt", "hfma"])
def test_nf4_decodes(N, K, blocksize, dtype, decode):
    """The NF4 decodes — word-wise (the 8 codes of a word as an in-thread dimension; the fp32 products'
    settings), the per-code loop and the byte permutes (inline PTX on a GPU, with the codes rounded to fp16; in
    the interpreter the per-code gather; "hfma", the default, takes them for fp32 / fp16 x, see
    test_nf4_hfma_bf16) — against the fp32 product, in the GEMV and in gate/up + SwiGLU, with a bias and three
    rows; and the decoder's switches pick each decode's settings."""
    w, bias = make_weight("nf4", N, K, blocksize=blocksize, bias=True)
    opts = dict(wordwise=decode == "wordwise", prmt=decode == "prmt", hfma=decode == "hfma")
    # the reference of the byte permutes on a GPU: the same product with the fp16 codes they read
    fp16_codes = decode in ("prmt", "hfma") and DEV == "cuda"
    ref_of = (lambda v: replace(v, table=v.table.half().float())) if fp16_codes else (lambda v: v)  # noqa: E731
    x = torch.randn(3, K, device=DEV).to(dtype)
    for b in (None, bias.to(dtype)):
        got = _qgemv(x, w, b, False, dict(settings("gemv", w), **opts))
        assert_close(f"nf4 {decode}", qgemv_ref(x, ref_of(w), b), got, tol(dtype))
    gate, _ = make_weight("nf4", N, K, blocksize=blocksize, seed=1)
    up, _ = make_weight("nf4", N, K, blocksize=blocksize, seed=2)
    gate, up = swiglu_pair(gate, up)
    got = _qgemv_swiglu(x, gate, up, False, dict(settings("swiglu", gate), **opts))
    assert_close(f"nf4 {decode} swiglu", qgemv_swiglu_ref(x, ref_of(gate), ref_of(up)), got, tol(dtype))
    assert settings("gemv", w)["hfma"] and settings("swiglu", gate)["hfma"]  # the default: packed products
    with nf4_hfma_on(False):  # the decoder's A/B switches ("triton-fp32", "triton-prmt")
        assert settings("gemv", w)["wordwise"] and settings("swiglu", gate)["wordwise"]
        assert "prmt" not in settings("gemv", w) and "hfma" not in settings("gemv", w)
        with nf4_prmt_on():
            assert settings("gemv", w)["prmt"] and settings("swiglu", gate)["prmt"]
    assert settings("gemv", w)["hfma"]


def test_nf4_planes():
    """A decode weight keeps the exact NF4 table (64-byte aligned) and, as its planes, the low and high bytes of
    the codes rounded to fp16, then to bf16, four codes per little-endian word; gate/up and q/k/v share them."""
    w, _ = make_weight("nf4", 8, 64)
    exact = torch.tensor(NF4_CODE, dtype=torch.float32)
    assert torch.equal(w.table.cpu(), exact) and w.table.data_ptr() % 64 == 0
    planes = w.planes.cpu().view(torch.uint8).to(torch.int32)
    for i, dt in enumerate((torch.float16, torch.bfloat16)):
        bits = exact.to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
        assert torch.equal(planes[32 * i:32 * (i + 1)], torch.cat([bits & 0xFF, bits >> 8]))
    gate, up = swiglu_pair(w, make_weight("nf4", 8, 64, seed=1)[0])
    assert up.planes is gate.planes and up.table is gate.table
    assert concat([w, gate]).planes is w.planes


# a bit-exact emulation of the PTX subset of decode_gemv._NF4_PRMT_ASM, run on its own text (CPU CI checks the
# assembly's logic; the GPU tests above run it)
def _prmt(a: int, b: int, c: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for j in range(4):
        sel = (c >> 4 * j) & 0xF
        byte = src[sel & 7]
        if sel & 8:  # sign-replicate mode: the selected byte's top bit in all 8 bits
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * j
    return out


def _bf16(bits: int) -> float:
    """The value of the bf16 in the low 16 bits (exactly, as a double)."""
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _bf16_bits(v: float) -> int:
    """v (a double, finite, the exact sum of a bf16 product and a bf16 here) rounded once to the nearest bf16,
    ties to even: its bits."""
    if v == 0:
        return 0x8000 if math.copysign(1.0, v) < 0 else 0
    m, e = math.frexp(abs(v))  # |v| = m * 2^e, m in [0.5, 1)
    assert -125 <= e <= 128, v  # normal bf16 range (the test's values lie well inside it)
    q = Fraction(m) * 256  # 8 significant bits
    r = round(q)  # Python rounds halves to even
    if r == 256:
        r, e = 128, e + 1
    f32 = struct.unpack("<I", struct.pack("<f", math.copysign(r / 256 * 2.0 ** e, v)))[0]
    return f32 >> 16


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
               for i in range(32))


def _run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    regs = dict(operands)
    val = lambda t: int(t, 0) if t[0].isdigit() else regs[t]  # noqa: E731
    for line in asm.split(";"):
        line = line.strip(" \n{}")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [t.strip() for t in rest.replace("{", "").replace("}", "").split(",")]
        if op == "mov.b32" and rest.startswith("{"):  # {lo, hi} <- a 32-bit register
            regs[args[0]], regs[args[1]] = regs[args[2]] & 0xFFFF, regs[args[2]] >> 16
        elif op == "mov.b64" and rest.startswith("{"):  # {lo, hi} <- a 64-bit register
            regs[args[0]], regs[args[1]] = regs[args[2]] & 0xFFFFFFFF, regs[args[2]] >> 32
        elif op == "mov.b64" and args[1] in regs and len(args) == 3:  # a 64-bit register <- {lo, hi}
            regs[args[0]] = regs[args[1]] | (regs[args[2]] << 32)
        elif op == "cvt.rn.f16x2.e4m3x2":  # two e4m3 bytes -> two f16 (exact), the upper byte to the upper half
            b = val(args[1])
            h = torch.tensor([b & 0xFF, b >> 8], dtype=torch.uint8).view(FP8).to(torch.float16)
            lo, hi = _bits16(h)
            regs[args[0]] = lo | (hi << 16)
        elif op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "fma.rn.bf16x2":  # per 16-bit lane: a * b + c, rounded once to bf16
            a, b, c = (val(t) for t in args[1:])
            regs[args[0]] = sum(_bf16_bits(_bf16(a >> sh) * _bf16(b >> sh) + _bf16(c >> sh)) << sh
                                for sh in (0, 16))
        elif op == "add.f32":
            f = torch.tensor([val(args[1]), val(args[2])], dtype=torch.int64).to(torch.int32).view(torch.float32)
            regs[args[0]] = (f[0] + f[1]).view(torch.int32).item() & 0xFFFFFFFF
        elif op == "xor.b32":
            regs[args[0]] = val(args[1]) ^ val(args[2])
        elif op == "sub.rn.f16x2":  # per 16-bit lane: a - b, rounded once to f16
            a, b = val(args[1]), val(args[2])
            lanes = [torch.tensor([(v >> sh) & 0xFFFF for v in (a, b)], dtype=torch.int32).to(torch.int16)
                     .view(torch.float16).double() for sh in (0, 16)]
            regs[args[0]] = sum(_bits16((t[0] - t[1]).half().view(1))[0] << sh for t, sh in zip(lanes, (0, 16)))
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        else:
            raise AssertionError(f"unemulated PTX: {line}")
    return regs


def _asm_text(c) -> str:
    return str(c.value if hasattr(c, "value") else c)


def _bits16(t: torch.Tensor) -> list[int]:
    """The bit patterns of a 16-bit float tensor, as non-negative ints."""
    return (t.view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


def _f32(bits: int) -> float:
    """The fp32 with these 32 bits."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _nf4_word(elems: list[int]) -> int:
    """The int32 word of 8 NF4 codes (element 2b in the high nibble of byte b)."""
    return sum(((elems[2 * b] << 4) | elems[2 * b + 1]) << 8 * b for b in range(4))


def test_nf4_prmt_assembly_decodes_every_code():
    """The byte-permute assembly, emulated bit for bit on random words of NF4 bytes: outputs $0..$7 are the fp16
    codes of elements 1, 0, 3, 2, 5, 4, 7, 6 (what _nf4_prmt reorders)."""
    asm = _asm_text(decode_gemv._NF4_PRMT_ASM)
    half = torch.tensor(NF4_CODE).half()
    planes = nf4_planes(half).tolist()
    bits = _bits16(half)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        elems = torch.randint(0, 16, (8,), generator=g).tolist()
        operands = {"$8": _nf4_word(elems), **{f"${9 + i}": p & 0xFFFFFFFF for i, p in enumerate(planes)}}
        regs = _run_ptx(asm, operands)
        got = [regs[f"${i}"] for i in range(8)]
        assert got == [bits[elems[i ^ 1]] for i in range(8)], (elems, got)


def test_nf4_hfma_assembly_sums_every_code():
    """The byte permutes with packed bf16 products, emulated bit for bit on random words of NF4 bytes and random
    bf16 x: $0 is the fp32 sum of the two lanes of four bf16 FMAs (elements 0, 2, 4, 6 in the low lane, 1, 3, 5,
    7 in the high, in that order), with the codes rounded to bf16; and that sum lies within a few bf16 roundings
    of the exact product (measured: printed)."""
    asm = _asm_text(decode_gemv._NF4_HFMA_ASM)
    table = torch.tensor(NF4_CODE).bfloat16()
    planes = nf4_planes(table).tolist()
    code_bits = _bits16(table)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(300):
        elems = torch.randint(0, 16, (8,), generator=g).tolist()
        word = _nf4_word(elems)
        x = (torch.randn(8, generator=g) * 4).bfloat16()
        x_bits = _bits16(x)
        pairs = {f"${2 + i}": x_bits[2 * i] | (x_bits[2 * i + 1] << 16) for i in range(4)}  # element 2i low
        regs = _run_ptx(asm, {"$1": word, **pairs, **{f"${6 + i}": p & 0xFFFFFFFF for i, p in enumerate(planes)}})
        got = _f32(regs["$0"])
        lanes = []
        for lane in (0, 1):  # the model: each lane's chain of bf16 FMAs, then one fp32 add
            acc = 0
            for e in range(lane, 8, 2):
                acc = _bf16_bits(_bf16(code_bits[elems[e]]) * _bf16(x_bits[e]) + _bf16(acc))
            lanes.append(torch.tensor(_bf16(acc), dtype=torch.float32))
        assert got == (lanes[0] + lanes[1]).item(), (elems, x.tolist(), got)
        exact = sum(NF4_CODE[elems[e]] * float(x[e]) for e in range(8))
        size = sum(abs(NF4_CODE[elems[e]] * float(x[e])) for e in range(8))
        worst = max(worst, abs(got - exact) / size)
    print(f"hfma word sums: worst |sum - exact| / sum |products| = {worst:.2e}")
    assert worst < 2 ** -6  # a few bf16 roundings (2^-9 each), not a wrong code or order


@requires_cuda
@pytest.mark.gpu
def test_nf4_hfma_bf16():
    """The byte permutes with packed bf16 products on the GPU at BAGEL-7B's decode shapes (bf16 x, the decoder's
    dtype; the kernel options really take them): against the product with the bf16-rounded codes, and its
    deviation from the exact codes' product (printed)."""
    x1 = torch.empty(1, 96, dtype=torch.bfloat16, device="cuda")
    assert decode_gemv._nf4_options(dict(hfma=True), x1)[1]["HFMA"]
    for N, K in ((4608, 3584), (3584, 18944), (40000, 3584), (37, 320)):
        w, _ = make_weight("nf4", N, K, blocksize=64)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        with nf4_hfma_on():
            got = qgemv(x, w, None, True)
        bf16_ref = qgemv_ref(x.float(), replace(w, table=w.table.bfloat16().float())).to(torch.bfloat16)
        assert_close(f"nf4 hfma {N}x{K}", bf16_ref, got, 8e-3)
        exact = qgemv_ref(x.float(), w)
        dev = ((got.float() - exact).norm() / exact.norm()).item()
        print(f"nf4 hfma {N}x{K}: rel. L2 vs the exact codes' product {dev:.2e}")
        assert dev < 1e-2
    gate, _ = make_weight("nf4", 18944, 3584, blocksize=64, seed=1)
    up, _ = make_weight("nf4", 18944, 3584, blocksize=64, seed=2)
    gate, up = swiglu_pair(gate, up)
    x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
    with nf4_hfma_on():
        got = qgemv_swiglu(x, gate, up, True)
    assert_close("nf4 hfma gate/up", qgemv_swiglu_ref(x, gate, up), got, 1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_concat_qkv(fmt):
    """One GEMV over q/k/v stacked (as the decoder concatenates them) equals the three GEMVs."""
    ws = [make_weight(fmt, n, 64, seed=s)[0] for s, n in enumerate((24, 8, 8))]
    qkv = concat(ws)
    assert qkv.shape == (40, 64)
    x = torch.randn(1, 64, device=DEV)
    parts = torch.cat([qgemv_ref(x, w) for w in ws], dim=1)
    assert torch.equal(dequantize_ref(qkv), torch.cat([dequantize_ref(w) for w in ws]))
    assert_close("qkv", parts, qgemv(x, qkv), 1e-5)


def one_code_per_row(fmt: str, K: int) -> DecodeWeight:
    """Every code of the format once, each alone in its own row (all other codes decode to 0), random scales."""
    g = torch.Generator().manual_seed(0)
    if fmt == "nf4":
        idx = torch.full((16 * 2, K), 7, dtype=torch.uint8)  # code 7 is 0.0
        rows = torch.arange(32)
        idx[rows, (5 * rows) % K] = (rows % 16).to(torch.uint8)
        packed = ((idx.reshape(-1)[0::2] << 4) | idx.reshape(-1)[1::2]).contiguous()
        absmax = torch.rand(32 * K // 32, generator=g) * 3 + 0.01
        table = torch.tensor(NF4_CODE, dtype=torch.float32)
        return DecodeWeight("nf4", packed.to(DEV), absmax.to(DEV), (32, K), 32, table.to(DEV))
    if fmt == "int8":
        values = torch.arange(-128, 128, dtype=torch.int32)
        codes = torch.zeros(256, K, dtype=torch.int8)
    else:  # every e4m3 bit pattern but the two NaNs, subnormals and -0 included
        values = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.int32)
        codes = torch.zeros(len(values), K, dtype=torch.int8)
    rows = torch.arange(len(values))
    codes[rows, (7 * rows) % K] = (values - 256 * (values > 127)).to(torch.int8)
    scale = torch.rand(len(values), generator=g) * 2 + 1e-3
    codes = codes if fmt == "int8" else codes.view(torch.uint8).view(FP8)
    return DecodeWeight(fmt, codes.to(DEV), scale.to(DEV), (len(values), K))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_is_exact(fmt):
    """In-register decode (no converter, NF4 table gather) == the reference dequantization, bit for bit."""
    w = one_code_per_row(fmt, 96)
    x = torch.ones(1, 96, device=DEV)
    want = dequantize_ref(w).sum(dim=1)[None]  # one non-zero per row: exact
    got = qgemv(x, w)
    assert torch.equal(got, want), (got - want).abs().max()
    gate, up = one_code_per_row(fmt, 96), one_code_per_row(fmt, 96)
    up.scale = up.scale.flip(0).contiguous()
    gate, up = swiglu_pair(gate, up)
    # the SwiGLU's exp differs from torch's sigmoid in the last bits
    assert_close(f"{fmt} swiglu", qgemv_swiglu_ref(x, gate, up), qgemv_swiglu(x, gate, up), 1e-6)


def test_decode_weight_other_modules():
    assert decode_weight(nn.Linear(4, 4)) is None
    assert decode_weight(nn.LayerNorm(4)) is None


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_shapes_bf16(fmt):
    """bf16 activations at BAGEL-7B's decode shapes (q/k/v fused, o, down, gate/up, a slice of the lm_head)."""
    x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
    for N, K in ((4608, 3584), (3584, 3584), (3584, 18944), (40000, 3584)):
        w, _ = make_weight(fmt, N, K, blocksize=64)
        xk = x if K == 3584 else torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for pdl in (False, True):
            assert_close(f"{fmt} {N}x{K}", qgemv_ref(xk, w), qgemv(xk, w, None, pdl), 1e-2)
        if fmt == "nf4":  # the fp32-product decodes (the default sums packed bf16 products), compiled for the GPU
            for name, opts in NF4_FP32_DECODES.items():
                got = _qgemv(xk, w, None, True, dict(settings("gemv", w), **opts))
                assert_close(f"nf4 {name} {N}x{K}", qgemv_ref(xk, w), got, 1e-2)
    gate, _ = make_weight(fmt, 18944, 3584, blocksize=64, seed=1)
    up, _ = make_weight(fmt, 18944, 3584, blocksize=64, seed=2)
    gate, up = swiglu_pair(gate, up)
    assert_close(f"{fmt} gate/up", qgemv_swiglu_ref(x, gate, up), qgemv_swiglu(x, gate, up, True), 1e-2)
    if fmt == "nf4":
        for name, opts in NF4_FP32_DECODES.items():
            got = _qgemv_swiglu(x, gate, up, True, dict(settings("swiglu", gate), **opts))
            assert_close(f"nf4 {name} gate/up", qgemv_swiglu_ref(x, gate, up), got, 1e-2)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K, parts", [(37, 192, 2), (9, 640, 3), (16, 64, 4), (5, 1024, 1), (11, 448, 2)])
def test_qgemv_parts(fmt, dtype, N, K, parts):
    """The split-K FMA GEMV against its reference (the same column ranges in fp64), with a bias and three rows,
    and its parts' sum against the whole product; a part count the row cannot fill gives fewer parts. NF4 in
    blocks of 32 (parts start on 64-column tiles in the interpreter: 448 ends on a half tile)."""
    w, bias = make_weight(fmt, N, K, bias=True)
    x = torch.randn(3, K, device=DEV).to(dtype)
    cfg = dict(BN=4, BK=128, num_warps=4, parts=parts)
    for b in (None, bias):
        got = qgemv_parts(x, w, b, False, cfg)
        want = qgemv_parts_ref(x, w, b, False, cfg)
        assert got.dtype == torch.float32 and got.shape == want.shape and got.shape[1:] == (3, N)
        assert_close(f"{fmt} parts", want, got, 1e-5)
        assert_close(f"{fmt} parts sum", qgemv_ref(x.float(), w, b), got.sum(0), 1e-5)
    assert qgemv_parts(x[:, :64], make_weight(fmt, N, 64)[0], None, False, dict(cfg, parts=8)).shape[0] == 1


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4"])
def test_qgemv_parts_down_bf16(fmt):
    """bf16 at BAGEL-7B's down projection (3584 x 18944), at the default and a few candidate settings (NF4 in
    blocks of 64 with its packed bf16 products: within their rounding of the exact codes' product, as the
    unsplit GEMV in ``test_nf4_hfma_bf16``)."""
    w, _ = make_weight(fmt, 3584, 18944, blocksize=64)
    x = torch.randn(1, 18944, device="cuda", dtype=torch.bfloat16)
    want = qgemv_ref(x.float(), w)
    cfgs = (None, dict(BN=4, BK=1024, num_warps=4, parts=4), dict(BN=8, BK=512, num_warps=4, parts=2))
    if fmt == "nf4":
        cfgs = (None, dict(BN=4, BK=512, num_warps=1, parts=4, hfma=True),
                dict(BN=4, BK=1024, num_warps=2, parts=2))
    for cfg in cfgs:
        for pdl in (False, True):
            assert_close(f"{fmt} down parts {cfg}", want, qgemv_parts(x, w, None, pdl, cfg).sum(0),
                         1e-2 if fmt == "nf4" else 1e-4)


def _e4m3(b: int) -> float:
    """The value of e4m3 bit pattern ``b`` (exactly, as a double)."""
    return torch.tensor([b], dtype=torch.uint8).view(FP8).double().item()


def test_fp8_hfma_f16_to_bf16_every_code():
    """Every e4m3 code but the NaNs (0x7F, 0xFF) as f16 (the conversion instruction, emulated) is an f16 normal or
    zero with 7 zero mantissa bits, so ``(h & 0x7FFF) >> 3 | (h & 0x8000)`` is the bf16 of the code times 2^-112,
    exactly (zeros keep their sign; no f16 subnormal arises); and the emulated assembly, each code alone in a word
    at each of the 4 byte positions with x = 1, sums exactly code * 2^-12."""
    asm, x_asm = _asm_text(decode_gemv._FP8_HFMA_ASM), _asm_text(decode_gemv._Q8_X_ASM)
    ones = _run_ptx(x_asm, {"$1": 0x3F803F803F803F80})["$0"]  # four bf16 1.0, times 2^100
    for b in range(256):
        if b & 0x7F == 0x7F:
            continue
        h = _run_ptx("cvt.rn.f16x2.e4m3x2 d, $1;", {"$1": b})["d"]
        assert h >> 16 == 0 and h & 0x7F == 0, (b, h)
        assert (h & 0x7C00) != 0 or (h & 0x3FF) == 0, f"f16 subnormal for code {b:#x}"
        c = ((h & 0x7FFF) >> 3) | (h & 0x8000)
        assert _bf16(c) == _e4m3(b) * 2.0 ** -112, (b, h, c)
        assert math.copysign(1.0, _bf16(c)) == math.copysign(1.0, _e4m3(b))
        for e in range(4):
            got = _f32(_run_ptx(asm, {"$1": b << 8 * e, "$2": ones})["$0"])
            assert got == _e4m3(b) * 2.0 ** -12, (hex(b), e, got)


def test_int8_hfma_every_code():
    """Every INT8 code alone in a word, at each of the 4 byte positions, through the emulated assembly
    (decode_gemv._INT8_HFMA_ASM) with x = 1: exactly code * 2^-12 (the sign flip, the f16 magic, the shift to
    bf16 and the offset FMA are exact for every byte, -128 and 0 included)."""
    asm, x_asm = _asm_text(decode_gemv._INT8_HFMA_ASM), _asm_text(decode_gemv._Q8_X_ASM)
    ones = _run_ptx(x_asm, {"$1": 0x3F803F803F803F80})["$0"]
    for q in range(-128, 128):
        for e in range(4):
            got = _f32(_run_ptx(asm, {"$1": (q & 0xFF) << 8 * e, "$2": ones})["$0"])
            assert got == q * 2.0 ** -12, (q, e, got)


def _q8_value(fmt: str, b: int) -> float:
    """The value of one-byte code ``b`` of ``fmt`` (INT8: two's complement; FP8: e4m3), exactly."""
    return float(b - 256 * (b >= 128)) if fmt == "int8" else _e4m3(b)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_q8_hfma_assembly_sums_every_code(fmt):
    """The one-byte decodes with packed bf16 products (decode_gemv._FP8_HFMA_ASM / _INT8_HFMA_ASM, x scaled by
    _Q8_X_ASM), emulated bit for bit on random words of codes and random bf16 x: the scaled x are x * 2^100
    exactly; $0 is the fp32 sum of the two lanes of two bf16 FMAs (elements 0, 2 in the low lane, 1, 3 in the
    high, in that order) of the codes times 2^-112 and the scaled x; and that sum lies within a few bf16
    roundings of the exact product code * x * 2^-12 (measured: printed)."""
    asm = _asm_text(decode_gemv._INT8_HFMA_ASM if fmt == "int8" else decode_gemv._FP8_HFMA_ASM)
    x_asm = _asm_text(decode_gemv._Q8_X_ASM)
    codes = list(range(256)) if fmt == "int8" else [b for b in range(256) if b & 0x7F != 0x7F]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for i in range(1000):
        elems = [codes[j] for j in torch.randint(0, len(codes), (4,), generator=g).tolist()]
        word = sum(b << 8 * e for e, b in enumerate(elems))
        x = (torch.randn(4, generator=g) * (4.0 if i % 2 else 1e-3)).bfloat16()
        if i % 10 == 0:
            x[i // 10 % 4] = 0.0  # zeros and negative zeros too
            x[(i // 10 + 1) % 4] = -0.0
        x_bits = _bits16(x)
        x64 = sum(xb << 16 * e for e, xb in enumerate(x_bits))  # element 0 in the low bits
        xs = _run_ptx(x_asm, {"$1": x64})["$0"]
        xs_bits = [(xs >> 16 * e) & 0xFFFF for e in range(4)]
        for e in range(4):
            assert _bf16(xs_bits[e]) == float(x[e]) * 2.0 ** 100, (x.tolist(), hex(xs))
            assert math.copysign(1.0, _bf16(xs_bits[e])) == math.copysign(1.0, float(x[e]))
        got = _f32(_run_ptx(asm, {"$1": word, "$2": xs})["$0"])
        lanes = []
        for lane in (0, 1):  # the model: each lane's chain of bf16 FMAs from +0, then one fp32 add
            acc = 0
            for e in (lane, lane + 2):
                acc = _bf16_bits(_q8_value(fmt, elems[e]) * 2.0 ** -112 * _bf16(xs_bits[e]) + _bf16(acc))
            lanes.append(torch.tensor(_bf16(acc), dtype=torch.float32))
        assert got == (lanes[0] + lanes[1]).item(), ([hex(b) for b in elems], x.tolist(), got)
        prods = [_q8_value(fmt, elems[e]) * float(x[e]) * 2.0 ** -12 for e in range(4)]
        size = sum(abs(p) for p in prods)
        if size:
            worst = max(worst, abs(got - sum(prods)) / size)
    print(f"{fmt} hfma word sums: worst |sum - exact| / sum |products| = {worst:.2e}")
    assert worst < 2 ** -7  # a few bf16 roundings (2^-9 each), not a wrong code, sign or order


@triton.jit
def _next_k_kernel(out, K, BK: tl.constexpr, EVEN_K: tl.constexpr):
    # the rotated loop of the decode GEMVs: the first tile before the loop, the next one during each iteration;
    # out[0] = the highest column any tile requests reaches, out[1] = the tiles computed
    k_next = 0
    hi = k_next + BK
    n = 0
    for k0 in range(0, K, BK):
        n += 1
        k_next = decode_gemv._next_k(k0, K, BK, EVEN_K)
        hi = tl.maximum(hi, k_next + BK)
    tl.store(out, hi)
    tl.store(out + 1, n)


@pytest.mark.parametrize("K, BK", [(3584, 512), (18944, 512), (512, 512), (1024, 256)])
def test_rotated_loop_stays_in_the_row(K, BK):
    """With whole tiles (EVEN_K: unmasked loads) the tile requested during the last iteration is the last one
    again, so no load reads past column K (past the end of the last row's buffer); masked tiles (EVEN_K off)
    may ask for [K, K + BK), which their masks drop."""
    out = torch.zeros(2, dtype=torch.int32, device=DEV)
    _next_k_kernel[(1,)](out, K, BK=BK, EVEN_K=True)
    assert out.tolist() == [K, K // BK]
    _next_k_kernel[(1,)](out, K, BK=BK, EVEN_K=False)
    assert out.tolist() == [K + BK, K // BK]


@triton.jit
def _q8_hfma_operands_kernel(x, w, xo, wo, N, K, k0, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    # what the packed-product GEMV hands _q8_hfma for the tile at k0: x words [BK // 4] and code words
    # [BN, BK // 4] (its rows past N clamped to N - 1)
    o_n = tl.arange(0, BN)
    p_w = w + tl.minimum(o_n, N - 1).to(tl.int64) * (K // 4)
    tl.store(xo + tl.arange(0, BK // 4), decode_gemv._q8_x_words(x, k0, K, BK // 4, EVEN_K))
    o_j = tl.arange(0, BK // 4)
    b_w = decode_gemv._q8_tile(p_w, o_n < N, k0, K, BK, True, EVEN_K)
    tl.store(wo + o_n[:, None] * (BK // 4) + o_j[None, :], b_w)


@pytest.mark.parametrize("K, k0, even", [(512, 256, True), (320, 256, False), (200, 0, False)])
def test_q8_hfma_operands(K, k0, even):
    """The Triton side of the packed-product decode (no inline PTX, so it runs in the interpreter too): x read as
    one int64 per word of 4 codes, in word order (two [W // 4, 2] loads joined and permuted), zeros past K; the
    codes as int32 words of rows clamped to N - 1, zeros past K."""
    N, BN, BK = 3, 4, 256
    w, _ = make_weight("fp8", N, K)
    x = torch.randn(1, K, device=DEV).bfloat16()
    xo = torch.full((BK // 4,), -1, dtype=torch.int64, device=DEV)
    wo = torch.full((BN, BK // 4), -1, dtype=torch.int32, device=DEV)
    words = decode_gemv._q8_codes(w, True)
    _q8_hfma_operands_kernel[(1,)](x, words, xo, wo, N, K, k0, BN=BN, BK=BK, EVEN_K=even)
    n = max(0, min(BK, K - k0)) // 4
    want_x = torch.zeros(BK // 4, dtype=torch.int64)
    want_x[:n] = x[0].cpu().view(torch.int64)[k0 // 4:k0 // 4 + n]
    assert torch.equal(xo.cpu(), want_x)
    want_w = torch.zeros(BN, BK // 4, dtype=torch.int32)
    rows = words.cpu()[[min(r, N - 1) for r in range(BN)]]
    want_w[:, :n] = rows[:, k0 // 4:k0 // 4 + n]
    assert torch.equal(wo.cpu(), want_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K", [(5, 200), (70, 33), (19, 128)])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_q8_hfma_fallback(fmt, N, K, dtype):
    """INT8 / FP8 weights with the packed bf16 products asked for (``hfma`` settings: FP8's default; off within
    int8_hfma_on(False) / fp8_hfma_on(False)) but fp32 / fp16 x, or the interpreter (inline PTX): the exact fp32
    decode, the same result as the fp32 products' settings (bit for bit in the interpreter, whose tiles do not
    depend on the settings), in the GEMV and in gate/up + SwiGLU. Each format's switch leaves the other format's
    settings as they are."""
    _check_hfma_fallback(fmt, N, K, dtype)


def _check_hfma_fallback(fmt, N, K, dtype):
    hfma_on = HFMA_ON[fmt]
    w, bias = make_weight(fmt, N, K, bias=True)
    x = torch.randn(3, K, device=DEV).to(dtype)
    cfg = settings("gemv", w)
    assert cfg["hfma"] and settings("swiglu", w)["hfma"]
    other = make_weight("int8" if fmt == "fp8" else "fp8", N, K)[0]
    with hfma_on(False):
        assert "hfma" not in settings("gemv", w) and "hfma" not in settings("swiglu", w)
        assert settings("gemv", other)["hfma"]
    c, hfma = decode_gemv._q8_options(cfg, x, w)
    assert not hfma and "hfma" not in c
    exact = DEV == "cpu"
    for b in (None, bias.to(dtype)):
        got = _qgemv(x, w, b, False, cfg)
        assert_close(f"{fmt} hfma fallback", qgemv_ref(x, w, b), got, tol(dtype))
        if exact:
            with hfma_on(False):
                assert torch.equal(got, qgemv(x, w, b))
    gate, _ = make_weight(fmt, N, K, seed=1)
    up, _ = make_weight(fmt, N, K, seed=2)
    gate, up = swiglu_pair(gate, up)
    got = qgemv_swiglu(x, gate, up)
    assert_close(f"{fmt} hfma fallback swiglu", qgemv_swiglu_ref(x, gate, up), got, tol(dtype))
    if exact:
        with hfma_on(False):
            assert torch.equal(got, qgemv_swiglu(x, gate, up))
    if exact:  # bf16 x in the interpreter falls back too
        xb = x.bfloat16()
        assert not decode_gemv._q8_options(cfg, xb, w)[1]
        with hfma_on():
            assert torch.equal(qgemv(xb, w), _qgemv(xb, w, None, False, dict(cfg, hfma=False)))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_q8_hfma_bf16(fmt):
    """The INT8 / FP8 decodes with packed bf16 products on the GPU (bf16 x; the kernel options really take them,
    with the library's defaults for everything else): every code alone in its row with x = 1 gives the exact
    dequantized weight (bit for bit: one product, exact in bf16); at BAGEL-7B's decode shapes, the GEMV (aligned
    and masked tiles, a bias) and gate/up + SwiGLU against the fp32 reference (its deviation printed)."""
    hfma_on = HFMA_ON[fmt]
    x1 = torch.ones(1, 96, dtype=torch.bfloat16, device="cuda")
    w = one_code_per_row(fmt, 96)
    assert decode_gemv._q8_options(dict(hfma=True), x1, w)[1]
    with hfma_on():
        got = qgemv(x1, w)
    assert torch.equal(got, dequantize_ref(w).sum(dim=1)[None].to(torch.bfloat16)), (got.float() - dequantize_ref(
        w).sum(dim=1)[None]).abs().max()
    # BAGEL's shapes, then masked tiles: the tiny checkpoint's (K 64 and 160, shorter than a tile)
    for N, K in ((4608, 3584), (3584, 18944), (40000, 3584), (37, 320), (128, 64), (64, 160), (512, 64)):
        w, bias = make_weight(fmt, N, K, bias=True)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for b in (None, bias.to(torch.bfloat16)):
            with hfma_on():
                got = qgemv(x, w, b, True)
            ref = qgemv_ref(x.float(), w, None if b is None else b.float())
            assert_close(f"{fmt} hfma {N}x{K}", ref.to(torch.bfloat16), got, 8e-3)
        dev = ((got.float() - ref).norm() / ref.norm()).item()
        print(f"{fmt} hfma {N}x{K}: rel. L2 vs the fp32 product {dev:.2e}")
    for N, K in ((18944, 3584), (160, 64)):
        gate, _ = make_weight(fmt, N, K, seed=1)
        up, _ = make_weight(fmt, N, K, seed=2)
        gate, up = swiglu_pair(gate, up)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        assert decode_gemv._q8_options(settings("swiglu", gate) | dict(hfma=True), x, gate, up)[1]
        with hfma_on():
            got = qgemv_swiglu(x, gate, up, True)
        assert_close(f"{fmt} hfma gate/up {N}x{K}", qgemv_swiglu_ref(x, gate, up), got, 1e-2)


@triton.jit
def _nf4_hfma_operands_kernel(x, p, a, xo, wo, ao, N, K, k0, BN: tl.constexpr, BK: tl.constexpr,
                              BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr):
    # what the packed-product NF4 GEMV hands _NF4_HFMA_ASM and the absmax FMA for the tile at k0: the 4 x words
    # and the code words, [BN, BK // 8] each, and the absmax per word (rows past N clamped to N - 1, as there)
    W: tl.constexpr = BK // 8
    o_n = tl.arange(0, BN)
    r_n = tl.minimum(o_n, N - 1).to(tl.int64)
    p_p = p + r_n * ((K // BLOCKSIZE) * (BLOCKSIZE // 8))
    b_p, b_a = decode_gemv._nf4_tile(p_p, a + r_n * (K // BLOCKSIZE), o_n < N, k0, K, BK, BLOCKSIZE, True, EVEN_K)
    x0, x1, x2, x3 = decode_gemv._nf4_x_words(x, k0, K, BN, W, EVEN_K)
    o = o_n[:, None] * W + tl.arange(0, W)[None, :]
    tl.store(xo + o, x0)
    tl.store(xo + BN * W + o, x1)
    tl.store(xo + 2 * BN * W + o, x2)
    tl.store(xo + 3 * BN * W + o, x3)
    tl.store(wo + o, b_p)
    tl.store(ao + o, tl.reshape(b_a, [BN, W]))


@pytest.mark.parametrize("K, k0, even, blocksize", [(512, 256, True, 64), (320, 256, False, 64),
                                                    (192, 0, False, 64),
                                                    (384, 256, False, 32), (512, 0, True, 128)])
def test_nf4_hfma_operands(K, k0, even, blocksize):
    """The Triton side of the packed-product NF4 decode (no inline PTX, so it runs in the interpreter too): x word
    c of code word j is the bf16 pair x[k0 + 8j + 2c], x[k0 + 8j + 2c + 1] as one int32 (four [R * W // 4, 4]
    loads split and joined), the same in every row, zeros past K; the codes as int32 words of rows clamped to
    N - 1, zeros past K; each word's absmax (loaded per 16-byte code load and broadcast), zeros past K."""
    N, BN, BK = 3, 4, 256
    W = BK // 8
    w, _ = make_weight("nf4", N, K, blocksize)
    x = torch.randn(1, K, device=DEV).bfloat16()
    xo = torch.full((4, BN, W), -1, dtype=torch.int32, device=DEV)
    wo = torch.full((BN, W), -1, dtype=torch.int32, device=DEV)
    ao = torch.full((BN, W), -1.0, dtype=torch.float32, device=DEV)
    _nf4_hfma_operands_kernel[(1,)](x, w.codes.view(torch.int32), w.scale, xo, wo, ao, N, K, k0, BN=BN, BK=BK,
                                    BLOCKSIZE=blocksize, EVEN_K=even)
    n = max(0, min(BK, K - k0)) // 8  # code words in range
    xw = x[0].cpu().view(torch.int32)
    rows = [min(r, N - 1) for r in range(BN)]
    want_x = torch.zeros(4, BN, W, dtype=torch.int32)
    for c in range(4):
        want_x[c, :, :n] = xw[k0 // 2 + c:k0 // 2 + 4 * n:4]
    assert torch.equal(xo.cpu(), want_x)
    want_w = torch.zeros(BN, W, dtype=torch.int32)
    want_w[:, :n] = w.codes.cpu().view(torch.int32).reshape(N, K // 8)[rows, k0 // 8:k0 // 8 + n]
    assert torch.equal(wo.cpu(), want_w)
    want_a = torch.zeros(BN, W)
    blocks = (k0 + 8 * torch.arange(n)) // blocksize
    want_a[:, :n] = w.scale.cpu().reshape(N, K // blocksize)[rows][:, blocks]
    assert torch.equal(ao.cpu(), want_a)


def test_x_words_ok():
    """The packed-bf16 decodes read x as words of 4 (NF4) or 8 (FP8) bytes only where every row starts on such a
    boundary: a bf16 row view at an odd element, a row stride of an odd count, or another dtype is refused (the
    launchers then take the exact decodes)."""
    ok = decode_gemv._x_words_ok
    x = torch.zeros(3, 72, dtype=torch.bfloat16)  # rows of 144 bytes (a fresh allocation: 64-byte aligned)
    assert ok(x[:, :64], 4) and ok(x[:, :64], 8)
    assert not ok(x[:, 1:65], 4)  # rows at an odd element
    assert ok(x[:, 2:66], 4) and not ok(x[:, 2:66], 8)  # 4 bytes in
    x70 = torch.zeros(3, 70, dtype=torch.bfloat16)[:, :64]  # rows of 140 bytes
    assert ok(x70, 4) and not ok(x70, 8)
    assert not ok(torch.zeros(3, 71, dtype=torch.bfloat16)[:, :64], 4)  # rows of 142 bytes
    assert not ok(x.half(), 4)


def test_packed_product_settings_by_shape():
    """The packed products' settings as measured (decode_gemv.*_HFMA_SETTINGS): INT8's long rows (down) keep the
    fp32 decode, which the packed one did not beat there; FP8's take the packed products; NF4's every shape."""
    long_k = decode_gemv.LONG_K + 512
    assert "hfma" not in settings("gemv", make_weight("int8", 2, long_k)[0])
    assert settings("gemv", make_weight("int8", 2, 512)[0])["hfma"]
    with int8_hfma_on(False):
        assert "hfma" not in settings("gemv", make_weight("int8", 2, 512)[0])
    assert settings("gemv", make_weight("fp8", 2, long_k)[0])["hfma"]
    assert settings("gemv", make_weight("nf4", 2, long_k, blocksize=64)[0])["hfma"]
