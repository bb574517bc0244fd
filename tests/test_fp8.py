"""Opt-in FP8 compute: exact path untouched, FP8 path close to it (CPU: float8 + _scaled_mm run there)."""

import pytest
import torch
from conftest import rel_l2

import bagel_rt
from bagel_rt.fp8 import Fp8Weight, fp8_linear
from bagel_rt.tiny import write_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_fp8_linear_close_to_bf16():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 48).to(DEV, torch.bfloat16)
    x = torch.randn(37, 96, generator=g).to(DEV, torch.bfloat16)
    ref = lin(x).float()
    out = fp8_linear(x, Fp8Weight(lin)).float()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_l2(out, ref) < 0.06  # e4m3 has a 3-bit mantissa: ~2-4% per product


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter is chosen at import, without CUDA")
def test_fp8_compute_is_opt_in_and_close(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cpu", dtype=torch.bfloat16, backend="triton")
    assert pipe.compute == "bf16" and pipe.fp8_weights() is None
    torch_pipe = bagel_rt.load(d, device="cpu", backend="torch")
    with pytest.raises(bagel_rt.InputError, match="triton backend"):
        torch_pipe.compute = "fp8"
    # the interpreter cannot do bf16 arithmetic, so compare in fp32 activations with fp8 GEMMs
    pipe32 = bagel_rt.load(d, device="cpu", dtype=torch.float32, backend="triton")
    a = pipe32.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    pipe32.compute = "fp8"
    b = pipe32.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    assert len(pipe32.fp8_weights()) == 2 * 7  # every gen-expert Linear of both layers
    gap = rel_l2(b.latents, a.latents)
    assert 0 < gap < 0.15, gap  # measured 6.6e-2 on the tiny random model (4 steps, fp32 activations)
    pipe32.compute = "bf16"
    c = pipe32.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    assert torch.equal(c.latents, a.latents)  # the exact path is untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter is chosen at import, without CUDA")
def test_fp8_fused_producers_match_the_unfused_chain(tmp_path, monkeypatch):
    """The norms and the SwiGLU write the FP8 rows themselves; swapped for norm/SwiGLU + a separate quantizer
    (the previous chain) the whole generation must give the same bits."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from bagel_rt import kernels as K

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cpu", dtype=torch.float32, backend="triton")
    pipe.compute = "fp8"
    fused = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0).latents
    calls = []

    def chain(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)
        return run

    def add_norm(x, r, w, eps):
        h, r_new = K.add_rms_norm(x, r, w, eps)
        return K.quantize_rows_fp8(h), r_new

    def norm(x, w, eps):
        return K.quantize_rows_fp8(K.rms_norm(x, w, eps))

    monkeypatch.setattr(K, "rms_norm_fp8", chain("norm", norm))
    monkeypatch.setattr(K, "add_rms_norm_fp8", chain("add_norm", add_norm))
    monkeypatch.setattr(K, "swiglu_fp8", chain("swiglu", lambda g, u: K.quantize_rows_fp8(K.swiglu(g, u))))
    chained = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0).latents
    assert {"norm", "add_norm", "swiglu"} <= set(calls)  # the fused producers were in use
    assert torch.equal(fused, chained)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (capability >= 8.9)")
def test_fp8_compute_on_gpu_bf16(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cuda", dtype=torch.bfloat16, backend="triton")
    a = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    pipe.compute = "fp8"
    b = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    gap = rel_l2(b.latents, a.latents)
    assert 0 < gap < 0.15, gap
    pipe.compute = "bf16"
    c = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    assert torch.equal(c.latents, a.latents)  # the exact path is untouched
