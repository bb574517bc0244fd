"""The fast decode path (bagel_rt.fast_decode) against the torch backend's decode step and Session.gen_text.

CPU: the tiny model in fp32 (and fp16) with the kernels in the Triton interpreter, eager (no CUDA graphs).
GPU (skipped without CUDA): the tiny model in bf16, CUDA graph against eager replays and against torch.
``bench_decode_7b`` is a benchmark, not a test: the full-size model with random weights, tokens/s and peak
memory of greedy decoding (run it by hand on a GPU: ``python tests/test_fast_decode.py``).
"""

import json
import time

import pytest
import torch
from bagel_rt.kernels import qkv_rope_cache, qkv_rope_cache_ref
from bagel_rt.quant import NF4Config, quantize_model
from bagel_rt.quant.decode_gemv import DecodeWeight
from conftest import rel_l2, requires_cuda, same_prefix_rel_l2
from test_kernels import assert_close

import bagel_rt
from bagel_rt.errors import InputError
from bagel_rt.fast_decode import GraphDecoder, decode_step_kernels, fast_gen_text, und_layers
from bagel_rt.tiny import write_tiny_checkpoint

# kernels run where Triton can: the GPU when there is one, else the interpreter on the CPU
DEV = "cuda" if torch.cuda.is_available() else "cpu"

PROMPT = "What is a bagel? Answer in one sentence."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def pipe32(tiny_dir):
    return bagel_rt.load(tiny_dir, device=DEV, dtype=torch.float32, backend="torch")  # Session = reference path


def prompted(pipe, seed=0):
    s = pipe.session(understanding_only=True, seed=seed)
    s.add_text(PROMPT)
    return s


def device_state(ctx, dev):
    """The [1] device tensors decode_step_kernels reads for the next token of ``ctx``."""
    return (torch.tensor([ctx.rope], device=dev), torch.tensor([ctx.length], dtype=torch.int32, device=dev))


def teacher_forced(model, ctx_ref, ctx_k, steps, layers=None, num_splits=None):
    """Feed the torch path's greedy tokens to both paths; return per-step (ref logits, kernel logits)."""
    out, tok = [], model.special.bos
    for _ in range(steps):
        ref = model.decode_step(ctx_ref, tok)
        pos, length = device_state(ctx_k, model.device)
        logits = decode_step_kernels(model, ctx_k.cache, torch.tensor([tok], device=model.device), pos, length,
                                     layers, num_splits)
        ctx_k.cache.length += 1
        ctx_k.rope += 1
        out.append((ref, logits))
        tok = int(ref.argmax())
    return out


# ---------------------------------------------------------------- the fused q/k/v epilogue kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("Hq, Hk, D", [(4, 2, 16), (6, 2, 32), (7, 1, 128)])
def test_qkv_rope_cache(Hq, Hk, D, with_bias, dtype):
    torch.manual_seed(0)
    qkv = torch.randn((Hq + 2 * Hk) * D).to(DEV, dtype)
    q, k, v = (t.view(-1, D) for t in qkv.split([Hq * D, Hk * D, Hk * D]))
    bias = torch.randn((Hq + 2 * Hk) * D).to(DEV, dtype) if with_bias else None
    qw, kw = (1 + 0.1 * torch.randn(D)).to(DEV, dtype), (1 + 0.1 * torch.randn(D)).to(DEV, dtype)
    ang = 37.0 * torch.arange(D // 2) / D
    cos, sin = torch.cat([ang, ang]).cos().to(DEV, dtype)[None], torch.cat([ang, ang]).sin().to(DEV, dtype)[None]
    caches = [torch.zeros(9, Hk, D, dtype=dtype, device=DEV) for _ in range(4)]
    length = torch.tensor([5], dtype=torch.int32, device=DEV)
    q_ref = qkv_rope_cache_ref(q, k, v, bias, qw, kw, cos, sin, 1e-6, caches[0], caches[1], length)
    q_out = qkv_rope_cache(q, k, v, bias, qw, kw, cos, sin, 1e-6, caches[2], caches[3], length)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close("q", q_ref, q_out, tol)
    assert_close("k row", caches[0][5], caches[2][5], tol)
    assert torch.equal(caches[1][5], caches[3][5]), "v row is not v + bias exactly"
    for c in caches[2:]:  # nothing but row 5 written
        assert not torch.cat([c[:5], c[6:]]).any()


# ---------------------------------------------------------------- CPU: kernel step vs the torch step


@pytest.mark.parametrize("fuse_qkv, num_splits", [(True, None), (False, 2)])
def test_decode_step_matches_torch_fp32(pipe32, fuse_qkv, num_splits):
    model = pipe32.model
    s = prompted(pipe32)
    ctx_ref, ctx_k = s.gen.fork(extra=8), s.gen.fork(extra=8)
    layers = und_layers(model, fuse_qkv)
    assert (layers[0].qkv_weight is not None) == fuse_qkv
    for i, (ref, out) in enumerate(teacher_forced(model, ctx_ref, ctx_k, 4, layers, num_splits)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_l2(out, ref) < 1e-3, f"step {i}: logits rel L2 {rel_l2(out, ref):.2e}"
    n = ctx_ref.length
    assert ctx_k.length == n
    # on a GPU the kernels' fp32 attention dots run in TF32, and later layers' keys inherit that rounding
    assert rel_l2(ctx_k.cache.k[:, :n], ctx_ref.cache.k[:, :n]) < (1e-5 if DEV == "cpu" else 1e-3)
    assert rel_l2(ctx_k.cache.v[:, :n], ctx_ref.cache.v[:, :n]) < (1e-5 if DEV == "cpu" else 1e-3)


def test_decode_step_matches_torch_fp16(tiny_dir):
    pipe = bagel_rt.load(tiny_dir, device=DEV, dtype=torch.float16)
    s = prompted(pipe)
    ctx_ref, ctx_k = s.gen.fork(extra=4), s.gen.fork(extra=4)
    layers = und_layers(pipe.model, True)
    for i, (ref, out) in enumerate(teacher_forced(pipe.model, ctx_ref, ctx_k, 3, layers)):
        assert out.dtype == torch.float16
        assert rel_l2(out, ref) < 1e-2, f"step {i}: logits rel L2 {rel_l2(out, ref):.2e}"


# ---------------------------------------------------------------- CPU: the decode loop vs Session.gen_text


def test_fast_gen_text_greedy_matches_session(pipe32):
    s = prompted(pipe32)
    res = s.gen_text(max_length=12, record=True)
    ctx = s.gen.fork(extra=12)
    start, rope = ctx.length, ctx.rope
    ids, logits = fast_gen_text(s, ctx, 12, record=True)
    assert ids == res.token_ids
    assert logits.shape == res.logits.shape and logits.dtype == torch.float32
    assert rel_l2(logits, res.logits) < 1e-3
    # the context is left as the torch decode loop leaves it: same length, rope and cache rows
    ref = s.gen.fork(extra=12)
    for tok in [pipe32.model.special.bos, *ids[:-1]]:
        pipe32.model.decode_step(ref, tok)
    assert (ctx.length, ctx.rope) == (start + len(ids), rope + len(ids)) == (ref.length, ref.rope)
    assert rel_l2(ctx.cache.k[:, :ref.length], ref.cache.k[:, :ref.length]) < (1e-5 if DEV == "cpu" else 1e-3)


def test_triton_gemv_decoder_matches_session(pipe32):
    s = prompted(pipe32)
    res = s.gen_text(max_length=8, record=True)
    ids, logits = GraphDecoder(pipe32.model, gemv="triton").generate(s.gen.fork(extra=8), 8, record=True)
    assert ids == res.token_ids
    assert rel_l2(logits, res.logits) < 1e-3
    with pytest.raises(InputError, match="gemv"):
        GraphDecoder(pipe32.model, gemv="cutlass")


@pytest.mark.parametrize("check_every", [1, 4])
def test_stop_token_and_chunked_checks(pipe32, check_every):
    s = prompted(pipe32)
    full, _ = fast_gen_text(s, s.gen.fork(extra=10), 10)
    stop = full[5]
    want = full[: full.index(stop) + 1]
    dec = GraphDecoder(pipe32.model, check_every=check_every)
    ctx = s.gen.fork(extra=10)
    start = ctx.length
    ids, _ = dec.generate(ctx, 10, stop_tokens=(stop,))
    assert ids == want
    assert ctx.length == start + len(want) and ctx.rope == s.gen.rope + len(want)
    ids, _ = dec.generate(s.gen.fork(extra=3), 3, stop_tokens=())  # the decoder is reusable; max_length stops
    assert ids == full[:3]


def test_sampling_matches_session(pipe32):
    s = prompted(pipe32, seed=7)
    res = s.gen_text(max_length=10, do_sample=True, temperature=0.8)
    gen = torch.Generator(device=DEV).manual_seed(7)  # the session samples with a generator on the model's device
    ids, _ = fast_gen_text(s, s.gen.fork(extra=10), 10, do_sample=True, temperature=0.8, generator=gen)
    assert ids == res.token_ids


def test_errors(pipe32):
    s = prompted(pipe32)
    with pytest.raises(InputError):
        fast_gen_text(s, s.gen.fork(), 0)
    with pytest.raises(InputError):
        fast_gen_text(s, s.gen.fork(extra=2), 2, do_sample=True, temperature=0.0)


# ---------------------------------------------------------------- compressed weights: the decode GEMVs


def quantized_pipe(tiny_dir, fmt, dtype=torch.float32, device=DEV):
    """The tiny model with every LLM Linear (both experts, lm_head) in ``fmt`` (NF4 blocks of 32: the tiny MLP
    is 160 wide)."""
    pipe = bagel_rt.load(tiny_dir, device=device, dtype=dtype, backend="torch")
    quantize_model(pipe.model.language_model, NF4Config(blocksize=32) if fmt == "nf4" else fmt)
    return pipe


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4"])
def test_compressed_decoder_matches_session(tiny_dir, fmt):
    """INT8 / FP8 / NF4 weights through the fused decode GEMVs: the torch backend's greedy tokens and logits."""
    pipe = quantized_pipe(tiny_dir, fmt)
    layers = und_layers(pipe.model, True)
    assert isinstance(layers[0].qkv_weight, DecodeWeight) and layers[0].qkv_weight.fmt == fmt
    assert set(layers[0].compressed) == {"o", "gate", "up", "down"}
    s = prompted(pipe)
    res = s.gen_text(max_length=8, record=True)
    dec = GraphDecoder(pipe.model)
    assert dec.head is not None and dec.head.fmt == fmt
    ids, logits = dec.generate(s.gen.fork(extra=8), 8, record=True)
    assert ids == res.token_ids
    assert rel_l2(logits, res.logits) < 1e-3
    assert und_layers(pipe.model, True, compressed=False)[0].qkv_weight is None  # the modules' own forward


def test_same_prefix_rel_l2():
    """The greedy-run comparison: identical runs agree; after a near-tie flip only the shared-prefix steps
    count (the flip step included); a flip that is no near-tie fails, and so do logits that differ before it."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    ids = logits.argmax(dim=1).tolist()
    assert same_prefix_rel_l2((ids, logits), (ids, logits)) == 0
    tie = logits.clone()
    top = tie[3].topk(2)
    tie[3, top.indices[0]] = top.values[1] + 1e-3  # step 3: a near-tie
    later = tie.clone()
    later[4:] = torch.randn(2, 50, generator=g)  # after the flip: another prefix, other logits
    flipped = ids[:3] + [int(top.indices[1])] + [0, 0]
    assert same_prefix_rel_l2((flipped, later), (ids, tie)) == 0
    with pytest.raises(AssertionError, match="diverge at step 1"):
        same_prefix_rel_l2((ids[:1] + [(ids[1] + 1) % 50] + ids[2:], logits), (ids, logits))
    off = later.clone()
    off[1] += 1.0  # before the flip
    assert same_prefix_rel_l2((flipped, off), (ids, tie)) > 0.1


def test_variant_formats_name_real_variants():
    """Every variant benchmarks may skip for a format (fast_decode.VARIANT_FORMATS) is a decode GEMV
    implementation, and names only formats the decoder packs; the fp32-product and byte-permute variants
    change the formats their kernels take (a variant wrongly listed would drop its A/B row silently)."""
    from bagel_rt.fast_decode import GEMVS, VARIANT_FORMATS

    assert set(VARIANT_FORMATS) <= set(GEMVS) - {"triton", "cublas"}
    assert all(fmts and fmts <= {"int8", "fp8", "nf4"} for fmts in VARIANT_FORMATS.values())
    assert VARIANT_FORMATS["triton-fp32"] == {"nf4", "fp8", "int8"} and "nf4" in VARIANT_FORMATS["triton-prmt"]


# ---------------------------------------------------------------- GPU: the CUDA graph


@pytest.fixture(scope="module")
def pipe_cuda(tiny_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return bagel_rt.load(tiny_dir, device="cuda", dtype=torch.bfloat16)


@requires_cuda
@pytest.mark.gpu
def test_kernel_step_matches_torch_bf16(pipe_cuda, tiny_dir):
    """bf16 kernel logits are as close to an fp32 run as the torch backend's bf16 logits (and close to them)."""
    pipe_fp32 = bagel_rt.load(tiny_dir, device="cuda", dtype=torch.float32)
    m16, m32 = pipe_cuda.model, pipe_fp32.model
    s16, s32 = prompted(pipe_cuda), prompted(pipe_fp32)
    ctx16, ctx_k, ctx32 = s16.gen.fork(extra=16), s16.gen.fork(extra=16), s32.gen.fork(extra=16)
    layers = und_layers(m16, True)
    err_torch, err_kernel = [], []
    tok = m16.special.bos
    for i in range(16):
        ref32, ref16 = m32.decode_step(ctx32, tok), m16.decode_step(ctx16, tok)
        pos, length = device_state(ctx_k, "cuda")
        out = decode_step_kernels(m16, ctx_k.cache, torch.tensor([tok], device="cuda"), pos, length, layers)
        ctx_k.cache.length += 1
        ctx_k.rope += 1
        assert rel_l2(out, ref16) < 2e-2, f"step {i}: kernel vs torch bf16 logits rel L2 {rel_l2(out, ref16):.2e}"
        err_torch.append(rel_l2(ref16, ref32))
        err_kernel.append(rel_l2(out, ref32))
        tok = int(ref32.argmax())
    print(f"bf16 logits rel L2 to fp32: torch {sum(err_torch) / 16:.2e}, kernels {sum(err_kernel) / 16:.2e}")
    assert sum(err_kernel) <= 1.5 * sum(err_torch)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("do_sample", [False, True])
def test_graph_matches_eager_bf16(pipe_cuda, do_sample):
    s = prompted(pipe_cuda)
    runs = []
    for use_graphs in (True, False):  # same split count, so the same kernels run in both
        dec = GraphDecoder(pipe_cuda.model, use_graphs=use_graphs, num_splits=4)
        assert dec.use_graphs == use_graphs
        gen = torch.Generator(device="cuda").manual_seed(3)
        ctx = s.gen.fork(extra=40)
        ids, logits = dec.generate(ctx, 40, do_sample, 0.8, gen, record=True, stop_tokens=())
        runs.append((ids, logits, ctx))
    (ids_g, lg_g, ctx_g), (ids_e, lg_e, ctx_e) = runs
    assert ids_g == ids_e
    assert rel_l2(lg_g, lg_e) < 1e-3
    n = ctx_e.length
    assert (ctx_g.length, ctx_g.rope) == (n, ctx_e.rope)
    assert rel_l2(ctx_g.cache.k[:, :n], ctx_e.cache.k[:, :n]) < 1e-3


@requires_cuda
@pytest.mark.gpu
def test_triton_gemv_graph_matches_cublas_bf16(pipe_cuda):
    s = prompted(pipe_cuda)
    runs = []
    for gemv in ("cublas", "triton"):
        ids, logits = GraphDecoder(pipe_cuda.model, num_splits=4, gemv=gemv).generate(
            s.gen.fork(extra=24), 24, record=True, stop_tokens=())
        runs.append((ids, logits))
    assert runs[0][0] == runs[1][0]
    assert rel_l2(runs[1][1], runs[0][1]) < 2e-2  # bf16 GEMVs with different summation orders


@requires_cuda
@pytest.mark.gpu
def test_pdl_decoder_matches_plain_launches_bf16(pipe_cuda):
    """Programmatic dependent launch only moves kernel start times: ids and logits stay bit-identical."""
    s = prompted(pipe_cuda)
    runs = []
    for pdl in (False, True):
        ids, logits = GraphDecoder(pipe_cuda.model, num_splits=4, pdl=pdl).generate(
            s.gen.fork(extra=40), 40, record=True, stop_tokens=())
        runs.append((ids, logits))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@requires_cuda
@pytest.mark.gpu
def test_graph_decoder_reuse_and_capacity_growth(pipe_cuda):
    model = pipe_cuda.model
    dec = GraphDecoder(model, num_splits=4)
    eager = GraphDecoder(model, use_graphs=False, num_splits=4)
    s = prompted(pipe_cuda)
    for n_extra in (0, 1100):  # the second context outgrows the first capture's capacity (1024)
        ctx = s.gen.fork(extra=n_extra + 20)
        if n_extra:
            model.prefill_text(ctx, [(7 * i) % 400 + 10 for i in range(n_extra)])
        want, _ = eager.generate(ctx.fork(extra=20), 20, stop_tokens=())
        got, _ = dec.generate(ctx.fork(extra=20), 20, stop_tokens=())
        assert got == want
    assert dec.cache.capacity >= s.gen.length + 1100 + 20


@requires_cuda
@pytest.mark.gpu
def test_greedy_matches_torch_bf16(pipe_cuda):
    model = pipe_cuda.model
    s = prompted(pipe_cuda)
    ctx = s.gen.fork(extra=24)
    want, ref_logits, tok = [], [], model.special.bos  # the torch backend's loop (Session.gen_text, torch)
    for _ in range(24):
        ref_logits.append(model.decode_step(ctx, tok).float())
        tok = int(ref_logits[-1].argmax())
        want.append(tok)
    ids, _ = GraphDecoder(model).generate(s.gen.fork(extra=24), 24, stop_tokens=())
    # bf16 noise may flip a near-tie: the first divergence, if any, must be at one
    for i, (a, b) in enumerate(zip(ids, want)):
        if a != b:
            top2 = ref_logits[i].topk(2).values
            assert top2[0] - top2[1] < 0.08 * ref_logits[i].std(), f"greedy ids diverge at step {i}"
            break


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt, gemv", [("int8", "triton"), ("int8", "triton-fp32"), ("fp8", "triton"),
                                       ("nf4", "triton")])
def test_compressed_greedy_matches_torch_bf16(tiny_dir, fmt, gemv):
    """Compressed weights in bf16 on the GPU: the graph decoder's greedy ids follow the torch backend (up to a
    near-tie), PDL leaves them and the logits bit-identical, and the fused GEMVs match the modules' forward.
    INT8 with the fp32 products too (its packed bf16 products are the default since the seventeenth stop)."""
    pipe = quantized_pipe(tiny_dir, fmt, torch.bfloat16, "cuda")
    model = pipe.model
    s = prompted(pipe)
    ctx = s.gen.fork(extra=24)
    want, ref_logits, tok = [], [], model.special.bos
    for _ in range(24):
        ref_logits.append(model.decode_step(ctx, tok).float())
        tok = int(ref_logits[-1].argmax())
        want.append(tok)
    runs = {}
    for pdl, compressed in ((True, True), (False, True), (True, False)):
        dec = GraphDecoder(model, num_splits=4, pdl=pdl, compressed=compressed, gemv=gemv)
        runs[pdl, compressed] = dec.generate(s.gen.fork(extra=24), 24, record=True, stop_tokens=())
    ids = runs[True, True][0]
    for i, (a, b) in enumerate(zip(ids, want)):
        if a != b:
            top2 = ref_logits[i].topk(2).values
            assert top2[0] - top2[1] < 0.08 * ref_logits[i].std(), f"greedy ids diverge at step {i}"
            break
    assert runs[False, True][0] == ids and torch.equal(runs[False, True][1], runs[True, True][1])
    assert same_prefix_rel_l2(runs[True, True], runs[True, False]) < 2e-2


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "nf4"])
def test_l2_prefetch_leaves_decode_bit_identical(tiny_dir, fmt):
    """"triton-prefetch" (every GEMV asks L2 for its weight lines before its PDL wait) only moves data earlier:
    greedy ids and logits bit-identical to "triton", bf16 and compressed weights (which take other kernels)."""
    if fmt == "bf16":
        pipe = bagel_rt.load(tiny_dir, device="cuda", dtype=torch.bfloat16)
    else:
        pipe = quantized_pipe(tiny_dir, fmt, torch.bfloat16, "cuda")
    s = prompted(pipe)
    runs = [GraphDecoder(pipe.model, num_splits=4, gemv=g).generate(s.gen.fork(extra=24), 24, record=True,
                                                                    stop_tokens=())
            for g in ("triton", "triton-prefetch")]
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_prefetch_option_is_scoped_and_off_in_the_interpreter(pipe32):
    """The prefetch switch holds inside its block only; the interpreter (no inline assembly) never turns it on,
    and the "triton-prefetch" decoder runs the same step there as "triton"."""
    from bagel_rt.kernels._device import l2_prefetch_on, prefetch_kwargs

    dev = torch.device(DEV)
    assert not prefetch_kwargs(True, dev)["PREFETCH"]
    with l2_prefetch_on():
        on = prefetch_kwargs(True, dev)["PREFETCH"]
        assert not prefetch_kwargs(False, dev)["PREFETCH"]  # never without PDL
    assert on == (DEV == "cuda" and torch.cuda.get_device_capability() >= (9, 0))
    assert not prefetch_kwargs(True, dev)["PREFETCH"]
    s = prompted(pipe32)
    runs = [GraphDecoder(pipe32.model, gemv=g).generate(s.gen.fork(extra=4), 4, record=True, stop_tokens=())
            for g in ("triton", "triton-prefetch")]
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------- benchmark (by hand, on a GPU)


def _und_bytes(model) -> int:
    """Bytes of the weights one decode token reads: und expert of every layer + final norm + lm_head."""
    mods = [model.language_model.model.norm, model.language_model.lm_head]
    for layer in model.language_model.model.layers:
        a = layer.self_attn
        mods += [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, a.q_proj, a.k_proj, a.v_proj,
                 a.o_proj, a.q_norm, a.k_norm]
    return sum(t.numel() * t.element_size() for m in mods for t in m.parameters())


def bench_decode_7b(tokens: int = 256, check_steps: int = 32, torch_tokens: int = 16) -> dict:
    """Greedy decode of the full-size model (random weights, bf16) on the GPU with the CUDA graph.

    Prefills a short prompt through a Session, captures (timed separately as ``first_call_s``), then times
    ``tokens`` greedy tokens (stop tokens ignored). Also measures, over ``check_steps`` teacher-forced steps,
    the logits' relative L2 to the torch backend's decode step and how often both argmaxes agree, and the
    torch backend's tokens/s over ``torch_tokens`` tokens.

    Returns:
        dict with tokens_per_s, ms_per_token, achieved_gb_s (und weights + lm_head bytes x tokens/s),
        peak_gib, first_call_s, logits_rel_l2_max/mean, argmax_agree, torch_tokens_per_s and the environment.
    """
    import triton

    from bagel_rt.random_weights import random_bagel

    torch.cuda.reset_peak_memory_stats()
    bagel = random_bagel("bagel-7b-mot", device="cuda")
    model = bagel.model
    s = bagel.session(understanding_only=True, seed=0)
    s.add_text("Describe a sesame bagel with cream cheese in one short paragraph.")
    dec = GraphDecoder(model)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.generate(s.gen.fork(extra=tokens), 8, stop_tokens=())  # fuse copy, warm-up, capture
    torch.cuda.synchronize()
    first_call = time.perf_counter() - t0

    ctx = s.gen.fork(extra=tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids, _ = dec.generate(ctx, tokens, stop_tokens=())
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert len(ids) == tokens
    peak = torch.cuda.max_memory_allocated() / 2**30

    # agreement with the torch backend, teacher-forced on the torch path's tokens
    ctx_ref, ctx_k = s.gen.fork(extra=check_steps), s.gen.fork(extra=check_steps)
    errs, agree = [], 0
    for ref, out in teacher_forced(model, ctx_ref, ctx_k, check_steps, dec.layers, dec.num_splits):
        errs.append(rel_l2(out, ref))
        agree += int(out.argmax()) == int(ref.argmax())

    ctx_t = s.gen.fork(extra=torch_tokens)
    tok = model.special.bos
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(torch_tokens):
        tok = int(model.decode_step(ctx_t, tok).argmax())
    torch.cuda.synchronize()
    torch_dt = time.perf_counter() - t0

    tps = tokens / dt
    return {
        "what": "greedy decode, batch 1, bf16, random weights, CUDA graph",
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "prompt_tokens": s.gen.length, "tokens": tokens, "tokens_per_s": round(tps, 1),
        "ms_per_token": round(1e3 * dt / tokens, 3),
        "achieved_gb_s": round(_und_bytes(model) * tps / 1e9, 1),
        "peak_gib": round(peak, 2), "first_call_s": round(first_call, 2),
        "cache_capacity": dec.cache.capacity, "check_every": dec.check_every,
        "fused_qkv": dec.layers[0].qkv_weight is not None,
        "logits_rel_l2_max": max(errs), "logits_rel_l2_mean": sum(errs) / len(errs),
        "argmax_agree": f"{agree}/{check_steps}",
        "torch_tokens_per_s": round(torch_tokens / torch_dt, 1),
    }


if __name__ == "__main__":
    print(json.dumps(bench_decode_7b(), indent=1))
