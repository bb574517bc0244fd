"""The rectified-flow sampler: schedule, CFG combination, Euler loop (reference doc 4.5, 6.8-6.9).

Convention: t = 1 is noise, t = 0 data; the model predicts v = eps - x0; each step ``x -= v * dt``.
The schedule is ``linspace(1, 0, N)`` warped by the shift ``s*t / (1 + (s-1)*t)``; the model is evaluated at
the first N-1 points. CFG is active at t iff ``lo < t <= hi``.

Exact shortcuts (DESIGN §3), decided per step and never approximate:

* a branch whose scale is <= 1 at a step is not computed (the reference computes the image-unconditional
  branch even when text guidance is off, then ignores it);
* a branch whose context is provably identical to the conditional one (equal prefill history — the
  image-unconditional context of text-to-image) reuses the conditional velocity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
from .validate import integer, number

RENORM_TYPES = ("global", "channel", "text_channel")
#: Largest guidance scale and timestep shift accepted (the app's sliders stop at 8 and 5), and most steps.
MAX_SCALE, MAX_STEPS = 100.0, 1000


@dataclass(frozen=True)
class CFGSettings:
    """Guidance settings with the official names and meanings."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"

    def __post_init__(self):
        number("cfg_text_scale", self.cfg_text_scale, 0.0, MAX_SCALE)
        number("cfg_img_scale", self.cfg_img_scale, 0.0, MAX_SCALE)
        for name, v in zip(("cfg_interval[0]", "cfg_interval[1]", "cfg_renorm_min"), (*self.cfg_interval,
                                                                                       self.cfg_renorm_min)):
            number(name, v, 0.0, 1.0)
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise InputError(f"cfg_renorm_type {self.cfg_renorm_type!r} is not supported; "
                             f"choose one of {', '.join(RENORM_TYPES)}")
        lo, hi = self.cfg_interval
        if not (0.0 <= lo <= hi <= 1.0):
            raise InputError(f"cfg_interval {tuple(self.cfg_interval)} must satisfy 0 <= lo <= hi <= 1")
        if not (0.0 <= self.cfg_renorm_min <= 1.0):
            raise InputError(f"cfg_renorm_min {self.cfg_renorm_min} must be in [0, 1]")

    def scales_at(self, t: float) -> tuple[float, float]:
        """(text, image) scales in force at time t: both 1.0 outside the interval."""
        lo, hi = self.cfg_interval
        if lo < t <= hi:
            return self.cfg_text_scale, self.cfg_img_scale
        return 1.0, 1.0


def schedule(num_timesteps: int, shift: float) -> Tensor:
    """Shifted timesteps [num_timesteps] float32 from 1 to 0 (the last, 0, is never evaluated)."""
    integer("num_timesteps", num_timesteps, 2, MAX_STEPS)
    number("timestep_shift", shift, 0.0, MAX_SCALE, lo_open=True)
    t = torch.linspace(1, 0, num_timesteps)
    return shift * t / (1 + (shift - 1) * t)


def combine_cfg(v_c: Tensor, v_t: Tensor | None, v_i: Tensor | None, text_scale: float, img_scale: float,
                renorm_type: str, renorm_min: float) -> Tensor:
    """The reference's CFG combination and renorm, in the velocities' dtype (bf16 in the reference).

    Args:
        v_c: [N, C] conditional velocity.
        v_t: [N, C] text-unconditional velocity (needed iff text_scale > 1).
        v_i: [N, C] image-unconditional velocity (needed iff text_scale > 1 and img_scale > 1).
    Returns:
        [N, C] guided velocity. Nothing is combined unless text_scale > 1 (then v_c is returned).
    """
    if text_scale <= 1.0:
        return v_c
    eps = 1e-8
    u = v_t + text_scale * (v_c - v_t)
    if renorm_type == "text_channel":
        scale = (v_c.norm(dim=-1, keepdim=True) / (u.norm(dim=-1, keepdim=True) + eps)).clamp(renorm_min, 1.0)
        u = u * scale
        return v_i + img_scale * (u - v_i) if img_scale > 1.0 else u
    if img_scale > 1.0:
        u = v_i + img_scale * (u - v_i)
    if renorm_type == "global":
        scale = (v_c.norm() / (u.norm() + eps)).clamp(renorm_min, 1.0)
    else:  # channel
        scale = (v_c.norm(dim=-1, keepdim=True) / (u.norm(dim=-1, keepdim=True) + eps)).clamp(renorm_min, 1.0)
    return u * scale


def velocity_sources(text_scale: float, img_scale: float, text_is_cond: bool, img_is_cond: bool) -> dict[str, str]:
    """Which branch supplies each velocity the combination needs at a step (the exact-skip rules, in one place).

    Returns a dict over the needed velocities ("cond" always; "text" iff text_scale > 1; "img" iff also
    img_scale > 1), each mapped to the branch that is actually computed for it: "cond" for a branch whose
    context provably equals the conditional one. ``set(result.values())`` is the set of forwards to run.
    """
    src = {"cond": "cond"}
    if text_scale > 1.0:
        src["text"] = "cond" if text_is_cond else "text"
        if img_scale > 1.0:
            src["img"] = "cond" if img_is_cond else "img"
    return src


VelocityFn = Callable[[str, Tensor, float], Tensor]


def denoise(velocity: VelocityFn, noise: Tensor, num_timesteps: int, timestep_shift: float, cfg: CFGSettings,
            text_is_cond: bool = False, img_is_cond: bool = False,
            on_step: Callable[[int, Tensor], None] | None = None, step_cache=None) -> Tensor:
    """Integrate from noise to latents.

    Args:
        velocity: ``velocity(branch, x, t)`` with branch in {"cond", "text", "img"} -> [N, C].
        noise: [N, C] float32 initial latents (token layout).
        text_is_cond / img_is_cond: the branch's context equals the conditional one (exact dedup).
        on_step: called with (step index, combined velocity) after each step (progress, recording).
        step_cache: the request's :class:`bagel_rt.step_cache.StepCache` when ``velocity`` is a cached one
            (:func:`bagel_rt.step_cache.velocity.cached_velocity`): told which branch supplied each velocity.
    Returns:
        [N, C] float32 final latents.
    """
    x = noise.float()
    for i, x_i, v in denoise_steps(velocity, noise, num_timesteps, timestep_shift, cfg, text_is_cond, img_is_cond,
                                   step_cache):
        x = x_i
        if on_step is not None:
            on_step(i, v)
    return x


def denoise_steps(velocity: VelocityFn, noise: Tensor, num_timesteps: int, timestep_shift: float,
                  cfg: CFGSettings, text_is_cond: bool = False, img_is_cond: bool = False,
                  step_cache=None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """:func:`denoise` one step at a time: yields (step index, x after the step [N, C] float32, combined
    velocity [N, C]) after each step, so that several images can be stepped in lockstep (a batch on the torch
    backend)."""
    ts = schedule(num_timesteps, timestep_shift)
    dts = ts[:-1] - ts[1:]
    x = noise.float()
    for i in range(num_timesteps - 1):
        t = float(ts[i])
        st, si = cfg.scales_at(t)
        src = velocity_sources(st, si, text_is_cond, img_is_cond)
        computed = {b: velocity(b, x, t) for b in ("cond", "text", "img") if b in src.values()}
        v_t = computed[src["text"]] if "text" in src else None
        v_i = computed[src["img"]] if "img" in src else None
        v = combine_cfg(computed["cond"], v_t, v_i, st, si, cfg.cfg_renorm_type, cfg.cfg_renorm_min)
        if step_cache is not None:
            step_cache.record_step(src)
        # the reference multiplies the bf16 velocity by a 0-dim fp32 dt (result bf16), then updates fp32 x
        x = x - (v * dts[i].to(v.device)).float()
        yield i, x, v
