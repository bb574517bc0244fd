"""Image preprocessing and output conversion (reference doc sections 4.6 and 4.8)."""

import pytest
import torch
from PIL import Image

from bagel_rt.errors import InputError
from bagel_rt.transforms import (
    VAE_RESIZE,
    VIT_RESIZE,
    flattened_position_ids,
    image_to_tensor,
    patchify,
    resize_dims,
    resize_image,
    tensor_to_image,
    to_rgb,
    unpatchify,
)

# (input, VAE-resized, ViT-resized from the VAE-resized image): the examples of reference doc section 4.8.
DOC_EXAMPLES = [
    ((1920, 1080), (1024, 576), (980, 546)),
    ((800, 600), (800, 608), (798, 602)),
    ((1024, 1024), (1024, 1024), (980, 980)),
    ((300, 200), (768, 512), (770, 518)),
    ((500, 2000), (256, 1024), (252, 980)),
]


@pytest.mark.parametrize("src, vae, vit", DOC_EXAMPLES)
def test_resize_dims_doc_examples(src, vae, vit):
    assert VAE_RESIZE == (1024, 512, 16) and VIT_RESIZE == (980, 224, 14)
    assert resize_dims(*src, *VAE_RESIZE) == vae
    assert resize_dims(*vae, *VIT_RESIZE) == vit


def test_resize_dims_max_pixels():
    # 1400^2 = 1,960,000 > 1,806,336: both sides are scaled by the *area* ratio 0.9216 (as the reference does,
    # not by its square root, which would give 1344): 1290.24 -> 1290 -> snapped to 1288.
    assert resize_dims(1400, 1400, 2000, 224, 14) == (1288, 1288)
    assert resize_dims(1344, 1344, 2000, 224, 14) == (1344, 1344)  # exactly at the budget: untouched
    assert resize_dims(1400, 1400, 2000, 224, 14, max_pixels=10**9) == (1400, 1400)


def test_resize_dims_bankers_rounding():
    # round(v / stride) on an exact .5 goes to the even multiple: 72 / 16 = 4.5 -> 4 -> 64, 88 / 16 = 5.5 -> 96,
    # 584 / 16 = 36.5 -> 36 -> 576, 600 / 16 = 37.5 -> 38 -> 608.
    assert resize_dims(584, 72, 10_000, 1, 16) == (576, 64)
    assert resize_dims(600, 88, 10_000, 1, 16) == (608, 96)


def test_resize_image_bicubic_and_skip():
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    out = resize_image(img, *VAE_RESIZE)
    assert out.size == (768, 512)
    same = Image.new("RGB", (1024, 576))
    assert resize_image(same, *VAE_RESIZE) is same
    # Bicubic matches PIL's own resize.
    grad = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    expected = grad.resize((768, 512), Image.Resampling.BICUBIC)
    assert resize_image(grad, *VAE_RESIZE).tobytes() == expected.tobytes()


def test_to_rgb_composites_alpha_on_white():
    img = Image.new("RGBA", (4, 2), (200, 0, 0, 0))
    img.putpixel((1, 0), (200, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (200, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (2, 2), 7)
    assert to_rgb(gray).getpixel((1, 1)) == (7, 7, 7)


def test_to_rgb_palette_with_transparency():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (50, 60, 70)


def test_image_to_tensor_range():
    img = Image.new("RGB", (3, 2), (0, 255, 51))
    x = image_to_tensor(img)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))
    with pytest.raises(InputError):
        image_to_tensor(Image.new("L", (2, 2)))


def test_tensor_to_image_truncates():
    # 0.5 * 255 = 127.5 and (0.999 * 0.5 + 0.5) * 255 = 254.87: both truncate, never round up.
    x = torch.tensor([0.0, 0.999, -2.0]).reshape(3, 1, 1).expand(3, 2, 4).clone()
    img = tensor_to_image(x)
    assert img.mode == "RGB" and img.size == (4, 2)
    assert img.getpixel((3, 1)) == (127, 254, 0)
    assert tensor_to_image(torch.full((3, 1, 1), 5.0)).getpixel((0, 0)) == (255, 255, 255)


def test_patchify_order_and_round_trip():
    c, p, h, w = 3, 2, 2, 3
    x = torch.arange(c * h * p * w * p, dtype=torch.float32).reshape(c, h * p, w * p)
    tokens = patchify(x, p)
    assert tokens.shape == (h * w, p * p * c)
    for r in range(h):
        for col in range(w):
            for py in range(p):
                for px in range(p):
                    for ch in range(c):
                        assert tokens[r * w + col, (py * p + px) * c + ch] == x[ch, r * p + py, col * p + px]
    assert torch.equal(unpatchify(tokens, h, w, p, c), x)
    z = torch.randn(16, 32, 20)
    assert torch.equal(unpatchify(patchify(z, 2), 16, 10, 2, 16), z)
    with pytest.raises(InputError):
        patchify(torch.zeros(3, 5, 4), 2)


def test_flattened_position_ids():
    ids = flattened_position_ids(48, 64, 64)
    assert ids.dtype == torch.long and ids.shape == (48 * 64,)
    assert torch.equal(ids, torch.arange(48 * 64))
    ids = flattened_position_ids(48, 40, 64)
    assert ids[40].item() == 64 and ids[-1].item() == 47 * 64 + 39
    ids = flattened_position_ids(3, 5, 70)
    assert ids.tolist() == [r * 70 + c for r in range(3) for c in range(5)]
