"""Kernels against their references in bf16 at BAGEL-7B-MoT's real shapes (hidden 3584, 28 / 4 heads,
head_dim 128, FFN 18944, 1024x1024 image = 4096 latent tokens + 2 markers). Needs a CUDA GPU."""

import math

import pytest
import torch
from bagel_rt.kernels import (
    add_rms_norm,
    add_rms_norm_fp8,
    add_rms_norm_fp8_ref,
    add_rms_norm_ref,
    cfg_euler,
    cfg_euler_ref,
    gemv,
    gemv_ref,
    gemv_swiglu,
    gemv_swiglu_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
    quantize_rows_fp8,
    quantize_rows_fp8_ref,
    rms_norm,
    rms_norm_fp8,
    rms_norm_ref,
    swiglu,
    swiglu_fp8,
    swiglu_fp8_ref,
    swiglu_ref,
    varlen_attention,
    varlen_attention_ref,
)
from test_kernels import assert_close, assert_fp8_rows_match, dequant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16
M_GEN = 4098  # 64 x 64 latent tokens + 2 markers
HIDDEN, FFN, HQ, HK, D = 3584, 18944, 28, 4, 128
MAX_REL = 1e-2  # relative RMS error allowed for bf16 outputs


def randn(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("M", [1, 3, M_GEN])
def test_rms_norm_bf16(M):
    torch.manual_seed(0)
    x, w = randn(M, HIDDEN, scale=3.0), randn(HIDDEN)
    ref, out = rms_norm_ref(x, w, 1e-6), rms_norm(x, w, 1e-6)
    assert_close("rms_norm", ref, out, MAX_REL)
    # same rounding order as the reference: almost all elements bit-identical
    assert (ref != out).float().mean() < 1e-3


@pytest.mark.parametrize("M", [1, M_GEN])
def test_add_rms_norm_bf16(M):
    torch.manual_seed(1)
    x, r, w = randn(M, HIDDEN), randn(M, HIDDEN, scale=4.0), randn(HIDDEN)
    (n_ref, r_ref), (n_out, r_out) = add_rms_norm_ref(x, r, w, 1e-6), add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(r_out, r_ref)
    assert_close("add_rms_norm.normed", n_ref, n_out, MAX_REL)


@pytest.mark.parametrize("M", [1, M_GEN])
def test_qk_norm_rope_bf16(M):
    torch.manual_seed(2)
    qkv = randn(M, (HQ + 2 * HK) * D, scale=2.0)
    q, k = qkv[:, : HQ * D].view(M, HQ, D), qkv[:, HQ * D: (HQ + HK) * D].view(M, HK, D)
    qw, kw = randn(D), randn(D)
    inv_freq = 1e6 ** (-torch.arange(0, D, 2, device="cuda").float() / D)
    ang = torch.arange(M, device="cuda").float()[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(BF16), ang.sin().to(BF16)
    args = (q, k, qw, kw, cos, sin, 1e-6, BF16)
    (q_ref, k_ref), (q_out, k_out) = qk_norm_rope_ref(*args), qk_norm_rope(*args)
    assert_close("qk_norm_rope.q", q_ref, q_out, MAX_REL)
    assert_close("qk_norm_rope.k", k_ref, k_out, MAX_REL)


@pytest.mark.parametrize("M", [1, M_GEN])
def test_swiglu_bf16(M):
    torch.manual_seed(3)
    gate_up = randn(M, 2 * FFN, scale=3.0)
    gate, up = gate_up[:, :FFN], gate_up[:, FFN:]
    assert_close("swiglu", swiglu_ref(gate, up), swiglu(gate, up), MAX_REL)


@pytest.mark.parametrize("N, K", [(HIDDEN + 2 * HK * D, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN),
                                  (151 * 1007, HIDDEN)])
def test_gemv_bf16(N, K):
    torch.manual_seed(8)
    x, w, bias = randn(1, K), randn(N, K, scale=0.02), randn(N)
    assert_close("gemv", gemv_ref(x, w), gemv(x, w), MAX_REL)
    assert_close("gemv+bias", gemv_ref(x, w, bias), gemv(x, w, bias), MAX_REL)


def test_gemv_swiglu_bf16():
    torch.manual_seed(9)
    x, wg, wu = randn(1, HIDDEN), randn(FFN, HIDDEN, scale=0.02), randn(FFN, HIDDEN, scale=0.02)
    assert_close("gemv_swiglu", gemv_swiglu_ref(x, wg, wu), gemv_swiglu(x, wg, wu), MAX_REL)


@pytest.mark.parametrize("M, K", [(1, HIDDEN), (M_GEN, HIDDEN), (2 * M_GEN, FFN)])
def test_quantize_rows_fp8_bf16(M, K):
    torch.manual_seed(4)
    x = randn(M, K, scale=3.0)
    assert_fp8_rows_match(quantize_rows_fp8_ref(x), quantize_rows_fp8(x))


def assert_fp8_rows_nearly_match(ref: tuple, out: tuple) -> None:
    """On the GPU a fused producer may sum a row's squares in another order than the separate kernel (the
    compiler picks the register layout per kernel), so a normed value can differ by one bf16 ulp and a few
    codes by one e4m3 step: allow at most 1 in 10^5 codes off, scales within a bf16 ulp."""
    (q_ref, s_ref), (q_out, s_out) = ref, out
    assert q_out.dtype == torch.float8_e4m3fn and q_out.shape == q_ref.shape and s_out.shape == s_ref.shape
    assert ((s_out - s_ref).abs() <= s_ref * 2**-7).all()
    off = (q_out.float() != q_ref.float()).float().mean().item()
    assert off <= 1e-5, f"{off:.2e} of the codes differ"


def test_fused_fp8_producers_bf16():
    """The FP8 path's fused producers at the denoising shapes against the unfused chain."""
    torch.manual_seed(13)
    x, r, w = randn(2 * M_GEN, HIDDEN), randn(2 * M_GEN, HIDDEN), randn(HIDDEN)
    assert_fp8_rows_nearly_match(quantize_rows_fp8(rms_norm(x, w, 1e-6)), rms_norm_fp8(x, w, 1e-6))
    qs, r_new = add_rms_norm_fp8(x, r, w, 1e-6)
    h, r_chain = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(r_new, r_chain)
    assert_fp8_rows_nearly_match(quantize_rows_fp8(h), qs)
    assert_close("add_rms_norm_fp8 vs ref", dequant(add_rms_norm_fp8_ref(x, r, w, 1e-6)[0]), dequant(qs), 0.06)
    gu = randn(2 * M_GEN, 2 * FFN, scale=2.0)
    g, u = gu[:, :FFN], gu[:, FFN:]
    got = swiglu_fp8(g, u)
    assert_fp8_rows_nearly_match(quantize_rows_fp8(swiglu(g, u)), got)
    assert_close("swiglu_fp8 vs ref", dequant(swiglu_fp8_ref(g, u)), dequant(got), 0.06)


@pytest.mark.parametrize("renorm_type", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("text_scale, img_scale, renorm_min", [(4.0, 1.0, 0.0), (4.0, 2.0, 0.0), (4.0, 1.5, 0.3),
                                                               (1.0, 2.0, 0.0)])
def test_cfg_euler_bf16_velocities(renorm_type, text_scale, img_scale, renorm_min):
    torch.manual_seed(4)
    N, C = 4096, 64
    x, v_c = randn(N, C, dtype=torch.float32), randn(N, C)
    f = torch.linspace(0, 1, N, device="cuda")[:, None]
    v_t, v_i = (v_c.float() + f * randn(N, C, dtype=torch.float32)).to(BF16), randn(N, C)
    args = (x, v_c, v_t, v_i, text_scale, img_scale, renorm_type, renorm_min, 0.0196)
    (x_ref, v_ref), (x_out, v_out) = cfg_euler_ref(*args), cfg_euler(*args)
    assert_close("cfg_euler.v", v_ref, v_out, 1e-5)
    assert_close("cfg_euler.x", x_ref, x_out, 1e-5)


def test_cfg_euler_cuda_graph_replay_with_dt_tensor():
    torch.manual_seed(5)
    N, C = 4096, 64
    x, v_c, v_t = randn(N, C, dtype=torch.float32), randn(N, C), randn(N, C)
    dt = torch.full((1,), 0.1, device="cuda")
    cfg_euler(x, v_c, v_t, None, 4.0, 1.0, "global", 0.0, dt)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x_new, v = cfg_euler(x, v_c, v_t, None, 4.0, 1.0, "global", 0.0, dt)
    dt.fill_(0.05)
    g.replay()
    x_ref, v_ref = cfg_euler_ref(x, v_c, v_t, None, 4.0, 1.0, "global", 0.0, 0.05)
    assert_close("cfg_euler.graph.x", x_ref, x_new, 1e-5)


def attention_case(Lq, Lk, causal, max_rel=MAX_REL, **kw):
    q = randn(sum(Lq), HQ, D)
    k, v = randn(sum(Lk), HK, D, scale=2.0), randn(sum(Lk), HK, D)
    args = (q, k, v, cu_seqlens(Lq), cu_seqlens(Lk), causal, 1 / math.sqrt(D))
    out = varlen_attention(*args, **kw)
    ref = varlen_attention_ref(*args)
    assert_close(f"varlen_attention Lq={Lq} Lk={Lk} causal={causal} {kw}", ref, out, max_rel)


def test_attention_cfg_branches_denoise():
    """Three CFG branches, one packed call: each 4098-token block against its own cache plus itself."""
    torch.manual_seed(6)
    attention_case((M_GEN,) * 3, (4150 + M_GEN, 40 + M_GEN, 4150 + M_GEN), causal=False)


def test_attention_text_prefill_causal():
    """Text prefill against a cache in front (bottom-right causal), including a long image context."""
    torch.manual_seed(7)
    attention_case((37, 515, 1), (4150 + 37, 515, 9000), causal=True)


@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_attention_decode(num_splits):
    torch.manual_seed(8)
    attention_case((1,), (2000,), causal=True, num_splits=num_splits)
    attention_case((1, 1, 1), (2000, 1, 777), causal=True, num_splits=num_splits)


def test_attention_long_context():
    torch.manual_seed(9)
    attention_case((M_GEN,), (14000,), causal=False, max_seqlen_q=M_GEN, max_seqlen_k=14000)


def test_attention_decode_cuda_graph():
    """Decode with a fixed number of splits is graph-capturable; the key length can change between replays."""
    torch.manual_seed(10)
    q, k, v = randn(1, HQ, D), randn(3000, HK, D), randn(3000, HK, D)
    cu_q, cu_k = cu_seqlens([1]), cu_seqlens([2000])
    call = lambda: varlen_attention(q, k, v, cu_q, cu_k, True, 1 / math.sqrt(D), max_seqlen_q=1,  # noqa: E731
                                    max_seqlen_k=3000, num_splits=8)
    call()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call()
    cu_k[1] = 2500
    g.replay()
    ref = varlen_attention_ref(q, k[:2500], v[:2500], cu_q, cu_seqlens([2500]), True, 1 / math.sqrt(D))
    assert_close("varlen_attention.graph", ref, out, MAX_REL)


def _decode_chain(x, r, w, pdl):
    """A decode layer's chain of PDL-capable kernels, each reading the previous one's output."""
    h, r = add_rms_norm(x, r, w["norm"], 1e-6, pdl)
    q = gemv(h, w["qkv"], w["bias"], pdl)
    h2 = rms_norm(q[:, :HIDDEN], w["norm"], 1e-6, pdl)
    act = gemv_swiglu(h2, w["gate"], w["up"], pdl)
    return gemv(act, w["down"], None, pdl), r


def test_pdl_chain_in_graph_is_bitwise_equal():
    """Programmatic dependent launch changes when kernels start, never what they compute: a chain of
    dependent kernels, captured in a CUDA graph and replayed with PDL, must give the same bits as plain
    launches (a kernel that read its input before the previous kernel finished would not)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    torch.manual_seed(12)
    n_qkv = HIDDEN + 2 * HK * D
    w = dict(norm=randn(HIDDEN), qkv=randn(n_qkv, HIDDEN, scale=0.02), bias=randn(n_qkv),
             gate=randn(FFN, HIDDEN, scale=0.02), up=randn(FFN, HIDDEN, scale=0.02),
             down=randn(HIDDEN, FFN, scale=0.02))
    x0, r0 = randn(1, HIDDEN), randn(1, HIDDEN)
    x, r = x0.clone(), r0.clone()
    for _ in range(4):
        x, r = _decode_chain(x, r, w, pdl=False)
    want = (x.clone(), r.clone())
    x_in, r_in = x0.clone(), r0.clone()
    for _ in range(2):  # compile outside the capture
        _decode_chain(x_in, r_in, w, pdl=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x, r = x_in, r_in
        for _ in range(4):
            x, r = _decode_chain(x, r, w, pdl=True)
    for _ in range(3):
        x_in.copy_(x0)
        r_in.copy_(r0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(x, want[0]) and torch.equal(r, want[1])
