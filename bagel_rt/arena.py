"""Where every CFG branch of every image lives in the packed denoiser's KV arena and in its packed rows.

One packed forward may serve several images (a batched request): each image has its own latent grid
(h, w) and its own branches (conditional, text-unconditional, image-unconditional), each branch its own KV
cache length and RoPE position. The arena holds the branches one after another, each image's together,
each branch followed by room for its query block (2 marker rows, then the image's latent rows):

    [ img0 cond cache | block(h0*w0+2) ][ img0 text cache | block ][ img1 cond cache | block(h1*w1+2) ] ...

The static latent input ``x_in`` holds each image's rows once, ``[h0*w0 rows of image 0 | h1*w1 of image 1
| ...]``; a branch's latent rows in the packed residual stream are a gather of its image's rows (every branch
of an image denoises the same x_t). :meth:`ArenaLayout.meta` describes one forward over any subset of the
branches (a tuple of arena indices, sorted).
"""

from __future__ import annotations

import torch

from .embeddings import rope_cos_sin


class ArenaLayout:
    """The arena and row layout of branches ``lens``/``ropes`` (arena order) of images with latent grids
    ``grids`` [(h, w) per image]; ``image_of[b]`` is branch b's image.

    Attributes:
        starts: [branches + 1] first arena row of each branch's section (its cache), then the total rows.
        rows: latent rows (h*w) of each branch; block: ``rows[b] + 2``.
        x_offsets: [images + 1] first row of each image in ``x_in``, then the total latent rows.
        key: what a captured denoiser depends on (grids, and each branch's image, cache length and RoPE).
    """

    def __init__(self, lens: list[int], ropes: list[int], image_of: list[int], grids: list[tuple[int, int]]):
        assert len(lens) == len(ropes) == len(image_of) and set(image_of) <= set(range(len(grids)))
        self.lens, self.ropes, self.image_of, self.grids = list(lens), list(ropes), list(image_of), list(grids)
        self.rows = [grids[i][0] * grids[i][1] for i in image_of]
        self.starts = [0]
        for n, r in zip(lens, self.rows):
            self.starts.append(self.starts[-1] + n + r + 2)
        self.x_offsets = [0]
        for h, w in grids:
            self.x_offsets.append(self.x_offsets[-1] + h * w)
        self.key = (tuple(self.grids), tuple(zip(self.image_of, self.lens, self.ropes)))
        self._meta: dict[tuple[int, ...], dict] = {}

    @property
    def branches(self) -> int:
        return len(self.lens)

    def cache_range(self, b: int) -> tuple[int, int]:
        """Arena rows of branch b's copied KV cache."""
        return self.starts[b], self.starts[b] + self.lens[b]

    def meta(self, sel: tuple[int, ...], head_dim: int, theta: float, device: torch.device,
             dtype: torch.dtype) -> dict:
        """The metadata of a forward over the branches ``sel`` (built once per set, on ``device``):

        * gen_rows / und_rows: arena rows of the selected branches' latent / marker keys and values;
        * lat_rows: the ``x_in`` row each packed latent row reads (its image's row);
        * q_ranges: each selected branch's rows [start, end) in the packed latent stream (velocities, hidden);
        * cu_k, cu_qg, cu_qu, max_k, max_qg: the variable-length attention's sequences. The key sequences are
          the arena sections ``min(sel) .. max(sel)``; a section between them that is not in ``sel`` gets no
          queries (length 0);
        * k_ranges: each selected branch's arena rows (cache + block), for per-branch attention calls;
        * cos_g, sin_g, cos_u, sin_u: RoPE tables of the latent / marker rows (a block sits at one position).
        """
        if sel in self._meta:
            return self._meta[sel]
        starts, lens, rows = self.starts, self.lens, self.rows
        span = range(sel[0], sel[-1] + 1)
        gen_rows = torch.cat([torch.arange(rows[b]) + starts[b] + lens[b] + 2 for b in sel])
        und_rows = torch.cat([torch.arange(2) + starts[b] + lens[b] for b in sel])
        lat_rows = torch.cat([torch.arange(rows[b]) + self.x_offsets[self.image_of[b]] for b in sel])
        q_ends = torch.tensor([rows[b] for b in sel]).cumsum(0).tolist()
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
            cu_k=torch.tensor(starts[sel[0]: sel[-1] + 2], **i32),
            cu_qg=torch.tensor([0] + [rows[b] if b in sel else 0 for b in span]).cumsum(0).to(**i32),
            cu_qu=torch.tensor([0] + [2 if b in sel else 0 for b in span]).cumsum(0).to(**i32),
            max_k=max(lens[b] + rows[b] + 2 for b in sel), max_qg=max(rows[b] for b in sel),
            k_ranges=[(starts[b], starts[b + 1]) for b in sel],
            cos_g=torch.cat(cos_g).contiguous(), sin_g=torch.cat(sin_g).contiguous(),
            cos_u=torch.cat(cos_u).contiguous(), sin_u=torch.cat(sin_u).contiguous(),
        )
        return self._meta[sel]
