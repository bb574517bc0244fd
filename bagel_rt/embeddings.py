"""BAGEL's glue embeddings: 2-D sin-cos tables, the timestep embedder, RoPE tables.

Reference doc sections 1.5 and 3.3. The checkpoint stores the sin-cos tables (``latent_pos_embed``,
``vit_pos_embed``); the model uses the stored bf16 tables for bit-parity, and :func:`sincos_2d_table` exists
to check them and to build tiny checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[len(pos), dim] table ``[sin(pos*w_k), cos(pos*w_k)]`` with ``w_k = 10000^(-k/(dim/2))`` (float64)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid: int) -> Tensor:
    """DiT-style 2-D table [grid*grid, dim], float32; row ``r*grid + c``.

    The first ``dim/2`` channels encode the column (x), the second half the row (y) — the reference's
    meshgrid puts x first although its variable is called ``emb_h`` (reference doc 6.1).
    """
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


def timestep_sinusoid(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """[N] timesteps in [0, 1] (used raw, not x1000) -> [N, dim] float32 ``[cos(t*f), sin(t*f)]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``time_embedder``: sinusoid(256) -> Linear -> SiLU -> Linear. Keys ``mlp.0`` / ``mlp.2``."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """[N] float timesteps -> [N, hidden] in the weights' dtype (sinusoid fp32, MLP in weight dtype)."""
        w = self.mlp[0].weight
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(w.dtype))


class PositionTable(nn.Module):
    """A frozen sin-cos table (``pos_embed`` [side*side, hidden]) looked up by flattened position id."""

    def __init__(self, side: int, hidden: int):
        super().__init__()
        self.side = side
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.pos_embed)


class MLPConnector(nn.Module):
    """ViT features -> LLM width: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE tables for integer positions [M] -> (cos, sin), each [M, head_dim] in ``dtype``.

    Angles in fp32 (``inv_freq_j = theta^(-2j/head_dim)``), the 64 frequencies duplicated ``[f, f]``
    (rotate-half convention), then cast to the activation dtype as the reference does.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    ang = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def embedding_table(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` with its weight left uninitialised: the weights are always loaded (or filled
    by the random-weight builders) afterwards. The default ``normal_`` init on the meta device, where models
    are built before loading, imports ~900 modules of PyTorch's Python decompositions on first use — ~1 s of
    every process start (measured); handing the weight in skips that init."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
