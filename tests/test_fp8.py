"""Opt-in FP8 compute: exact path untouched, FP8 path close to it (CPU: float8 + _scaled_mm run there)."""

import pytest
import torch
from bagel_rt.quant import FP8Linear
from conftest import rel_l2

import bagel_rt
from bagel_rt.compute import gen_linears
from bagel_rt.tiny import write_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter is chosen at import, without CUDA")
def test_fp8_compute_is_opt_in_and_close(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d = write_tiny_checkpoint(tmp_path / "tiny")
    # the interpreter cannot do bf16 arithmetic, so compare in fp32 activations with fp8 GEMMs
    pipe32 = bagel_rt.load(d, device="cpu", dtype=torch.float32, backend="triton", keep_bf16=True)
    assert pipe32.compute == "bf16"
    a = pipe32.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    pipe32.compute = "fp8"
    assert pipe32.compute == "fp8"
    gen = [m for _, _, m in gen_linears(pipe32.model)]
    assert len(gen) == 2 * 7 and all(type(m) is FP8Linear for m in gen)  # every gen-expert Linear, both layers
    b = pipe32.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    gap = rel_l2(b.latents, a.latents)
    assert 0 < gap < 0.15, gap  # measured 6.6e-2 on the tiny random model (4 steps, fp32 activations)
    pipe32.compute = "bf16"  # the kept bf16 Linears come back
    assert all(type(m) is torch.nn.Linear for _, _, m in gen_linears(pipe32.model))
    c = pipe32.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    assert torch.equal(c.latents, a.latents)  # the exact path is untouched


def test_fp8_compute_drops_the_bf16_weights_unless_kept(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cpu", backend="torch", compute="fp8")
    assert pipe.compute == "fp8" and not pipe.bf16_linears
    assert not any(type(m) is torch.nn.Linear for _, _, m in gen_linears(pipe.model))
    with pytest.raises(bagel_rt.InputError, match="keep_bf16"):
        pipe.compute = "bf16"
    assert pipe.compute == "fp8"  # nothing changed
    res = pipe.generate("A red bagel", image_shapes=(32, 32), num_timesteps=3, seed=0)  # the torch backend too
    assert torch.isfinite(res.latents).all()
    with pytest.raises(bagel_rt.InputError, match="needs INT8 weights"):
        pipe.compute = "int8"


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
    pipe = bagel_rt.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", keep_bf16=True)
    a = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    pipe.compute = "fp8"
    b = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    gap = rel_l2(b.latents, a.latents)
    assert 0 < gap < 0.15, gap
    pipe.compute = "bf16"
    c = pipe.generate("A red bagel", image_shapes=(32, 48), num_timesteps=4, seed=0)
    assert torch.equal(c.latents, a.latents)  # the exact path is untouched
