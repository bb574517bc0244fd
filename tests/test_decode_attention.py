"""The fused decode attention (q/k/v epilogue + split-K attention + combine in one launch) against the unfused
chain's references, on random inputs: odd head counts, several split counts (empty splits included), cache rows
at the start, inside and at the end of a split."""

import pytest
import torch
from bagel_rt.kernels.decode_attention import decode_attention, decode_attention_ref
from conftest import requires_cuda
from test_kernels import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(Hq, Hk, D, capacity, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    qkv = rnd((Hq + 2 * Hk) * D)
    b = rnd((Hq + 2 * Hk) * D) * 0.1 if bias else None
    qw, kw = 1 + 0.1 * rnd(D), 1 + 0.1 * rnd(D)
    ang = torch.rand(D // 2, generator=g) * 6.0
    cos = torch.cat([ang.cos(), ang.cos()]).to(DEV, dtype)
    sin = torch.cat([ang.sin(), ang.sin()]).to(DEV, dtype)
    kc, vc = rnd(capacity, Hk, D), rnd(capacity, Hk, D)
    return qkv, b, qw, kw, cos, sin, kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq, Hk, D", [(14, 2, 32), (4, 4, 16), (6, 2, 64)])
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_decode_attention_matches_chain(Hq, Hk, D, splits, dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    counters = torch.zeros(Hk + 3, dtype=torch.int32, device=DEV)
    for row, bias in ((0, True), (16, False), (37, True), (47, False)):
        qkv, b, qw, kw, cos, sin, kc, vc = _inputs(Hq, Hk, D, 48, dtype, bias, seed=row)
        length = torch.tensor([row], dtype=torch.int32, device=DEV)
        kr, vr = kc.clone(), vc.clone()
        want = decode_attention_ref(qkv, b, qw, kw, cos, sin, 1e-6, kr, vr, length, D ** -0.5, splits, counters)
        got = decode_attention(qkv, b, qw, kw, cos, sin, 1e-6, kc, vc, length, D ** -0.5, splits, counters)
        assert got.shape == (Hq, D) and got.dtype == dtype
        assert_close(f"row {row}", want, got, tol)
        # the new row written (as the reference epilogue, up to the fp32 sum order of the norm), nothing else
        # touched; counters back to zero
        other = torch.arange(48, device=DEV) != row
        assert torch.equal(kc[other], kr[other]) and torch.equal(vc[other], vr[other]), row
        assert_close(f"k row {row}", kr[row], kc[row], tol)
        assert torch.equal(vc[row], vr[row]), row
        assert not counters.any()


def test_decode_attention_refuses_bad_inputs():
    qkv, b, qw, kw, cos, sin, kc, vc = _inputs(34, 2, 16, 8, torch.float32, False)
    length = torch.tensor([3], dtype=torch.int32, device=DEV)
    counters = torch.zeros(2, dtype=torch.int32, device=DEV)
    with pytest.raises(AssertionError, match="query heads per kv head"):  # 17 > 16 rows of one tile
        decode_attention(qkv, b, qw, kw, cos, sin, 1e-6, kc, vc, length, 0.25, 2, counters)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4, 13])
def test_decode_attention_bf16_bagel_shape(splits):
    """bf16 at BAGEL-7B's decode shape (28 query heads, 4 kv heads, head dim 128, a 1024-row cache)."""
    counters = torch.zeros(4, dtype=torch.int32, device="cuda")
    for row in (0, 511, 700, 1023):
        qkv, b, qw, kw, cos, sin, kc, vc = _inputs(28, 4, 128, 1024, torch.bfloat16, True, seed=row)
        length = torch.tensor([row], dtype=torch.int32, device="cuda")
        kr, vr = kc.clone(), vc.clone()
        want = decode_attention_ref(qkv, b, qw, kw, cos, sin, 1e-6, kr, vr, length, 128 ** -0.5, splits, counters)
        for pdl in (False, True):
            got = decode_attention(qkv, b, qw, kw, cos, sin, 1e-6, kc, vc, length, 128 ** -0.5, splits, counters,
                                   pdl)
            assert_close(f"row {row} pdl {pdl}", want, got, 1e-2)
            assert_close(f"k row {row}", kr[row], kc[row], 1e-2)
            assert not counters.any()
