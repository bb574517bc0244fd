"""KV caches and contexts.

A :class:`Context` is one conversation state: a KV cache holding the post-norm, post-RoPE keys and the
values of every token prefilled so far (text, ViT blocks, clean VAE blocks), plus the next RoPE position.
Contexts are extended turn by turn and forked cheaply (one copy of the used rows) for the CFG branches and
for text decoding, which the reference does on a deep copy.

The cache is one preallocated buffer per context, [layers, capacity, kv_heads, head_dim] for K and V. A
forward writes its block's keys right after the cached rows and attends over ``[0, length + L)``; a
denoising forward simply does not advance ``length``, so noised latents are never cached (doc 3.4) and no
per-step concatenation or allocation happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

_ROUND = 256  # capacity granularity in tokens


def _moved(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from CUDA to the CPU into pinned memory (waited for), so that the copy back to the
    GPU does not block and both run at pinned-transfer speed rather than through pageable staging."""
    if t.device.type == "cuda" and device.type == "cpu":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())


class KVCache:
    """Keys/values of one context. ``length`` rows are valid; rows beyond are scratch.

    It holds ``num_layers`` decoder layers starting at layer ``first``: all of them, or under a layer split
    (:mod:`bagel_rt.parallel.layer_split`) the ones this process runs, so a rank's caches cost its share of the
    layers (half of them on each of two cards), not the whole model's."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, device: torch.device | str,
                 dtype: torch.dtype, capacity: int = 0, first: int = 0):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.first = first
        self.device, self.dtype = torch.device(device), dtype
        self.length = 0
        cap = _round_up(max(capacity, 1))
        self.k = torch.empty(num_layers, cap, kv_heads, head_dim, device=self.device, dtype=dtype)
        self.v = torch.empty_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` rows after the valid ones (grows by copying the valid rows)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        cap = _round_up(max(need, self.capacity + self.capacity // 2))
        k = torch.empty(self.num_layers, cap, self.kv_heads, self.head_dim, device=self.device, dtype=self.dtype)
        v = torch.empty_like(k)
        k[:, : self.length] = self.k[:, : self.length]
        v[:, : self.length] = self.v[:, : self.length]
        self.k, self.v = k, v

    def to(self, device: torch.device | str) -> KVCache:
        """Move the buffers to ``device`` (in place; a no-op where they are). Under a memory budget the
        contexts' caches wait on the CPU while the denoiser's arena, which holds copies of them, is on the GPU
        (an edit's conditional and text-unconditional caches are ~0.5 GiB each at 1024^2)."""
        device = torch.device(device)
        if device != self.device:
            self.k, self.v = _moved(self.k, device), _moved(self.v, device)
            self.device = device
        return self

    def holds(self, i: int) -> bool:
        """Whether decoder layer ``i`` (the model's index) has buffers here."""
        return self.first <= i < self.first + self.num_layers

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Decoder layer ``i``'s K and V buffers, each [capacity, kv_heads, head_dim]."""
        last = self.first + self.num_layers - 1
        assert self.holds(i), f"layer {i} is not in this cache (layers {self.first}..{last})"
        return self.k[i - self.first], self.v[i - self.first]

    def fork(self, extra: int = 0) -> KVCache:
        """An independent copy of the valid rows, with room for ``extra`` more."""
        new = KVCache(self.num_layers, self.kv_heads, self.head_dim, self.device, self.dtype,
                      capacity=self.length + extra, first=self.first)
        new.k[:, : self.length] = self.k[:, : self.length]
        new.v[:, : self.length] = self.v[:, : self.length]
        new.length = self.length
        return new

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def _round_up(n: int) -> int:
    return (n + _ROUND - 1) // _ROUND * _ROUND


@dataclass
class Context:
    """A conversation state: its KV cache, the next RoPE position, and what was prefilled.

    ``history`` lists the prefilled segments (``("text", token ids)``, ``("vae", image key)``,
    ``("vit", image key)``) in order. Two contexts with equal histories hold identical caches (prefill is
    deterministic given the same inputs), which is how exact CFG-branch deduplication is decided.
    """

    cache: KVCache
    rope: int = 0
    history: tuple = field(default_factory=tuple)

    @property
    def length(self) -> int:
        return self.cache.length

    def fork(self, extra: int = 0) -> Context:
        return Context(self.cache.fork(extra), self.rope, self.history)
