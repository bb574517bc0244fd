"""Loading compressed checkpoints (INT8, NF4, FP8, the FP8/NF4 recipe, DFloat11) and quantizing bf16 ones as they
load.

The layouts, the quantization plan and the per-Linear quantizer are in :mod:`bagel_rt.quantized`; this module
checks a checkpoint's tensors against what the model expects (every problem named by file and key), streams
them tensor by tensor (DF11 units decoded, or kept compressed with ``df11_resident``) and swaps the quantized
Linears in. Split from :mod:`bagel_rt.quantized` to keep each file to one job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (
    _FLOAT,
    SafetensorsHeader,
    expected_shapes,
    iter_tensors,
    raise_key_problems,
    read_header,
)
from .df11_resident import ResidentDF11
from .errors import CheckpointError
from .quant import (
    DF11Config,
    FP8Linear,
    Int8Linear,
    NF4Linear,
    df11_decode,
    df11_decode_ref,
    df11_pattern_units,
    load_fp8,
    load_int8,
    load_nf4,
)
from .quant.df11_check import check_unit
from .quant.df11_decode import BUFFER_NAMES
from .quant.fp8_matmul import FP8
from .quant.nf4 import BLOCKSIZES as NF4_BLOCKSIZES
from .quantized import (
    CONFIG_FILE,
    EMA_FILE,
    LINEAR_FORMATS,
    NF4_BLOCKSIZE,
    _linears,
    _shape_ok,
    linear_formats,
    quantize_linear,
    quantized_specs,
)
from .validate import df11_declared, df11_patterns, metadata_int

__all__ = ["load_weights", "weight_files"]


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
    files = sorted(path.glob("*.safetensors"))  # a directory or a dangling link there is an error naming it
    if not files:
        raise CheckpointError(f"{path}: {CONFIG_FILE} declares DFloat11 weights but there is no top-level "
                              "*.safetensors file")
    return files


def _df11_layout(path: Path, model: nn.Module) -> tuple[dict[str, SafetensorsHeader], dict[str, list[str]]]:
    """DFloat11 files: (key -> header of the file holding it, compressed unit -> its weight names, in order)."""
    cfg = df11_declared(path / CONFIG_FILE)
    try:
        DF11Config(threads_per_block=cfg["threads_per_block"][0], bytes_per_thread=cfg["bytes_per_thread"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid dfloat11_config ({e})") from None
    patterns = df11_patterns(path / CONFIG_FILE, cfg.get("pattern_dict"))
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
                 skip: Sequence[str] = (), progress=None, df11_resident: bool = False,
                 df11_form: str | None = None) -> ResidentDF11 | None:
    """Fill ``model`` (built on the meta device) from the checkpoint ``path`` holding ``stored`` weights.

    fmt: what the model holds (see :func:`resolve_weights`): "int8"/"nf4"/"fp8"/"fp8-gen-nf4-und" swap the
    quantized Linears for ``Int8Linear``/``NF4Linear``/``FP8Linear`` (those quantized in the file, each by its own
    tensors, or :func:`linear_formats`' choice with ``skip`` when quantizing a bf16/df11 checkpoint as it loads,
    tensor by tensor on ``device``: no bf16 copy of a quantized weight outlives its own quantization);
    "bf16"/"df11" keep the modules (DF11 units decoded once, with the Triton kernel on CUDA), unless
    ``df11_resident``: then the units stay compressed on ``device`` and each is decoded into a shared buffer just
    before its module runs (bf16 only; :mod:`bagel_rt.df11_resident`), and the store of units is returned.
    Float tensors go to ``dtype``; quantization side tensors keep theirs. ``progress``: callable(bytes read).
    Every key and shape is checked before any data is read (:class:`CheckpointError` names file and key).
    """
    shapes = expected_shapes(model)
    linears = _linears(model)
    units: dict[str, list[str]] = {}
    if stored == "df11":
        found, units = _df11_layout(path, model)
        files = {h.path for h in found.values()}
        expected, where = _df11_specs(shapes, units), files.pop() if len(files) == 1 else path
    else:
        ema = read_header(path / EMA_FILE)
        found, where = dict.fromkeys(ema.tensors, ema), ema.path
        expected = {k: _Spec(s, None) for k, s in shapes.items()}
    swaps: dict[str, str] = {}  # Linear -> the format it holds
    double: set[str] = set()  # NF4 Linears stored with double quantization
    blocksize = NF4_BLOCKSIZE
    if stored in LINEAR_FORMATS:  # a Linear is quantized when the file holds its quantization side tensors
        blocksize = metadata_int(ema.path, ema.metadata, "bagel_rt.blocksize", NF4_BLOCKSIZE, NF4_BLOCKSIZES)
        for x, lin in linears.items():
            f = _stored_linear_format(x, found, LINEAR_FORMATS[stored])
            if f is not None:
                swaps[x] = f
                if f"{x}.weight.nested_absmax" in found:
                    double.add(x)
                del expected[f"{x}.weight"]
                specs = quantized_specs(x, lin.out_features, lin.in_features, f, x in double, blocksize)
                expected.update({k: _Spec(s, d) for k, (s, d) in specs.items()})
        if not swaps:
            raise CheckpointError(f"{ema.path}: its metadata declares {stored} weights (bagel_rt.format) but no "
                                  f"Linear of the file is stored in {stored}")
    elif fmt in LINEAR_FORMATS:
        swaps = linear_formats(model, fmt, skip)[0]
    _check_tensors(found, expected, where,
                   f"a {stored} BAGEL model with the sizes of llm_config.json/vit_config.json")

    for x, f in swaps.items():
        n, k, bias = linears[x].out_features, linears[x].in_features, linears[x].bias is not None
        parent, _, attr = x.rpartition(".")
        try:
            new = (Int8Linear(k, n, bias, device="meta") if f == "int8"
                   else FP8Linear(k, n, bias, dtype, "meta") if f == "fp8"
                   else NF4Linear(k, n, bias, blocksize, dtype, "meta"))
        except ValueError as e:
            raise CheckpointError(f"{where}: {x}: {e}") from None
        setattr(model.get_submodule(parent), attr, new)

    to_quantize = {} if stored in LINEAR_FORMATS else {f"{x}.weight": x for x in swaps}
    resident = ResidentDF11(device, df11_form) if df11_resident else None
    state: dict[str, Tensor] = {}
    for key, t in _stream(found, units, shapes, device, progress, resident, model):
        if key in to_quantize:
            q = quantize_linear(to_quantize[key], t, swaps[to_quantize[key]], blocksize=blocksize)
            state.update((k, v.to(device)) for k, v in q.items())  # the small side tensors start on the CPU
        else:
            # the model's own tensors go to dtype; quantization side tensors (SCB, absmax, ...) keep theirs
            cast = key in shapes and t.is_floating_point() and t.dtype != dtype and t.dtype != FP8
            state[key] = t.to(dtype) if cast else t

    for x, f in swaps.items():
        mod = model.get_submodule(x)
        group = {k: state.pop(k) for k in quantized_specs(x, mod.out_features, mod.in_features, f, x in double)
                 if k in state}
        try:
            if f == "int8":
                load_int8(x, group)  # validates
                mod.weight, mod.SCB = group[f"{x}.weight"], group[f"{x}.SCB"]
                mod.weight_format = group[f"{x}.weight_format"]
            elif f == "fp8":
                mod.set_weights(load_fp8(x, group))
            else:
                mod.set_weights(load_nf4(x, group))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if mod.bias is not None:
            mod.bias = state.pop(f"{x}.bias")
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys and all(k.rpartition(".")[0] in swaps for k in result.missing_keys), result
    if resident is not None:
        resident.layout()
    return resident


#: the Linear format a quantized weight's own dtype implies
_WEIGHT_DTYPE_FORMAT = {"I8": "int8", "U8": "nf4", "F8_E4M3": "fp8"}


def _stored_linear_format(x: str, found: dict[str, SafetensorsHeader], allowed: tuple[str, ...]) -> str | None:
    """The format (one of ``allowed``) the file stores the Linear ``x`` in: the one whose side tensors it holds,
    else the one its weight's non-float dtype implies; None for a plain float weight. A weight whose dtype fits
    none of ``allowed`` gets ``allowed[0]``, so the key check reports its dtype."""
    for f in allowed:
        if any(k in found for k in quantized_specs(x, 1, 1, f, True) if k != f"{x}.weight"):
            return f
    w = found.get(f"{x}.weight")
    dtype = w.tensors[f"{x}.weight"].dtype if w is not None else None
    if dtype is None or dtype in _FLOAT:
        return None
    f = _WEIGHT_DTYPE_FORMAT.get(dtype)
    return f if f in allowed else allowed[0]


def _stream(found: dict[str, SafetensorsHeader], units: dict[str, list[str]],
            shapes: dict[str, tuple[int, ...]], device: torch.device, progress, resident: ResidentDF11 | None,
            model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor on ``device``) of every tensor of the files; DF11 units decoded to their bf16 weights (or, with
    ``resident``, kept compressed and handed to it) as soon as all their buffers are read."""
    unit_of = {f"{u}.{b}": (u, b) for u in units for b in BUFFER_NAMES if f"{u}.{b}" in found}
    pending: dict[str, dict[str, Tensor]] = {u: {} for u in units}
    need = {u: sum(1 for b in BUFFER_NAMES if f"{u}.{b}" in found) for u in units}
    for key, t in _read(found, device, progress):
        if key not in unit_of:
            yield key, t
            continue
        u, b = unit_of[key]
        pending[u][b] = t
        if len(pending[u]) == need[u]:
            yield from _unit_weights(u, units[u], pending.pop(u), found[f"{u}.encoded_exponent"].path, shapes,
                                     device, resident, model)


def _read(found: dict[str, SafetensorsHeader], device: torch.device, progress) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor on ``device``) of every key of ``found``, file by file (:func:`bagel_rt.checkpoint.
    iter_tensors`: on CUDA the pinned-ring reader — safetensors' own per-tensor path moved NF4 files at
    0.7 GB/s, 11.9 s for the 8.9 GiB model on an H200 host, ``benchmarks/load_time.py --formats nf4``)."""
    by_file: dict[Path, tuple[SafetensorsHeader, list[str]]] = {}
    for key, h in found.items():
        by_file.setdefault(h.path, (h, []))[1].append(key)
    for h, keys in by_file.values():
        yield from iter_tensors(h, keys, device, progress)


def _unit_weights(u: str, ws: list[str], buffers: dict[str, Tensor], where: Path,
                  shapes: dict[str, tuple[int, ...]], device: torch.device, resident: ResidentDF11 | None,
                  model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The bf16 weights ``ws`` of the DF11 unit ``u`` decoded from its ``buffers`` (none with ``resident``,
    which keeps the unit compressed)."""
    numels = [math.prod(shapes[w]) for w in ws]
    split = torch.tensor(numels, dtype=torch.int64).cumsum(0)[:-1]
    stored_split = buffers.get("split_positions", torch.zeros(0, dtype=torch.int64)).cpu()
    if not torch.equal(stored_split, split):
        raise CheckpointError(f"{where}: {u}.split_positions is {stored_split.tolist()}, expected "
                              f"{split.tolist()} (the cumulative sizes of {', '.join(ws)})")
    buffers["split_positions"] = split.to(device)
    try:
        check_unit(buffers)  # damage is an error here, not wrong weights or a decoder that never stops
    except ValueError as e:
        raise CheckpointError(f"{where}: DFloat11 unit {u!r}: {e}") from None
    if resident is not None:
        resident.add(model, u, [(w, shapes[w]) for w in ws], buffers, split.tolist())
        return
    out = torch.empty(sum(numels), dtype=torch.bfloat16, device=device)
    try:
        (df11_decode if device.type == "cuda" else df11_decode_ref)(buffers, out)
    except ValueError as e:
        raise CheckpointError(f"{where}: DFloat11 unit {u!r}: {e}") from None
    for w, part in zip(ws, torch.tensor_split(out, split.tolist())):
        yield w, part.view(shapes[w])
