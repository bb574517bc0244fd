"""Classifier-free-guidance combination + renorm + Euler step of the rectified-flow sampler, fused.

Exactly the reference's combination (bagel-reference.md section 4.5), with s_t = text_scale,
s_i = img_scale, m = renorm_min, eps = 1e-8:

* no guidance unless s_t > 1: v = v_c (also when s_i > 1);
* "global" / "channel": u = v_t + s_t (v_c - v_t); if s_i > 1: u = v_i + s_i (u - v_i);
  v = u * clamp(|v_c| / (|u| + eps), m, 1), with |.| the Frobenius norm over the whole [N, C] tensor
  (global) or the L2 norm of each row over C (channel);
* "text_channel": u = v_t + s_t (v_c - v_t); u = u * clamp(|v_c|_row / (|u|_row + eps), m, 1);
  if s_i > 1: v = v_i + s_i (u - v_i) (no renorm after the image step), else v = u;
* Euler: x_new = x - v * dt (x in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

RENORM_TYPES = ("global", "channel", "text_channel")
_EPS = 1e-8
# RENORM constexpr values of the kernels
_NONE, _GLOBAL, _CHANNEL, _TEXT_CHANNEL = 0, 1, 2, 3


def _check_args(v_t: Tensor | None, v_i: Tensor | None, text_scale: float, img_scale: float, renorm_type: str):
    if renorm_type not in RENORM_TYPES:
        raise NotImplementedError(f"renorm_type {renorm_type!r} is not one of {RENORM_TYPES}")
    if text_scale > 1.0 and v_t is None:
        raise ValueError(f"text_scale {text_scale} > 1 needs v_t")
    if text_scale > 1.0 and img_scale > 1.0 and v_i is None:
        raise ValueError(f"img_scale {img_scale} > 1 needs v_i")


def _row_or_global_scale(v_c: Tensor, u: Tensor, renorm_min: float, per_row: bool) -> Tensor:
    if per_row:
        norm_c, norm_u = v_c.norm(dim=-1, keepdim=True), u.norm(dim=-1, keepdim=True)
    else:
        norm_c, norm_u = v_c.norm(), u.norm()
    return (norm_c / (norm_u + _EPS)).clamp(min=renorm_min, max=1.0)


def cfg_euler_ref(
    x: Tensor,
    v_c: Tensor,
    v_t: Tensor | None,
    v_i: Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
    dt: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Reference in fp32. x: [N, C] fp32, v_*: [N, C] -> (x_new [N, C] fp32, v [N, C] fp32)."""
    _check_args(v_t, v_i, text_scale, img_scale, renorm_type)
    v_c = v_c.float()
    if text_scale <= 1.0:
        v = v_c
    else:
        u = v_t.float() + text_scale * (v_c - v_t.float())
        if renorm_type == "text_channel":
            u = u * _row_or_global_scale(v_c, u, renorm_min, per_row=True)
            v = v_i.float() + img_scale * (u - v_i.float()) if img_scale > 1.0 else u
        else:
            if img_scale > 1.0:
                u = v_i.float() + img_scale * (u - v_i.float())
            v = u * _row_or_global_scale(v_c, u, renorm_min, per_row=renorm_type == "channel")
    return x - v * dt, v


@triton.jit
def _load_rows(p, o_n, o_c, m, C):
    # [BLOCK_N, BLOCK_C] fp32 tile of a contiguous [N, C] tensor
    return tl.load(p + o_n[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _guided(b_c, vt, vi, o_n, o_c, m, C, text_scale, img_scale, renorm_min, eps,
            HAS_IMG: tl.constexpr, RENORM: tl.constexpr):
    # the guided velocity u before any global / channel renorm (text_channel renorm is done here)
    b_t = _load_rows(vt, o_n, o_c, m, C)
    b_u = b_t + text_scale * (b_c - b_t)
    if RENORM == 3:
        b_nc = tl.sqrt(tl.sum(b_c * b_c, axis=1))
        b_nu = tl.sqrt(tl.sum(b_u * b_u, axis=1))
        b_u = b_u * tl.minimum(tl.maximum(b_nc / (b_nu + eps), renorm_min), 1.0)[:, None]
    if HAS_IMG:
        b_i = _load_rows(vi, o_n, o_c, m, C)
        b_u = b_i + img_scale * (b_u - b_i)
    return b_u


@triton.jit
def _cfg_sumsq_kernel(vc, vt, vi, partial, N, C, text_scale, img_scale, renorm_min, eps,
                      HAS_IMG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # pass 1 of "global": partial[i] = (sum v_c^2, sum u^2) over this program's rows (no atomics: deterministic)
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_C)
    m = (o_n < N)[:, None] & (o_c < C)[None, :]
    # [BLOCK_N, BLOCK_C]
    b_c = _load_rows(vc, o_n, o_c, m, C)
    b_u = _guided(b_c, vt, vi, o_n, o_c, m, C, text_scale, img_scale, renorm_min, eps, HAS_IMG, 1)
    tl.store(partial + 2 * i_n, tl.sum(tl.sum(b_c * b_c, axis=1), axis=0))
    tl.store(partial + 2 * i_n + 1, tl.sum(tl.sum(b_u * b_u, axis=1), axis=0))


@triton.jit
def _cfg_euler_kernel(x, vc, vt, vi, partial, dt, x_out, v_out, N, C, P, text_scale, img_scale, renorm_min, eps,
                      HAS_IMG: tl.constexpr, RENORM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_C)
    m = (o_n < N)[:, None] & (o_c < C)[None, :]
    # [BLOCK_N, BLOCK_C]
    b_c = _load_rows(vc, o_n, o_c, m, C)
    if RENORM == 0:
        # no guidance: v = v_c
        b_v = b_c
    else:
        b_v = _guided(b_c, vt, vi, o_n, o_c, m, C, text_scale, img_scale, renorm_min, eps, HAS_IMG, RENORM)
    if RENORM == 1:
        # [BLOCK_P] partial sums of squares from pass 1; every program reduces them in the same order
        o_p = tl.arange(0, BLOCK_P)
        b_sc = tl.sum(tl.load(partial + 2 * o_p, mask=o_p < P, other=0.0), axis=0)
        b_su = tl.sum(tl.load(partial + 2 * o_p + 1, mask=o_p < P, other=0.0), axis=0)
        b_v = b_v * tl.minimum(tl.maximum(tl.sqrt(b_sc) / (tl.sqrt(b_su) + eps), renorm_min), 1.0)
    if RENORM == 2:
        b_nc = tl.sqrt(tl.sum(b_c * b_c, axis=1))
        b_nu = tl.sqrt(tl.sum(b_v * b_v, axis=1))
        b_v = b_v * tl.minimum(tl.maximum(b_nc / (b_nu + eps), renorm_min), 1.0)[:, None]
    b_dt = tl.load(dt)
    o = o_n[:, None] * C + o_c[None, :]
    b_x = tl.load(x + o, mask=m, other=0.0)
    tl.store(x_out + o, b_x - b_v * b_dt, mask=m)
    tl.store(v_out + o, b_v, mask=m)


def cfg_euler(
    x: Tensor,
    v_c: Tensor,
    v_t: Tensor | None,
    v_i: Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
    dt: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """CFG combination + renorm + Euler update in one kernel (two for "global"), no host sync.

    Args:
        x: [N, C] fp32 latent state x_t (contiguous).
        v_c: [N, C] conditional velocity (any float dtype, contiguous).
        v_t: [N, C] text-unconditional velocity, or None (only read when text_scale > 1).
        v_i: [N, C] image-unconditional velocity, or None (only read when text_scale > 1 and img_scale > 1).
        text_scale, img_scale, renorm_min: Python floats (baked into a captured CUDA graph).
        renorm_type: "global" | "channel" | "text_channel".
        dt: step size t_i - t_{i+1}: a Python float, or a 1-element fp32 tensor on x's device, so that one
            captured CUDA graph can be replayed for every step.
    Returns:
        (x_new, v): x_new = x - v * dt and the combined velocity v, both [N, C] fp32.

    Memory passes removed: eager CFG runs ~10 elementwise kernels plus 2-4 norm reductions over [N, C]
    tensors; here every input is read once (twice for "global": pass 1 writes only a few partial sums).
    """
    _check_args(v_t, v_i, text_scale, img_scale, renorm_type)
    assert x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous(), "x must be a contiguous fp32 [N, C]"
    N, C = x.shape
    guided = text_scale > 1.0
    has_img = guided and img_scale > 1.0
    for name, t in (("v_c", v_c), ("v_t", v_t if guided else None), ("v_i", v_i if has_img else None)):
        if t is not None:
            assert t.shape == (N, C) and t.is_contiguous() and t.device == x.device, f"{name} must be a [N, C]"
    if isinstance(dt, Tensor):
        assert dt.numel() == 1 and dt.dtype == torch.float32 and dt.device == x.device, "dt tensor: fp32 [1]"
    else:
        dt = torch.full((1,), float(dt), dtype=torch.float32, device=x.device)
    renorm = _NONE
    if guided:
        renorm = {"global": _GLOBAL, "channel": _CHANNEL, "text_channel": _TEXT_CHANNEL}[renorm_type]
    vt = v_t if guided else v_c
    vi = v_i if has_img else v_c
    x_out = torch.empty_like(x)
    v_out = torch.empty_like(x)
    if N == 0:
        return x_out, v_out
    block_c = triton.next_power_of_2(C)
    block_n = max(1, min(triton.next_power_of_2(N), 4096 // block_c))
    n_programs = triton.cdiv(N, block_n)
    args = (float(text_scale), float(img_scale), float(renorm_min), _EPS)
    partial = x_out  # unused unless global
    if renorm == _GLOBAL:
        partial = torch.empty((n_programs, 2), dtype=torch.float32, device=x.device)
        _cfg_sumsq_kernel[(n_programs,)](v_c, vt, vi, partial, N, C, *args,
                                         HAS_IMG=has_img, BLOCK_N=block_n, BLOCK_C=block_c)
    _cfg_euler_kernel[(n_programs,)](
        x, v_c, vt, vi, partial, dt, x_out, v_out, N, C, n_programs, *args,
        HAS_IMG=has_img, RENORM=renorm, BLOCK_N=block_n, BLOCK_C=block_c,
        BLOCK_P=triton.next_power_of_2(n_programs),
    )
    return x_out, v_out
