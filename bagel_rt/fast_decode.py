"""Fast text decoding (``triton`` backend): the und-expert decode step on fused kernels, as a CUDA graph.

:func:`decode_step_kernels` is the kernel twin of :meth:`bagel_rt.model.BagelModel.decode_step`: one token
through the und expert, with every per-token quantity on the device (token id, RoPE position and cache
length are [1] tensors), so the whole step can be captured once and replayed. Per layer it runs

    add+RMSNorm -> q/k/v GEMV -> [bias + q/k RMSNorm + RoPE + K/V cache write] -> split-K attention
    -> o GEMV -> add+RMSNorm -> gate/up GEMVs -> SwiGLU -> down GEMV

where the bracket is one small kernel (:func:`bagel_rt.kernels.qkv_rope_cache`) and the GEMVs are cuBLAS
(``F.linear``) or, with ``gemv="triton"``, :func:`bagel_rt.kernels.gemv` with gate/up/SwiGLU fused into one
kernel. INT8 / FP8 / NF4 weights run through their own decode GEMVs (:mod:`bagel_rt.quant.decode_gemv`: the
same fusions, codes decoded in registers, fp32 scales cached when the layers are gathered, PDL). With
``fuse_qkv`` the three projections read one concatenated copy of their weights (one GEMV instead of three;
0.9 GB extra at full size in bf16, 0.46 GB in INT8 / FP8, 0.26 GB in NF4).

:class:`GraphDecoder` owns a static KV cache, the static [1] inputs and one CUDA graph per mode (greedy /
sampled) for its capacity. The greedy graph also takes the argmax, writes it as the next input token and
into a device list of predicted ids, and advances position and length, so replays chain on the GPU with no
host involvement; the host reads the predicted ids every ``check_every`` tokens to stop at ``<|im_end|>``
(steps past the stop token are wasted, never visible: they only write scratch rows). Sampling copies the
logits out of the graph and draws with ``torch.multinomial`` eagerly, exactly as the torch path does.
Without CUDA (or with ``use_graphs=False``) the same step runs eagerly, in place on the context's cache.

Numerics against the torch backend (DESIGN section 3, within bf16 noise): q/k RMSNorm + RoPE in fp32 (the
torch und path uses the activation dtype), the q/k/v bias added in fp32 to the bf16-rounded GEMV output on
the fused path, SwiGLU rounded once, fp32 online softmax.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_rt.kernels import (
    add_rms_norm,
    add_rms_norm_parts,
    gemv,
    gemv_swiglu,
    qkv_rope_cache,
    rms_norm,
    swiglu,
    varlen_attention,
)
from bagel_rt.kernels._device import l2_prefetch_on
from bagel_rt.quant.decode_gemv import (
    DecodeWeight,
    concat,
    decode_weight,
    fp8_hfma_on,
    int8_hfma_on,
    nf4_hfma_on,
    nf4_prmt_on,
    qgemv,
    qgemv_parts,
    qgemv_swiglu,
    swiglu_pair,
)
from bagel_rt.quant.decode_mma import (
    MMA_FORMATS,
    SPLIT_MIN_K,
    Digits,
    add_rms_norm_digits,
    digit_kind,
    mma_gemv,
    mma_gemv_parts,
    mma_gemv_swiglu,
    prefers_mma,
    prefers_split,
    wgmma_on,
)

from .cache import Context, KVCache
from .embeddings import rope_cos_sin
from .errors import InputError

#: the decode step's matrix-vector products: "cublas" (F.linear) or "triton" (bagel_rt.kernels.gemv, with the MLP's
#: gate/up/SwiGLU fused) for plain bf16 nn.Linear weights. Compressed weights take a decode GEMV either way: under
#: "triton" and "cublas" the faster one for their shape (bagel_rt.quant.decode_mma.prefers_mma: INT8 / FP8 gate/up
#: and lm_head on the tensor cores, FP8 down split-K on them (decode_mma.prefers_split), the rest on the FMA
#: kernels of bagel_rt.quant.decode_gemv, as measured per shape); "triton-fma" and "triton-mma" force one kind
#: everywhere it applies, for A/B runs; "triton-split" is "triton" with the o and down projections of INT8 / FP8
#: weights on the tensor cores split over column ranges (decode_mma.mma_gemv_parts), their fp32 parts summed by the
#: residual add that follows (kernels.add_rms_norm_parts) — for the 3584-channel projections, which fill too few
#: SMs unsplit — and the norms before gate/up and lm_head writing the digits their tensor-core GEMVs read
#: (decode_mma. add_rms_norm_digits: 29 digit launches fewer per token). An experiment, slower than "triton" on the
#: H200 (decode, one process, 9c4a67a: INT8 338.1 vs 363.4 tok/s, FP8 283.7 vs 304.3; its split settings were then
#: 32 x 512, since retuned to 64 x 256). NF4's down projection is split over column ranges on its FMA kernel under
#: every name (decode_gemv.qgemv_parts, 2 parts, summed the same way): its 3584 rows leave the SMs a latency-bound
#: tail unsplit (decode, one process, H200, 7b1c684, tok/s: NF4 339.2 unsplit, 354.8 split; bf16 252.5).
#: "triton-fsplit" is "triton" with the INT8 / FP8 down projections split that way too: slower there (INT8 383.1 vs
#: 387.1, FP8 331.8 vs 344.3, same run). "triton-prefetch" is "triton" with every GEMV asking L2 for all of its
#: weight lines before it waits for the previous kernel (bagel_rt.kernels._device.l2_prefetch; bf16 GEMVs too):
#: with the packed products slower (decode, one process, H100, 1ff1e2e, tok/s, without / with: NF4 321.9 / 300.7,
#: INT8 302.7 / 239.0, FP8 269.4 / 237.2). Under "triton" the FMA kernels of NF4, INT8 and FP8 weights sum their
#: products in packed bf16 pairs (decode_gemv.nf4_hfma_on, int8_hfma_on, fp8_hfma_on: NF4 decoded by byte permutes;
#: the default since the fifteenth stop; measured, one process, H100, 1ff1e2e, median of 5, tok/s, fp32 products ->
#: packed: NF4 279.7 -> 337.3, INT8 297.7 -> 303.4, FP8 280.6 -> 283.2, bf16 190.0; INT8's were off for a stop: see
#: decode_gemv.INT8_HFMA_SETTINGS); "triton-fp32" keeps the fp32 products (NF4's word-wise decode, the exact fp32
#: decodes of INT8 and FP8) for A/B runs, and "triton-prmt" is that with NF4 decoded by byte permutes into fp32
#: products (decode_gemv.nf4_prmt_on). "triton-wgmma" and "triton-wgmma-split" are "triton" and "triton-split" with
#: the INT8 / FP8 tensor-core GEMVs putting the weight tile first (Hopper's wgmma from shared memory; FP8 weights
#: undecoded against e4m3 digits: decode_mma.wgmma_on): A/B candidates, no faster in the decoder (one process,
#: H100, a0527a6, median of 3, tok/s, "triton" / "triton-wgmma" / "triton-wgmma-split": FP8 288.8 / 285.9 / 283.1,
#: INT8 318.8 / 314.2 / 304.2).
GEMVS = ("cublas", "triton", "triton-fma", "triton-mma", "triton-split", "triton-fsplit", "triton-prefetch",
         "triton-fp32", "triton-prmt", "triton-wgmma", "triton-wgmma-split")


@contextlib.contextmanager
def _fp32_products(prmt: bool = False):
    with nf4_hfma_on(False), fp8_hfma_on(False), int8_hfma_on(False), nf4_prmt_on(prmt):
        yield


#: the variants that are another implementation run inside a context (see GEMVS): name -> (context, base)
_VARIANTS = {"triton-prefetch": (l2_prefetch_on, "triton"), "triton-fp32": (_fp32_products, "triton"),
             "triton-prmt": (functools.partial(_fp32_products, True), "triton"),
             "triton-wgmma": (wgmma_on, "triton"), "triton-wgmma-split": (wgmma_on, "triton-split")}
#: the weight formats whose decode step a variant changes beyond "triton": an A/B run of it on another format
#: measures the same kernels again (benchmarks skip it); variants not named here change every format
VARIANT_FORMATS = {"triton-prmt": {"nf4"}, "triton-fp32": {"nf4", "fp8", "int8"},
                   "triton-split": {"int8", "fp8"}, "triton-fsplit": {"int8", "fp8"},
                   "triton-fma": {"int8", "fp8"}, "triton-mma": {"int8", "fp8"},
                   "triton-wgmma": {"int8", "fp8"}, "triton-wgmma-split": {"int8", "fp8"}}
DEFAULT_GEMV = "triton"  # measured faster on the H200 (see bagel_rt.kernels.gemv)
#: programmatic dependent launch of the step's Triton kernels (Hopper+): each kernel launches while the one
#: before it drains, and the GEMVs request their first weight tile before waiting for its output
DEFAULT_PDL = True
CAPACITY_STEP = 1024  # the static cache grows in these steps (a new capacity means a new capture)
WARMUP_STEPS = 2  # eager steps on a side stream before a capture: Triton compiles and autotunes there


# -- the und weights a decode step reads ------------------------------------------------------------------


@dataclass
class UndLayer:
    """The und-expert tensors and modules one decoder layer reads when decoding.

    ``qkv_weight`` is a fused [(Hq + 2 Hk) * D, hidden] copy of the q/k/v weights, bf16 or compressed (None:
    call the q/k/v modules, which then add their own biases); ``qkv_bias`` is the fused bias the epilogue
    kernel adds (fused path only). ``compressed`` holds the INT8 / FP8 / NF4 projections ("o", "gate", "up",
    "down") as the decode GEMVs of :mod:`bagel_rt.quant.decode_gemv` read them, scales computed once (gate and
    up only as a pair of one format and shape, for the fused gate/up + SwiGLU kernel).
    """

    attn_norm: Tensor
    mlp_norm: Tensor
    q_norm: Tensor
    k_norm: Tensor
    attn: nn.Module
    mlp: nn.Module
    qkv_weight: Tensor | DecodeWeight | None = None
    qkv_bias: Tensor | None = None
    compressed: dict[str, DecodeWeight] = field(default_factory=dict)


def _same_kind(ws: list[DecodeWeight | None]) -> bool:
    return all(w is not None and (w.fmt, w.blocksize) == (ws[0].fmt, ws[0].blocksize) for w in ws)


def und_layers(model, fuse_qkv: bool = False, compressed: bool = True) -> list[UndLayer]:
    """Collect every layer's und weights.

    ``fuse_qkv`` concatenates the q/k/v weights once (plain ``nn.Linear``, or compressed modules of one format);
    ``compressed`` gathers INT8 / FP8 / NF4 modules for the compressed decode GEMVs (False: their own forward).
    """
    out = []
    for layer in model.language_model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        lw = UndLayer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, a.q_norm.weight,
                      a.k_norm.weight, a, mlp)
        projs = (a.q_proj, a.k_proj, a.v_proj)
        qkv = [decode_weight(m) if compressed else None for m in projs]
        if fuse_qkv and all(m.bias is not None for m in projs):
            if all(type(m) is nn.Linear for m in projs):
                lw.qkv_weight = torch.cat([m.weight for m in projs]).contiguous()
            elif _same_kind(qkv):
                lw.qkv_weight = concat(qkv)
            if lw.qkv_weight is not None:
                lw.qkv_bias = torch.cat([m.bias for m in projs]).contiguous()
        if compressed:
            named = {"o": a.o_proj, "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
            lw.compressed = {k: w for k, m in named.items() if (w := decode_weight(m)) is not None}
            gate, up = lw.compressed.pop("gate", None), lw.compressed.pop("up", None)
            # (swiglu_pair checks format, shape, block size and the NF4 tables)
            pair = (swiglu_pair(gate, up) if gate is not None and up is not None and mlp.gate_proj.bias is None
                    and mlp.up_proj.bias is None else None)
            if pair is not None:
                lw.compressed["gate"], lw.compressed["up"] = pair
        out.append(lw)
    return out


# -- one decode step --------------------------------------------------------------------------------------


def check_gemv(impl: str) -> str:
    """``impl`` if it names a decode GEMV implementation (:data:`GEMVS`), else an :class:`InputError`."""
    if impl not in GEMVS:
        raise InputError(f"gemv must be one of {', '.join(map(repr, GEMVS))}, got {impl!r}")
    return impl


def _add_norm(delta: Tensor, residual: Tensor, weight: Tensor, eps: float, pdl: bool, impl: str = "triton",
              consumer: DecodeWeight | None = None) -> tuple[Tensor | Digits, Tensor]:
    # the residual add + RMSNorm after a block: its output as one row block, or as split-K parts [P, 1, H]; under
    # "triton-split", when the normed rows feed a tensor-core GEMV (``consumer``), written as its digits
    if impl == "triton-split" and consumer is not None and _on_mma(consumer, impl):
        return add_rms_norm_digits(delta, residual, weight, eps, digit_kind(consumer), pdl)
    if delta.dim() == 3:
        return add_rms_norm_parts(delta, residual, weight, eps, pdl)
    return add_rms_norm(delta, residual, weight, eps, pdl)


def _on_mma(w: DecodeWeight, impl: str) -> bool:
    # whether a compressed weight's decode GEMV runs on the tensor cores (see GEMVS)
    if impl == "triton-fma" or w.fmt not in MMA_FORMATS:
        return False
    return impl == "triton-mma" or prefers_mma(w)


def _split(w: DecodeWeight, impl: str) -> str | None:
    # for a compressed weight whose output a residual add sums: the split-K GEMV it takes, "mma" (tensor cores)
    # or "fma" (NF4's long rows always, INT8 / FP8 ones under triton-fsplit), or None (unsplit)
    if (w.fmt == "nf4" or impl == "triton-fsplit") and w.shape[1] > SPLIT_MIN_K:
        return "fma"
    if impl in ("triton-fma", "triton-mma") or w.fmt not in MMA_FORMATS:
        return None
    return "mma" if impl == "triton-split" or prefers_split(w) else None


def _qgemv(x: Tensor, w: DecodeWeight, bias: Tensor | None, impl: str, pdl: bool) -> Tensor:
    return mma_gemv(x, w, bias, pdl) if _on_mma(w, impl) else qgemv(x, w, bias, pdl)


def _linear(mod: nn.Module, x: Tensor, impl: str, pdl: bool, packed: DecodeWeight | None = None,
            parts: bool = False) -> Tensor:
    # compressed weights always take a decode GEMV (``impl`` "cublas" / "triton" chooses for bf16; see GEMVS);
    # ``parts``: the caller sums split-K parts [P, M, N] (a residual add follows), so "triton-split" may split
    if packed is not None:
        split = _split(packed, impl) if parts else None
        if split is not None:
            return (qgemv_parts if split == "fma" else mma_gemv_parts)(x, packed, mod.bias, pdl)
        return _qgemv(x, packed, mod.bias, impl, pdl)
    if impl != "cublas" and type(mod) is nn.Linear:
        return gemv(x, mod.weight, mod.bias, pdl)
    return mod(x)


def _mlp(lw: UndLayer, h: Tensor, impl: str, pdl: bool) -> Tensor:
    mlp, packed = lw.mlp, lw.compressed
    g, u = mlp.gate_proj, mlp.up_proj
    if "gate" in packed:
        gate, up = packed["gate"], packed["up"]
        act = mma_gemv_swiglu(h, gate, up, pdl) if _on_mma(gate, impl) else qgemv_swiglu(h, gate, up, pdl)
    elif impl != "cublas" and type(g) is nn.Linear and type(u) is nn.Linear and g.bias is None and u.bias is None:
        act = gemv_swiglu(h, g.weight, u.weight, pdl)
    else:
        act = swiglu(g(h), u(h))
    return _linear(mlp.down_proj, act, impl, pdl, packed.get("down"), parts=True)


@torch.no_grad()
def decode_step_kernels(model, cache: KVCache, token: Tensor, pos: Tensor, length: Tensor,
                        layers: list[UndLayer] | None = None, num_splits: int | None = None,
                        gemv_impl: str = DEFAULT_GEMV, pdl: bool = DEFAULT_PDL,
                        head: DecodeWeight | None = None) -> Tensor:
    """One und-mode decoding step on the fused kernels (the twin of ``BagelModel.decode_step``).

    Host-sync free and allocation-stable, so it can be captured in a CUDA graph.

    Args:
        model: the :class:`bagel_rt.model.BagelModel`.
        cache: the KV cache; this token's key/value go to row ``length`` (capacity must exceed it) and the
            attention covers rows ``[0, length + 1)``. ``cache.length`` is not touched.
        token: [1] int64 input token id, on the model's device.
        pos: [1] int64 RoPE position of the token.
        length: [1] int32 number of valid cache rows before this token.
        layers: the gathered und weights (:func:`und_layers`); default: unfused, gathered now.
        num_splits: attention key splits (flash-decoding); None = the kernel's heuristic for a cache of
            ``cache.capacity`` keys (the split bounds themselves follow the actual length on the device).
        gemv_impl: one of ``GEMVS`` (see there and ``DEFAULT_GEMV``).
        pdl: launch the step's Triton kernels with programmatic dependent launch (see ``DEFAULT_PDL``;
            Hopper and newer, ignored elsewhere).
        head: the compressed ``lm_head`` (:func:`bagel_rt.quant.decode_gemv.decode_weight`), or None (the
            module: bf16 GEMV or its own forward).
    Returns:
        [vocab] logits in the model dtype. ``token``, ``pos`` and ``length`` are not advanced.
    """
    lm = model.language_model
    p = lm.params
    Hq, Hk, D, eps = p.num_heads, p.num_kv_heads, p.head_dim, p.rms_norm_eps
    layers = layers if layers is not None else und_layers(model)
    impl = check_gemv(gemv_impl)
    if impl in _VARIANTS:
        context, base = _VARIANTS[impl]
        with context():
            return decode_step_kernels(model, cache, token, pos, length, layers, num_splits, base, pdl, head)
    dev, dt = token.device, cache.dtype
    x = lm.model.embed_tokens(token)  # [1, H]
    cos, sin = rope_cos_sin(pos, D, p.rope_theta, dt)  # [1, D] each, rounded to dt like the reference
    cu_q = torch.arange(2, dtype=torch.int32, device=dev)  # [0, 1]
    cu_k = F.pad(length + 1, (1, 0))  # [0, length + 1]
    sm_scale = 1.0 / math.sqrt(D)
    residual, delta = x, None
    for i, lw in enumerate(layers):
        if delta is None:
            h = rms_norm(x, lw.attn_norm, eps, pdl)
        else:
            h, residual = _add_norm(delta, residual, lw.attn_norm, eps, pdl)
        a = lw.attn
        if isinstance(lw.qkv_weight, DecodeWeight):
            qkv = _qgemv(h, lw.qkv_weight, None, impl, pdl)[0]
            q, k, v = qkv.split([Hq * D, Hk * D, Hk * D])
        elif lw.qkv_weight is not None:
            qkv = (gemv(h, lw.qkv_weight, None, pdl) if impl != "cublas" else F.linear(h, lw.qkv_weight))[0]
            q, k, v = qkv.split([Hq * D, Hk * D, Hk * D])
        else:
            q, k, v = a.q_proj(h)[0], a.k_proj(h)[0], a.v_proj(h)[0]
        k_buf, v_buf = cache.layer(i)
        q = qkv_rope_cache(q.view(Hq, D), k.view(Hk, D), v.view(Hk, D), lw.qkv_bias, lw.q_norm, lw.k_norm, cos,
                           sin, eps, k_buf, v_buf, length, pdl)
        o = varlen_attention(q, k_buf, v_buf, cu_q, cu_k, True, sm_scale, 1, cache.capacity, num_splits, pdl)
        o = _linear(a.o_proj, o.view(1, Hq * D), impl, pdl, lw.compressed.get("o"), parts=True)
        h, residual = _add_norm(o, residual, lw.mlp_norm, eps, pdl, impl, lw.compressed.get("gate"))
        delta = _mlp(lw, h, impl, pdl)
    h, _ = _add_norm(delta, residual, lm.model.norm.weight, eps, pdl, impl, head)
    return _linear(lm.lm_head, h, impl, pdl, head)[0]


# -- the decoder ------------------------------------------------------------------------------------------


class GraphDecoder:
    """Text decoding of one model with :func:`decode_step_kernels`, replayed as a CUDA graph per token.

    Keep one per model and reuse it: the fused weights, the static cache and the graphs are built once (a
    larger context capacity than any seen before costs one new capture). The graphs bake in the weights'
    addresses: build a new decoder after replacing or moving the model's weights (``lm_head`` alone may move
    between requests after :meth:`release_head`, as it does under a memory budget).

    Args:
        model: the :class:`bagel_rt.model.BagelModel`.
        use_graphs: capture and replay CUDA graphs (CUDA only; otherwise the step runs eagerly).
        fuse_qkv: one GEMV over a concatenated copy of the q/k/v weights (plain ``nn.Linear``, or INT8 / FP8 /
            NF4 modules of one format).
        check_every: read the predicted ids (and stop) every this many tokens; default 8 on CUDA, 1 else.
        num_splits: attention key splits, None = heuristic (see :func:`decode_step_kernels`).
        gemv: the GEMV implementation, one of ``GEMVS`` (default
            ``DEFAULT_GEMV``).
        pdl: programmatic dependent launch of the step's Triton kernels (default ``DEFAULT_PDL``).
        compressed: run INT8 / FP8 / NF4 weights (und projections and ``lm_head``) through the compressed decode
            GEMVs (``bagel_rt.quant.decode_gemv``: q/k/v as one, gate/up + SwiGLU as one, scales cached, PDL);
            False: each quantized module's own forward.
    """

    def __init__(self, model, use_graphs: bool = True, fuse_qkv: bool = True, check_every: int | None = None,
                 num_splits: int | None = None, gemv: str = DEFAULT_GEMV, pdl: bool = DEFAULT_PDL,
                 compressed: bool = True):
        self.gemv = check_gemv(gemv)
        self.pdl = pdl
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        on_cuda = self.device.type == "cuda"
        self.use_graphs = use_graphs and on_cuda
        self.check_every = check_every or (8 if on_cuda else 1)
        self.num_splits = num_splits
        self.layers = und_layers(model, fuse_qkv, compressed)
        self.compressed = compressed
        self.head = decode_weight(model.language_model.lm_head) if compressed else None
        i64 = dict(dtype=torch.long, device=self.device)
        # static per-token state (graph inputs/outputs): all [1] device tensors
        self.token = torch.zeros(1, **i64)  # input token id
        self.pos = torch.zeros(1, **i64)  # its RoPE position
        self.length = torch.zeros(1, dtype=torch.int32, device=self.device)  # cache rows before it
        self.step = torch.zeros(1, **i64)  # greedy: index of the next predicted id in ``ids``
        self.ids = torch.zeros(0, **i64)  # predicted ids of the current request
        self.cache: KVCache | None = None  # graph mode: the static cache the graphs read and write
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # greedy? -> (graph, logits)
        self.pool = None

    # -- lm_head, which may leave the device between requests ----------------------------------------------
    def release_head(self) -> None:
        """Forget everything built from ``lm_head``'s (and the token table's) weights, before they move
        (``placement.text_phase``): the compressed head (it references the module's CUDA buffers, which would
        stay allocated) and the graphs (they bake both tables' addresses). The next :meth:`generate` rebuilds them
        from where the tables are then."""
        self.head = None
        self.graphs.clear()
        self.pool = None

    def _bind_head(self) -> None:
        head = self.model.language_model.lm_head
        if head.weight.device != self.device:
            raise RuntimeError(f"lm_head is on {head.weight.device}, the decoder runs on {self.device}: bring it "
                               "to the device for the text phase (bagel_rt.placement.text_phase)")
        if self.compressed and self.head is None:  # released (or an uncompressed lm_head: None again)
            self.head = decode_weight(head)

    # -- one step, eager or captured -----------------------------------------------------------------------
    def _step(self, cache: KVCache, greedy: bool) -> Tensor:
        logits = decode_step_kernels(self.model, cache, self.token, self.pos, self.length, self.layers,
                                     self.num_splits, self.gemv, self.pdl, self.head)
        self.pos.add_(1)
        self.length.add_(1)
        if greedy:  # the prediction becomes the next input, and is recorded for the host
            self.token.copy_(torch.argmax(logits))
            self.ids.index_copy_(0, self.step, self.token)
            self.step.add_(1)
        return logits

    def _static_cache(self, need: int) -> KVCache:
        """The static cache, reallocated (and the graphs dropped) when ``need`` rows do not fit."""
        if self.cache is None or self.cache.capacity < need:
            self.graphs.clear()
            self.pool = self.cache = None
            cap = -(-need // CAPACITY_STEP) * CAPACITY_STEP
            self.cache = self.model.new_cache(cap)
            self.ids = torch.zeros(self.cache.capacity, dtype=torch.long, device=self.device)
        return self.cache

    def _capture(self, greedy: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        cache = self.cache
        for t in (self.token, self.pos, self.length, self.step):
            t.zero_()
        # warm-up on a side stream: Triton compiles (and autotunes) here, never inside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step(cache, greedy)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(cache, greedy)
        return graph, logits

    def _runner(self, cache: KVCache, greedy: bool):
        if not self.use_graphs:
            return lambda: self._step(cache, greedy)
        if greedy not in self.graphs:
            self.graphs[greedy] = self._capture(greedy)
        graph, logits = self.graphs[greedy]

        def replay() -> Tensor:
            graph.replay()
            return logits

        return replay

    # -- a request ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ctx: Context, max_length: int, do_sample: bool = False, temperature: float = 0.3,
                 generator: torch.Generator | None = None, record: bool = False,
                 stop_tokens: tuple[int, ...] | None = None, on_token=None) -> tuple[list[int], Tensor | None]:
        """Decode from ``ctx`` like ``Session.gen_text``: feed ``<|im_start|>``, stop at ``<|im_end|>``.

        Args:
            ctx: the context to decode from (``gen_text`` passes a fork). It is extended in place: the fed
                tokens (``<|im_start|>`` and every prediction but the last) are cached, and ``ctx.rope``
                advances by the number of steps, exactly as ``decode_step`` would leave it.
            max_length: at most this many predicted tokens.
            do_sample: draw from softmax(logits / temperature) with ``generator`` instead of the argmax.
            generator: a generator on the model's device (sampling only).
            record: also return each step's logits.
            stop_tokens: ids that end decoding (default: ``<|im_end|>``; ``()`` never stops early).
            on_token: optional callable taking each predicted id, called after each chunk's host sync.
        Returns:
            (predicted ids including the final stop token, [n, vocab] float32 CPU logits or None).
        """
        if max_length < 1:
            raise InputError(f"max_think_token_n / max_new_tokens must be >= 1, got {max_length}")
        if do_sample and not temperature > 0:
            raise InputError(f"text_temperature must be > 0 when sampling, got {temperature}")
        self._bind_head()
        sp = self.model.special
        stops = {sp.eos} if stop_tokens is None else set(stop_tokens)
        start, rope = ctx.length, ctx.rope
        if self.use_graphs:
            cache = self._static_cache(start + max_length)
            run = self._runner(cache, greedy=not do_sample)  # a capture's warm-up writes scratch rows: copy after
            cache.k[:, :start].copy_(ctx.cache.k[:, :start])
            cache.v[:, :start].copy_(ctx.cache.v[:, :start])
        else:
            ctx.cache.reserve(max_length)
            cache = ctx.cache
            if self.ids.numel() < max_length:
                self.ids = torch.zeros(max_length, dtype=torch.long, device=self.device)
            run = self._runner(cache, greedy=not do_sample)
        self.token.fill_(sp.bos)
        self.pos.fill_(rope)
        self.length.fill_(start)
        self.step.zero_()
        predicted: list[int] = []
        logits_rec: list[Tensor] = []
        done, stopped = 0, False
        while not stopped and done < max_length:
            n = min(self.check_every, max_length - done)
            for j in range(n):
                logits = run()
                if record:
                    logits_rec.append(logits.float().cpu())
                if do_sample:
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                    self.token.copy_(nxt)
                    self.ids[done + j: done + j + 1].copy_(nxt)
            for t in self.ids[done: done + n].tolist():  # the one host sync per chunk
                predicted.append(t)
                if on_token is not None:
                    on_token(t)
                if t in stops:
                    stopped = True
                    break
            done += n
        used = len(predicted)  # tokens fed = steps taken up to the stop token
        if self.use_graphs:
            ctx.cache.reserve(used)
            ctx.cache.k[:, start: start + used].copy_(cache.k[:, start: start + used])
            ctx.cache.v[:, start: start + used].copy_(cache.v[:, start: start + used])
        ctx.cache.length = start + used
        ctx.rope = rope + used
        return predicted, (torch.stack(logits_rec[:used]) if record else None)


def fast_gen_text(source, ctx: Context, max_length: int, do_sample: bool = False, temperature: float = 0.3,
                  generator: torch.Generator | None = None,
                  record: bool = False, on_token=None) -> tuple[list[int], Tensor | None]:
    """``Session.gen_text``'s decode loop on the triton backend.

    Args:
        source: a :class:`GraphDecoder` (reused: graphs are captured once), or a ``Session``, ``Bagel`` or
            ``BagelModel`` (a new decoder is built for this call; CUDA graphs unless ``bagel.use_graphs`` is
            False).
        ctx: the context to decode from (extended in place; pass a fork with room for ``max_length``).
        Other arguments: as :meth:`GraphDecoder.generate`.
    Returns:
        (predicted ids including the final ``<|im_end|>`` when decoding stopped on it, [n, vocab] float32 CPU
        logits when ``record`` else None).
    """
    if not isinstance(source, GraphDecoder):
        bagel = getattr(source, "bagel", source)  # Session -> Bagel
        model = getattr(bagel, "model", bagel)  # Bagel -> BagelModel
        source = GraphDecoder(model, use_graphs=getattr(bagel, "use_graphs", True))
    return source.generate(ctx, max_length, do_sample, temperature, generator, record, on_token=on_token)
