"""The fast denoising path (``triton`` backend): batched CFG, static buffers, fused kernels, CUDA graphs.

One :class:`PackedDenoiser` serves one image request. At construction it copies the KV caches of the
branches that will ever be computed (conditional first, then text-unconditional, then image-unconditional)
into one contiguous *arena* per layer, each branch followed by room for the query block:

    arena rows: [ cond cache | cond block ][ text cache | text block ][ img cache | img block ]

A step then runs every active branch in **one** forward. The residual stream is packed
``[gen rows of branch 0..B-1 | und (marker) rows of branch 0..B-1]``, so each expert's GEMMs see one
contiguous range with B times the rows (no per-layer gather/scatter); the block's keys/values are written
into the arena with one ``index_copy_`` per tensor; attention is one variable-length launch per query kind
(latent queries, marker queries) where each branch attends to its own cache plus its own block — on Hopper
the latent queries go to cuDNN's fused attention instead, one call per branch (:func:`resolve_attention`).
The und (marker) rows' kernels run on a second CUDA stream, beside the gen rows' GEMMs: they are memory-bound
GEMVs over the und expert's weights (~13 GB per forward), and overlapping them measured t2i 9.02 -> 8.91 s,
edit 17.29 -> 17.22 s (H200, identical latents; ``diagnose.py --only-denoiser-ab marker_stream``).
A forward runs over any set of arena branches (a tuple of arena indices: without step caching the active
branches form a prefix of the arena order; with it, branches on different schedules may not). A branch set's
first forward runs eagerly and is that step's result; the second
captures the forward in a CUDA graph, replayed from then on (so a fresh denoiser costs ~0.05-0.2 s over a warm
one instead of four discarded forwards); x_t and t are copied into static input buffers, so the loop has no
host synchronisation. The CFG combination + renorm + Euler update is one fused kernel
(:func:`bagel_rt.kernels.cfg_euler`).

Step caching (opt-in, :mod:`bagel_rt.step_cache`): the branches on a full evaluation run the packed forward as
above and refresh their derivatives of the final hidden state; the branches on a Taylor evaluation run a graph
of their own (the Taylor series of those derivatives, the final norm and ``llm2vae``: no LLM forward).

Numerics: the same operations as the torch backend (bf16 GEMMs, fp32 RMSNorm and fp32 q/k norm + RoPE,
fp32 softmax); the CFG arithmetic runs in fp32 instead of the reference's bf16.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import Context
from .df11_resident import LayerPrefetch
from .embeddings import rope_cos_sin
from .errors import InputError
from .sampler import CFGSettings, schedule, velocity_sources
from .step_cache import StepCache
from .step_cache.packed import PackedDerivatives
from .transforms import flattened_position_ids

ATTENTIONS = ("auto", "triton", "cudnn")


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """The latent-query attention of the packed forward: our varlen Triton kernel (one launch for all
    branches) or cuDNN's fused attention through PyTorch SDPA (one call per branch, native GQA; CUDA,
    bf16/fp16 only). "auto" picks cuDNN on Hopper, where it ran the denoising shapes faster (README,
    benchmarks/results), else Triton."""
    if attention not in ATTENTIONS:
        raise InputError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and cudnn_attention_ok()
    if attention == "cudnn" and not usable:
        raise InputError(f"attention 'cudnn' needs a CUDA GPU, bf16/fp16 weights and cuDNN >= 9 "
                         f"(device {device}, dtype {dtype}, cuDNN {torch.backends.cudnn.version()})")
    if attention != "auto":
        return attention
    if usable and torch.cuda.get_device_capability(device)[0] == 9:
        return "cudnn"
    return "triton"


def cudnn_attention_ok() -> bool:
    """cuDNN >= 9 is present (its fused attention is what SDPA's CUDNN_ATTENTION backend runs)."""
    return torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000


def _kernels():
    from bagel_rt import kernels  # imported lazily: the torch backend never needs Triton

    return kernels


class PackedDenoiser:
    """Batched-CFG velocity for up to ``len(ctxs)`` branches over one KV arena.

    Args:
        model: the :class:`bagel_rt.model.BagelModel`.
        ctxs: the branch contexts in arena order (conditional first).
        h, w: latent grid (tokens per side); the block has ``h*w + 2`` tokens.
        use_graphs: capture each branch count's forward in a CUDA graph (CUDA only).
        attention: "triton" or "cudnn" for the latent queries (see :func:`resolve_attention`).
        df11: the model's compressed DF11 units (``df11_resident``; :mod:`bagel_rt.df11_resident`), or None.
        lean: under a memory budget (see :attr:`lean`).
    """

    def __init__(self, model, ctxs: list[Context], h: int, w: int, use_graphs: bool = True,
                 mlp_chunks: int = 1, df11=None, attention: str = "triton", lean: bool = False,
                 marker_stream: bool | None = None):
        self.k_ops = _kernels()
        self.attention = resolve_attention(attention, model.device, model.dtype)
        #: as asked: under "auto", a cuDNN refusal of this request's shapes hands over to the Triton kernel
        self.requested_attention = attention
        self._checked: set[tuple] = set()  # (kind, branches) whose forward has run once
        #: the decode schedule of the compressed DF11 layers (``df11``: the model's
        #: :class:`bagel_rt.df11_resident.ResidentDF11`, or None): the packed forward reads the Linears' weights
        #: without calling the layers, so it decodes each layer's unit itself, one layer ahead
        self.prefetch = LayerPrefetch(df11, model.device) if df11 is not None else None
        #: under a memory budget: the general pool's cached blocks are released before a capture (while a graph
        #: is captured the allocator cannot release them, so the eager forward's freed activations would stay
        #: reserved beside the graph's own pool)
        self.lean = lean
        #: row chunks of the MLP (its [rows, 18944] intermediates dominate the activations); >1 under a
        #: memory budget, trading a little GEMM efficiency for memory (weight-only formats dequantize once per
        #: layer for all chunks: see :meth:`_mlp`)
        self.mlp_chunks = mlp_chunks
        #: the stream of the und (marker) rows' kernels, overlapping the gen rows' (None: one stream). Default:
        #: on for CUDA (not for split models: their collectives must keep one order on all ranks)
        if marker_stream is None:
            split = model.parallel is not None and model.parallel.mode != "cfg"
            marker_stream = model.device.type == "cuda" and not split
        self.side = torch.cuda.Stream(device=model.device) if marker_stream else None
        #: the tuning options as given (a cached denoiser is reused only for the same ones)
        self.options = dict(marker_stream=self.side is not None)
        self.model, self.h, self.w = model, h, w
        p = model.params.llm
        (self.Hq, self.Hk), self.D, self.eps = model.local_heads, p.head_dim, p.rms_norm_eps
        self.N, self.L, self.B = h * w, h * w + 2, len(ctxs)
        dev, dt = model.device, model.dtype
        self.device, self.dtype = dev, dt
        lens = [c.length for c in ctxs]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n + self.L)
        self.k = torch.empty(p.num_layers, starts[-1], self.Hk, self.D, device=dev, dtype=dt)
        self.v = torch.empty_like(self.k)
        for b, c in enumerate(ctxs):
            self.k[:, starts[b]: starts[b] + lens[b]] = c.cache.k[:, : lens[b]]
            self.v[:, starts[b]: starts[b] + lens[b]] = c.cache.v[:, : lens[b]]
        self.sm_scale = 1.0 / math.sqrt(self.D)
        self.starts, self.lens, self.ropes = starts, lens, [c.rope for c in ctxs]
        #: per set of branches (a tuple of arena indices, built on first use): arena rows of the packed block,
        #: cu_seqlens, rope tables
        self.meta: dict[tuple[int, ...], dict] = {}
        s = model.special
        self.markers = model.embed([s.start_of_image, s.end_of_image])  # [2, H]
        pos = flattened_position_ids(h, w, model.params.max_latent_size).to(dev)
        self.pos_emb = model.latent_pos_embed(pos)  # [N, H]
        # static inputs (graph replays read these)
        self.x_in = torch.zeros(self.N, model.params.patch_latent_dim, device=dev, dtype=torch.float32)
        self.t_in = torch.zeros(1, device=dev, dtype=torch.float32)
        self.use_graphs = use_graphs and dev.type == "cuda"
        #: captured graphs by (kind, branches): kind "full" (the packed forward) or "taylor" (step caching)
        self.graphs: dict[tuple, tuple] = {}
        #: one memory pool per kind: a step may replay a full and a Taylor graph and use both outputs
        self.pools: dict[str, object] = {}
        self.key = denoiser_key(ctxs, h, w)
        #: the Linear modules' formats at construction (a module swap, e.g. compute="fp8", needs new graphs)
        self.formats = linear_modules_signature(model)
        #: the step cache's derivative buffers (allocated by the first step-cached request, see
        #: :meth:`step_store`)
        self.derivatives: PackedDerivatives | None = None

    def branch_meta(self, sel: tuple[int, ...]) -> dict:
        """The metadata of a forward over the arena branches ``sel`` (sorted, any subset: branches on
        different step-cache schedules need not form a prefix). The attention's key sequences are the arena
        sections ``min(sel) .. max(sel)``; a section between them that is not in ``sel`` gets no queries."""
        if sel in self.meta:
            return self.meta[sel]
        p, dev, dt = self.model.params.llm, self.device, self.dtype
        starts, lens = self.starts, self.lens
        span = range(sel[0], sel[-1] + 1)
        gen_rows = torch.cat([torch.arange(self.N) + starts[b] + lens[b] + 2 for b in sel])
        und_rows = torch.cat([torch.arange(2) + starts[b] + lens[b] for b in sel])
        cos_g, sin_g, cos_u, sin_u = [], [], [], []
        for b in sel:
            c, s = rope_cos_sin(torch.tensor([self.ropes[b]], device=dev), self.D, p.rope_theta, dt)
            cos_g.append(c.expand(self.N, -1))
            sin_g.append(s.expand(self.N, -1))
            cos_u.append(c.expand(2, -1))
            sin_u.append(s.expand(2, -1))
        i32 = dict(dtype=torch.int32, device=dev)
        queries = torch.tensor([0] + [int(b in sel) for b in span]).cumsum(0)
        self.meta[sel] = dict(
            gen_rows=gen_rows.to(dev), und_rows=und_rows.to(dev),
            cu_k=torch.tensor(starts[sel[0]: sel[-1] + 2], **i32),
            cu_qg=(queries * self.N).to(**i32), cu_qu=(queries * 2).to(**i32),
            max_k=max(lens[b] for b in sel) + self.L,
            k_ranges=[(starts[b], starts[b] + lens[b] + self.L) for b in sel],
            cos_g=torch.cat(cos_g).contiguous(), sin_g=torch.cat(sin_g).contiguous(),
            cos_u=torch.cat(cos_u).contiguous(), sin_u=torch.cat(sin_u).contiguous(),
        )
        return self.meta[sel]

    def refill(self, ctxs: list[Context]) -> None:
        """Reuse this denoiser (and its captured graphs) for new contexts of the same lengths and ropes."""
        assert denoiser_key(ctxs, self.h, self.w) == self.key
        start = 0
        for c in ctxs:
            n = c.length
            self.k[:, start: start + n] = c.cache.k[:, :n]
            self.v[:, start: start + n] = c.cache.v[:, :n]
            start += n + self.L

    # -- the packed forward ---------------------------------------------------------------------------------
    def _layer(self, i: int, layer, xg: Tensor, xu: Tensor, m: dict) -> tuple[Tensor, Tensor]:
        """One packed decoder layer on the residual streams xg (gen rows) and xu (und rows).

        With a marker stream (:attr:`side`), the und rows' work runs there, beside the gen rows' GEMMs: the two
        only meet in the arena (each attends to the other's keys/values), so the streams wait on each other
        twice per layer, once per direction.

        The MLP output is added with a plain add: fusing it into the next layer's add+RMSNorm measured 0.6%
        slower end to end (H200, same process, 9.63 vs 9.59 s per t2i, commit 5691509), and adding the
        residual in the down projection's GEMM epilogue (addmm) no faster (8.92 vs 8.92 s t2i, 17.22 vs 17.21 s
        edit, b06ae36, ``diagnose.py --only-denoiser-ab residual_gemm`` of that commit)."""
        K, V = self.k[i], self.v[i]
        with self._on_side():
            qu = self._qkv_to_arena(layer, "", xu, K, V, m["und_rows"], m["cos_u"], m["sin_u"])
        qg = self._qkv_to_arena(layer, "_moe_gen", xg, K, V, m["gen_rows"], m["cos_g"], m["sin_g"])
        gen_kv = self._mark()  # the gen rows' keys/values are in the arena
        self._wait_side()  # ... and the und rows' ones
        og = self._latent_attention(qg, K, V, m)
        with self._on_side():
            if gen_kv is not None:
                self.side.wait_event(gen_kv)
            ou = self.k_ops.varlen_attention(qu, K, V, m["cu_qu"], m["cu_k"], False, self.sm_scale, 2, m["max_k"])
            xu = self._attn_out_mlp(layer, "", xu, ou)
        return self._attn_out_mlp(layer, "_moe_gen", xg, og), xu

    def _qkv_to_arena(self, layer, sfx: str, x: Tensor, K: Tensor, V: Tensor, rows: Tensor, cos: Tensor,
                      sin: Tensor) -> Tensor:
        """Queries [R, Hq, D] of one expert's rows x [R, H] (``sfx`` "" for und, "_moe_gen" for gen); their
        keys (q/k-normed, rotated) and values are written into the arena rows ``rows`` of K, V [rows, Hk, D]."""
        a, R = layer.self_attn, x.shape[0]
        mods = [getattr(a, n + sfx) for n in ("q_proj", "k_proj", "v_proj")]
        h, _, xq = self._norm_in(x, None, getattr(layer, "input_layernorm" + sfx).weight, mods)
        q, k, v = (self._linear(mod, h, xq) for mod in mods)
        q, k = self.k_ops.qk_norm_rope(q.view(R, self.Hq, self.D), k.view(R, self.Hk, self.D),
                                       getattr(a, "q_norm" + sfx).weight, getattr(a, "k_norm" + sfx).weight, cos,
                                       sin, self.eps, self.dtype)
        K.index_copy_(0, rows, k)
        V.index_copy_(0, rows, v.view(R, self.Hk, self.D))
        return q

    def _attn_out_mlp(self, layer, sfx: str, x: Tensor, o: Tensor) -> Tensor:
        """The rest of the layer for one expert's rows: x + o_proj(o), then + MLP(post-attention norm)."""
        a = self._linear(getattr(layer.self_attn, "o_proj" + sfx), o.view(o.shape[0], -1))
        mlp = getattr(layer, "mlp" + sfx)
        h, x, hq = self._norm_in(x, a, getattr(layer, "post_attention_layernorm" + sfx).weight,
                                 [mlp.gate_proj, mlp.up_proj])
        return self._mlp(mlp, h, hq, x)

    def _on_side(self):
        """Context running the und rows' kernels on the marker stream (a no-op without one)."""
        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def _mark(self):
        """An event recorded on the current stream (None without a marker stream)."""
        if self.side is None:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _wait_side(self) -> None:
        """The current stream waits for the work queued so far on the marker stream."""
        if self.side is not None:
            torch.cuda.current_stream().wait_stream(self.side)

    def _latent_attention(self, q: Tensor, K: Tensor, V: Tensor, m: dict) -> Tensor:
        """Attention of the latent queries q [nb*N, Hq, D] of the branches described by ``m`` (a ``meta``
        entry) over the arena rows K, V [rows, Hk, D], with the chosen implementation."""
        if self.attention == "cudnn":
            return self._attention_cudnn(q, K, V, m["k_ranges"])
        return self.k_ops.varlen_attention(q, K, V, m["cu_qg"], m["cu_k"], False, self.sm_scale, self.N,
                                           m["max_k"])

    def _attention_cudnn(self, q: Tensor, K: Tensor, V: Tensor, k_ranges: list) -> Tensor:
        """Latent-query attention through cuDNN: branch b's N queries q[bN:(b+1)N] [N, Hq, D] attend to the
        arena rows k_ranges[b] of K, V [rows, Hk, D] (GQA without expanding K/V). Returns [nb*N, Hq, D]."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        outs = []
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for b, (k0, k1) in enumerate(k_ranges):
                qb = q[b * self.N:(b + 1) * self.N].transpose(0, 1)[None]  # [1, Hq, N, D] (strided view)
                kb, vb = K[k0:k1].transpose(0, 1)[None], V[k0:k1].transpose(0, 1)[None]
                ob = F.scaled_dot_product_attention(qb, kb, vb, scale=self.sm_scale, enable_gqa=True)
                outs.append(ob[0].transpose(0, 1))
        return torch.cat(outs)

    def _norm_in(self, x: Tensor, delta: Tensor | None, weight: Tensor, mods) -> tuple:
        """The input of ``mods`` (Linears sharing it): ``rms_norm(x + delta)``, the new residual ``x + delta``
        (x when delta is None) and the input's 8-bit rows (None unless the modules compute in 8 bits, see
        :func:`act_format`). For FP8 modules the norm writes the FP8 rows directly and the bf16 input is None
        (never materialised)."""
        k_ops, eps = self.k_ops, self.eps
        if act_format(mods) == "fp8":
            if delta is None:
                return None, x, k_ops.rms_norm_fp8(x, weight, eps)
            xq, x = k_ops.add_rms_norm_fp8(delta, x, weight, eps)
            return None, x, xq
        if delta is None:
            h = k_ops.rms_norm(x, weight, eps)
        else:
            h, x = k_ops.add_rms_norm(delta, x, weight, eps)
        return h, x, quantized_rows(mods, h)

    def _mlp(self, mlp, h: Tensor | None, hq: tuple | None, res: Tensor) -> Tensor:
        """``res + mlp`` on input rows h (bf16) and/or hq (their 8-bit rows), in ``mlp_chunks`` row chunks.

        Weight-only formats dequantize on every call, so under chunks their weights are dequantized once per
        layer (``dense_weight``) and shared by the chunks: four chunks would otherwise dequantize each weight
        four times (+3 x 0.06 ms per Linear and layer on an H200)."""
        rows = h.shape[0] if h is not None else hq[0].shape[0]
        n = self.mlp_chunks
        mods = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if n > 1 and rows >= 2 * n and all(hasattr(m, "dense_weight") for m in mods if weight_only(m)):
            dense = {id(m): m.dense_weight(self.dtype) for m in mods if weight_only(m)}
            hs = h.tensor_split(n) if h is not None else [None] * n
            hqs = zip(hq[0].tensor_split(n), hq[1].tensor_split(n)) if hq is not None else [None] * n
            return torch.cat([self._mlp_rows(mlp, c, cq, r, dense)
                              for c, cq, r in zip(hs, hqs, res.tensor_split(n))])
        return self._mlp_rows(mlp, h, hq, res)

    def _mlp_rows(self, mlp, h: Tensor | None, hq: tuple | None, res: Tensor, dense: dict | None = None) -> Tensor:
        """``res + mlp(h)``; ``dense``: dequantized weights by ``id(module)`` to use instead of the modules'."""
        if hq is None:
            hq = quantized_rows((mlp.gate_proj, mlp.up_proj), h)
        g, u = self._linear(mlp.gate_proj, h, hq, dense), self._linear(mlp.up_proj, h, hq, dense)
        down = mlp.down_proj
        if act_format([down]) == "fp8":  # the SwiGLU writes the FP8 rows the down projection reads
            return res + self._linear(down, None, self.k_ops.swiglu_fp8(g, u))
        act = self.k_ops.swiglu(g, u)
        return res + self._linear(down, act, quantized_rows([down], act), dense)

    def _linear(self, mod, x: Tensor | None, xq=None, dense: dict | None = None) -> Tensor:
        """A Linear of the model: cuBLAS for plain bf16 (or on its weight already dequantized in ``dense``, by
        ``id(mod)``), the module's 8-bit product when ``xq`` (``x``'s 8-bit rows, see :func:`quantized_rows`) is
        given (``x`` may then be None), else the module's own forward (weight-only formats dequantize inside
        their kernels)."""
        if dense and id(mod) in dense:
            return F.linear(x, dense[id(mod)], mod.bias)
        if xq is not None:
            return mod.forward_quantized(xq, self.dtype)
        if type(mod) is torch.nn.Linear:
            return F.linear(x, mod.weight, mod.bias)
        return mod(x)

    def _hidden(self, sel: tuple[int, ...]) -> Tensor:
        """The last decoder layer's output [len(sel)*N, H] (latent rows, before the final norm) of the branches
        ``sel`` for the static inputs x_in, t_in."""
        model, m, nb = self.model, self.branch_meta(sel), len(sel)
        lat = model.vae2llm(self.x_in.to(self.dtype)) + model.time_embedder(self.t_in) + self.pos_emb
        xg = lat.to(self.dtype).repeat(nb, 1)
        if self.side is not None:  # fork: the marker stream starts after everything queued so far
            self.side.wait_stream(torch.cuda.current_stream())
        with self._on_side():  # xu lives on the marker stream only (allocated, used and freed there)
            xu = self.markers.repeat(nb, 1)
        stage = model.parallel.stage if model.parallel is not None else None  # layer split: this rank's layers
        pf = self.prefetch
        if pf is not None:
            pf.start()
        for i, layer in enumerate(model.language_model.model.layers):
            if stage is not None:
                if not stage.holds(i):
                    continue
                xg, xu = stage.receive(i, [xg, xu])
            if pf is not None:
                pf.before(i, self.side)
            xg, xu = self._layer(i, layer, xg, xu, m)
            if pf is not None:
                pf.after(i, self.side)
            if stage is not None:
                stage.send(i, [xg, xu])
        if pf is not None:
            pf.finish()
        self._wait_side()  # join (a graph capture must end with every stream joined)
        return xg if stage is None else stage.share(xg)

    def _head(self, hidden: Tensor) -> Tensor:
        """Velocities [nb, N, 64] of hidden states [nb*N, H]: the final gen norm, then ``llm2vae``."""
        out = self.k_ops.rms_norm(hidden, self.model.language_model.model.norm_moe_gen.weight, self.eps)
        return self.model.llm2vae(out).view(-1, self.N, self.model.params.patch_latent_dim)

    def _forward(self, kind: str, sel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(hidden states [len(sel)*N, H], velocities [len(sel), N, 64]) of a full forward ("full") or of the
        Taylor series of the cached derivatives ("taylor": no LLM forward at all)."""
        hidden = self._hidden(sel) if kind == "full" else self.derivatives.series(sel)
        return hidden, self._head(hidden)

    @torch.no_grad()
    def velocities(self, x: Tensor, t: float, sel: int | tuple[int, ...]) -> Tensor:
        """Velocities [len(sel), N, 64] of the arena branches ``sel`` (or of the first ``sel`` ones) at
        (x [N, 64] fp32, t)."""
        return self.full(x, t, sel)[1]

    @torch.no_grad()
    def full(self, x: Tensor, t: float, sel: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The packed forward of the branches ``sel`` at (x, t): (hidden states [len(sel)*N, H] before the final
        norm, velocities [len(sel), N, 64]).

        A branch set's first call runs eagerly (Triton compiles, cuBLAS/cuDNN pick their kernels; its result
        is this step's), the second captures the forward in a CUDA graph, later calls replay it."""
        self.x_in.copy_(x)
        self.t_in.fill_(t)
        return self._run("full", tuple(range(sel)) if isinstance(sel, int) else tuple(sel))

    @torch.no_grad()
    def taylor_velocities(self, sel: tuple[int, ...], distances: list[int]) -> Tensor:
        """Velocities [len(sel), N, 64] of the branches ``sel`` predicted from their cached derivatives at the
        given distances (step caching; a graph of its own per branch set, like :meth:`full`)."""
        for b, k in zip(sel, distances):
            self.derivatives.set_distance(b, k)
        return self._run("taylor", tuple(sel))[1]

    def step_store(self, orders: int, max_distance: int) -> PackedDerivatives:
        """The derivative buffers for a step-cached request, zeroed (allocated, or reallocated for other
        settings, on first use; their Taylor graphs go with them)."""
        if self.derivatives is None or not self.derivatives.fits(orders, max_distance):
            self.derivatives = None
            for key in [k for k in self.graphs if k[0] == "taylor"]:
                del self.graphs[key]
            self._checked = {k for k in self._checked if k[0] != "taylor"}
            self.derivatives = PackedDerivatives(self.B, orders, self.N, self.model.params.llm.hidden_size,
                                                 max_distance, self.device, self.dtype)
        self.derivatives.reset()
        return self.derivatives

    def _run(self, kind: str, sel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        key = (kind, sel)
        if key not in self._checked:
            return self._first_forward(kind, sel)
        if not self.use_graphs:
            return self._forward(kind, sel)
        if key not in self.graphs:
            self.graphs[key] = self._capture(kind, sel)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _first_forward(self, kind: str, sel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The first forward of a branch set, eager. Where "auto" picked cuDNN's attention and cuDNN
        refuses (an unsupported shape, driver or build), warn once and continue with the Triton kernel."""
        try:
            out = self._forward(kind, sel)
        except RuntimeError as e:
            if self.attention != "cudnn" or "cudnn" not in str(e).lower():
                raise
            if self.requested_attention != "auto":  # asked for explicitly: say what to do instead
                raise InputError(f"cuDNN attention failed for this request ({str(e).splitlines()[0][:200]}); "
                                 f"use attention 'triton' (or 'auto')") from None
            warnings.warn(f"cuDNN attention failed ({str(e).splitlines()[0][:200]}); the denoiser uses "
                          f"bagel-rt's Triton attention instead", RuntimeWarning, stacklevel=2)
            self.attention = "triton"
            out = self._forward(kind, sel)
        self._checked.add((kind, sel))
        return out

    def _capture(self, kind: str, sel: tuple[int, ...]):
        """The forward of a branch set captured in a CUDA graph (after its eager first run), and its outputs,
        which each replay rewrites."""
        graph = torch.cuda.CUDAGraph()
        if self.lean:
            torch.cuda.empty_cache()
        if kind not in self.pools:
            self.pools[kind] = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pools[kind]):
            try:
                out = self._forward(kind, sel)
            except BaseException:
                # join the marker stream before the capture ends, so that the real error (e.g. out of memory
                # under a budget) surfaces instead of "capturing stream has unjoined work"
                self._wait_side()
                raise
        return graph, out


def linear_modules_signature(model) -> tuple:
    """Each decoder Linear's module type and activation format (what a captured graph depends on)."""
    return tuple((type(m).__name__, getattr(m, "act_format", None))
                 for m in model.language_model.model.layers.modules() if not list(m.children()))


def act_format(mods) -> str | None:
    """The 8-bit activation format ("fp8", "int8") that every module of ``mods`` computes with, else None.

    The one Linear interface: every weight format is a module with ``forward(x)`` (any rows, weight-only or
    not) and, for 8-bit compute, an ``act_format`` and ``forward_quantized((q [M, K], scale [M, 1]),
    out_dtype)``; a plain ``nn.Linear`` has neither. Modules sharing an input share its quantized rows."""
    fmts = {getattr(m, "act_format", None) for m in mods}
    return fmts.pop() if len(fmts) == 1 else None


def weight_only(mod) -> bool:
    """A compressed module that dequantizes its weight on every call (INT8/NF4/DF11 without 8-bit compute)."""
    return type(mod) is not torch.nn.Linear and getattr(mod, "act_format", None) is None


def quantized_rows(mods, x: Tensor):
    """The 8-bit rows of an input ``x`` [M, K] shared by ``mods`` (quantized once), or None when the modules
    do not compute in 8 bits."""
    fmt = act_format(mods)
    if fmt == "fp8":
        from .quant.fp8 import quantize_rows

        return quantize_rows(x)
    if fmt == "int8":
        from .kernels import quantize_rows_int8

        return quantize_rows_int8(x)
    return None


def denoiser_key(ctxs: list[Context], h: int, w: int) -> tuple:
    """What a captured denoiser depends on: grid size and each branch's cache length and RoPE position."""
    return (h, w, tuple((c.length, c.rope) for c in ctxs))


@torch.no_grad()
def denoise_packed(model, ctxs: dict[str, Context], noise: Tensor, h: int, w: int, num_timesteps: int,
                   timestep_shift: float, cfg: CFGSettings, text_is_cond: bool, img_is_cond: bool,
                   use_graphs: bool = True, on_step=None, cache: dict | None = None,
                   mlp_chunks: int = 1, df11=None, lean: bool = False, attention: str = "triton",
                   step_cache: StepCache | None = None, **options) -> Tensor:
    """The sampler loop of :func:`bagel_rt.sampler.denoise` on the packed fast path.

    Args:
        ctxs: {"cond", "text", "img"} contexts.
        text_is_cond / img_is_cond: exact dedup flags (that branch reuses the conditional velocity; under step
            caching, only the flags of :func:`bagel_rt.step_cache.exact_dedup`).
        attention: the latent-query attention ("auto", "triton", "cudnn"; :func:`resolve_attention`).
        df11: the compressed DF11 units (``df11_resident``), decoded layer by layer inside the forward.
        lean: under a memory budget (see :attr:`PackedDenoiser.lean`).
        step_cache: the request's step-cache state (None: every evaluation is a full forward). At each step
            the branches on a full evaluation run one packed forward, the others one Taylor graph.
        options: tuning options of :class:`PackedDenoiser` (``marker_stream``), for A/B measurements; the
            defaults are the measured best.
    Returns:
        [h*w, 64] float32 final latents.
    """
    k_ops = _kernels()
    ts = schedule(num_timesteps, timestep_shift)
    steps = [(float(ts[i]), float(ts[i] - ts[i + 1])) for i in range(num_timesteps - 1)]
    # the branches ever computed, in arena order (conditional first)
    ever = set().union(*(velocity_sources(*cfg.scales_at(t), text_is_cond, img_is_cond).values()
                         for t, _ in steps))
    order = [b for b in ("cond", "text", "img") if b in ever]
    exchange = None  # CFG-parallel: this rank's denoisers hold its branches only (bagel_rt.parallel.cfg_parallel)
    if model.parallel is not None and model.parallel.mode == "cfg":
        from .parallel.cfg_parallel import exchange_for

        exchange = exchange_for(model, cfg, num_timesteps, timestep_shift, text_is_cond, img_is_cond,
                                share=step_cache is None)
    local = order if exchange is None else exchange.mine
    settings = (h, w, use_graphs, mlp_chunks, df11, lean, attention, options)
    den = _cached_denoiser(cache, "denoiser", model, [ctxs[b] for b in local], *settings) if local else None
    shared = None  # the leftover branches of uneven steps, tensor-parallel over all ranks
    if exchange is not None and exchange.shared:
        from .parallel.cfg_parallel import shared_contexts, shared_view

        shared = _cached_denoiser(cache, "shared", shared_view(model),
                                  shared_contexts(model, ctxs, exchange.shared), *settings)
    if step_cache is not None and den is not None:
        s = step_cache.settings
        den.step_store(s.max_order + 1, s.fresh_threshold - 1)
    x = noise.to(model.device, torch.float32).contiguous()
    for i, (t, dt) in enumerate(steps):
        st, si = cfg.scales_at(t)
        src = velocity_sources(st, si, text_is_cond, img_is_cond)
        needed = set(src.values())
        mine = needed if exchange is None else exchange.local(needed)
        sel = tuple(j for j, b in enumerate(local) if b in mine)
        v = {}
        if step_cache is None and sel:
            v = dict(zip(sel, den.velocities(x, t, sel)))
        elif sel:
            v = _cached_step(den, step_cache, x, t, sel, local)
        v = {local[j]: vj for j, vj in v.items()}
        if exchange is not None:  # every rank gets every velocity of the step (one all_gather)
            exchange.count_others(step_cache, needed)
            v = exchange.gather(v, needed, tuple(x.shape), x.device, model.dtype)
            leftover = exchange.plan(needed)[1]
            if leftover:
                v.update(zip(leftover, shared.velocities(x, t, tuple(exchange.shared.index(b) for b in leftover))))
        if step_cache is not None:
            step_cache.record_step(src)
        v_t = v[src["text"]] if "text" in src else None
        v_i = v[src["img"]] if "img" in src else None
        x, v_comb = k_ops.cfg_euler(x, v["cond"], v_t, v_i, st, si, cfg.cfg_renorm_type, cfg.cfg_renorm_min, dt)
        if on_step is not None:
            on_step(i, v_comb)
    return x


def _cached_denoiser(cache: dict | None, slot: str, model, ctxs: list, h: int, w: int, use_graphs: bool,
                     mlp_chunks: int, df11, lean: bool, attention: str, options: dict) -> PackedDenoiser:
    """The denoiser kept in ``cache[slot]`` when it fits this request (refilled with the new caches: its graphs
    stay), else a new one (kept there)."""
    key = denoiser_key(ctxs, h, w)
    den = cache.get(slot) if cache is not None else None
    if (den is not None and den.key == key and den.use_graphs == (use_graphs and model.device.type == "cuda")
            and den.formats == linear_modules_signature(model) and den.requested_attention == attention
            and den.mlp_chunks == mlp_chunks and den.lean == lean and (den.prefetch is None) == (df11 is None)
            and all(den.options.get(k) == v for k, v in options.items())):
        den.refill(ctxs)  # same shapes: keep the captured graphs, copy the new caches in
        return den
    if cache is not None:
        cache.pop(slot, None)  # free the old arena and graph pool before allocating new ones
    den = PackedDenoiser(model, ctxs, h, w, use_graphs, mlp_chunks, df11, attention, lean, **options)
    if cache is not None:
        cache[slot] = den
    return den


def _cached_step(den: PackedDenoiser, step_cache: StepCache, x: Tensor, t: float, sel: tuple[int, ...],
                 order: list[str]) -> dict[int, Tensor]:
    """One step under step caching: {arena branch: velocity [N, 64]} of the branches ``sel``. Those on a full
    evaluation run one packed forward (and refresh their derivatives), the others one Taylor graph; branches on
    the same schedule stay packed together."""
    evs = {b: step_cache.evaluation(order[b]) for b in sel}
    full = tuple(b for b in sel if evs[b].full)
    taylor = tuple(b for b in sel if not evs[b].full)
    v = {}
    if full:
        hidden, vf = den.full(x, t, full)
        for j, b in enumerate(full):
            den.derivatives.update(b, hidden[j * den.N:(j + 1) * den.N], evs[b])
            v[b] = vf[j]
    if taylor:
        v.update(zip(taylor, den.taylor_velocities(taylor, [evs[b].distance for b in taylor])))
    return v
