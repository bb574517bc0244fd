"""Image preprocessing and output conversion (reference doc sections 4.6 and 4.8).

Input images go: ``to_rgb`` -> ``resize_image`` with ``VAE_RESIZE`` -> (VAE path) ``image_to_tensor`` and,
for the ViT, ``resize_image`` of that already-resized image with ``VIT_RESIZE``. Pixel tensors and latents
are cut into tokens with ``patchify`` in (py, px, c) order.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InputError

#: (max_size, min_size, stride) of the official VAE and ViT image transforms.
VAE_RESIZE = (1024, 512, 16)
VIT_RESIZE = (980, 224, 14)

#: Default pixel budget of the official ImageTransform: 14 * 14 * 9 * 1024.
MAX_PIXELS = 1_806_336


def _snap(v: float, stride: int) -> int:
    # Python's round() is banker's rounding; the reference uses it too, so ties go to even.
    return max(stride, int(round(v / stride) * stride))


def _rescale(w: int, h: int, scale: float, stride: int) -> tuple[int, int]:
    return _snap(round(w * scale), stride), _snap(round(h * scale), stride)


def resize_dims(
    w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Target (width, height) of the official ``MaxLongEdgeMinShortEdgeResize`` rule.

    Scale so the long side is at most ``max_size`` but the short side at least ``min_size`` (the minimum
    wins), snap both sides to multiples of ``stride``, then shrink for ``max_pixels`` and finally for
    ``max_size`` again; that last step may break ``min_size``, as in the reference.
    """
    if w <= 0 or h <= 0:
        raise InputError(f"image size must be positive, got {w}x{h}")
    scale = min(max_size / max(w, h), 1.0)
    scale = max(scale, min_size / min(w, h))
    w2, h2 = _rescale(w, h, scale, stride)
    if w2 * h2 > max_pixels:
        # The reference scales the sides by the *area* ratio (not its square root); kept for parity.
        w2, h2 = _rescale(w2, h2, max_pixels / (w2 * h2), stride)
    if max(w2, h2) > max_size:
        w2, h2 = _rescale(w2, h2, max_size / max(w2, h2), stride)
    return w2, h2


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB; images with an alpha channel (RGBA, LA, P with transparency) are put on white."""
    has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def resize_image(img: Image.Image, max_size: int, min_size: int, stride: int) -> Image.Image:
    """Resize with the official rule (see :func:`resize_dims`) and PIL bicubic resampling."""
    size = resize_dims(img.width, img.height, max_size, min_size, stride)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.BICUBIC)


def image_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1] ((x / 255 - 0.5) / 0.5)."""
    if img.mode != "RGB":
        raise InputError(f"expected an RGB image, got mode {img.mode!r} (use to_rgb first)")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (x.float() / 255.0 - 0.5) / 0.5


def tensor_to_image(x: Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB PIL image. Truncates to uint8 (no rounding), as the reference does."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise InputError(f"expected an image tensor [3, H, W], got {tuple(x.shape)}")
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy())


def patchify(x: Tensor, p: int) -> Tensor:
    """[C, H, W] -> tokens [(H/p) * (W/p), p * p * C], row-major over patches, each in (py, px, c) order."""
    c, hh, ww = x.shape
    if hh % p or ww % p:
        raise InputError(f"size {hh}x{ww} is not divisible by the patch size {p}")
    h, w = hh // p, ww // p
    # [C, h, py, w, px] -> [h, w, py, px, C]
    return x.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def unpatchify(tokens: Tensor, h: int, w: int, p: int, c: int) -> Tensor:
    """Inverse of :func:`patchify`: tokens [h * w, p * p * c] -> [c, h * p, w * p]."""
    if tokens.shape != (h * w, p * p * c):
        raise InputError(f"expected tokens [{h * w}, {p * p * c}], got {tuple(tokens.shape)}")
    # [h, w, py, px, C] -> [C, h, py, w, px]
    return tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


def flattened_position_ids(h: int, w: int, max_per_side: int) -> Tensor:
    """Position id of each patch of an h x w grid in a max_per_side-wide table: r * max_per_side + c, [h * w]."""
    if h > max_per_side or w > max_per_side:
        raise InputError(f"grid {h}x{w} exceeds the position table side {max_per_side}")
    rows = torch.arange(h).unsqueeze(1) * max_per_side
    return (rows + torch.arange(w).unsqueeze(0)).reshape(-1)
