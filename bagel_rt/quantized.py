"""Compressed checkpoints: convert a BAGEL checkpoint to INT8, NF4, FP8 or DFloat11, and load any of them.

Layouts (docs/weight-formats.md sections 3.6 and 4, DESIGN.md section 4):

* ``int8`` / ``nf4``: the official layout with a quantized ``ema.safetensors``. Each quantized Linear ``X`` is
  stored under the bitsandbytes keys (int8: ``X.weight``, ``X.SCB``, ``X.weight_format``; nf4: ``X.weight``,
  ``X.weight.absmax``, ``X.weight.quant_map`` [, ``X.weight.nested_absmax``, ``X.weight.nested_quant_map``],
  ``X.weight.quant_state.bitsandbytes__nf4``), so bitsandbytes reads them; every other tensor is unchanged.
  The file's safetensors metadata declares the format (``bagel_rt.format``) and the loader goes by it.
* ``fp8``: the same, each FP8 Linear ``X`` as ``X.weight`` (F8_E4M3 ``[N, K]``) and ``X.weight_scale`` (F32
  ``[N, 1]``, one scale per output channel: the compressed-tensors / vLLM channel-wise layout).
* ``fp8-gen-nf4-und`` (the 12 GB recipe): the generation expert's Linears in FP8, the understanding expert's
  Linears and ``lm_head`` in NF4, in one ``ema.safetensors``; each Linear is recognised by its own tensors.
* ``df11``: the ``DFloat11/BAGEL-7B-MoT-DF11`` layout: ``config.json`` with ``dfloat11_config`` (its
  ``pattern_dict`` names the compression units), a top-level ``model.safetensors`` with each unit's buffers
  (``U.luts``, ``U.encoded_exponent``, ...) and the uncompressed tensors under their own names, and
  ``vae/ae.safetensors``. Lossless: decoded weights are bit-identical to the bf16 originals.

Which weights are quantized (int8 / nf4): the ``weight`` of every ``nn.Linear`` of the model (both LLM experts,
``lm_head``, the ViT, the connector, the glue), except those matching a ``skip`` pattern (``re.search`` on the
tensor name), the :data:`DTYPE_PROBES` and, for NF4, Linears whose ``in_features`` is not a multiple of the
block size. Embeddings, norms, position tables and biases stay as stored. The metadata lists what was kept.
fp8 and the recipe quantize the LLM Linears of both experts and ``lm_head`` only (:data:`LLM_FORMATS`); the ViT,
the connector and the glue stay bf16.

:func:`bagel_rt.convert.convert_checkpoint` writes these layouts (tensor by tensor, unit by unit).
:func:`bagel_rt.quantized_load.load_weights` fills a model built on the meta device from any layout; quantizing a
bf16 checkpoint as it is loaded gives the same tensors as loading the converted checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (
    _DTYPES,
    SafetensorsHeader,
    read_header,
)
from .errors import CheckpointError, InputError
from .model import SpecialTokens
from .quant import (
    NF4Config,
    fp8_state,
    int8_state,
    nf4,
    quantize_model,
)
from .validate import df11_declared

__all__ = [
    "FORMATS",
    "WEIGHTS",
    "DTYPE_PROBES",
    "BAGEL_DF11_PATTERNS",
    "checkpoint_format",
    "declares_df11",
    "ema_format",
    "resolve_weights",
    "quant_plan",
    "linear_formats",
    "quantize_in_place",
    "RECIPE",
    "LLM_FORMATS",
    "QUANTIZED",
    "LINEAR_FORMATS",
    "quantize_linear",
    "quantized_specs",
]

RECIPE = "fp8-gen-nf4-und"
#: formats that quantize the LLM Linears only: (generation expert, understanding expert, lm_head)
LLM_FORMATS = {"fp8": ("fp8", "fp8", "fp8"), RECIPE: ("fp8", "nf4", "nf4")}
QUANTIZED = ("int8", "nf4", *LLM_FORMATS)  # formats stored in a quantized ema.safetensors
FORMATS = (*QUANTIZED, "df11")
WEIGHTS = ("auto", "bf16", *QUANTIZED, "df11")
#: the Linear formats each stored format may hold
LINEAR_FORMATS = {"int8": ("int8",), "nf4": ("nf4",), "fp8": ("fp8",), RECIPE: ("fp8", "nf4")}
EMA_FILE, AE_FILE, DF11_FILE, CONFIG_FILE = "ema.safetensors", "ae.safetensors", "model.safetensors", "config.json"
DF11_VAE = f"vae/{AE_FILE}"
NF4_BLOCKSIZE = 64
_PLAIN = {"bf16", "fp16", "fp32"}  # metadata values of unquantized checkpoints
#: Linears whose weight dtype the model reads as the dtype of its input (``TimestepEmbedder``, ``VisionModel``):
#: a quantized weight there would cast the activations to int8/uint8, so they stay bf16 (1.6 M parameters).
DTYPE_PROBES = ("time_embedder.mlp.0", "vit_model.vision_model.embeddings.patch_embedding")
_EXPERTS = ("", "_moe_gen")
_LLM_LINEARS = ([f"self_attn.{p}{sfx}" for sfx in _EXPERTS for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
                + [f"mlp{sfx}.{p}" for sfx in _EXPERTS for p in ("gate_proj", "up_proj", "down_proj")])
#: DFloat11 compression units: regex over module names -> the Linears concatenated into that unit (a module with
#: its own weight, an Embedding or the lm_head, is a unit of one). Norms, biases, the glue and the sin-cos tables
#: stay bf16 (< 0.2 % of the weights).
BAGEL_DF11_PATTERNS: dict[str, list[str]] = {
    r"language_model\.model\.layers\.\d+": _LLM_LINEARS,
    r"language_model\.model\.embed_tokens": [],
    r"language_model\.lm_head": [],
    r"vit_model\.vision_model\.encoder\.layers\.\d+": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.out_proj", "mlp.fc1", "mlp.fc2"],
    r"vit_model\.vision_model\.embeddings\.position_embedding": [],
}
_NO_SPECIAL = SpecialTokens(0, 0, 0, 0)  # token ids play no part in key names and shapes
_CHUNK_ELEMENTS = 1 << 24  # quantize at most this many weights at once (fp32 temporaries of ~64 MB each)
_QS = "weight.quant_state.bitsandbytes__nf4"
_ST_DTYPES = {v: k for k, v in _DTYPES.items()}  # torch dtype -> safetensors dtype name


# -- formats ----------------------------------------------------------------------------------------------------
def declares_df11(path: Path) -> bool:
    """Whether ``path`` is in the DFloat11 layout: its ``config.json`` holds ``dfloat11_config``."""
    return df11_declared(path / CONFIG_FILE) is not None


def ema_format(ema: SafetensorsHeader) -> str:
    """"bf16" (plain floats, or no declaration) or one of :data:`QUANTIZED`: the ``bagel_rt.format`` metadata of
    ``ema``."""
    fmt = ema.metadata.get("bagel_rt.format", "bf16")
    if fmt in _PLAIN:
        return "bf16"
    if fmt not in QUANTIZED:
        raise CheckpointError(f"{ema.path}: unknown weight format {fmt!r} in its metadata (bagel_rt.format); "
                              f"this version reads bf16, {', '.join(QUANTIZED)} and df11")
    return fmt


def checkpoint_format(path: Path) -> str:
    """The weight format the checkpoint directory ``path`` declares: "bf16" (plain floats), one of
    :data:`QUANTIZED` or "df11" (:func:`declares_df11`, else :func:`ema_format`). Never guessed from file or
    directory names."""
    return "df11" if declares_df11(path) else ema_format(read_header(path / EMA_FILE))


def resolve_weights(stored: str, weights: str, path: Path) -> str:
    """The format the model will hold, given what the checkpoint stores and what was asked for.

    "auto" = what is stored; a bf16 checkpoint can be quantized to int8/nf4/fp8/the recipe as it loads; a df11
    checkpoint
    decodes to exact bf16 (and so can also be quantized); quantized weights cannot be turned back.
    """
    if weights not in WEIGHTS:
        raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights in ("auto", stored):
        return stored
    if stored in ("bf16", "df11") and weights in (*QUANTIZED, "bf16"):
        return weights
    if weights == "df11":
        raise CheckpointError(f"{path}: holds {stored} weights; DFloat11 weights need a DFloat11 checkpoint "
                              f"(write one with: bagel-rt quantize SRC DST --format df11)")
    raise CheckpointError(f"{path}: holds {stored} weights, which cannot give weights={weights!r} (quantization "
                          f"is lossy): load the bf16 or df11 checkpoint instead, or this one with weights='auto'")


# -- which Linears, and their quantized tensors ------------------------------------------------------------------
def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _compile_skip(skip: Iterable[str]) -> list[re.Pattern]:
    out = []
    for p in skip:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"skip pattern {p!r} is not a regular expression ({e})") from None
    return out


def quant_plan(model: nn.Module, fmt: str, skip: Iterable[str] = (), blocksize: int = NF4_BLOCKSIZE
               ) -> tuple[list[str], dict[str, str]]:
    """The Linears of ``model`` that ``fmt`` ("int8" / "nf4") quantizes, and the others with the reason."""
    rx = _compile_skip(skip)
    chosen, kept = [], {}
    for name, lin in _linears(model).items():
        if any(r.search(f"{name}.weight") for r in rx):
            kept[name] = "skip pattern"
        elif name in DTYPE_PROBES:
            kept[name] = "its weight dtype sets the input dtype"
        elif fmt == "nf4" and lin.in_features % blocksize:
            kept[name] = f"in_features {lin.in_features} is not a multiple of the block size {blocksize}"
        else:
            chosen.append(name)
    return chosen, kept


def linear_formats(model: nn.Module, fmt: str, skip: Iterable[str] = (), blocksize: int = NF4_BLOCKSIZE
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """The Linears of ``model`` that ``fmt`` (one of :data:`QUANTIZED`) quantizes, each with its own format
    ("int8", "nf4" or "fp8"), and the others with the reason they stay as stored."""
    if fmt not in LLM_FORMATS:
        chosen, kept = quant_plan(model, fmt, skip, blocksize)
        return dict.fromkeys(chosen, fmt), kept
    rx = _compile_skip(skip)
    gen, und, head = LLM_FORMATS[fmt]
    llm = re.compile(r"language_model\.model\.layers\.\d+\.(" + "|".join(map(re.escape, _LLM_LINEARS)) + ")")
    out, kept = {}, {}
    for name, lin in _linears(model).items():
        f = None
        if name == "language_model.lm_head":
            f = head
        elif llm.fullmatch(name):
            f = gen if "_moe_gen" in name else und
        if f is None:  # not an LLM Linear: stays as stored (bagel_rt.llm_formats says what is quantized)
            continue
        if any(r.search(f"{name}.weight") for r in rx):
            kept[name] = "skip pattern"
        elif f == "nf4" and lin.in_features % blocksize:
            kept[name] = f"in_features {lin.in_features} is not a multiple of the block size {blocksize}"
        else:
            out[name] = f
    return out, kept


def quantize_in_place(model: nn.Module, fmt: str, skip: Iterable[str] = ()) -> dict[str, str]:
    """Swaps the Linears :func:`linear_formats` chooses for ``fmt`` by their quantized modules, from the float
    weights already in ``model`` (e.g. a random-weight model); returns that choice."""
    plan = linear_formats(model, fmt, skip)[0]
    for f in sorted(set(plan.values())):
        quantize_model(model, f, filter_fn=lambda mod, name, f=f: plan.get(name) == f)
    return plan


def quantized_specs(name: str, out_features: int, in_features: int, fmt: str, double_quant: bool = False,
                    blocksize: int = NF4_BLOCKSIZE) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors of the Linear ``name`` quantized to ``fmt`` ("int8" / "nf4": bitsandbytes; "fp8"):
    key -> (shape, safetensors dtype); -1 = any."""
    if fmt == "fp8":
        return {f"{name}.weight": ((out_features, in_features), "F8_E4M3"),
                f"{name}.weight_scale": ((out_features, 1), "F32")}
    if fmt == "int8":
        return {f"{name}.weight": ((out_features, in_features), "I8"), f"{name}.SCB": ((out_features,), "F32"),
                f"{name}.weight_format": ((), "U8")}
    n = out_features * in_features
    n_blocks = -(-n // blocksize)
    w = f"{name}.weight"
    specs = {w: (((n + 1) // 2, 1), "U8"), f"{w}.absmax": ((n_blocks,), "U8" if double_quant else "F32"),
             f"{w}.quant_map": ((16,), "F32")}
    if double_quant:
        specs[f"{w}.nested_absmax"] = ((-(-n_blocks // nf4.NESTED_BLOCKSIZE),), "F32")
        specs[f"{w}.nested_quant_map"] = ((256,), "F32")
    specs[f"{name}.{_QS}"] = ((-1,), "U8")
    return specs


def quantize_linear(name: str, weight: Tensor, fmt: str, double_quant: bool = False,
                    blocksize: int = NF4_BLOCKSIZE, chunk_elements: int = _CHUNK_ELEMENTS) -> dict[str, Tensor]:
    """The tensors of Linear ``name`` with ``weight`` [N, K] quantized to ``fmt`` ("int8", "nf4", "fp8"),
    computed on the weight's device.

    Works through row chunks of at most ``chunk_elements`` weights (bounded temporary memory) and gives the same
    tensors as ``int8_state`` / ``nf4_state`` / ``fp8_state`` of the whole weight: INT8 and FP8 scales are per
    row, and NF4 blocks never straddle rows because ``K`` is a multiple of the block size.
    """
    N, K = weight.shape
    rows = max(1, chunk_elements // K)
    chunks = [weight[r: r + rows] for r in range(0, N, rows)]
    if fmt in ("int8", "fp8"):
        parts = [(int8_state if fmt == "int8" else fp8_state)(name, c) for c in chunks]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if parts[0][k].ndim}
        if fmt == "int8":
            out[f"{name}.weight_format"] = parts[0][f"{name}.weight_format"]
        return out
    if K % blocksize:
        raise ValueError(f"NF4 needs in_features ({K}) of {name!r} to be a multiple of the block size {blocksize}")
    qs = [nf4.quantize(c, NF4Config(blocksize=blocksize)) for c in chunks]
    q = nf4.NF4Weights(packed=torch.cat([x.packed for x in qs]), absmax=torch.cat([x.absmax for x in qs]),
                       shape=(N, K), dtype=weight.dtype, blocksize=blocksize, quant_map=qs[0].quant_map)
    if double_quant:  # as nf4.quantize does, over the absmax of the whole weight
        offset = q.absmax.mean()
        dmap = nf4.dynamic_map(weight.device)
        qabs, nested = nf4._blockwise_quant(q.absmax - offset, dmap, nf4.NESTED_BLOCKSIZE)
        q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_offset = qabs, nested, dmap, offset.item()
    return nf4._weights_to_state(name, q)


def _shape_ok(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(got) == len(want) and all(w in (-1, g) for g, w in zip(got, want))
