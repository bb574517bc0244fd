"""Where every CFG branch of every image lives in the packed denoiser's KV arena and in its packed rows.

One packed forward may serve several images (a batched request): each image has its own latent grid
(h, w) and its own branches (conditional, text-unconditional, image-unconditional), each branch its own KV
cache length and RoPE position. The arena holds the branches one after another, each image's together,
each branch's cache followed by room for its query block (2 marker rows, then the image's latent rows):

    [ img0 cond cache | block(h0*w0+2) ][ img0 img-uncond cache | block ][ img1 cond cache | block(h1*w1+2) ] ...

**Shared prefixes.** A branch whose cache is the beginning of another branch's of the same image (its prefill
history is a prefix of the other's: an edit's text-unconditional context is the conditional one before the
instruction, the VAE and ViT blocks of the input image, ~9000 rows at 1024^2) does not get a copy of its own:
its query block goes right before the other's cache, so that each branch's keys stay one contiguous range,

    [ text block | cond cache (its first rows = the text-unconditional cache) | cond block ]
      `----- text-unconditional keys -----'
                 `----------------- conditional keys -------------------------'

and the attention reads each branch's range (overlapping ranges: ``seqused_k`` of
:func:`bagel_rt.kernels.varlen_attention`; the cuDNN path slices per branch). The attention is not causal, so
the keys' order within a range does not matter (only the floating-point summation order moves). This saves
~0.48 GiB of an edit's 1.62 GiB arena at 1024^2 and one host-to-GPU copy of that cache under a budget.

**One layer of query blocks.** The layout above is one layer's *working* arena. A query block's keys and
values live only while its layer runs (the next layer writes its own), so only the caches are kept for every
layer: a *store* ``[layers, store_total]`` holds each copied branch's cache (:attr:`ArenaLayout.store_start`),
and before a layer attends its caches are copied into a working arena of one layer (:meth:`ArenaLayout.
cache_rows`: one ``index_copy_`` for the keys, one for the values). The blocks took 28 layers of rows: an
edit's three blocks of 4098 rows at 1024^2 are 0.66 GiB of the arena's 1.14, a t2i's two 0.44 of 0.45; with
one layer of them (two working arenas, alternating by layer, so that the marker stream's attention of one layer
may still read its arena while the next layer fills the other) the edit's arena is 0.57 GiB and the t2i's
0.03. The copy moves the caches' rows once per layer and step (an edit's ~9000 rows, 18 MB per layer), ~0.1 %
of the step's time at HBM bandwidth (estimated: its A/B, ``budget_memory.py ...+layered``, is not yet run). With
it the 12 GB recipe's edit fits under 12 GiB (H100, 93cbf89: 13.76 s, peak 11.46 GiB; it ran out of memory in the
denoiser before).

The static latent input ``x_in`` holds each image's rows once, ``[h0*w0 rows of image 0 | h1*w1 of image 1
| ...]``; a branch's latent rows in the packed residual stream are a gather of its image's rows (every branch
of an image denoises the same x_t). :meth:`ArenaLayout.meta` describes one forward over any subset of the
branches (a tuple of arena indices, sorted).
"""

from __future__ import annotations

import torch

from .embeddings import rope_cos_sin


def shared_prefixes(histories: list[tuple], lens: list[int], image_of: list[int]) -> list[int | None]:
    """For each branch, the branch of the same image whose cache begins with all of its own (``histories``: the
    contexts' prefill histories, :class:`bagel_rt.cache.Context`; a history that is a prefix of another's means
    those rows are the same, as exact CFG deduplication already relies on), or None.

    Pairs only, each branch in at most one (a parent keeps one child, whose block goes before the parent's
    cache): the longest shared caches first, the earlier branch as the parent where two histories are equal.
    Empty caches share nothing (a t2i's text-unconditional branch)."""
    cand = []
    for c in range(len(lens)):
        for a in range(len(lens)):
            hc, ha = histories[c], histories[a]
            if (a != c and image_of[a] == image_of[c] and 0 < lens[c] <= lens[a] and ha[: len(hc)] == hc
                    and (lens[c] < lens[a] or a < c)):
                cand.append((-lens[c], c, a))
    shares: list[int | None] = [None] * len(lens)
    used: set[int] = set()
    for _, c, a in sorted(cand):
        if c not in used and a not in used:
            shares[c] = a
            used.update((a, c))
    return shares


class ArenaLayout:
    """The arena and row layout of branches ``lens``/``ropes`` (arena order) of images with latent grids
    ``grids`` [(h, w) per image]; ``image_of[b]`` is branch b's image, ``shares[b]`` the branch whose cache
    begins with branch b's (:func:`shared_prefixes`; None: none).

    Attributes:
        total: the arena's rows.
        cache_start: [branches] first arena row of each branch's cache (a sharing branch: its parent's).
        block_start: [branches] first arena row of each branch's query block (2 marker rows, then its latents).
        key_range: [branches] (first, end) arena rows each branch's queries attend to (its cache and its block).
        store_start: [branches] first row of each branch's cache in the store of every layer's caches (a sharing
            branch: its parent's); the copied branches' caches one after another, in arena order.
        store_total: the store's rows (the copied branches' cache lengths).
        rows: latent rows (h*w) of each branch; block: ``rows[b] + 2``.
        x_offsets: [images + 1] first row of each image in ``x_in``, then the total latent rows.
        key: what a captured denoiser depends on (grids, each branch's image, cache length and RoPE, the
            shared prefixes).
    """

    def __init__(self, lens: list[int], ropes: list[int], image_of: list[int], grids: list[tuple[int, int]],
                 shares: list[int | None] | None = None):
        assert len(lens) == len(ropes) == len(image_of) and set(image_of) <= set(range(len(grids)))
        shares = [None] * len(lens) if shares is None else list(shares)
        self.lens, self.ropes, self.image_of, self.grids = list(lens), list(ropes), list(image_of), list(grids)
        self.shares = shares
        self.rows = [grids[i][0] * grids[i][1] for i in image_of]
        child = {a: c for c, a in enumerate(shares) if a is not None}
        for a, c in child.items():  # pairs only: a parent is no child, a child no parent
            assert shares[a] is None and c not in child and image_of[a] == image_of[c] and lens[c] <= lens[a]
        B = len(lens)
        self.cache_start, self.block_start, self.key_range = [0] * B, [0] * B, [(0, 0)] * B
        pos = 0
        for b in range(B):
            if shares[b] is not None:
                continue  # placed with its parent
            c = child.get(b)
            if c is not None:  # the sharing branch's block, then the shared cache
                self.block_start[c] = pos
                pos += self.rows[c] + 2
                self.cache_start[c] = pos
                self.key_range[c] = (self.block_start[c], pos + lens[c])
            self.cache_start[b] = pos
            pos += lens[b]
            self.block_start[b] = pos
            pos += self.rows[b] + 2
            self.key_range[b] = (self.cache_start[b], pos)
        self.total = pos
        self.store_start, stored = [0] * B, 0
        for b in range(B):  # parents before their children: a child takes its parent's start
            if shares[b] is None:
                self.store_start[b] = stored
                stored += lens[b]
        for c, a in enumerate(shares):
            if a is not None:
                self.store_start[c] = self.store_start[a]
        self.store_total = stored
        self.x_offsets = [0]
        for h, w in grids:
            self.x_offsets.append(self.x_offsets[-1] + h * w)
        self.key = (tuple(self.grids), tuple(zip(self.image_of, self.lens, self.ropes)), tuple(shares))
        self._meta: dict[tuple[int, ...], dict] = {}

    @classmethod
    def of_contexts(cls, ctxs: list, image_of: list[int], grids: list[tuple[int, int]]) -> ArenaLayout:
        """The layout of the branch contexts ``ctxs`` (:class:`bagel_rt.cache.Context`), shared prefixes found
        from their histories."""
        lens = [c.length for c in ctxs]
        return cls(lens, [c.rope for c in ctxs], image_of, grids,
                   shared_prefixes([c.history for c in ctxs], lens, image_of))

    @property
    def branches(self) -> int:
        return len(self.lens)

    def cache_range(self, b: int) -> tuple[int, int]:
        """Arena rows of branch b's KV cache (inside its parent's for a sharing branch)."""
        return self.cache_start[b], self.cache_start[b] + self.lens[b]

    def nbytes(self, layer_row_bytes: int, layers: int) -> int:
        """Bytes of the store of ``layers`` layers' caches and the two one-layer arenas, at ``layer_row_bytes``
        per row and layer (one token's keys and values)."""
        return (layers * self.store_total + 2 * self.total) * layer_row_bytes

    def store_range(self, b: int) -> tuple[int, int]:
        """Rows of branch b's KV cache in the store (inside its parent's for a sharing branch)."""
        return self.store_start[b], self.store_start[b] + self.lens[b]

    def cache_rows(self) -> torch.Tensor:
        """[store_total] int64: the working-arena row of each store row (where a layer's caches are copied)."""
        idx = [torch.arange(self.lens[b]) + self.cache_start[b] for b in self.copied()]
        return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)

    def copied(self) -> list[int]:
        """The branches whose caches are copied into the arena (the others read their parent's rows)."""
        return [b for b in range(self.branches) if self.shares[b] is None]

    def meta(self, sel: tuple[int, ...], head_dim: int, theta: float, device: torch.device,
             dtype: torch.dtype) -> dict:
        """The metadata of a forward over the branches ``sel`` (built once per set, on ``device``):

        * gen_rows / und_rows: arena rows of the selected branches' latent / marker keys and values;
        * lat_rows: the ``x_in`` row each packed latent row reads (its image's row);
        * q_ranges: each selected branch's rows [start, end) in the packed latent stream (velocities, hidden);
        * cu_k, used_k, cu_qg, cu_qu, max_k, max_qg: the variable-length attention's sequences, one per selected
          branch: its queries (latent: cu_qg, markers: cu_qu) attend to the arena rows
          ``cu_k[j] .. cu_k[j] + used_k[j]`` (its key range; ranges overlap where a prefix is shared);
        * k_ranges: each selected branch's key range, for per-branch attention calls;
        * cos_g, sin_g, cos_u, sin_u: RoPE tables of the latent / marker rows (a block sits at one position).
        """
        if sel in self._meta:
            return self._meta[sel]
        rows, blocks = self.rows, self.block_start
        gen_rows = torch.cat([torch.arange(rows[b]) + blocks[b] + 2 for b in sel])
        und_rows = torch.cat([torch.arange(2) + blocks[b] for b in sel])
        lat_rows = torch.cat([torch.arange(rows[b]) + self.x_offsets[self.image_of[b]] for b in sel])
        q_ends = torch.tensor([rows[b] for b in sel]).cumsum(0).tolist()
        k_ranges = [self.key_range[b] for b in sel]
        cos_g, sin_g, cos_u, sin_u = [], [], [], []
        for b in sel:
            c, s = rope_cos_sin(torch.tensor([self.ropes[b]], device=device), head_dim, theta, dtype)
            cos_g.append(c.expand(rows[b], -1))
            sin_g.append(s.expand(rows[b], -1))
            cos_u.append(c.expand(2, -1))
            sin_u.append(s.expand(2, -1))
        i32 = dict(dtype=torch.int32, device=device)
        self._meta[sel] = dict(
            gen_rows=gen_rows.to(device), und_rows=und_rows.to(device), lat_rows=lat_rows.to(device),
            q_ranges=list(zip([0] + q_ends[:-1], q_ends)),
            cu_k=torch.tensor([k0 for k0, _ in k_ranges] + [self.total], **i32),
            used_k=torch.tensor([k1 - k0 for k0, k1 in k_ranges], **i32),
            cu_qg=torch.tensor([0] + q_ends, **i32), cu_qu=torch.arange(0, 2 * len(sel) + 1, 2, **i32),
            max_k=max(k1 - k0 for k0, k1 in k_ranges), max_qg=max(rows[b] for b in sel),
            k_ranges=k_ranges,
            cos_g=torch.cat(cos_g).contiguous(), sin_g=torch.cat(sin_g).contiguous(),
            cos_u=torch.cat(cos_u).contiguous(), sin_u=torch.cat(sin_u).contiguous(),
        )
        return self._meta[sel]
