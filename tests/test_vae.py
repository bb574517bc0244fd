"""The FLUX autoencoder: hyper-parameter inference, checkpoint layout, posterior sampling, and the decoder
against images decoded by the official code (tests/golden/outputs)."""

import numpy as np
import pytest
import torch
from conftest import GOLDEN, rel_l2
from safetensors.torch import load_file

from bagel_rt.config import VAEParams
from bagel_rt.errors import CheckpointError, InputError
from bagel_rt.transforms import tensor_to_image, unpatchify
from bagel_rt.vae import AutoEncoder, expected_vae_shapes, vae_params_from_shapes

AE_FILE = GOLDEN / "tiny-a" / "ae.safetensors"
TINY = VAEParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, z_channels=16, in_channels=3)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return load_file(AE_FILE)


@pytest.fixture(scope="module")
def shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def ae(state_dict) -> AutoEncoder:
    model = AutoEncoder(TINY)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_params_inferred_from_shapes(shapes):
    assert vae_params_from_shapes(shapes, "ae.safetensors") == TINY


def test_state_dict_matches_checkpoint(shapes):
    model_shapes = {k: tuple(v.shape) for k, v in AutoEncoder(TINY).state_dict().items()}
    assert len(shapes) == 240
    assert model_shapes == shapes
    assert expected_vae_shapes(TINY) == shapes


def test_full_size_layout():
    # Reference doc section 2.4: the released ae.safetensors has 244 tensors.
    shapes = expected_vae_shapes(VAEParams())
    assert len(shapes) == 244
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert vae_params_from_shapes(shapes, "ae") == VAEParams()


def test_missing_key_is_named(shapes):
    broken = {k: v for k, v in shapes.items() if k != "encoder.conv_in.weight"}
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: missing key 'encoder\.conv_in\.weight'"):
        vae_params_from_shapes(broken, "ae.safetensors")


def test_inconsistent_moments_channels(shapes):
    broken = dict(shapes)
    broken["encoder.conv_out.weight"] = (16, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.weight has 16 output channels.*32"):
        vae_params_from_shapes(broken, "ae.safetensors")


def test_encode_decode_shapes(ae):
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x, torch.Generator().manual_seed(1))
        y = ae.decode(z)
    assert z.shape == (2, 16, 4, 6) and z.dtype == torch.float32
    assert y.shape == (2, 3, 32, 48)
    assert torch.isfinite(z).all() and torch.isfinite(y).all()


def test_encode_rejects_bad_size(ae):
    with pytest.raises(InputError, match="divisible by 8"):
        ae.encode(torch.zeros(1, 3, 30, 32), None)


def test_posterior_sample_follows_seed(ae):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p = ae.params
    with torch.no_grad():
        z1 = ae.encode(x, torch.Generator().manual_seed(42))
        z2 = ae.encode(x, torch.Generator().manual_seed(42))
        z_mean = ae.encode(x, None)
        mean, logvar = ae.encoder(x).chunk(2, dim=1)
    assert torch.equal(z1, z2)
    torch.testing.assert_close(z_mean, p.scale_factor * (mean - p.shift_factor))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(42))
    expected = p.scale_factor * (mean + torch.exp(0.5 * logvar) * eps - p.shift_factor)
    torch.testing.assert_close(z1, expected)
    assert not torch.allclose(z1, z_mean)
    # The draw consumes exactly numel(mean) normals from the generator, in that order.
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        ae.encode(x, g)
    follow = torch.Generator().manual_seed(42)
    torch.randn(mean.shape, generator=follow)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=follow))


@pytest.mark.parametrize("case, height, width", [("t2i_256", 256, 256), ("t2i_192x320_channel", 192, 320)])
def test_decoder_matches_reference_image(ae, case, height, width):
    golden = load_file(GOLDEN / "outputs" / f"{case}.safetensors")
    h, w = height // 16, width // 16
    # Final latents in token layout [h*w, 2*2*16] -> [16, 2h, 2w] (reference doc section 4.6).
    z = unpatchify(golden["latents"], h, w, 2, 16)
    with torch.no_grad():
        x = ae.decode(z[None])[0]
    image = torch.from_numpy(np.asarray(tensor_to_image(x)).copy())
    ref = golden["image"]
    assert image.shape == ref.shape == (height, width, 3)
    diff = (image.int() - ref.int()).abs()
    # The reference decoded in fp32 on the CPU too; only pixels sitting on a truncation boundary may flip.
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 1e-3
    assert rel_l2(image.float(), ref.float()) < 1e-3


def test_lean_inference_path_matches_plain_path(monkeypatch):
    """Without autograd, large activations run norm->swish->conv and upsample->conv over row bands; the
    result equals the plain path up to float rounding order (band edges included: 40 rows is not a multiple
    of the band height)."""
    from bagel_rt import vae as V

    torch.manual_seed(0)
    ae = V.AutoEncoder(V.VAEParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()
    for m in ae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.normal_(0, 0.1)
    z = torch.randn(1, 16, 40, 34)  # decoded to 320 x 272: the two top levels take the lean path
    monkeypatch.setattr(V, "ATTN_CHUNK", 500)  # the mid attention over 40 x 34 positions runs in 3 query chunks
    with torch.no_grad():
        assert V._lean(torch.empty(1, 1, 320, 272)) and not V._lean(torch.empty(1, 1, 40, 34))
    with torch.enable_grad():
        ref = ae.decode(z).detach()
    with torch.no_grad():
        out = ae.decode(z)
    assert (out - ref).abs().max() < 1e-4 and float((out - ref).norm() / ref.norm()) < 1e-5


def _random_vae(params: VAEParams, seed: int):
    from bagel_rt.random_weights import random_module

    return random_module(lambda: AutoEncoder(params), "cpu", torch.float32, seed)


@pytest.mark.parametrize("hw, rows", [((6, 5), 4), ((7, 9), 3), ((3, 4), 2), ((5, 6), 64)])
def test_streamed_levels_match_plain_path(monkeypatch, hw, rows):
    """Decode and encode with every level streamed over row bands (the threshold lowered to all sizes) equal
    the plain path to fp32 rounding: odd heights and widths, bands that do not divide the height, bands of the
    2-row halo that writing a block over its input allows, a band taller than the image; two residual blocks
    per level, so the encoder streams several blocks in a row."""
    from bagel_rt import vae as V

    ae = _random_vae(VAEParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2), seed=3)
    g = torch.Generator().manual_seed(sum(hw))
    z = torch.randn(1, 16, *hw, generator=g)
    x = torch.rand(2, 3, 8 * hw[0], 8 * hw[1], generator=g) * 2 - 1
    with torch.no_grad():
        ref_dec, ref_enc = ae.decode(z), ae.encoder(x)
        monkeypatch.setattr(V, "LEAN_MIN_PIXELS", 1)
        monkeypatch.setattr(V, "LEAN_ROWS", rows)
        dec, enc = ae.decode(z), ae.encoder(x)
    for out, ref in ((dec, ref_dec), (enc, ref_enc)):
        assert out.shape == ref.shape
        # fp32 rounding of two summation orders: 1.05e-6 seen on a CPU run with more threads than CI's two
        assert float((out - ref).norm() / ref.norm()) < 4e-6 and (out - ref).abs().max() < 1e-4


def test_band_statistics_match_group_norm(monkeypatch):
    """GroupNorm statistics merged from band passes: band means that differ (a trend down the rows, so the
    spread between bands is part of the variance) and a channel offset of 1e3 (a large mean against unit
    spread, where a naive fp32 sum-of-squares formula would lose the variance) still match GroupNorm."""
    from bagel_rt import vae as V

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 37, 11, generator=g) + 1e3 * torch.rand(1, 64, 1, 1, generator=g)
    x += torch.linspace(-3, 3, 37)[:, None]
    monkeypatch.setattr(V, "LEAN_ROWS", 8)  # 5 bands, the last one short
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    norm.bias.data.normal_(generator=g)
    scale, shift = V._norm_affine(lambda a, b: x[:, :, a:b], 37, norm)
    with torch.no_grad():
        torch.testing.assert_close(x * scale + shift, norm(x), rtol=1e-4, atol=1e-4)


def test_streaming_saves_memory(monkeypatch):
    """Live-tensor accounting of a lean decode and encode on meta tensors (no arithmetic): the decoder's
    upsampled input of its last level (64 ch at full size) and the encoder's level-0 activations (32 ch at full
    size) are never stored, and the peak stays near the one full-size tensor each must write."""
    from pathlib import Path

    from bagel_rt import vae as V

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from vae_memory import LiveTensorBytes

    with torch.device("meta"):
        ae = AutoEncoder(VAEParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2))
    monkeypatch.setattr(V, "LEAN_MIN_PIXELS", 64 * 64)
    monkeypatch.setattr(V, "LEAN_ROWS", 16)
    size = 256
    full = 32 * size * size * 4  # a 32-channel full-size activation: 8 MiB
    z = torch.empty(1, 16, size // 8, size // 8, device="meta")
    x = torch.empty(1, 3, size, size, device="meta")
    # Largest tensor: decode, up.0's 32-ch output (the plain lean path stored the 64-ch upsampled input, 2 full);
    # encode, level 1's 64-ch half-size output (before: level 0's activations, 1 full). Peaks before: 4.8 / 3.8.
    cases = ((lambda: ae.decode(z), full, 2.5 * full), (lambda: ae.encoder(x), full / 2, 2.0 * full))
    for fn, largest, peak in cases:
        mode = LiveTensorBytes()
        with torch.no_grad(), mode:
            fn()
        assert mode.largest <= largest and mode.peak < peak, (mode.largest / full, mode.peak / full)
