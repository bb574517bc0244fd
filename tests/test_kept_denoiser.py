"""Under a budget, the packed denoiser stays through the VAE decode where both fit (placement.vae_fits), so the
next request of the same layout replays its graphs; it is released where they do not fit, when the decode runs
out of memory beside it, and before an input image's or a text phase's work (CPU: Triton interpreter, fp32)."""

import numpy as np
import pytest
import torch
from conftest import rel_l2

import bagel_rt
from bagel_rt import placement, session
from bagel_rt.memory_plan import VAE_PARAMS, vae_decode_bytes
from bagel_rt.tiny import write_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 5e-3
SHAPE = (32, 48)


@pytest.fixture
def pipe(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny")
    p = bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="triton")
    yield p
    p.offload = False


def test_denoiser_kept_through_the_vae_decode_and_reused(pipe):
    ref = pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    pipe.offload = True  # what a budget sets (the headroom check needs CUDA: on the CPU everything fits)
    pipe.fast_cache.clear()
    a = pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    den = pipe.fast_cache.get("denoiser")
    assert den is not None  # kept through the decode
    b = pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    assert pipe.fast_cache.get("denoiser") is den  # the next request of the layout reuses it
    assert rel_l2(a.latents, ref.latents) < TOL and torch.equal(a.latents, b.latents)


def test_denoiser_released_where_the_vae_does_not_fit(pipe, monkeypatch):
    pipe.offload = True
    monkeypatch.setattr(placement, "vae_fits", lambda *_: False)
    pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    assert not pipe.fast_cache


def test_decode_out_of_memory_beside_the_denoiser_retries_without_it(pipe, monkeypatch):
    ref = pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    pipe.offload = True
    real, calls = session.Session._vae_decode, []

    def decode(self, z):
        calls.append(bool(self.bagel.fast_cache))
        if self.bagel.fast_cache:  # the predicted room was not there
            raise torch.cuda.OutOfMemoryError("out of memory (test)")
        return real(self, z)

    monkeypatch.setattr(session.Session, "_vae_decode", decode)
    res = pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    assert calls == [True, False] and not pipe.fast_cache
    assert rel_l2(res.latents, ref.latents) < TOL
    assert (np.asarray(res.image) == np.asarray(ref.image)).all()


def test_decode_out_of_memory_without_a_kept_denoiser_is_raised(pipe, monkeypatch):
    pipe.offload = True
    monkeypatch.setattr(placement, "vae_fits", lambda *_: False)

    def decode(self, z):
        raise torch.cuda.OutOfMemoryError("out of memory (test)")

    monkeypatch.setattr(session.Session, "_vae_decode", decode)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no budget set: not turned into the budget's InputError
        pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)


def test_input_image_and_text_phase_release_the_kept_denoiser(pipe):
    from PIL import Image

    pipe.offload = True
    pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    assert pipe.fast_cache
    s = pipe.session(seed=1)
    s.add_image(Image.new("RGB", (64, 48), (30, 60, 90)))
    assert not pipe.fast_cache  # before the VAE encode and the ViT
    pipe.generate("A red bagel", image_shapes=SHAPE, num_timesteps=3, seed=5)
    assert pipe.fast_cache
    with placement.text_phase(pipe):
        assert not pipe.fast_cache


def test_vae_fits_counts_the_decode_and_its_slack(monkeypatch):
    class Bagel:  # what vae_fits reads: the headroom the budget leaves now
        pass

    need = vae_decode_bytes(1024, 1024)
    assert need == 4 * VAE_PARAMS + 1087 * 2**20
    assert vae_decode_bytes(512, 512) == 4 * VAE_PARAMS + (1087 * 2**20) // 4
    for free, fits in ((None, True), (need + placement.VAE_SLACK, True), (need + placement.VAE_SLACK - 1, False)):
        monkeypatch.setattr(placement, "_headroom", lambda bagel, free=free: free)
        assert placement.vae_fits(Bagel(), 1024, 1024) is fits
