"""Batched requests: one ``generate`` / ``edit`` call that makes several images.

A call names its inputs (prompts; or image and instruction pairs) and ``n`` images per input. The images are
numbered input-major (input 0's n images, then input 1's) and image k gets its own seed: ``seed + k`` for an
int, ``seed[k]`` for a list, a random one for None. Each image is then exactly the request it would be alone
(its own session, seeded with its seed: the same VAE posterior noise, initial noise and sampled think text);
only the denoising runs together (:func:`bagel_rt.fast.denoise_batch` packs every image's CFG branches into
one forward per step on the triton backend; the torch backend steps the images in lockstep, one after
another within each step).

Everything here is checked before any model work: an empty list, ``n`` out of range, more than
:data:`MAX_BATCH_IMAGES` images, lists of unequal length, items of the wrong type, a seed list of the wrong
length or a seed out of range are :class:`bagel_rt.errors.InputError` with a message naming the argument.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from . import validate
from .cache import Context
from .errors import InputError
from .step_cache import StepCache

#: Most images one call makes (inputs x n). The packed forward's activations grow with the images
#: (at 1024x1024 each t2i image adds ~8200 rows to every GEMM, ~1 GiB of MLP intermediates per image in bf16).
MAX_BATCH_IMAGES = 16


@dataclass
class ImageJob:
    """One image of a denoising call.

    Attributes:
        ctxs: its CFG branch contexts {"cond", "text", "img"}.
        noise: [h*w, 64] float32 initial latents (token layout).
        h, w: latent grid (tokens per side).
        text_is_cond, img_is_cond: exact-dedup flags (that branch reuses the conditional velocity).
        step_cache: its step-cache state (None: every evaluation is a full forward).
        on_step: ``on_step(i, combined velocity [h*w, 64])`` after each step (recording, progress).
    """

    ctxs: dict[str, Context]
    noise: Tensor
    h: int
    w: int
    text_is_cond: bool
    img_is_cond: bool
    step_cache: StepCache | None = None
    on_step: Callable[[int, Tensor], None] | None = None


def as_list(name: str, value, kinds: tuple[type, ...], what: str) -> tuple[list, bool]:
    """(the items, whether ``value`` was a single item): a single item of ``kinds`` or a non-empty list (or
    tuple) of them."""
    if isinstance(value, kinds):
        return [value], True
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be {what} or a list of them, got {type(value).__name__}")
    if not value:
        raise InputError(f"{name} is an empty list; give at least one")
    for i, item in enumerate(value):
        if not isinstance(item, kinds):
            raise InputError(f"{name}[{i}] must be {what}, got {type(item).__name__}")
    return list(value), False


def pair_up(a_name: str, a: list, a_single: bool, b_name: str, b: list, b_single: bool) -> list[tuple]:
    """Pairs of two inputs' items: lists of equal length pair up; a single item is paired with every item of
    the other."""
    if a_single and not b_single:
        a = a * len(b)
    elif b_single and not a_single:
        b = b * len(a)
    elif len(a) != len(b):
        raise InputError(f"{a_name} has {len(a)} items and {b_name} {len(b)}; give lists of equal length, or a "
                         f"single item for one of them")
    return list(zip(a, b))


def count(n, inputs: int) -> int:
    """The number of images: ``n`` per input (an integer >= 1), at most :data:`MAX_BATCH_IMAGES` in all."""
    validate.integer("n", n, 1, MAX_BATCH_IMAGES)
    if inputs * n > MAX_BATCH_IMAGES:
        raise InputError(f"{inputs} inputs x n={n} is {inputs * n} images; one call makes at most "
                         f"{MAX_BATCH_IMAGES} (split the request)")
    return inputs * n


def seeds(seed, images: int) -> list[int]:
    """One seed per image: ``seed + k`` for an int, the list itself (of length ``images``), or random seeds
    for None."""
    if seed is None:
        return [secrets.randbits(62) for _ in range(images)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != images:
            raise InputError(f"seed is a list of {len(seed)} seeds for {images} images; give one per image "
                             f"(or one int: image k then uses seed + k)")
        return [validate.seed(s) for s in seed]
    first = validate.seed(seed)
    if first + images - 1 > validate.MAX_SEED:
        raise InputError(f"seed {first} + {images - 1} (one seed per image) is beyond the largest seed "
                         f"{validate.MAX_SEED}")
    return [first + k for k in range(images)]
