"""The FLUX.1 autoencoder that BAGEL uses for image latents (reference doc sections 1.4 and 2.4).

Module and parameter names equal the keys of the official ``ae.safetensors``, so the file loads with
``load_state_dict(strict=True)`` and no renaming. Shapes in docstrings: B batch, C channels, H/W pixels,
h/w latent positions (H / downsample).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEParams
from .errors import CheckpointError, InputError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: Tensor, inplace: bool = False) -> Tensor:
    return x.mul_(torch.sigmoid(x)) if inplace else x * torch.sigmoid(x)


# -- memory-lean inference path -----------------------------------------------------------------------------
# At 1024^2 in fp32 a full-resolution activation is 0.5-1 GiB and the VAE decode is the memory peak of a whole
# request. Without autograd, a 3x3 convolution only needs its input rows plus one halo row on each side, and
# GroupNorm only needs its per-group statistics, so the full-resolution levels run over row bands. An
# activation is then a ``Rows`` function, rows [a, b) -> [B, C, b - a, W], computed on demand from the last
# tensor that does exist; a GroupNorm's statistics cost one pass over the bands (recomputing what leads to
# them), and only the level's output is written whole. Same operations, same results up to float rounding
# order (GroupNorm as x * scale + shift from fp32 statistics). Live tensors at 1024^2, FLUX VAE, counted on
# the CPU by benchmarks/vae_memory.py: decode 2147 -> 1005 MiB, encode 1665 -> 492 MiB (row bands of single
# convolutions only -> whole levels streamed). The price is recomputation: each norm's statistics pass reruns
# the convolutions before it (1024^2 decode: ~17 instead of ~9 TFLOP by count; CPU, 320^2 decode + encode of
# random VAEs: 1.4-1.9x the time of the per-convolution bands). The GPU cost is measured by vae_memory.py.
LEAN_MIN_PIXELS = 256 * 256  # below this the plain path is used (it is the reference path everywhere)
LEAN_ROWS = 64  # rows per band; must be >= the halo of an in-place write (2 rows, see _write)
# The mid block's single-head attention over all positions of the latent grid (128^2 = 16384 at 1024^2), head
# width 512, fp32: flash attention cannot take it (fp16/bf16 only, head dim <= 256), and SDPA's fallback needs
# memory that grows with N^2. Without autograd the queries run in chunks of this many rows (same per-row
# arithmetic): measured on an H200, the 1024^2 decode's peak fell by 0.30 GiB (NF4 request, 10.16 -> 9.86 GiB).
ATTN_CHUNK = 2048

Rows = Callable[[int, int], Tensor]  # rows [a, b) of a [B, C, H, W] activation -> [B, C, b - a, W]


def _lean(x: Tensor) -> bool:
    return not torch.is_grad_enabled() and x.shape[-2] * x.shape[-1] >= LEAN_MIN_PIXELS


def _rows_of(x: Tensor) -> Rows:
    return lambda a, b: x[:, :, a:b]


def _norm_affine(src: Rows, height: int, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) [B, C, 1, 1] such that GroupNorm(x) = x * scale + shift, x of ``height`` rows
    given by ``src``.

    One pass over the bands: each band's per-group var_mean in fp32 (as GroupNorm computes it), merged in fp64
    with the parallel-variance rule (var = sum_k w_k (var_k + (mean_k - mean)^2), w_k the band's share of the
    rows), so the statistics equal a whole-tensor var_mean up to fp32 rounding.
    """
    g = norm.num_groups
    stats, weights = [], []
    for r0 in range(0, height, LEAN_ROWS):
        t = src(r0, min(height, r0 + LEAN_ROWS))
        var, mean = torch.var_mean(t.float().unflatten(1, (g, -1)), dim=(2, 3, 4), unbiased=False)  # [B, G]
        stats.append(torch.stack([mean, var]).double())
        weights.append(t.shape[2] / height)
        dtype = t.dtype
        del t
    st = torch.stack(stats)  # [bands, 2, B, G]
    w = torch.tensor(weights, dtype=torch.float64, device=st.device)
    mean = torch.einsum("k,kbg->bg", w, st[:, 0])
    var = torch.einsum("k,kbg->bg", w, st[:, 1] + (st[:, 0] - mean) ** 2)
    rstd = torch.rsqrt(var.float() + norm.eps)  # [B, G]
    c = norm.num_channels
    scale = rstd.repeat_interleave(c // g, dim=1) * norm.weight.float()
    shift = norm.bias.float() - mean.float().repeat_interleave(c // g, dim=1) * scale
    return scale.to(dtype)[:, :, None, None], shift.to(dtype)[:, :, None, None]


def _norm_swish(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """swish(t * scale + shift) in one new tensor (same two roundings as ``t * scale + shift``)."""
    t = (t * scale).add_(shift)
    return t.mul_(torch.sigmoid(t))


def _conv_band(t: Tensor, t_lo: int, a: int, b: int, conv: nn.Conv2d, height: int) -> Tensor:
    """Rows [a, b) of a 3x3, padding-1 ``conv`` over an input of ``height`` rows; ``t`` holds input rows from
    ``t_lo`` on and covers [a - 1, b + 1] within the input. Zero rows only at the true borders."""
    lo, hi = max(0, a - 1), min(height, b + 1)
    t = F.pad(t[:, :, lo - t_lo:hi - t_lo], (0, 0, int(lo == a), int(hi == b)))
    return F.conv2d(t, conv.weight, conv.bias, padding=(0, 1))


def _conv_src(src: Rows, conv: nn.Conv2d, height: int) -> Rows:
    """Rows of a 3x3, padding-1 ``conv`` over the ``height`` rows that ``src`` gives."""
    return lambda a, b: _conv_band(src(max(0, a - 1), min(height, b + 1)), max(0, a - 1), a, b, conv, height)


def _norm_swish_conv(src: Rows, height: int, norm: nn.GroupNorm, conv: nn.Conv2d) -> Rows:
    """Rows of conv(swish(norm(x))), x given by ``src``; the norm's statistics are taken here (one pass)."""
    scale, shift = _norm_affine(src, height, norm)
    return _conv_src(lambda a, b: _norm_swish(src(a, b), scale, shift), conv, height)


def _write(src: Rows, height: int, out: Tensor | None = None) -> Tensor:
    """Rows [0, height) of ``src`` into ``out`` (a new tensor if None), band by band.

    ``out`` may be the very tensor ``src`` reads from, if a band reads at most 2 <= LEAN_ROWS rows beyond its own:
    each band is held back until the next one has been computed (has read its halo), then written over rows
    that nothing reads any more. That saves a full-resolution activation (512 MiB at 1024^2, 128 channels).
    """
    if out is not None and LEAN_ROWS < 2:
        raise ValueError(f"LEAN_ROWS={LEAN_ROWS}: writing a block over its input needs bands of >= 2 rows")
    pending = None  # (first row, rows) of the band not yet written
    for r0 in range(0, height, LEAN_ROWS):
        y = src(r0, min(height, r0 + LEAN_ROWS))
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], height, y.shape[3])
        if pending is not None:  # the band just computed has read the previous band's rows already
            out[:, :, pending[0]:pending[0] + pending[1].shape[2]] = pending[1]
        pending = (r0, y)
        del y
    out[:, :, pending[0]:] = pending[1]
    return out


class ResnetBlock(nn.Module):
    """x' + conv2(swish(norm2(conv1(swish(norm1(x)))))); x' is a 1x1 projection of x when channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # The checkpoint has nin_shortcut only where the width changes; an identity has no key.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, H, W] -> [B, C_out, H, W]."""
        if _lean(x):  # one full-size tensor in, one out (x is the caller's: not written over)
            return _write(self.rows(_rows_of(x), x.shape[2]), x.shape[2])
        inplace = not torch.is_grad_enabled()  # swish and the residual add on fresh tensors: no copies
        h = self.conv1(_swish(self.norm1(x), inplace))
        h = self.conv2(_swish(self.norm2(h), inplace))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h

    def rows(self, src: Rows, height: int) -> Rows:
        """The block's output as rows, its input x given by ``src`` (rows of [B, C_in, height, W]); nothing
        full-size is stored. Takes the two norms' statistics now: a pass over x, and a pass over conv1's
        output that computes it band by band (conv1 runs twice in all). An output band reads x with a halo of
        2 rows (conv1, then conv2), once: the residual is the middle of those rows."""
        s1 = _norm_affine(src, height, self.norm1)
        h_src = _conv_src(lambda a, b: _norm_swish(src(a, b), *s1), self.conv1, height)
        s2 = _norm_affine(h_src, height, self.norm2)

        def band(a: int, b: int) -> Tensor:
            lo, hi = max(0, a - 2), min(height, b + 2)
            x = src(lo, hi)
            h = _conv_band(_norm_swish(x, *s1), lo, max(0, a - 1), min(height, b + 1), self.conv1, height)
            y = _conv_band(_norm_swish(h, *s2), max(0, a - 1), a, b, self.conv2, height)
            del h
            x = x[:, :, a - lo:b - lo]
            return y.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))

        return band


class AttnBlock(nn.Module):
    """Single-head self-attention of width C over all h*w positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        b, c, hh, ww = x.shape
        n = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose width is all C channels (SDPA scale 1/sqrt(C)).
        q, k, v = (proj(n).reshape(b, 1, c, hh * ww).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        if not torch.is_grad_enabled() and hh * ww > ATTN_CHUNK:
            a = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + ATTN_CHUNK], k, v)
                           for i in range(0, hh * ww, ATTN_CHUNK)], dim=2)
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H/2, W/2]."""
        # Asymmetric padding (right/bottom only) is what the weights were trained with; padding=1 would shift
        # every output pixel by half an input pixel.
        if _lean(x):  # no padded copy of the input
            return _write(self.rows(_rows_of(x), x.shape[2]), x.shape[2] // 2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))

    def rows(self, src: Rows, height: int) -> Rows:
        """Output rows [a, b) (of height // 2), the input of ``height`` rows given by ``src``: output row i
        reads input rows 2i .. 2i + 2, the one past the bottom being the zero padding."""
        def band(a: int, b: int) -> Tensor:
            hi = min(height, 2 * b + 1)
            t = F.pad(src(2 * a, hi), (0, 1, 0, 2 * b + 1 - hi))
            return F.conv2d(t, self.conv.weight, self.conv.bias, stride=2)

        return band


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, 2H, 2W]."""
        if _lean(x):  # never materialise the 4x nearest-upsampled input
            return _write(self.rows(x), 2 * x.shape[2])
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def rows(self, x: Tensor) -> Rows:
        """Output rows [a, b) (of 2H) computed from x, band by band."""
        def up(a: int, b: int) -> Tensor:  # upsampled rows [a, b) come from input rows [a // 2, (b + 1) // 2)
            t = F.interpolate(x[:, :, a // 2:(b + 1) // 2], scale_factor=2.0, mode="nearest")
            return t[:, :, a % 2:a % 2 + (b - a)]

        return _conv_src(up, self.conv, 2 * x.shape[2])


class _Mid(nn.Module):
    """Resnet, attention, resnet at the lowest resolution (``mid.block_1``, ``mid.attn_1``, ``mid.block_2``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block.{j}`` resnet blocks, then an optional ``downsample`` / ``upsample``.

    FLUX also registers an empty ``attn`` list per level; it holds no parameters, so it is left out.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, resample: nn.Module | None, kind: str
    ):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        # The attribute name is the checkpoint key: "downsample" in the encoder, "upsample" in the decoder.
        self.kind = kind
        if resample is not None:
            setattr(self, kind, resample)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        resample = getattr(self, self.kind, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels, H/d, W/d] (mean || logvar), d = downsample."""

    def __init__(self, p: VAEParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        levels, c_in = [], p.ch
        for i, c_out in enumerate(widths):
            last = i == len(widths) - 1
            levels.append(_Level(c_in, c_out, p.num_res_blocks, None if last else Downsample(c_out), "downsample"))
            c_in = c_out
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * p.z_channels, kernel_size=3, padding=1)

    def _levels_lean(self, x: Tensor) -> Tensor:
        """conv_in and the levels, each large level streamed from its input to its (downsampled) output.

        Only a level's input and output exist whole: at 1024^2 the level-0 activations (128 channels, 512 MiB
        each) never do, the level runs from the 12 MiB image. The price is recomputation for the norms'
        statistics (each block's rows() pass runs the chain up to it): level 0 runs about 10 of its 128-ch
        3x3 convolutions instead of 4.
        """
        height = x.shape[2]
        src: Rows | None = _conv_src(_rows_of(x), self.conv_in, height)
        h = None
        for level in self.down:
            if h is not None and not _lean(h):
                h = level(h)
                continue
            if h is not None:
                src, height = _rows_of(h), h.shape[2]
            for blk in level.block:
                src = blk.rows(src, height)
            down = getattr(level, "downsample", None)
            h = _write(src, height) if down is None else _write(down.rows(src, height), height // 2)
            src = None  # lets the level's input go
        return h

    def forward(self, x: Tensor) -> Tensor:
        if _lean(x):
            h = self._levels_lean(x)
        else:
            h = self.conv_in(x)
            for level in self.down:
                h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, in_channels, h*d, w*d].

    ``up.{k}`` is indexed by resolution level (same as the encoder's ``down.{k}``), but runs from the lowest
    resolution, ``up.{L-1}``, down to ``up.0``. Each level has num_res_blocks + 1 blocks.
    """

    def __init__(self, p: VAEParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, c_in, kernel_size=3, padding=1)
        self.mid = _Mid(c_in)
        levels: list[_Level] = [None] * len(widths)  # type: ignore[list-item]
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            levels[i] = _Level(c_in, c_out, p.num_res_blocks + 1, Upsample(c_out) if i > 0 else None, "upsample")
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, p.in_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        if torch.is_grad_enabled():
            for level in reversed(self.up):
                h = level(h)
            return self.conv_out(_swish(self.norm_out(h)))
        # Without autograd, large upsamplings are never stored: the next block reads the upsample-conv rows
        # band by band (rows()), so at 1024^2 the [1, 256, 1024, 1024] input of up.0 (1 GiB) never exists;
        # blocks without a width change write their output over their input.
        up_src = None  # (rows, height) of the upsampled activation that the next block reads
        for level in reversed(self.up):
            for blk in level.block:
                if up_src is not None:
                    h = _write(blk.rows(*up_src), up_src[1])
                    up_src = None  # lets the level's input go
                elif _lean(h) and blk.nin_shortcut is None:  # h is ours: nothing else holds it
                    h = _write(blk.rows(_rows_of(h), h.shape[2]), h.shape[2], out=h)
                else:
                    h = blk(h)
            up = getattr(level, "upsample", None)
            if up is not None and _lean(h):
                up_src = (up.rows(h), 2 * h.shape[2])
            elif up is not None:
                h = up(h)
        if _lean(h):
            return _write(_norm_swish_conv(_rows_of(h), h.shape[2], self.norm_out, self.conv_out), h.shape[2])
        return self.conv_out(_swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX autoencoder with BAGEL's latent normalisation ``z = scale * (sample - shift)``.

    Runs in the dtype and on the device of its parameters (the official app runs it in fp32 on the CPU).
    """

    def __init__(self, params: VAEParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def _check_image(self, x: Tensor) -> None:
        p = self.params
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise InputError(f"VAE encode expects images [B, {p.in_channels}, H, W], got {tuple(x.shape)}")
        d = p.downsample
        if x.shape[2] % d or x.shape[3] % d:
            raise InputError(f"VAE encode needs H and W divisible by {d}, got {x.shape[2]}x{x.shape[3]}")

    def encode(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Encode images to normalised latents.

        Args:
            x: [B, in_channels, H, W] in [-1, 1]; H and W divisible by ``params.downsample``.
            generator: CPU generator for the posterior sample; ``None`` returns the posterior mean.
        Returns:
            z: [B, z_channels, H/d, W/d] in the module's dtype.
        """
        self._check_image(x)
        w = self.encoder.conv_in.weight
        moments = self.encoder(x.to(device=w.device, dtype=w.dtype))
        mean, logvar = moments.float().chunk(2, dim=1)
        if generator is None:
            sample = mean
        else:
            # The reference draws randn_like(mean) from the CPU generator in fp32 (doc section 6, item 22).
            # Drawing on the CPU and moving keeps the seed stream identical on any device. The reference
            # (BAGEL's copy of FLUX's DiagonalGaussian) does not clamp logvar, so neither do we.
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu").to(mean.device)
            sample = mean + torch.exp(0.5 * logvar) * eps
        z = self.params.scale_factor * (sample - self.params.shift_factor)
        return z.to(w.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Decode normalised latents.

        Args:
            z: [B, z_channels, h, w].
        Returns:
            images [B, in_channels, h*d, w*d], nominally in [-1, 1] (not clamped).
        """
        p = self.params
        if z.ndim != 4 or z.shape[1] != p.z_channels:
            raise InputError(f"VAE decode expects latents [B, {p.z_channels}, h, w], got {tuple(z.shape)}")
        w = self.decoder.conv_in.weight
        z = z.to(device=w.device, dtype=w.dtype)
        return self.decoder(z / p.scale_factor + p.shift_factor)


def _shape(shapes: dict[str, tuple[int, ...]], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: missing key {key!r} (needed to infer the VAE hyper-parameters)")
    s = tuple(shapes[key])
    if len(s) != ndim:
        raise CheckpointError(f"{source}: {key!r} has shape {list(s)}, expected {ndim} dimensions")
    return s


def vae_params_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> VAEParams:
    """Infer the VAE hyper-parameters from the tensor shapes of ``ae.safetensors``.

    Args:
        shapes: checkpoint key -> tensor shape.
        source: the file name, used as the prefix of error messages.
    Raises:
        CheckpointError: a needed key is missing or the shapes contradict each other.
    """
    ch, in_channels = _shape(shapes, "encoder.conv_in.weight", 4, source)[:2]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise CheckpointError(f"{source}: missing key 'encoder.down.0.block.0.conv1.weight' (no encoder levels)")
    if levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels are {levels}, expected 0..{len(levels) - 1} without gaps")
    ch_mult = []
    for i in levels:
        out = _shape(shapes, f"encoder.down.{i}.block.0.conv1.weight", 4, source)[0]
        if out % ch:
            raise CheckpointError(
                f"{source}: encoder.down.{i}.block.0.conv1.weight has {out} output channels, "
                f"not a multiple of ch={ch} (from encoder.conv_in.weight)"
            )
        ch_mult.append(out // ch)
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    num_res_blocks = len(blocks)
    if blocks != set(range(num_res_blocks)):
        raise CheckpointError(
            f"{source}: encoder.down.0 has blocks {sorted(blocks)}, expected 0..{num_res_blocks - 1}"
        )
    z_channels = _shape(shapes, "decoder.conv_in.weight", 4, source)[1]
    moments = _shape(shapes, "encoder.conv_out.weight", 4, source)[0]
    if moments != 2 * z_channels:
        raise CheckpointError(
            f"{source}: encoder.conv_out.weight has {moments} output channels, expected 2 * z_channels = "
            f"{2 * z_channels} (z_channels from decoder.conv_in.weight)"
        )
    out_channels = _shape(shapes, "decoder.conv_out.weight", 4, source)[0]
    if out_channels != in_channels:
        raise CheckpointError(
            f"{source}: decoder.conv_out.weight has {out_channels} output channels but the encoder takes "
            f"{in_channels} (encoder.conv_in.weight)"
        )
    for i, m in enumerate(ch_mult):
        if (ch * m) % 32:
            raise CheckpointError(
                f"{source}: level {i} has {ch * m} channels, not divisible by the 32 GroupNorm groups"
            )
    return VAEParams(
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        in_channels=in_channels,
    )


def expected_vae_shapes(params: VAEParams) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of an :class:`AutoEncoder` built from ``params``, with its shape."""
    with torch.device("meta"):
        model = AutoEncoder(params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
