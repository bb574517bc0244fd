"""Every Triton kernel against its plain-PyTorch reference, on small odd shapes, in fp32 and fp16.

On a CPU machine the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), which cannot do
bf16; the bf16 comparisons at BAGEL's real shapes are in test_kernels_gpu.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
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
    rms_norm_fp8_ref,
    rms_norm_ref,
    swiglu,
    swiglu_fp8,
    swiglu_fp8_ref,
    swiglu_ref,
    varlen_attention,
    varlen_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
# relative RMS error allowed per dtype of the compared output
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, max_rel: float) -> None:
    """Shapes and dtypes equal, no NaN, and ||out - ref|| / ||ref|| <= max_rel; prints both errors if not."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    assert not out.isnan().any(), f"{name}: NaN in output"
    diff = (out.double() - ref.double())
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel = (diff.norm() / ref.double().norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
    assert rel <= max_rel, f"{name}: relative RMS error {rel:.3e} > {max_rel:.1e} (max abs error {max_abs:.3e})"


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N", [(1, 48), (3, 100), (63, 48), (67, 100), (3, 3584)])
def test_rms_norm(M, N, dtype):
    torch.manual_seed(0)
    x, w = randn(M, N, dtype=dtype, scale=3.0), randn(N, dtype=dtype)
    assert_close("rms_norm", rms_norm_ref(x, w, 1e-6), rms_norm(x, w, 1e-6), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N", [(1, 48), (67, 100), (3, 3584)])
def test_add_rms_norm(M, N, dtype):
    torch.manual_seed(1)
    x, r, w = randn(M, N, dtype=dtype), randn(M, N, dtype=dtype, scale=4.0), randn(N, dtype=dtype)
    normed, new_res = add_rms_norm(x, r, w, 1e-6)
    normed_ref, new_res_ref = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(new_res, new_res_ref), "add_rms_norm: residual is not x + residual exactly"
    assert_close("add_rms_norm.normed", normed_ref, normed, TOL[dtype])


def test_rms_norm_strided_rows_and_rounding_order():
    torch.manual_seed(2)
    base = randn(5, 160, dtype=torch.float16)
    x, w = base[:, 16:116], randn(100, dtype=torch.float16)  # row stride 160
    assert_close("rms_norm.strided", rms_norm_ref(x, w, 1e-6), rms_norm(x, w, 1e-6), TOL[torch.float16])
    # Qwen2 order: normalise in fp32, round to fp16, then multiply by the weight in fp16
    xf = x.float()
    qwen = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    assert torch.equal(rms_norm_ref(x, w, 1e-6), qwen)


# ---------------------------------------------------------------- q/k norm + RoPE


def rope_tables(pos: torch.Tensor, D: int, dtype: torch.dtype, theta: float = 1e6):
    inv_freq = theta ** (-torch.arange(0, D, 2, device=DEVICE).float() / D)
    ang = pos.float()[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)],
)
@pytest.mark.parametrize("M, Hq, Hk, D", [(1, 7, 1, 32), (3, 3, 3, 128), (67, 7, 3, 32), (3, 28, 4, 128)])
def test_qk_norm_rope(M, Hq, Hk, D, dtype, out_dtype):
    torch.manual_seed(3)
    q, k = randn(M, Hq, D, dtype=dtype, scale=2.0), randn(M, Hk, D, dtype=dtype)
    qw, kw = randn(D, dtype=dtype), randn(D, dtype=dtype)
    cos, sin = rope_tables(torch.arange(M, device=DEVICE) * 37, D, dtype)
    args = (q, k, qw, kw, cos, sin, 1e-6, out_dtype)
    (q_ref, k_ref), (q_out, k_out) = qk_norm_rope_ref(*args), qk_norm_rope(*args)
    assert_close("qk_norm_rope.q", q_ref, q_out, TOL[out_dtype if out_dtype != torch.float32 else dtype])
    assert_close("qk_norm_rope.k", k_ref, k_out, TOL[out_dtype if out_dtype != torch.float32 else dtype])


def test_qk_norm_rope_views_of_fused_qkv_and_shared_position():
    """q, k as strided views into one qkv projection output; one position for all rows (image block)."""
    torch.manual_seed(4)
    M, Hq, Hk, D = 5, 7, 1, 32
    qkv = randn(M, (Hq + 2 * Hk) * D, dtype=torch.float16)
    q = qkv[:, : Hq * D].view(M, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hk) * D].view(M, Hk, D)
    cos, sin = rope_tables(torch.tensor([11], device=DEVICE), D, torch.float16)
    cos, sin = cos.expand(M, D), sin.expand(M, D)  # row stride 0
    qw, kw = randn(D, dtype=torch.float16), randn(D, dtype=torch.float16)
    args = (q, k, qw, kw, cos, sin, 1e-6, torch.float16)
    (q_ref, k_ref), (q_out, k_out) = qk_norm_rope_ref(*args), qk_norm_rope(*args)
    assert_close("qk_norm_rope.q", q_ref, q_out, TOL[torch.float16])
    assert_close("qk_norm_rope.k", k_ref, k_out, TOL[torch.float16])


# ---------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N", [(1, 48), (3, 100), (63, 100), (67, 48), (2, 3000)])
def test_swiglu(M, N, dtype):
    torch.manual_seed(5)
    gate_up = randn(M, 2 * N, dtype=dtype, scale=3.0)
    gate, up = gate_up[:, :N], gate_up[:, N:]  # views of a fused projection output (row stride 2N)
    out = swiglu(gate, up)
    assert out.is_contiguous()
    assert_close("swiglu", swiglu_ref(gate, up), out, TOL[dtype])


# ---------------------------------------------------------------- CFG + renorm + Euler


def cfg_inputs(N, C, dtype):
    """Velocities whose guided norms land on both sides of the clamp bounds, varying per row."""
    v_c = randn(N, C, dtype=torch.float32)
    f = torch.linspace(0.0, 1.0, N, device=DEVICE)[:, None]
    v_t = (v_c + f * randn(N, C)).to(dtype)
    v_i = (v_c + 0.5 * f * randn(N, C)).to(dtype)
    return randn(N, C), v_c.to(dtype), v_t, v_i


@pytest.mark.parametrize("renorm_type", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("text_scale, img_scale", [(4.0, 1.0), (4.0, 1.5), (1.0, 2.0), (0.5, 1.0)])
@pytest.mark.parametrize("renorm_min", [0.0, 0.3, 1.0])
def test_cfg_euler(renorm_type, text_scale, img_scale, renorm_min):
    torch.manual_seed(6)
    x, v_c, v_t, v_i = cfg_inputs(67, 64, torch.float32)
    args = (x, v_c, v_t, v_i, text_scale, img_scale, renorm_type, renorm_min, 0.0625)
    (x_ref, v_ref), (x_out, v_out) = cfg_euler_ref(*args), cfg_euler(*args)
    assert_close("cfg_euler.v", v_ref, v_out, TOL[torch.float32])
    assert_close("cfg_euler.x", x_ref, x_out, TOL[torch.float32])
    if text_scale <= 1.0:  # no guidance at all: v is v_c, even with img_scale > 1
        assert torch.equal(v_out, v_c)


@pytest.mark.parametrize("renorm_type", ["global", "channel", "text_channel"])
def test_cfg_euler_fp16_velocities_odd_channels_dt_tensor(renorm_type):
    torch.manual_seed(7)
    x, v_c, v_t, v_i = cfg_inputs(100, 48, torch.float16)
    dt = torch.full((1,), 0.02, device=DEVICE)
    args = (x, v_c, v_t, v_i, 5.0, 1.5, renorm_type, 0.0, dt)
    (x_ref, v_ref), (x_out, v_out) = cfg_euler_ref(*args), cfg_euler(*args)
    assert v_out.dtype == torch.float32 and x_out.dtype == torch.float32
    assert_close("cfg_euler.v", v_ref, v_out, TOL[torch.float32])
    assert_close("cfg_euler.x", x_ref, x_out, TOL[torch.float32])


def test_cfg_euler_ref_formulas():
    """The reference against the section 4.5 formulas written out, and the no-guidance cases."""
    torch.manual_seed(8)
    x, v_c, v_t, v_i = cfg_inputs(9, 64, torch.float32)
    st, si, m = 4.0, 2.0, 0.0
    # renorm_min = 1 disables renorm: plain text-then-image guidance
    _, v = cfg_euler_ref(x, v_c, v_t, v_i, st, si, "global", 1.0, 0.1)
    assert torch.allclose(v, v_i + si * (v_t + st * (v_c - v_t) - v_i))
    # global: one scale for the whole tensor, never above 1
    u = v_i + si * (v_t + st * (v_c - v_t) - v_i)
    _, v = cfg_euler_ref(x, v_c, v_t, v_i, st, si, "global", m, 0.1)
    assert torch.allclose(v, u * min(1.0, (v_c.norm() / (u.norm() + 1e-8)).item()))
    # text_channel: renorm per row after the text step, image step on top without renorm
    u = v_t + st * (v_c - v_t)
    u = u * (v_c.norm(dim=1, keepdim=True) / (u.norm(dim=1, keepdim=True) + 1e-8)).clamp(m, 1.0)
    x_new, v = cfg_euler_ref(x, v_c, v_t, v_i, st, si, "text_channel", m, 0.1)
    assert torch.allclose(v, v_i + si * (u - v_i))
    assert torch.allclose(x_new, x - 0.1 * v)
    # no text guidance: v = v_c whatever the image scale; v_t / v_i may be absent
    _, v = cfg_euler_ref(x, v_c, None, None, 1.0, 2.0, "channel", m, 0.1)
    assert torch.equal(v, v_c)
    x_new, v = cfg_euler(x, v_c, None, None, 1.0, 2.0, "channel", m, 0.1)
    assert torch.equal(v, v_c)
    with pytest.raises(NotImplementedError):
        cfg_euler(x, v_c, v_t, v_i, st, si, "local", m, 0.1)


# ---------------------------------------------------------------- attention


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq, Hk, D", [(4, 2, 16), (6, 2, 32)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_varlen_attention(Hq, Hk, D, causal, dtype, num_splits):
    torch.manual_seed(9)
    Lq, Lk = (1, 5, 17), (9, 20, 33)
    q = randn(sum(Lq), Hq, D, dtype=dtype)
    k, v = randn(sum(Lk), Hk, D, dtype=dtype, scale=2.0), randn(sum(Lk), Hk, D, dtype=dtype)
    args = (q, k, v, cu_seqlens(Lq), cu_seqlens(Lk), causal, 1 / math.sqrt(D))
    out = varlen_attention(*args, num_splits=num_splits)
    # on a GPU, fp32 dots run on TF32 tensor cores
    tol = 5e-3 if dtype == torch.float32 and DEVICE == "cuda" else TOL[dtype]
    assert_close("varlen_attention", varlen_attention_ref(*args), out, tol)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_varlen_attention_edge_cases(num_splits):
    """Decode rows, an empty query sequence, an empty key sequence (-> zeros), and causal with Lk < Lq
    (the first Lq - Lk queries see nothing -> zeros)."""
    torch.manual_seed(10)
    Hq, Hk, D = 3, 1, 16
    Lq, Lk = (1, 0, 2, 6, 1), (7, 5, 0, 4, 1)
    q = randn(sum(Lq), Hq, D, dtype=torch.float16)
    k, v = randn(sum(Lk), Hk, D, dtype=torch.float16), randn(sum(Lk), Hk, D, dtype=torch.float16)
    args = (q, k, v, cu_seqlens(Lq), cu_seqlens(Lk), True, 0.25)
    ref, out = varlen_attention_ref(*args), varlen_attention(*args, num_splits=num_splits)
    assert_close("varlen_attention.edge", ref, out, TOL[torch.float16])
    assert (out[1:3] == 0).all() and (out[3:5] == 0).all(), "queries without keys must give zeros"


def test_varlen_attention_strided_qkv_views():
    """q, k, v as views into one fused projection output [M, (Hq + 2 Hk) * D]."""
    torch.manual_seed(11)
    Hq, Hk, D, L = 6, 2, 32, (4, 13)
    qkv = randn(sum(L), (Hq + 2 * Hk) * D, dtype=torch.float16)
    q = qkv[:, : Hq * D].view(-1, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hk) * D].view(-1, Hk, D)
    v = qkv[:, (Hq + Hk) * D:].view(-1, Hk, D)
    args = (q, k, v, cu_seqlens(L), cu_seqlens(L), True, 1 / math.sqrt(D))
    ref, out = varlen_attention_ref(*args), varlen_attention(*args)
    assert_close("varlen_attention.views", ref, out, TOL[torch.float16])


def test_varlen_attention_ref_matches_sdpa():
    """The reference's bottom-right causal mask and GQA mapping, checked against SDPA on one sequence."""
    torch.manual_seed(12)
    Hq, Hk, D, Lq, Lk = 6, 2, 16, 5, 12
    q, k, v = randn(Lq, Hq, D), randn(Lk, Hk, D), randn(Lk, Hk, D)
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril(diagonal=Lk - Lq)
    expect = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(3, 1).transpose(0, 1), v.repeat_interleave(3, 1).transpose(0, 1),
        attn_mask=mask, scale=0.3,
    ).transpose(0, 1)
    out = varlen_attention_ref(q, k, v, cu_seqlens([Lq]), cu_seqlens([Lk]), True, 0.3)
    assert_close("varlen_attention_ref", expect, out, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_bagel_group_size(causal):
    """G = 7 query heads per kv head (BAGEL's 28/4), packed rows spanning several blocks, D = 64."""
    torch.manual_seed(13)
    Hq, Hk, D, Lq, Lk = 7, 1, 64, (1, 40), (70, 90)
    q = randn(sum(Lq), Hq, D, dtype=torch.float16)
    k, v = randn(sum(Lk), Hk, D, dtype=torch.float16), randn(sum(Lk), Hk, D, dtype=torch.float16)
    args = (q, k, v, cu_seqlens(Lq), cu_seqlens(Lk), causal, 1 / math.sqrt(D))
    assert_close("varlen_attention.g7", varlen_attention_ref(*args), varlen_attention(*args), TOL[torch.float16])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_varlen_attention_overlapping_key_ranges(causal, num_splits):
    """``seqused_k``: each sequence reads keys [cu_k[b], cu_k[b] + seqused_k[b]) — overlapping ranges (the arena's
    shared prefix: the second sequence's keys sit inside the first's), a gap, an empty range. Checked against
    the reference and against each sequence run alone on a copy of its keys."""
    torch.manual_seed(14)
    Hq, Hk, D = 6, 2, 16
    Lq = (3, 17, 2, 5)
    starts, used = (9, 0, 40, 31), (30, 25, 0, 9)  # [9, 39) and [0, 25) overlap; [31, 40) inside the first
    q = randn(sum(Lq), Hq, D, dtype=torch.float16)
    k, v = randn(45, Hk, D, dtype=torch.float16, scale=2.0), randn(45, Hk, D, dtype=torch.float16)
    cu_k = torch.tensor([*starts, 45], dtype=torch.int32, device=DEVICE)
    seq = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    args = (q, k, v, cu_seqlens(Lq), cu_k, causal, 1 / math.sqrt(D))
    out = varlen_attention(*args, num_splits=num_splits, seqused_k=seq)
    ref = varlen_attention_ref(*args, seqused_k=seq)
    assert_close("varlen_attention.seqused", ref, out, TOL[torch.float16])
    assert (out[20:22] == 0).all(), "an empty key range gives zeros"
    cq = cu_seqlens(Lq).tolist()
    for b in range(len(Lq)):  # the reference's ranges: each sequence alone on a contiguous copy of its keys
        kb, vb = k[starts[b]: starts[b] + used[b]].clone(), v[starts[b]: starts[b] + used[b]].clone()
        alone = varlen_attention_ref(q[cq[b]: cq[b + 1]], kb, vb, cu_seqlens([Lq[b]]), cu_seqlens([used[b]]),
                                     causal, 1 / math.sqrt(D))
        assert torch.equal(alone, ref[cq[b]: cq[b + 1]])


# ---------------------------------------------------------------- FP8 row quantization


def assert_fp8_rows_match(ref: tuple, out: tuple) -> None:
    """Same scales and the same e4m3 values (on the GPU, Triton's cast may drop the sign of a zero code:
    -0 and +0 compare equal, and nothing downstream can tell them apart)."""
    (q_ref, s_ref), (q_out, s_out) = ref, out
    assert q_out.dtype == torch.float8_e4m3fn and q_out.shape == q_ref.shape
    assert s_out.dtype == torch.float32 and s_out.shape == s_ref.shape
    torch.testing.assert_close(s_out, s_ref, rtol=0, atol=0)
    off = q_out.float() != q_ref.float()
    assert not off.any(), f"{off.sum().item()} codes differ: {q_out[off][:4].float()} vs {q_ref[off][:4].float()}"


def test_fp8_codes_round_like_torch_at_ties_and_edges():
    """PyTorch's codes where rounding is hardest (the GPU's conversion instruction there, the fp32 emulation in
    the interpreter): fp32 rows whose scaled values sit on e4m3 ties, one fp32 ulp either side of them, at
    binade edges, on subnormals and at +-448."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties (fp32 holds them)
    vals = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    row = torch.cat([vals, -vals])
    # the first row's scale is exactly 1 (448 * fp32(1/448) rounds to 1); the others go through a scale and
    # its reciprocal as real rows do
    x = torch.stack([row * f for f in (1.0, 0.37, 2.5, 1e-3, 777.0)]).to(DEVICE)
    assert float(quantize_rows_fp8_ref(x)[1][0]) == 1.0
    assert_fp8_rows_match(quantize_rows_fp8_ref(x), quantize_rows_fp8(x))


def dequant(qs: tuple) -> torch.Tensor:
    return qs[0].float() * qs[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N", [(1, 48), (5, 100), (3, 2100)])
def test_norm_fp8_outputs(M, N, dtype):
    """RMSNorm / add+RMSNorm writing FP8 rows: the same codes as the unfused kernel chain, close to the ref."""
    torch.manual_seed(11)
    x, r, w = randn(M, N, dtype=dtype, scale=2.0), randn(M, N, dtype=dtype), randn(N, dtype=dtype)
    if M > 1:
        x[1] = 0.0  # an all-zero row: the minimum scale, all-zero codes
    got = rms_norm_fp8(x, w, 1e-6)
    assert_fp8_rows_match(quantize_rows_fp8(rms_norm(x, w, 1e-6)), got)
    assert_close("rms_norm_fp8", dequant(rms_norm_fp8_ref(x, w, 1e-6)), dequant(got), 0.06)
    (q, s), r_new = add_rms_norm_fp8(x, r, w, 1e-6)
    h_chain, r_chain = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(r_new, r_chain)
    assert_fp8_rows_match(quantize_rows_fp8(h_chain), (q, s))
    (q_ref, s_ref), r_ref = add_rms_norm_fp8_ref(x, r, w, 1e-6)
    assert_close("add_rms_norm_fp8", dequant((q_ref, s_ref)), dequant((q, s)), 0.06)
    assert_close("add_rms_norm_fp8 residual", r_ref, r_new, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N", [(1, 48), (4, 300), (2, 4500)])
def test_swiglu_fp8(M, N, dtype):
    """SwiGLU writing FP8 rows (two passes over rows longer than one block): same codes as the chain."""
    torch.manual_seed(12)
    gu = randn(M, 2 * N, dtype=dtype, scale=2.0)
    g, u = gu[:, :N], gu[:, N:]  # strided views, as the MLP passes them
    got = swiglu_fp8(g, u)
    assert_fp8_rows_match(quantize_rows_fp8(swiglu(g, u)), got)
    assert_close("swiglu_fp8", dequant(swiglu_fp8_ref(g, u)), dequant(got), 0.06)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K", [(1, 48), (7, 100), (67, 2049), (3, 4500)])
def test_quantize_rows_fp8(M, K, dtype):
    torch.manual_seed(0)
    x = randn(M, K, dtype=dtype, scale=3.0)
    x[0, :5] = 0.0
    x[0, 5:8] = torch.tensor([1e-30, -3e-4, 5e-3])  # subnormal codes after scaling
    if M > 2:
        x[2] = 0.0  # an all-zero row: scale clamps to the minimum, codes all zero
        x[1, :6] = torch.tensor([448.0, 19.0, 18.999, -84.0, 127.9, 0.01])  # row max 448: exact ties, binade edges
    ref = quantize_rows_fp8_ref(x)
    assert_fp8_rows_match(ref, quantize_rows_fp8(x))
    deq = ref[0].float() * ref[1]
    assert (deq - x.float()).norm() / x.float().norm() < 0.05  # e4m3: ~2-3% per element


def test_quantize_rows_fp8_row_stride():
    x = randn(9, 2 * 300)[:, 300:]  # a view with a row stride of 600
    assert_fp8_rows_match(quantize_rows_fp8_ref(x), quantize_rows_fp8(x))


# ---------------------------------------------------------------- decode GEMVs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", [(1, 48, 100), (1, 67, 300), (3, 5, 48), (4, 33, 129)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv(M, N, K, dtype, with_bias):
    torch.manual_seed(6)
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype, scale=0.1)
    bias = randn(N, dtype=dtype) if with_bias else None
    assert_close("gemv", gemv_ref(x, w, bias), gemv(x, w, bias), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", [(1, 48, 100), (2, 67, 300)])
def test_gemv_swiglu(M, N, K, dtype):
    torch.manual_seed(7)
    x, wg, wu = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype, scale=0.1), randn(N, K, dtype=dtype, scale=0.1)
    x2 = randn(M, 2 * K, dtype=dtype)[:, :K]  # a row-strided view of x's kind
    assert_close("gemv_swiglu", gemv_swiglu_ref(x, wg, wu), gemv_swiglu(x, wg, wu), TOL[dtype])
    assert_close("gemv_swiglu", gemv_swiglu_ref(x2, wg, wu), gemv_swiglu(x2, wg, wu), TOL[dtype])


def test_warm_triton_cache_key_memoises_the_key():
    """The loader's background warm-up leaves Triton's per-process cache key computed (and memoised)."""
    from bagel_rt.kernels._device import warm_triton_cache_key
    from triton.runtime.cache import triton_key

    triton_key.cache_clear()
    thread = warm_triton_cache_key()
    assert thread is not None
    thread.join(timeout=60)
    assert triton_key.cache_info().currsize == 1
    assert triton_key() == triton_key.__wrapped__()  # the memoised value is Triton's own key
