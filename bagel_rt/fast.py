"""The fast denoising path (``triton`` backend): batched CFG, static buffers, fused kernels, CUDA graphs.

One :class:`PackedDenoiser` serves one request: one image, or a batch of images (:mod:`bagel_rt.batch`). At
construction it copies the KV caches of the branches that will ever be computed (per image: conditional first,
then text-unconditional, then image-unconditional) into a store of every layer's caches; before each layer
attends, its caches are copied into a one-layer *arena*, each branch's cache followed by room for its query block
(:mod:`bagel_rt.arena`: each image has its own grid, each branch its own cache length and RoPE position; the
query blocks need one layer only, which keeps an edit's arena at 0.57 GiB instead of 1.14 at 1024^2):

    arena rows: [ cond cache | cond block ][ text cache | text block ][ img cache | img block ] [ image 1 ...

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
import gc
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .arena import ArenaLayout
from .batch import ImageJob
from .cache import Context
from .df11_resident import LayerPrefetch
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
    """Batched-CFG velocity for the branches of one or several images over one KV arena
    (:class:`bagel_rt.arena.ArenaLayout`).

    Args:
        model: the :class:`bagel_rt.model.BagelModel`.
        ctxs: the branch contexts in arena order (each image's together, its conditional first).
        h, w: the latent grid (tokens per side) of a single image; a block has ``h*w + 2`` tokens.
        use_graphs: capture each branch set's forward in a CUDA graph (CUDA only).
        attention: "triton" or "cudnn" for the latent queries (see :func:`resolve_attention`).
        image_of, grids: for several images, the image of each context and each image's (h, w) grid (``h``
            and ``w`` are then ignored); default: every context belongs to the one image of grid (h, w).
        df11: the model's compressed DF11 units (``df11_resident``; :mod:`bagel_rt.df11_resident`), or None.
        lean: under a memory budget (see :attr:`lean`).
    """

    def __init__(self, model, ctxs: list[Context], h: int | None, w: int | None, use_graphs: bool = True,
                 mlp_chunks: int = 1, df11=None, attention: str = "triton", lean: bool = False,
                 marker_stream: bool | None = None, image_of: list[int] | None = None,
                 grids: list[tuple[int, int]] | None = None):
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
        self.model = model
        p = model.params.llm
        (self.Hq, self.Hk), self.D, self.eps = model.local_heads, p.head_dim, p.rms_norm_eps
        if grids is None:
            grids, image_of = [(h, w)], [0] * len(ctxs)
        self.layout = ArenaLayout.of_contexts(ctxs, image_of, grids)
        self.B = len(ctxs)
        #: latent tokens per branch when every image has one grid size (None for a batch of mixed sizes)
        self.N = self.layout.rows[0] if len(set(self.layout.rows)) == 1 else None
        dev, dt = model.device, model.dtype
        self.device, self.dtype = dev, dt
        # the store holds the copied caches of this process's decoder layers (all, or its range under a layer
        # split); two one-layer arenas alternate by layer (:mod:`bagel_rt.arena`): the marker stream may still
        # attend over one layer's while the next layer fills the other
        layers = model.local_layers
        self.first = layers.start
        self.k = torch.empty(len(layers), self.layout.store_total, self.Hk, self.D, device=dev, dtype=dt)
        self.v = torch.empty_like(self.k)
        self.arena_k = torch.zeros(2, self.layout.total, self.Hk, self.D, device=dev, dtype=dt)
        self.arena_v = torch.zeros_like(self.arena_k)
        self.cache_rows = self.layout.cache_rows().to(dev)
        self.refill(ctxs)
        self.sm_scale = 1.0 / math.sqrt(self.D)
        s = model.special
        self.markers = model.embed([s.start_of_image, s.end_of_image])  # [2, H]
        #: latent position embeddings of every image's rows of x_in [X, H]
        side = model.params.max_latent_size
        self.pos_emb = torch.cat([model.latent_pos_embed(flattened_position_ids(gh, gw, side).to(dev))
                                  for gh, gw in grids])
        # static inputs (graph replays read these): every image's latents, one shared timestep
        self.x_in = torch.zeros(self.layout.x_offsets[-1], model.params.patch_latent_dim, device=dev,
                                dtype=torch.float32)
        self.t_in = torch.zeros(1, device=dev, dtype=torch.float32)
        self.use_graphs = use_graphs and dev.type == "cuda"
        #: under a budget, set when a capture ran out of memory: this denoiser then runs eagerly (see :meth:`_run`)
        self.graphs_refused = False
        #: captured graphs by (kind, branches): kind "full" (the packed forward) or "taylor" (step caching)
        self.graphs: dict[tuple, tuple] = {}
        #: one memory pool per kind: a step may replay a full and a Taylor graph and use both outputs
        self.pools: dict[str, object] = {}
        #: the Linear modules' formats at construction (a module swap, e.g. compute="fp8", needs new graphs)
        self.formats = linear_modules_signature(model)
        #: the step cache's derivative buffers (allocated by the first step-cached request, see
        #: :meth:`step_store`)
        self.derivatives: PackedDerivatives | None = None

    @property
    def arena_nbytes(self) -> int:
        """Bytes of the cache store's and the arenas' keys and values."""
        return self.k.nbytes + self.v.nbytes + self.arena_k.nbytes + self.arena_v.nbytes

    @property
    def key(self) -> tuple:
        """What this denoiser's arena and graphs depend on (:func:`denoiser_key`)."""
        return self.layout.key

    def branch_meta(self, sel: tuple[int, ...]) -> dict:
        """The metadata of a forward over the arena branches ``sel`` (sorted, any subset: branches on
        different step-cache schedules, or of images at different steps of their schedules, need not form a
        prefix); see :meth:`bagel_rt.arena.ArenaLayout.meta`."""
        return self.layout.meta(sel, self.D, self.model.params.llm.rope_theta, self.device, self.dtype)

    def refill(self, ctxs: list[Context]) -> None:
        """Copy the contexts' caches into the store (at construction, and to reuse this denoiser and its
        captured graphs for new contexts of the same layout key). A branch sharing its parent's prefix
        (:func:`bagel_rt.arena.shared_prefixes`) reads the parent's rows: nothing to copy."""
        assert denoiser_key(ctxs, self.layout.image_of, self.layout.grids) == self.key
        for b in self.layout.copied():
            c = ctxs[b]
            a0, a1 = self.layout.store_range(b)
            self.k[:, a0:a1] = c.cache.k[:, : c.length]
            self.v[:, a0:a1] = c.cache.v[:, : c.length]

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
        K, V = self.layer_arena(i)
        with self._on_side():
            qu = self._qkv_to_arena(layer, "", xu, K, V, m["und_rows"], m["cos_u"], m["sin_u"])
        qg = self._qkv_to_arena(layer, "_moe_gen", xg, K, V, m["gen_rows"], m["cos_g"], m["sin_g"])
        gen_kv = self._mark()  # the gen rows' keys/values are in the arena
        self._wait_side()  # ... and the und rows' ones
        og = self._latent_attention(qg, K, V, m)
        with self._on_side():
            if gen_kv is not None:
                self.side.wait_event(gen_kv)
            ou = self.k_ops.varlen_attention(qu, K, V, m["cu_qu"], m["cu_k"], False, self.sm_scale, 2, m["max_k"],
                                             seqused_k=m["used_k"])
            xu = self._attn_out_mlp(layer, "", xu, ou)
        return self._attn_out_mlp(layer, "_moe_gen", xg, og), xu

    def layer_arena(self, i: int) -> tuple[Tensor, Tensor]:
        """The one-layer arena of decoder layer i, K and V [total, Hk, D], with that layer's caches copied in
        (its query blocks are written by the layer itself)."""
        K, V = self.arena_k[i % 2], self.arena_v[i % 2]
        if self.cache_rows.numel():
            K.index_copy_(0, self.cache_rows, self.k[i - self.first])
            V.index_copy_(0, self.cache_rows, self.v[i - self.first])
        return K, V

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
        """Attention of the latent queries q [R, Hq, D] (R: the latent rows of the branches described by ``m``,
        a ``meta`` entry) over the arena rows K, V [rows, Hk, D], with the chosen implementation."""
        if self.attention == "cudnn":
            return self._attention_cudnn(q, K, V, m["q_ranges"], m["k_ranges"])
        return self.k_ops.varlen_attention(q, K, V, m["cu_qg"], m["cu_k"], False, self.sm_scale, m["max_qg"],
                                           m["max_k"], seqused_k=m["used_k"])

    def _attention_cudnn(self, q: Tensor, K: Tensor, V: Tensor, q_ranges: list, k_ranges: list) -> Tensor:
        """Latent-query attention through cuDNN: the j-th branch's queries q[q_ranges[j]] [n, Hq, D] attend to
        the arena rows k_ranges[j] of K, V [rows, Hk, D] (GQA without expanding K/V). Returns [R, Hq, D]."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        outs = []
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for (q0, q1), (k0, k1) in zip(q_ranges, k_ranges):
                qb = q[q0:q1].transpose(0, 1)[None]  # [1, Hq, n, D] (strided view)
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
        sizes = row_chunks(rows, n)
        if len(sizes) > 1 and all(hasattr(m, "dense_weight") for m in mods if weight_only(m)):
            dense = {id(m): m.dense_weight(self.dtype) for m in mods if weight_only(m)}
            hs = h.split(sizes) if h is not None else [None] * len(sizes)
            hqs = zip(hq[0].split(sizes), hq[1].split(sizes)) if hq is not None else [None] * len(sizes)
            out = torch.empty_like(res)  # each chunk adds into its rows (a concatenation would copy them again)
            for c, cq, r, o in zip(hs, hqs, res.split(sizes), out.split(sizes)):
                self._mlp_rows(mlp, c, cq, r, dense, o)
            return out
        return self._mlp_rows(mlp, h, hq, res)

    def _mlp_rows(self, mlp, h: Tensor | None, hq: tuple | None, res: Tensor, dense: dict | None = None,
                  out: Tensor | None = None) -> Tensor:
        """``res + mlp(h)`` (into ``out`` if given); ``dense``: dequantized weights by ``id(module)`` to use
        instead of the modules'."""
        if hq is None:
            hq = quantized_rows((mlp.gate_proj, mlp.up_proj), h)
        g, u = self._linear(mlp.gate_proj, h, hq, dense), self._linear(mlp.up_proj, h, hq, dense)
        down = mlp.down_proj
        if act_format([down]) == "fp8":  # the SwiGLU writes the FP8 rows the down projection reads
            y = self._linear(down, None, self.k_ops.swiglu_fp8(g, u))
        else:
            act = self.k_ops.swiglu(g, u)
            y = self._linear(down, act, quantized_rows([down], act), dense)
        return res + y if out is None else torch.add(res, y, out=out)

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
        """The last decoder layer's output [R, H] (the latent rows of the branches ``sel``, packed in order, see
        ``q_ranges`` of :meth:`branch_meta`; before the final norm) for the static inputs x_in, t_in."""
        model, m, nb = self.model, self.branch_meta(sel), len(sel)
        lat = model.vae2llm(self.x_in.to(self.dtype)) + model.time_embedder(self.t_in) + self.pos_emb
        xg = lat.to(self.dtype)[m["lat_rows"]]  # each branch's copy of its image's rows
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
        """Velocities [R, 64] of hidden states [R, H]: the final gen norm, then ``llm2vae``."""
        out = self.k_ops.rms_norm(hidden, self.model.language_model.model.norm_moe_gen.weight, self.eps)
        return self.model.llm2vae(out)

    def _forward(self, kind: str, sel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(hidden states [R, H], velocities [R, 64]) of a full forward ("full") or of the Taylor series of the
        cached derivatives ("taylor": no LLM forward at all); R: the branches' latent rows, packed in order."""
        hidden = self._hidden(sel) if kind == "full" else self.derivatives.series(sel)
        return hidden, self._head(hidden)

    def split(self, sel: tuple[int, ...], rows: Tensor) -> list[Tensor]:
        """Packed rows [R, ...] of the branches ``sel`` -> one contiguous view per branch [h*w, ...]."""
        return [rows[a:b] for a, b in self.branch_meta(sel)["q_ranges"]]

    @torch.no_grad()
    def velocities(self, x: Tensor, t: float, sel: int | tuple[int, ...]) -> Tensor:
        """Velocities [len(sel), N, 64] of the arena branches ``sel`` (or of the first ``sel`` ones) at
        (x [N, 64] fp32, t), for branches of one grid size (a single image, or a batch of one size)."""
        sel = tuple(range(sel)) if isinstance(sel, int) else tuple(sel)
        v = self.full(x, t, sel)[1]
        assert len({self.layout.rows[b] for b in sel}) == 1, "velocities() stacks branches of one grid size"
        return v.view(len(sel), -1, v.shape[-1])

    @torch.no_grad()
    def full(self, x: Tensor | list[Tensor], t: float, sel: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The packed forward of the branches ``sel`` at (x, t): (hidden states [R, H] before the final norm,
        velocities [R, 64]; :meth:`split` cuts them per branch). ``x``: every image's latents [X, 64] fp32, or
        a list of each image's [h*w, 64].

        A branch set's first call runs eagerly (Triton compiles, cuBLAS/cuDNN pick their kernels; its result
        is this step's), the second captures the forward in a CUDA graph, later calls replay it."""
        if isinstance(x, Tensor):
            self.x_in.copy_(x)
        else:
            o = self.layout.x_offsets
            for i, xi in enumerate(x):
                self.x_in[o[i]:o[i + 1]].copy_(xi)
        self.t_in.fill_(t)
        return self._run("full", tuple(range(sel)) if isinstance(sel, int) else tuple(sel))

    @torch.no_grad()
    def taylor_velocities(self, sel: tuple[int, ...], distances: list[int]) -> Tensor:
        """Velocities [R, 64] of the branches ``sel`` predicted from their cached derivatives at the given
        distances (step caching; a graph of its own per branch set, like :meth:`full`)."""
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
            self.derivatives = PackedDerivatives(self.B, orders, self.layout.rows,
                                                 self.model.params.llm.hidden_size, max_distance, self.device,
                                                 self.dtype)
        self.derivatives.reset()
        return self.derivatives

    def _run(self, kind: str, sel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        key = (kind, sel)
        if key not in self._checked:
            return self._first_forward(kind, sel)
        if not self.use_graphs or self.graphs_refused:
            return self._forward(kind, sel)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(kind, sel)
            except torch.cuda.OutOfMemoryError:
                if not self.lean:
                    raise
            if key not in self.graphs:  # outside the except: its traceback would keep the failed capture alive
                self._refuse_graphs()
                return self._forward(kind, sel)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _refuse_graphs(self) -> None:
        """Under a budget, after a capture ran out of memory: drop the graphs and their pools and run eagerly.

        A capture cannot release the allocator's cached blocks (PyTorch does not free memory while a graph is
        being captured), so under a cap it can fail where the same forward run eagerly fits: on the H200 an INT8
        edit under 16 GiB failed in its capture with 1.4 GiB of the default pool cached but unused, and ran
        eagerly in 19.36 s with a 15.22 GiB peak (7928ef3, ``budget_memory.py --history``; uncapped with graphs
        18.15 s). Since then the same edit keeps its graphs (20.24 / 20.74 s, 1.109x / 1.121x bf16, peak 15.29,
        c1fb778 / 4db1cad); the pipeline remembers a refusal for its budget (``Bagel.graphs_refused``)."""
        warnings.warn("under the GPU memory budget the denoiser's CUDA-graph capture ran out of memory; it runs "
                      "without CUDA graphs (a few percent slower); a larger max_gpu_memory keeps them",
                      RuntimeWarning, stacklevel=3)
        self.graphs.clear()
        self.pools.clear()
        self.graphs_refused = True
        gc.collect()
        torch.cuda.empty_cache()

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


#: the denoiser MLP's row chunks start at multiples of this many rows: cuBLASLt's FP8 GEMM refuses per-row scales
#: that do not start 16-byte aligned (CUBLAS_STATUS_NOT_SUPPORTED for the second of two 2-row chunks of the
#: marker rows, H200, 7b1c684), and so few rows gain nothing from chunking anyway
CHUNK_ALIGN = 16


def row_chunks(rows: int, n: int) -> list[int]:
    """Sizes of about ``n`` row chunks of ``rows`` rows, each but the last a multiple of :data:`CHUNK_ALIGN`
    (fewer where the rows are few: ``[rows]`` for at most ``CHUNK_ALIGN`` rows, e.g. the marker rows)."""
    size = -(-rows // (n * CHUNK_ALIGN)) * CHUNK_ALIGN
    return [min(size, rows - s) for s in range(0, rows, size)] if n > 1 else [rows]


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


def denoiser_key(ctxs: list[Context], image_of: list[int], grids: list[tuple[int, int]]) -> tuple:
    """What a captured denoiser depends on: each image's grid and each branch's image, cache length and RoPE
    position, and which branches share a cached prefix (:attr:`bagel_rt.arena.ArenaLayout.key`)."""
    return ArenaLayout.of_contexts(ctxs, image_of, grids).key


@torch.no_grad()
def denoise_packed(model, ctxs: dict[str, Context], noise: Tensor, h: int, w: int, num_timesteps: int,
                   timestep_shift: float, cfg: CFGSettings, text_is_cond: bool, img_is_cond: bool,
                   use_graphs: bool = True, on_step=None, cache: dict | None = None,
                   mlp_chunks: int = 1, df11=None, lean: bool = False, attention: str = "triton",
                   step_cache: StepCache | None = None, **options) -> Tensor:
    """The sampler loop of :func:`bagel_rt.sampler.denoise` on the packed fast path, for one image: its
    ``ctxs`` ({"cond", "text", "img"}), initial ``noise`` [h*w, 64] and exact-dedup flags (under step caching,
    only those of :func:`bagel_rt.step_cache.exact_dedup`). ``on_step(i, combined velocity)`` after each step.
    See :func:`denoise_batch` for the other arguments. Returns the [h*w, 64] float32 final latents."""
    job = ImageJob(ctxs, noise, h, w, text_is_cond, img_is_cond, step_cache, on_step)
    return denoise_batch(model, [job], num_timesteps, timestep_shift, cfg, use_graphs, None, cache, mlp_chunks,
                         df11, lean, attention, **options)[0]


@torch.no_grad()
def denoise_batch(model, jobs: list[ImageJob], num_timesteps: int, timestep_shift: float, cfg: CFGSettings,
                  use_graphs: bool = True, on_step=None, cache: dict | None = None, mlp_chunks: int = 1,
                  df11=None, lean: bool = False, attention: str = "triton", **options) -> list[Tensor]:
    """The sampler loop of :func:`bagel_rt.sampler.denoise` for several images at once: at each step, every
    branch any image needs runs in **one** packed forward; then each image's CFG combination + Euler update
    (its own branches' velocities, the shared scales of the step).

    Args:
        jobs: the images (:class:`bagel_rt.batch.ImageJob`: contexts, grid, noise, dedup flags, step cache,
            per-image ``on_step(i, combined velocity)``). Step caching is on for all of them or for none.
        use_graphs: capture the packed forwards in CUDA graphs.
        on_step: ``on_step(i)`` after step i of the whole batch (after the images' own callbacks).
        cache: a dict keeping the last denoiser (``cache["denoiser"]``), reused with its graphs while the
            arena layout (grids, branch cache lengths and ropes) stays the same.
        attention: the latent-query attention ("auto", "triton", "cudnn"; :func:`resolve_attention`).
        df11: the compressed DF11 units (``df11_resident``), decoded layer by layer inside the forward.
        lean: under a memory budget (see :attr:`PackedDenoiser.lean`).
        options: tuning options of :class:`PackedDenoiser` (``marker_stream``), for A/B measurements; the
            defaults are the measured best.
    Returns:
        each image's [h*w, 64] float32 final latents.
    """
    k_ops = _kernels()
    steps = _steps(num_timesteps, timestep_shift)
    settings = (use_graphs, mlp_chunks, df11, lean, attention, options)
    if model.parallel is not None and model.parallel.mode == "cfg":
        # CFG-parallel spreads one image's branches over the ranks: a batch's images run one after another
        return [_denoise_cfg_parallel(model, job, steps, num_timesteps, timestep_shift, cfg, on_step, cache,
                                      settings) for job in jobs]
    caching = {job.step_cache is not None for job in jobs}
    assert len(caching) == 1, "step caching is on for every image of a batch or for none"
    ctxs, image_of, names = _arena_branches(jobs, cfg, steps)
    arena = {(k, b): a for a, (k, b) in enumerate(zip(image_of, names))}
    den = _cached_denoiser(cache, "denoiser", model, ctxs, image_of, [(job.h, job.w) for job in jobs], *settings)
    if caching == {True}:
        s = jobs[0].step_cache.settings
        den.step_store(s.max_order + 1, s.fresh_threshold - 1)
    xs = [job.noise.to(model.device, torch.float32).contiguous() for job in jobs]
    for i, (t, dt) in enumerate(steps):
        st, si = cfg.scales_at(t)
        srcs = [velocity_sources(st, si, job.text_is_cond, job.img_is_cond) for job in jobs]
        sel = tuple(sorted(arena[k, b] for k, src in enumerate(srcs) for b in set(src.values())))
        if caching == {False}:
            v = dict(zip(sel, den.split(sel, den.full(xs, t, sel)[1])))
        else:
            v = _cached_step(den, jobs, xs, t, sel, image_of, names)
        for k, (job, src) in enumerate(zip(jobs, srcs)):
            xs[k] = _update(k_ops, job, i, xs[k], {b: v[arena[k, b]] for b in set(src.values())}, src, st, si,
                            dt, cfg)
        if on_step is not None:
            on_step(i)
    return xs


def _denoise_cfg_parallel(model, job: ImageJob, steps: list[tuple[float, float]], num_timesteps: int,
                          timestep_shift: float, cfg: CFGSettings, on_step, cache: dict | None,
                          settings: tuple) -> Tensor:
    """One image under CFG-parallel (:mod:`bagel_rt.parallel.cfg_parallel`): this rank's packed denoiser holds
    its own branches only; the velocities of a step meet in one all_gather, and the leftover branches of uneven
    steps run tensor-parallel over all ranks in a second denoiser. Returns the [h*w, 64] final latents."""
    from .parallel.cfg_parallel import exchange_for, shared_contexts, shared_view

    k_ops = _kernels()
    step_cache, grid = job.step_cache, [(job.h, job.w)]
    order = _branches_ever(job, cfg, steps)
    exchange = exchange_for(model, cfg, num_timesteps, timestep_shift, job.text_is_cond, job.img_is_cond,
                            share=step_cache is None)
    local = order if exchange is None else exchange.mine
    den = (_cached_denoiser(cache, "denoiser", model, [job.ctxs[b] for b in local], [0] * len(local), grid,
                            *settings) if local else None)
    shared = None  # the leftover branches of uneven steps, tensor-parallel over all ranks
    if exchange is not None and exchange.shared:
        shared = _cached_denoiser(cache, "shared", shared_view(model),
                                  shared_contexts(model, job.ctxs, exchange.shared), [0] * len(exchange.shared),
                                  grid, *settings)
    if step_cache is not None and den is not None:
        s = step_cache.settings
        den.step_store(s.max_order + 1, s.fresh_threshold - 1)
    x = job.noise.to(model.device, torch.float32).contiguous()
    for i, (t, dt) in enumerate(steps):
        st, si = cfg.scales_at(t)
        src = velocity_sources(st, si, job.text_is_cond, job.img_is_cond)
        needed = set(src.values())
        mine = needed if exchange is None else exchange.local(needed)
        sel = tuple(j for j, b in enumerate(local) if b in mine)
        v = {}
        if step_cache is None and sel:
            v = dict(zip(sel, den.velocities(x, t, sel)))
        elif sel:
            v = _cached_step(den, [job], [x], t, sel, [0] * len(local), local)
        v = {local[j]: vj for j, vj in v.items()}
        if exchange is not None:  # every rank gets every velocity of the step (one all_gather)
            exchange.count_others(step_cache, needed)
            v = exchange.gather(v, needed, tuple(x.shape), x.device, model.dtype)
            leftover = exchange.plan(needed)[1]
            if leftover:
                v.update(zip(leftover, shared.velocities(x, t, tuple(exchange.shared.index(b) for b in leftover))))
        x = _update(k_ops, job, i, x, v, src, st, si, dt, cfg)
        if on_step is not None:
            on_step(i)
    return x


def _steps(num_timesteps: int, timestep_shift: float) -> list[tuple[float, float]]:
    """(t, dt) of each step of the schedule."""
    ts = schedule(num_timesteps, timestep_shift)
    return [(float(ts[i]), float(ts[i] - ts[i + 1])) for i in range(num_timesteps - 1)]


def arena_bytes(model, jobs: list[ImageJob], cfg: CFGSettings, num_timesteps: int, timestep_shift: float) -> int:
    """Bytes of the cache store and arenas :func:`denoise_batch` allocates for ``jobs`` (:class:`bagel_rt.arena.
    ArenaLayout`: each branch some step evaluates holds its cache, unless it shares it, in every layer; its 2
    marker rows and its image's latent rows in the one-layer arenas)."""
    ctxs, image_of, _ = _arena_branches(jobs, cfg, _steps(num_timesteps, timestep_shift))
    layout = ArenaLayout.of_contexts(ctxs, image_of, [(job.h, job.w) for job in jobs])
    _, hk = model.local_heads
    return layout.nbytes(2 * hk * model.params.llm.head_dim * model.dtype.itemsize, len(model.local_layers))


def latent_rows(jobs: list[ImageJob], cfg: CFGSettings, num_timesteps: int, timestep_shift: float) -> int:
    """Latent rows of the largest packed forward :func:`denoise_batch` runs for ``jobs``: each image's latent rows
    once per branch some step evaluates (a branch that the exact-skip rules never run counts for nothing: an edit
    with ``cfg_img_scale=1`` computes two, a t2i with ``cfg_text_scale=1`` one)."""
    steps = _steps(num_timesteps, timestep_shift)
    return sum(len(_branches_ever(job, cfg, steps)) * job.h * job.w for job in jobs)


def _arena_branches(jobs: list[ImageJob], cfg: CFGSettings, steps: list[tuple[float, float]]) -> tuple:
    """(contexts, image of each, branch names) of the branches each image ever computes, in arena order (each
    image's together, conditional first)."""
    ctxs, image_of, names = [], [], []
    for k, job in enumerate(jobs):
        for b in _branches_ever(job, cfg, steps):
            ctxs.append(job.ctxs[b])
            image_of.append(k)
            names.append(b)
    return ctxs, image_of, names


def _branches_ever(job: ImageJob, cfg: CFGSettings, steps: list[tuple[float, float]]) -> list[str]:
    """The branches ("cond", "text", "img", in that order) that some step of ``job`` evaluates."""
    ever = set().union(*(velocity_sources(*cfg.scales_at(t), job.text_is_cond, job.img_is_cond).values()
                         for t, _ in steps))
    return [b for b in ("cond", "text", "img") if b in ever]


def _update(k_ops, job: ImageJob, i: int, x: Tensor, v: dict[str, Tensor], src: dict[str, str], st: float,
            si: float, dt: float, cfg: CFGSettings) -> Tensor:
    """Step i's tail for one image: record the step in its step cache, combine the velocities ``v`` (by branch;
    ``src`` says which branch stands for each CFG term) and take the Euler step; calls ``job.on_step``.
    Returns the next [h*w, 64] latents."""
    if job.step_cache is not None:
        job.step_cache.record_step(src)
    v_t = v[src["text"]] if "text" in src else None
    v_i = v[src["img"]] if "img" in src else None
    x, v_comb = k_ops.cfg_euler(x, v[src["cond"]], v_t, v_i, st, si, cfg.cfg_renorm_type, cfg.cfg_renorm_min, dt)
    if job.on_step is not None:
        job.on_step(i, v_comb)
    return x


def graphs_refused(cache: dict | None) -> bool:
    """Whether the denoiser kept in ``cache`` gave its CUDA graphs up (a capture ran out of memory under a
    budget; see :meth:`PackedDenoiser._refuse_graphs`)."""
    den = cache.get("denoiser") if cache is not None else None
    return den is not None and den.graphs_refused


def _cached_denoiser(cache: dict | None, slot: str, model, ctxs: list[Context], image_of: list[int],
                     grids: list[tuple[int, int]], use_graphs: bool, mlp_chunks: int, df11, lean: bool,
                     attention: str, options: dict) -> PackedDenoiser:
    """The denoiser kept in ``cache[slot]`` refilled with ``ctxs`` when its layout and settings match (its
    graphs stay), else a new one (kept there)."""
    key = denoiser_key(ctxs, image_of, grids)
    den = cache.get(slot) if cache is not None else None
    if (den is not None and den.key == key and den.use_graphs == (use_graphs and model.device.type == "cuda")
            and den.formats == linear_modules_signature(model) and den.requested_attention == attention
            and den.mlp_chunks == mlp_chunks and den.lean == lean and (den.prefetch is None) == (df11 is None)
            and all(den.options.get(k) == v for k, v in options.items())):
        den.refill(ctxs)  # same shapes: keep the captured graphs, copy the new caches in
        return den
    if cache is not None:
        cache.pop(slot, None)  # free the old arena and graph pool before allocating new ones
    den = PackedDenoiser(model, ctxs, None, None, use_graphs, mlp_chunks, df11, attention, lean,
                         image_of=image_of, grids=grids, **options)
    if cache is not None:
        cache[slot] = den
    return den


def _cached_step(den: PackedDenoiser, jobs: list[ImageJob], xs: list[Tensor], t: float, sel: tuple[int, ...],
                 image_of: list[int], names: list[str]) -> dict[int, Tensor]:
    """One step under step caching: {arena branch: velocity [h*w, 64]} of the branches ``sel``. Those on a
    full evaluation (by their image's step cache) run one packed forward (and refresh their derivatives), the
    others one Taylor graph; branches on the same schedule stay packed together, across images too."""
    evs = {b: jobs[image_of[b]].step_cache.evaluation(names[b]) for b in sel}
    full = tuple(b for b in sel if evs[b].full)
    taylor = tuple(b for b in sel if not evs[b].full)
    v = {}
    if full:
        hidden, vf = den.full(xs, t, full)
        for b, hb, vb in zip(full, den.split(full, hidden), den.split(full, vf)):
            den.derivatives.update(b, hb, evs[b])
            v[b] = vb
    if taylor:
        vt = den.taylor_velocities(taylor, [evs[b].distance for b in taylor])
        v.update(zip(taylor, den.split(taylor, vt)))
    return v
