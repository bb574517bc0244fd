"""Compressed checkpoints: convert a BAGEL checkpoint to INT8, NF4 or DFloat11, and load any of them.

Layouts (docs/weight-formats.md sections 3.6 and 4, DESIGN.md section 4):

* ``int8`` / ``nf4``: the official layout with a quantized ``ema.safetensors``. Each quantized Linear ``X`` is
  stored under the bitsandbytes keys (int8: ``X.weight``, ``X.SCB``, ``X.weight_format``; nf4: ``X.weight``,
  ``X.weight.absmax``, ``X.weight.quant_map`` [, ``X.weight.nested_absmax``, ``X.weight.nested_quant_map``],
  ``X.weight.quant_state.bitsandbytes__nf4``), so bitsandbytes reads them; every other tensor is unchanged.
  The file's safetensors metadata declares the format (``bagel_rt.format``) and the loader goes by it.
* ``df11``: the ``DFloat11/BAGEL-7B-MoT-DF11`` layout: ``config.json`` with ``dfloat11_config`` (its
  ``pattern_dict`` names the compression units), a top-level ``model.safetensors`` with each unit's buffers
  (``U.luts``, ``U.encoded_exponent``, ...) and the uncompressed tensors under their own names, and
  ``vae/ae.safetensors``. Lossless: decoded weights are bit-identical to the bf16 originals.

Which weights are quantized (int8 / nf4): the ``weight`` of every ``nn.Linear`` of the model (both LLM experts,
``lm_head``, the ViT, the connector, the glue), except those matching a ``skip`` pattern (``re.search`` on the
tensor name), the :data:`DTYPE_PROBES` and, for NF4, Linears whose ``in_features`` is not a multiple of the
block size. Embeddings, norms, position tables and biases stay as stored. The metadata lists what was kept.

:func:`bagel_rt.convert.convert_checkpoint` writes these layouts (tensor by tensor, unit by unit).
:func:`load_weights` fills a model built on the meta device from any layout; quantizing a bf16 checkpoint as it
is loaded gives the same tensors as loading the converted checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .checkpoint import (
    _DTYPES,
    _FLOAT,
    SafetensorsHeader,
    expected_shapes,
    raise_key_problems,
    read_header,
)
from .errors import CheckpointError, InputError
from .model import SpecialTokens
from .quant import (
    DF11Config,
    Int8Linear,
    NF4Config,
    NF4Linear,
    df11_decode,
    df11_decode_ref,
    df11_pattern_units,
    int8_state,
    load_int8,
    load_nf4,
    nf4,
)
from .quant.df11_decode import BUFFER_NAMES

__all__ = [
    "FORMATS",
    "WEIGHTS",
    "DTYPE_PROBES",
    "BAGEL_DF11_PATTERNS",
    "checkpoint_format",
    "declares_df11",
    "ema_format",
    "weight_files",
    "resolve_weights",
    "load_weights",
    "quant_plan",
    "quantize_linear",
    "quantized_specs",
]

FORMATS = ("int8", "nf4", "df11")
WEIGHTS = ("auto", "bf16", "int8", "nf4", "df11")
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
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    return isinstance(data, dict) and "dfloat11_config" in data


def ema_format(ema: SafetensorsHeader) -> str:
    """"bf16" (plain floats, or no declaration), "int8" or "nf4": the ``bagel_rt.format`` metadata of ``ema``."""
    fmt = ema.metadata.get("bagel_rt.format", "bf16")
    if fmt in _PLAIN:
        return "bf16"
    if fmt not in ("int8", "nf4"):
        raise CheckpointError(f"{ema.path}: unknown weight format {fmt!r} in its metadata (bagel_rt.format); "
                              "this version reads bf16, int8, nf4 and df11")
    return fmt


def checkpoint_format(path: Path) -> str:
    """The weight format the checkpoint directory ``path`` declares: "bf16" (plain floats), "int8", "nf4" or
    "df11" (:func:`declares_df11`, else :func:`ema_format`). Never guessed from file or directory names."""
    return "df11" if declares_df11(path) else ema_format(read_header(path / EMA_FILE))


def resolve_weights(stored: str, weights: str, path: Path) -> str:
    """The format the model will hold, given what the checkpoint stores and what was asked for.

    "auto" = what is stored; a bf16 checkpoint can be quantized to int8/nf4 as it loads; a df11 checkpoint
    decodes to exact bf16 (and so can also be quantized); quantized weights cannot be turned back.
    """
    if weights not in WEIGHTS:
        raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights in ("auto", stored):
        return stored
    if stored in ("bf16", "df11") and weights in ("int8", "nf4", "bf16"):
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


def quantized_specs(name: str, out_features: int, in_features: int, fmt: str, double_quant: bool = False,
                    blocksize: int = NF4_BLOCKSIZE) -> dict[str, tuple[tuple[int, ...], str]]:
    """The bitsandbytes tensors of the quantized Linear ``name``: key -> (shape, safetensors dtype); -1 = any."""
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
    """The bitsandbytes tensors of Linear ``name`` with ``weight`` [N, K], computed on the weight's device.

    Works through row chunks of at most ``chunk_elements`` weights (bounded temporary memory) and gives the same
    tensors as ``int8_state`` / ``nf4_state`` of the whole weight: INT8 scales are per row, and NF4 blocks never
    straddle rows because ``K`` is a multiple of the block size.
    """
    N, K = weight.shape
    rows = max(1, chunk_elements // K)
    chunks = [weight[r: r + rows] for r in range(0, N, rows)]
    if fmt == "int8":
        parts = [int8_state(name, c) for c in chunks]
        out = {k: torch.cat([p[k] for p in parts]) for k in (f"{name}.weight", f"{name}.SCB")}
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


# -- reading ----------------------------------------------------------------------------------------------------
def _open(header: SafetensorsHeader, device: torch.device | str):
    device = torch.device(device)
    # safetensors reads straight into device memory for CUDA; on the CPU it returns mmap-backed tensors
    return safe_open(str(header.path), framework="pt", device=str(device) if device.type == "cuda" else "cpu")


def _get(f, header: SafetensorsHeader, key: str) -> Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error type for corrupt data
        raise CheckpointError(f"{header.path}: cannot read {key!r} ({str(e).splitlines()[0]})") from None


def _shape_ok(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(got) == len(want) and all(w in (-1, g) for g, w in zip(got, want))


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]  # -1: any size
    dtype: str | None  # None: any float dtype
    optional: bool = False


def _check_tensors(found: dict[str, SafetensorsHeader], expected: dict[str, _Spec], where: Path,
                   what: str) -> None:
    """Strict check of the tensors in one or more files against ``expected``: every problem listed by key."""
    multi = len({h.path for h in found.values()}) > 1

    def name(k: str) -> str:
        return f"{k} (in {found[k].path.name})" if multi else k

    missing = [k for k, s in expected.items() if k not in found and not s.optional]
    unexpected = [name(k) for k in found if k not in expected]
    wrong, bad_dtype = [], []
    for k, s in expected.items():
        if k not in found:
            continue
        t = found[k].tensors[k]
        if not _shape_ok(t.shape, s.shape):
            want = "[" + ", ".join("*" if d == -1 else str(d) for d in s.shape) + "]"
            wrong.append(f"{name(k)}: file {list(t.shape)}, expected {want}")
        if (t.dtype not in _FLOAT) if s.dtype is None else (t.dtype != s.dtype):
            bad_dtype.append(f"{name(k)}: file {t.dtype}, expected {s.dtype or 'a float dtype'}")
    raise_key_problems(where, what, (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                     ("wrong dtype", bad_dtype)))


def weight_files(path: Path, stored: str) -> list[Path]:
    """The safetensors files holding the model weights (not the VAE) of a ``stored``-format checkpoint."""
    if stored != "df11":
        return [path / EMA_FILE]
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{path}: {CONFIG_FILE} declares DFloat11 weights but there is no top-level "
                              "*.safetensors file")
    return files


def _df11_layout(path: Path, model: nn.Module) -> tuple[dict[str, SafetensorsHeader], dict[str, list[str]]]:
    """DFloat11 files: (key -> header of the file holding it, compressed unit -> its weight names, in order)."""
    cfg = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["dfloat11_config"]
    try:
        DF11Config(threads_per_block=int(cfg["threads_per_block"][0]),
                   bytes_per_thread=int(cfg["bytes_per_thread"]))
        patterns = {str(k): [str(a) for a in v] for k, v in cfg["pattern_dict"].items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid dfloat11_config ({e})") from None
    found: dict[str, SafetensorsHeader] = {}
    for p in weight_files(path, "df11"):
        h = read_header(p)
        for k in h.tensors:
            if k in found:
                raise CheckpointError(f"{p}: tensor {k!r} is also in {found[k].path.name}")
            found[k] = h
    names = list(model.state_dict())
    try:
        described = df11_pattern_units(names, patterns)
    except ValueError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    units = {}
    for k, h in found.items():
        u = k.removesuffix(".encoded_exponent")
        if u == k:
            continue
        if u not in described and f"{u}.weight" not in names:
            raise CheckpointError(f"{h.path}: compressed unit {u!r} is neither described by the pattern_dict of "
                                  f"{CONFIG_FILE} nor a module of the model with a weight")
        units[u] = described.get(u, [f"{u}.weight"])
    return found, units


def _df11_specs(model_shapes: dict[str, tuple[int, ...]], units: dict[str, list[str]]) -> dict[str, _Spec]:
    covered = {w for ws in units.values() for w in ws}
    specs = {k: _Spec(s, None) for k, s in model_shapes.items() if k not in covered}
    for u, ws in units.items():
        n = sum(math.prod(model_shapes[w]) for w in ws)
        specs.update({f"{u}.luts": _Spec((-1, 256), "U8"), f"{u}.encoded_exponent": _Spec((-1,), "U8"),
                      f"{u}.sign_mantissa": _Spec((n,), "U8"), f"{u}.output_positions": _Spec((-1,), "U8"),
                      f"{u}.gaps": _Spec((-1,), "U8"),
                      f"{u}.split_positions": _Spec((len(ws) - 1,), "I64", optional=len(ws) == 1)})
    return specs


# -- loading ----------------------------------------------------------------------------------------------------
def load_weights(model: nn.Module, path: Path, stored: str, fmt: str, device: torch.device, dtype: torch.dtype,
                 skip: Sequence[str] = (), progress=None, df11_resident: bool = False) -> None:
    """Fill ``model`` (built on the meta device) from the checkpoint ``path`` holding ``stored`` weights.

    fmt: what the model holds (see :func:`resolve_weights`): "int8"/"nf4" swap the quantized Linears for
    ``Int8Linear``/``NF4Linear`` (those quantized in the file, or :func:`quant_plan`'s choice with ``skip`` when
    quantizing a bf16/df11 checkpoint as it loads, tensor by tensor on ``device``); "bf16"/"df11" keep the modules
    (DF11 units decoded once, with the Triton kernel on CUDA), unless ``df11_resident``: then the units stay
    compressed on ``device`` and each is decoded into one shared buffer just before its module runs (bf16 only).
    Float tensors go to ``dtype``; quantization side tensors keep theirs. ``progress``: callable(bytes read).
    Every key and shape is checked before any data is read (:class:`CheckpointError` names file and key).
    """
    shapes = expected_shapes(model)
    linears = _linears(model)
    units: dict[str, list[str]] = {}
    if stored == "df11":
        found, units = _df11_layout(path, model)
        expected, where = _df11_specs(shapes, units), path
    else:
        ema = read_header(path / EMA_FILE)
        found, where = dict.fromkeys(ema.tensors, ema), ema.path
        expected = {k: _Spec(s, None) for k, s in shapes.items()}
    swaps: dict[str, str] = {}  # Linear -> the format it holds
    double: set[str] = set()  # NF4 Linears stored with double quantization
    blocksize = NF4_BLOCKSIZE
    if stored in ("int8", "nf4"):  # a Linear is quantized when the file holds its quantization side tensors
        blocksize = int(ema.metadata.get("bagel_rt.blocksize", NF4_BLOCKSIZE))
        for x, lin in linears.items():
            w = found.get(f"{x}.weight")
            side = [k for k in quantized_specs(x, 1, 1, stored, True) if k != f"{x}.weight"]
            if any(k in found for k in side) or (w is not None and w.tensors[f"{x}.weight"].dtype not in _FLOAT):
                swaps[x] = stored
                if f"{x}.weight.nested_absmax" in found:
                    double.add(x)
                del expected[f"{x}.weight"]
                specs = quantized_specs(x, lin.out_features, lin.in_features, stored, x in double, blocksize)
                expected.update({k: _Spec(s, d) for k, (s, d) in specs.items()})
    elif fmt in ("int8", "nf4"):
        swaps = dict.fromkeys(quant_plan(model, fmt, skip)[0], fmt)
    _check_tensors(found, expected, where,
                   f"a {stored} BAGEL model with the sizes of llm_config.json/vit_config.json")

    for x, f in swaps.items():
        n, k, bias = linears[x].out_features, linears[x].in_features, linears[x].bias is not None
        parent, _, attr = x.rpartition(".")
        try:
            new = (Int8Linear(k, n, bias, device="meta") if f == "int8"
                   else NF4Linear(k, n, bias, blocksize, dtype, "meta"))
        except ValueError as e:
            raise CheckpointError(f"{where}: {x}: {e}") from None
        setattr(model.get_submodule(parent), attr, new)

    to_quantize = {} if stored in ("int8", "nf4") else {f"{x}.weight": x for x in swaps}
    resident = _ResidentUnits(device) if df11_resident else None
    state: dict[str, Tensor] = {}
    for key, t in _stream(found, units, shapes, device, progress, resident, model):
        if key in to_quantize:
            q = quantize_linear(to_quantize[key], t, fmt, blocksize=blocksize)
            state.update((k, v.to(device)) for k, v in q.items())  # the small side tensors start on the CPU
        else:
            # the model's own tensors go to dtype; quantization side tensors (SCB, absmax, ...) keep theirs
            state[key] = t.to(dtype) if key in shapes and t.is_floating_point() and t.dtype != dtype else t

    for x, f in swaps.items():
        mod = model.get_submodule(x)
        group = {k: state.pop(k) for k in quantized_specs(x, mod.out_features, mod.in_features, f, x in double)
                 if k in state}
        try:
            if f == "int8":
                load_int8(x, group)  # validates
                mod.weight, mod.SCB = group[f"{x}.weight"], group[f"{x}.SCB"]
                mod.weight_format = group[f"{x}.weight_format"]
            else:
                mod.set_weights(load_nf4(x, group))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if mod.bias is not None:
            mod.bias = state.pop(f"{x}.bias")
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and all(k.rpartition(".")[0] in swaps for k in result.missing_keys), result


def _stream(found: dict[str, SafetensorsHeader], units: dict[str, list[str]],
            shapes: dict[str, tuple[int, ...]], device: torch.device, progress, resident: _ResidentUnits | None,
            model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor on ``device``) of every tensor of the files; DF11 units decoded to their bf16 weights (or, with
    ``resident``, kept compressed and handed to it)."""
    with ExitStack() as stack:
        files = {h.path: (h, stack.enter_context(_open(h, device))) for h in found.values()}

        def get(key: str) -> Tensor:
            h, f = files[found[key].path]
            t = _get(f, h, key).to(device)
            if progress:
                progress(h.tensors[key].nbytes)
            return t

        for u, ws in units.items():
            where = found[f"{u}.encoded_exponent"].path
            buffers = {b: get(f"{u}.{b}") for b in BUFFER_NAMES if f"{u}.{b}" in found}
            numels = [math.prod(shapes[w]) for w in ws]
            split = torch.tensor(numels, dtype=torch.int64).cumsum(0)[:-1]
            stored_split = buffers.get("split_positions", torch.zeros(0, dtype=torch.int64)).cpu()
            if not torch.equal(stored_split, split):
                raise CheckpointError(f"{where}: {u}.split_positions is {stored_split.tolist()}, expected "
                                      f"{split.tolist()} (the cumulative sizes of {', '.join(ws)})")
            buffers["split_positions"] = split.to(device)
            if resident is not None:
                resident.add(model, u, [(w, shapes[w]) for w in ws], buffers, split.tolist())
                continue
            out = torch.empty(sum(numels), dtype=torch.bfloat16, device=device)
            try:
                (df11_decode if device.type == "cuda" else df11_decode_ref)(buffers, out)
            except ValueError as e:
                raise CheckpointError(f"{where}: unit {u!r}: {e}") from None
            for w, part in zip(ws, torch.tensor_split(out, split.tolist())):
                yield w, part.view(shapes[w])
        covered = {f"{u}.{b}" for u in units for b in BUFFER_NAMES}
        for key in found:
            if key not in covered:
                yield key, get(key)


class _ResidentUnits:
    """DF11 units kept compressed on the device, each decoded by a forward pre-hook on its module into one
    shared bf16 buffer (grown to the largest unit) whose slices are the modules' ``weight`` attributes.

    Decoding happens on every forward of the unit's module, so a weight is valid only while its unit's module
    runs: this suits the torch backend, whose forwards go through the modules.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scratch = torch.empty(0, dtype=torch.bfloat16, device=device)
        self.units: list[tuple[dict[str, Tensor], list[tuple[nn.Module, tuple[int, ...]]], list[int]]] = []

    def add(self, model: nn.Module, unit: str, weights: list[tuple[str, tuple[int, ...]]],
            buffers: dict[str, Tensor], split: list[int]) -> None:
        targets = []
        for w, shape in weights:
            mod = model.get_submodule(w.rpartition(".")[0])
            del mod.weight  # from now on a plain attribute, set to a slice of the shared buffer
            targets.append((mod, tuple(shape)))
        entry = (buffers, targets, split)
        self.units.append(entry)
        if buffers["sign_mantissa"].numel() > self.scratch.numel():
            self.scratch = torch.empty(buffers["sign_mantissa"].numel(), dtype=torch.bfloat16, device=self.device)
            for e in self.units:  # every unit's weights now point at the new buffer
                self._views(*e)
        else:
            self._views(*entry)
        model.get_submodule(unit).register_forward_pre_hook(lambda mod, args: self._decode(*entry))

    def _views(self, buffers: dict[str, Tensor], targets, split: list[int]) -> Tensor:
        out = self.scratch[: buffers["sign_mantissa"].numel()]
        for (mod, shape), part in zip(targets, torch.tensor_split(out, split)):
            mod.weight = part.view(shape)
        return out

    def _decode(self, buffers: dict[str, Tensor], targets, split: list[int]) -> None:
        out = self._views(buffers, targets, split)
        (df11_decode if self.device.type == "cuda" else df11_decode_ref)(buffers, out)
