"""Predicted GPU memory of a request under a budget, from sizes alone (no measurement, no GPU).

A request's peak is the resident weights plus the largest transient of its phases. This module adds those
transients up from the model's sizes, the image size and the prompt length, the way the runtime allocates them
under a budget (:mod:`bagel_rt.placement`: ViT, VAE and embedding visit the GPU for their phase only; the
contexts' KV caches wait on the CPU while the denoiser's arena holds their copies; prefill and denoiser MLPs in
row chunks; the graph pool released before the VAE decode where the two do not fit together). It is what
:func:`bagel_rt.placement.keep_layers_decoded` leaves room for, and what ``benchmarks/budget_memory.py``
prints beside the allocator's measured peaks. The KV-cache and arena terms are exact (tests/test_memory.py
checks them against a request); the activation terms count the tensors alive at the widest point of each phase
and ignore allocator rounding and library workspaces (cuBLAS, cuDNN: tens of MiB).

Phases (bytes):

* ``vae_encode`` (edit): the fp32 VAE's weights and its streamed encode (602 MiB at 1024^2, measured;
  scaled by the pixel count).
* ``vit``: the ViT's weights (bf16) and one layer's activations over the image's patches.
* ``prefill``: the context's KV cache (reserved once for the whole image) plus one layer's activations of the
  largest block: the residual stream, q/k/v, the GQA-expanded keys/values of the context, the MLP's three
  intermediates of one row chunk and, for weight-only formats, one dequantized weight.
* ``denoise``: the arena (every computed branch's cache in every layer, shared prefixes once; two one-layer
  arenas of those caches and the query blocks) and one packed forward's activations (residual streams,
  q/attention output, the MLP intermediates of one row chunk, the chunks' shared dequantized weights for
  weight-only formats), the graph pool holding about one forward.
* ``vae_decode``: the VAE's weights and its streamed decode (1087 MiB at 1024^2, measured). The denoiser (arena
  and graph pool) stays through it where both fit the budget (:func:`bagel_rt.placement.vae_fits`), so the next
  request of the same layout replays its graphs instead of capturing them again; the prediction takes the
  conservative case (released).
"""

from __future__ import annotations

import math

from .arena import ArenaLayout
from .cache import _round_up
from .config import BagelParams
from .transforms import VIT_RESIZE, resize_dims

MIB = 2**20
#: measured peaks of the streamed fp32 VAE at 1024^2 above its weights (H200, vae_memory_h200.jsonl)
VAE_ENCODE_1024, VAE_DECODE_1024 = 602 * MIB, 1087 * MIB
VAE_PARAMS = 83_819_683  # the FLUX autoencoder of BAGEL (fp32 on the GPU while it visits)


#: cache rows reserved after an image's blocks for the text that usually follows (an edit's instruction): without
#: them a text longer than the rounding slack grows the cache by half (9216 -> 13824 rows at 1024^2)
TEXT_ROOM = 256


def cache_rows(params: BagelParams, task: str, height: int, width: int, text_tokens: int) -> int:
    """Capacity (rows) of the conditional context's cache after the prefill of an app-style request."""
    rows = context_rows(params, task, height, width, text_tokens)["cond"]
    if task == "edit":
        rows = max(rows, vae_rows(params, height, width) + vit_rows(params, height, width) + TEXT_ROOM)
    return _round_up(rows)


def kv_row_bytes(params: BagelParams, itemsize: int) -> int:
    """Bytes of one cached token over all layers (keys and values)."""
    p = params.llm
    return 2 * p.num_layers * p.num_kv_heads * p.head_dim * itemsize


def context_rows(params: BagelParams, task: str, height: int, width: int, text_tokens: int) -> dict[str, int]:
    """Valid rows of each CFG context after the prefill of an app-style request ({"cond", "text", "img"}): t2i
    [text] / [] / [text]; edit [VAE block, ViT block, text] / [VAE block, ViT block] / [text]."""
    if task == "t2i":
        return {"cond": text_tokens, "text": 0, "img": text_tokens}
    image = vae_rows(params, height, width) + vit_rows(params, height, width)
    return {"cond": image + text_tokens, "text": image, "img": text_tokens}


def vae_rows(params: BagelParams, height: int, width: int) -> int:
    """Rows of the VAE block of an image of (height, width) pixels (VAE-sized): two markers and one token per
    latent patch."""
    ds = params.latent_downsample
    return (height // ds) * (width // ds) + 2


def vit_rows(params: BagelParams, height: int, width: int) -> int:
    """Rows of the ViT block of a VAE-sized image: two markers and one token per patch of its ViT resize."""
    w, h = resize_dims(width, height, *VIT_RESIZE)
    ps = params.vit.patch_size
    return (h // ps) * (w // ps) + 2


def branches(task: str) -> tuple[str, ...]:
    """The CFG branches the denoiser computes with the app defaults (t2i: the image-unconditional branch equals
    the conditional one)."""
    return ("cond", "text") if task == "t2i" else ("cond", "text", "img")


def arena_bytes(params: BagelParams, task: str, height: int, width: int, text_tokens: int, itemsize: int,
                output: tuple[int, int] | None = None) -> int:
    """The packed denoiser's cache store and arenas (:mod:`bagel_rt.arena`): each computed branch's cache in
    every layer, and two one-layer arenas of every branch's cache followed by its query block (``output``: the
    generated image's (height, width), default the input's); an edit's text-unconditional cache is the start of
    the conditional one and is held once (shared prefixes)."""
    rows = context_rows(params, task, height, width, text_tokens)
    names = branches(task)
    ds = params.latent_downsample
    H, W = output or (height, width)
    shares = [names.index("cond") if task == "edit" and b == "text" else None for b in names]
    layout = ArenaLayout([rows[b] for b in names], [0] * len(names), [0] * len(names), [(H // ds, W // ds)],
                         shares)
    layers = params.llm.num_layers
    return layout.nbytes(kv_row_bytes(params, itemsize) // layers, layers)


def denoise_activation_bytes(params: BagelParams, rows: int, mlp_chunks: int, itemsize: int = 2,
                             weight_only: bool = False) -> int:
    """Predicted bytes of one packed denoiser forward's activations over ``rows`` latent rows (all branches):
    the residual streams, q and the attention output (6 x [rows, hidden]), the MLP's gate, up and SwiGLU of one
    of ``mlp_chunks`` row chunks, and for weight-only generation experts the dequantized MLP weights (three
    shared by the chunks, one at a time unchunked)."""
    p = params.llm
    H, inter, b = p.hidden_size, p.intermediate_size, itemsize
    dense = (3 if mlp_chunks > 1 else 1) * inter * H * b if weight_only else 0
    return 6 * rows * H * b + 3 * math.ceil(rows / mlp_chunks) * inter * b + dense


def vae_decode_bytes(height: int, width: int) -> int:
    """Predicted GPU bytes of a visiting VAE decoding a height x width image: its fp32 weights and the streamed
    decode's peak, scaled from the measured 1024^2 one by the pixel count."""
    return 4 * VAE_PARAMS + int(VAE_DECODE_1024 * height * width / 1024**2)


def request_transients(params: BagelParams, task: str, height: int, width: int, itemsize: int = 2,
                       text_tokens: int = 32, weight_only: bool = False, prefill_rows: int | None = None,
                       mlp_chunks: int = 4) -> dict[str, int]:
    """Predicted transient bytes of each phase of a request under a budget, and their maximum ("peak").

    Args:
        task: "t2i" or "edit" (app defaults: 2 / 3 computed branches).
        itemsize: bytes per activation (2: bf16).
        weight_only: INT8/NF4 weights (a dequantized weight per prefill Linear; the denoiser's MLP chunks
            share three).
        prefill_rows: the prefill MLP's row chunk (None: whole blocks).
        mlp_chunks: the denoiser MLP's row chunks.
    """
    p, pv = params.llm, params.vit
    H, inter, b = p.hidden_size, p.intermediate_size, itemsize
    kv = kv_row_bytes(params, b)
    area = height * width / 1024**2
    dense = inter * H * b  # one dequantized MLP weight
    out: dict[str, int] = {}
    if task == "edit":
        out["vae_encode"] = 4 * VAE_PARAMS + int(VAE_ENCODE_1024 * area)
        n_vit = vit_rows(params, height, width) - 2
        vit_params = pv.num_layers * (4 * pv.hidden_size**2 + 2 * pv.hidden_size * pv.intermediate_size)
        out["vit"] = vit_params * b + n_vit * (6 * pv.hidden_size + pv.intermediate_size) * b
    rows = context_rows(params, task, height, width, text_tokens)
    cache = cache_rows(params, task, height, width, text_tokens) * kv
    block = text_tokens
    if task == "edit":
        block = max(vae_rows(params, height, width), vit_rows(params, height, width))
    chunk = block if prefill_rows is None else min(block, prefill_rows)
    prefill = (cache + 6 * block * H * b + 2 * rows["cond"] * H * b  # stream, q/k/v, the GQA-expanded keys/values
               + 3 * chunk * inter * b + (dense if weight_only else 0))
    if task == "edit":
        prefill += _round_up(rows["text"]) * kv  # the text-unconditional fork of the conditional context
    out["prefill"] = prefill
    R = len(branches(task)) * (vae_rows(params, height, width) - 2)
    act = denoise_activation_bytes(params, R, mlp_chunks, b, weight_only)
    out["denoise"] = arena_bytes(params, task, height, width, text_tokens, b) + act
    out["vae_decode"] = vae_decode_bytes(height, width)
    out["peak"] = max(out.values())
    return out
