"""The triton backend's packed batched-CFG denoiser matches the torch backend (CPU: Triton interpreter, fp32)."""

import pytest
import torch
from conftest import rel_l2

import bagel_rt
from bagel_rt.sampler import CFGSettings
from bagel_rt.tiny import write_tiny_checkpoint

# kernels run where Triton can: the GPU when there is one, else the interpreter on the CPU. On a GPU the fp32
# attention dots run in TF32, so the agreement bound is looser there.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 5e-3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")
    return (bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="torch"),
            bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="triton"))


def _three_branch_session(pipe):
    """Think-style contexts: cond = [sys, prompt, plan], text-uncond = [sys], img-uncond = [sys, prompt]."""
    s = pipe.session(think=True, seed=4)
    s.add_text("Two dogs play in the park.")
    s._prefill_text(s.gen, "a plan")  # what think appends: to gen only
    return s


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_packed_three_branches_match_torch(pipes, renorm):
    cfg = CFGSettings(4.0, 2.0, (0.3, 1.0), 0.1, renorm)
    out = []
    for pipe in pipes:
        s = _three_branch_session(pipe)
        assert s.cfg_img.history != s.gen.history and s.cfg_text.history != s.gen.history
        out.append(s.gen_image((48, 64), cfg, num_timesteps=5, record=True))
    ref, fast = out
    assert rel_l2(fast.velocities, ref.velocities) < TOL
    assert rel_l2(fast.latents, ref.latents) < TOL


def test_packed_t2i_dedup_and_denoiser_reuse(pipes):
    torch_pipe, fast_pipe = pipes
    a = torch_pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=2)
    b = fast_pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=2)
    assert rel_l2(b.latents, a.latents) < TOL
    den = fast_pipe.fast_cache["denoiser"]
    assert den.B == 2  # cond + text-uncond; the image-uncond branch equals cond and is never computed
    c = fast_pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=2)
    assert fast_pipe.fast_cache["denoiser"] is den  # same shapes: reused (refilled), not rebuilt
    assert torch.equal(b.latents, c.latents)


def test_mlp_row_chunks_under_a_budget_match(pipes):
    """Under a memory budget the packed MLP runs in row chunks; the result does not change."""
    _, fast_pipe = pipes
    a = fast_pipe.generate("A red bagel", image_shapes=(128, 128), num_timesteps=3, seed=5)
    fast_pipe.offload = True  # what limit_gpu_memory sets (placement itself is a no-op on one device)
    try:
        b = fast_pipe.generate("A red bagel", image_shapes=(128, 128), num_timesteps=3, seed=5)
        assert fast_pipe.fast_cache["denoiser"].mlp_chunks > 1  # kept through the decode (test_kept_denoiser)
    finally:
        fast_pipe.offload = False
    assert rel_l2(b.latents, a.latents) < TOL


def test_weight_only_mlp_chunks_dequantize_once_per_layer(tmp_path, monkeypatch):
    """INT8 weights under a budget: the MLP's row chunks share one dequantized weight per Linear and layer
    (not one per chunk), and the result matches the unchunked run."""
    from bagel_rt.quant import Int8Linear

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="triton", weights="int8")
    a = pipe.generate("A red bagel", image_shapes=(128, 128), num_timesteps=3, seed=5)
    calls = []
    real = Int8Linear.dense_weight
    monkeypatch.setattr(Int8Linear, "dense_weight", lambda self, dt: calls.append(id(self)) or real(self, dt))
    pipe.offload = True
    b = pipe.generate("A red bagel", image_shapes=(128, 128), num_timesteps=3, seed=5)
    layers = pipe.model.params.llm.num_layers
    # 3 MLP Linears x layers x 2 forwards (3 timesteps = 2 steps): the 128 gen rows are chunked (4 x 32), the
    # 4 marker rows are not (fast.row_chunks)
    assert len(calls) == 3 * layers * 2, len(calls)
    assert len(set(calls)) == 3 * layers  # the gen expert's gate/up/down of each layer
    assert rel_l2(b.latents, a.latents) < TOL


def test_cudnn_attention_is_refused_where_it_cannot_run(pipes):
    """Asking for cuDNN attention with fp32 weights (or on the CPU) is a clear error when it is set (at load
    from the CLI), not a deep traceback in the middle of a request."""
    _, fast_pipe = pipes
    with pytest.raises(bagel_rt.InputError, match="attention 'cudnn' needs"):
        fast_pipe.attention = "cudnn"
    assert fast_pipe.attention == "auto"
    with pytest.raises(bagel_rt.InputError, match="attention must be"):
        fast_pipe.attention = "flash"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_latent_attention_matches_triton_bf16(tmp_path):
    """The cuDNN latent attention (one SDPA call per branch, native GQA) computes what the Triton kernel does:
    the attention itself to bf16 rounding, and whole generations to CFG-amplified bf16 noise."""
    from bagel_rt.kernels import varlen_attention_ref

    from bagel_rt.fast import PackedDenoiser

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cuda", dtype=torch.bfloat16, backend="triton")
    s = _three_branch_session(pipe)
    ctxs = [s.gen, s.cfg_text, s.cfg_img]
    outs = {}
    for impl in ("triton", "cudnn"):
        den = PackedDenoiser(pipe.model, ctxs, 3, 4, use_graphs=False, attention=impl)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(3 * den.N, den.Hq, den.D, device="cuda", dtype=torch.bfloat16, generator=g)
        den.arena_k[0].normal_(generator=g)
        den.arena_v[0].normal_(generator=g)
        m = den.branch_meta((0, 1, 2))
        outs[impl] = den._latent_attention(q, den.arena_k[0], den.arena_v[0], m)
    ref = varlen_attention_ref(
        q, den.arena_k[0], den.arena_v[0], m["cu_qg"], m["cu_k"], False, den.sm_scale, seqused_k=m["used_k"])
    assert rel_l2(outs["cudnn"], ref) < 1e-2 and rel_l2(outs["triton"], ref) < 1e-2

    # one packed forward of all three branches (no CFG combination to amplify bf16 noise)
    x = torch.randn(12, pipe.model.params.patch_latent_dim, device="cuda", generator=g)
    vel = {impl: PackedDenoiser(pipe.model, ctxs, 3, 4, use_graphs=False, attention=impl).velocities(x, 0.7, 3)
           for impl in ("triton", "cudnn")}
    assert rel_l2(vel["cudnn"], vel["triton"]) < 1e-2

    res = {}
    for impl in ("triton", "cudnn"):
        pipe.attention = impl
        s = _three_branch_session(pipe)
        res[impl] = s.gen_image((48, 64), CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel"),
                                num_timesteps=4, record=True)
        assert pipe.fast_cache["denoiser"].attention == impl
    # whole generations: CFG (text 4, image 2) amplifies the bf16 noise of this random tiny model to a few
    # 1e-2 (measured 4.3e-2 first-step velocities, 3.3e-2 latents on an H200); a wiring error is O(1)
    x = rel_l2(res["cudnn"].latents, res["triton"].latents)
    assert x < 0.1, x


def test_auto_attention_falls_back_when_cudnn_refuses(pipes):
    """Where "auto" picked cuDNN and cuDNN refuses the request, the denoiser warns once and uses the Triton
    kernel: the same velocities, no failed request (cuDNN itself is simulated: it cannot run on a CPU)."""
    from bagel_rt.fast import PackedDenoiser

    _, fast_pipe = pipes
    s = _three_branch_session(fast_pipe)
    ctxs = [s.gen, s.cfg_text, s.cfg_img]
    x = torch.randn(12, fast_pipe.model.params.patch_latent_dim, generator=torch.Generator().manual_seed(3))
    ref = PackedDenoiser(fast_pipe.model, ctxs, 3, 4, use_graphs=False).velocities(x.to(DEV), 0.6, 3).clone()
    den = PackedDenoiser(fast_pipe.model, ctxs, 3, 4, use_graphs=False)
    den.attention, den.requested_attention = "cudnn", "auto"  # what "auto" resolves to on Hopper

    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built.")

    den._attention_cudnn = refuse
    with pytest.warns(RuntimeWarning, match="cuDNN attention failed"):
        out = den.velocities(x.to(DEV), 0.6, 3)
    assert den.attention == "triton" and torch.equal(out, ref)
    # an explicit choice is not second-guessed: a one-line error that says what to use instead
    den2 = PackedDenoiser(fast_pipe.model, ctxs, 3, 4, use_graphs=False)
    den2.attention, den2.requested_attention, den2._attention_cudnn = "cudnn", "cudnn", refuse
    with pytest.raises(bagel_rt.InputError, match="No valid execution plans.*use attention 'triton'"):
        den2.velocities(x.to(DEV), 0.6, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_marker_stream_and_graphs_match_one_stream_eager(tmp_path):
    """The und (marker) rows on their own stream, eager first call, graph capture and replays: the same
    velocities as one stream without graphs, for each branch count and changing inputs (a missing wait
    between the streams reads stale keys/values: an O(1) error)."""
    from bagel_rt.fast import PackedDenoiser

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cuda", dtype=torch.bfloat16, backend="triton")
    s = _three_branch_session(pipe)
    ctxs = [s.gen, s.cfg_text, s.cfg_img]
    two = PackedDenoiser(pipe.model, ctxs, 3, 4, use_graphs=True)
    one = PackedDenoiser(pipe.model, ctxs, 3, 4, use_graphs=False, marker_stream=False)
    assert two.side is not None and one.side is None
    g = torch.Generator(device="cuda").manual_seed(1)
    for nb in (3, 1, 3, 2):
        for t in (0.9, 0.5, 0.2):  # eager first call, capture, replay (then replays only)
            x = torch.randn(12, pipe.model.params.patch_latent_dim, device="cuda", generator=g)
            ref = one.velocities(x, t, nb).clone()
            got = two.velocities(x, t, nb).clone()
            assert rel_l2(got, ref) < 1e-3, (nb, t, rel_l2(got, ref))
    assert set(two.graphs) == {("full", (0,)), ("full", (0, 1)), ("full", (0, 1, 2))}



def test_capture_out_of_memory_under_a_budget_runs_eagerly(tmp_path):
    """Under a budget a graph capture that runs out of memory (PyTorch cannot free cached blocks while one
    captures) is not the request's end: the denoiser warns, drops its graphs and computes the same velocities
    eagerly from then on; without a budget the error is raised."""
    from bagel_rt.fast import PackedDenoiser

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="triton")
    s = _three_branch_session(pipe)
    ctxs = [s.gen, s.cfg_text, s.cfg_img]
    ref = PackedDenoiser(pipe.model, ctxs, 3, 4, use_graphs=False)
    captures = []

    def no_memory(kind, sel):
        captures.append((kind, sel))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 130.00 MiB.")

    for lean in (True, False):
        den = PackedDenoiser(pipe.model, ctxs, 3, 4, use_graphs=False, lean=lean)
        den.use_graphs = True  # as on a GPU; the capture is what fails
        den._capture = no_memory
        x = torch.randn(12, pipe.model.params.patch_latent_dim, device=DEV, generator=torch.Generator(DEV))
        assert torch.equal(den.velocities(x, 0.9, 3), ref.velocities(x, 0.9, 3))  # the eager first call
        if not lean:
            with pytest.raises(torch.cuda.OutOfMemoryError):
                den.velocities(x, 0.8, 3)
            continue
        with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
            got = den.velocities(x, 0.8, 3)
        assert torch.equal(got, ref.velocities(x, 0.8, 3)) and den.graphs_refused and den.graphs == {}
        assert torch.equal(den.velocities(x, 0.7, 3), ref.velocities(x, 0.7, 3))
        assert captures == [("full", (0, 1, 2))]  # tried once, then eager


def test_refused_graphs_are_remembered_by_the_pipeline(tmp_path, monkeypatch):
    """Once a denoiser gave its graphs up under a budget, the pipeline's next requests denoise eagerly from the
    start (under a budget the denoiser is rebuilt per request, and each retried capture would cost a forward and
    its memory again); a new budget (limit_gpu_memory) clears it."""
    import bagel_rt.fast as fast

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="triton")
    asked = []
    real = fast.denoise_batch

    def refusing(*args, use_graphs, cache, **kw):
        asked.append(use_graphs)
        out = real(*args, use_graphs=use_graphs, cache=cache, **kw)
        cache["denoiser"].graphs_refused = True  # as after a capture that ran out of memory
        return out

    monkeypatch.setattr(fast, "denoise_batch", refusing)
    cfg = CFGSettings(4.0, 1.0, (0.0, 1.0), 0.0, "global")
    for _ in range(2):
        pipe.session(seed=1).gen_image((32, 32), cfg, num_timesteps=3)
    assert asked == [True, False] and pipe.graphs_refused
