"""Validation at the edge: what comes from a file or a request is checked once, here, before it is used.

Every check raises one error type per problem (:mod:`bagel_rt.errors`) with a one-line message naming the file
(or argument), the key, the value found and what was expected. Sizes read from a file are bounded before
anything is allocated or looped over, JSON is read only from regular files of bounded size and nesting, and the
few regular expressions a checkpoint may carry are restricted to module-name patterns before they are compiled.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import stat
from pathlib import Path

import torch

from .errors import CheckpointError, InputError, NonFiniteError

#: Largest JSON file read (configs, tokenizer files: the real tokenizer.json has 7 MB).
MAX_JSON_BYTES = 64 << 20
#: Largest safetensors header (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
#: Most dimensions of a stored tensor.
MAX_NDIM = 8


# -- files --------------------------------------------------------------------------------------------------------
def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` if it is a readable regular file; a directory, FIFO, device, dangling link, a missing or an
    unreadable file is a :class:`CheckpointError` naming it (a FIFO is never opened: that would block)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (the {what})") from None
    except OSError as e:  # e.g. a parent directory without search permission
        raise CheckpointError(f"{path}: cannot be accessed ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise CheckpointError(f"{path}: is {kind}; expected the {what}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (the {what} is not readable)")
    return path


def readable_dir(path: Path) -> Path:
    """``path`` if it is a directory whose entries can be listed and opened (:class:`CheckpointError` else)."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{path}: permission denied (the checkpoint directory is not readable)")
    return path


def read_bytes(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (larger is a :class:`CheckpointError`)."""
    regular_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than {limit} bytes; this is not a {what}")
    return data


def parse_json(raw: bytes, where: str):
    """JSON from ``raw``; invalid text or nesting too deep for the parser is a :class:`CheckpointError`."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply") from None


def read_json_object(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from the regular file ``path`` (size and nesting bounded)."""
    data = parse_json(read_bytes(path, MAX_JSON_BYTES, what), str(path))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# -- safetensors headers ---------------------------------------------------------------------------------------
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def header_entries(path: Path, header: dict, n: int, size: int, itemsize: dict[str, int]
                   ) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate a parsed safetensors header as the safetensors library does, so that reading it cannot fail later.

    header: the JSON object (header length ``n``, file size ``size``); itemsize: bytes per element of each dtype
    this build reads. Returns ({key: (dtype, shape, start, end)}, metadata). Checks: metadata is a str -> str
    object; every entry has a known dtype, a shape of non-negative ints and two int offsets; each tensor spans
    exactly its numel * itemsize bytes; the tensors tile the data section from 0 to the file's end without gaps
    or overlaps.
    """
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header key '__metadata__' is {type(meta).__name__}, expected an object "
                              "of strings")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{path}: metadata {k!r} is {v!r}, expected a string")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is {type(info).__name__}, expected an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in itemsize:
            raise CheckpointError(f"{where}: dtype {dtype!r}, expected one of {', '.join(itemsize)}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_int(s) and s >= 0 for s in shape)):
            raise CheckpointError(f"{where}: shape {shape!r}, expected a list of at most {MAX_NDIM} "
                                  "non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r}, expected [begin, end] with "
                                  "0 <= begin <= end")
        nbytes = math.prod(shape) * itemsize[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but "
                                  f"{dtype} {shape} needs {nbytes}")
        entries[key] = (dtype, tuple(shape), offsets[0], offsets[1])
    end = 0
    for key, (_, _, a, b) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3])):
        if a != end:
            problem = "overlaps the tensor before it" if a < end else f"leaves a gap of {a - end} bytes before it"
            raise CheckpointError(f"{path}: tensor {key!r} at data_offsets [{a}, {b}] {problem} (corrupt header)")
        end = b
    if 8 + n + end != size:
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes but the file has "
                                  f"{size} (re-download or re-convert it)")
        raise CheckpointError(f"{path}: {size - 8 - n - end} bytes after the last tensor (header length {n}, "
                              f"tensor data {end} bytes, file size {size}): a corrupt header or trailing data")
    return entries, meta


def metadata_int(path: Path, meta: dict[str, str], key: str, default: int, allowed: tuple[int, ...]) -> int:
    """An integer metadata value (a decimal string) that must be one of ``allowed``."""
    raw = meta.get(key)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) not in allowed:
        raise CheckpointError(f"{path}: metadata {key!r} is {raw!r}, expected one of "
                              f"{', '.join(map(str, allowed))}")
    return int(raw)


# -- configs ----------------------------------------------------------------------------------------------------
def config_int(path: Path, data: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    """``data[key]``: an integer in [lo, hi] (``default`` when absent and not None)."""
    if key not in data and default is not None:
        return default
    if key not in data:
        raise CheckpointError(f"{path}: missing key {key!r}")
    v = data[key]
    if not _int(v) or not lo <= v <= hi:
        raise CheckpointError(f"{path}: key {key!r} is {v!r}, expected an integer in [{lo}, {hi}]")
    return v


def config_float(path: Path, data: dict, key: str, lo: float, hi: float, default: float) -> float:
    """``data[key]``: a finite number with lo < value <= hi (``default`` when absent)."""
    v = data.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and lo < v <= hi):
        raise CheckpointError(f"{path}: key {key!r} is {v!r}, expected a finite number in ({lo:g}, {hi:g}]")
    return float(v)


# -- DFloat11 -----------------------------------------------------------------------------------------------------
#: A DF11 ``pattern_dict`` key: dotted module-name parts, each a name or ``\d+`` (a layer index), dots escaped.
#: Nothing else (no groups, alternation, wildcards or repetition of repetitions) so no pattern can backtrack.
_SAFE_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\\d\+)"
SAFE_MODULE_PATTERN = re.compile(rf"{_SAFE_PART}(?:\\\.{_SAFE_PART}){{0,15}}")
_SAFE_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*){0,7}")


#: The dfloat11 releases whose layout bagel-rt reads (docs/weight-formats.md section 3).
DF11_VERSIONS = re.compile(r"0\.5\.[0-9]{1,3}")


def df11_declared(path: Path) -> dict | None:
    """The ``dfloat11_config`` object of the ``config.json`` at ``path``; None when there is no such file or it
    declares no DFloat11 weights. The version must be one whose layout this build reads."""
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json_object(path, "model config (config.json)")
    if "dfloat11_config" not in data:
        if "dfloat11_version" in data:
            raise CheckpointError(f"{path}: dfloat11_version {data['dfloat11_version']!r} is an early DFloat11 "
                                  "layout; bagel-rt reads dfloat11_config version 0.5.x")
        return None
    cfg = data["dfloat11_config"]
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: dfloat11_config is {type(cfg).__name__}, expected an object")
    version = cfg.get("version")
    if not isinstance(version, str) or not DF11_VERSIONS.fullmatch(version):
        raise CheckpointError(f"{path}: dfloat11_config.version is {version!r}, expected 0.5.x (the layout this "
                              "version of bagel-rt reads)")
    return cfg


def df11_patterns(path: Path, raw) -> dict[str, list[str]]:
    """The DF11 ``pattern_dict`` of ``path``: module-name patterns (see :data:`SAFE_MODULE_PATTERN`) -> the
    attribute names of the Linears of that unit."""
    if not isinstance(raw, dict) or not 1 <= len(raw) <= 1024:
        raise CheckpointError(f"{path}: dfloat11_config.pattern_dict is {type(raw).__name__} "
                              f"{'of ' + str(len(raw)) + ' entries ' if isinstance(raw, dict) else ''}"
                              "expected an object of 1 to 1024 module patterns")
    out = {}
    for pattern, attrs in raw.items():
        if len(pattern) > 256 or not SAFE_MODULE_PATTERN.fullmatch(pattern):
            raise CheckpointError(f"{path}: dfloat11_config.pattern_dict key {pattern[:80]!r} is not a "
                                  r"module-name pattern (dotted names with '\.' and '\d+' only, e.g. "
                                  r"'language_model\.model\.layers\.\d+')")
        if not (isinstance(attrs, list) and len(attrs) <= 64
                and all(isinstance(a, str) and _SAFE_ATTR.fullmatch(a) for a in attrs)):
            raise CheckpointError(f"{path}: dfloat11_config.pattern_dict[{pattern!r}] is {str(attrs)[:80]}, "
                                  "expected a list of at most 64 module attribute names")
        out[pattern] = list(attrs)
    return out


# -- requests ---------------------------------------------------------------------------------------------------
def number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite real ``value`` in [lo, hi] (or (lo, hi] with ``lo_open``) as a float; else :class:`InputError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise InputError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def integer(name: str, value, lo: int, hi: int) -> int:
    """An int ``value`` (not a bool or float) in [lo, hi]; else :class:`InputError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value)


#: Seeds go to ``torch.Generator.manual_seed``, which takes 64 bits.
MAX_SEED = 2**64 - 1


def seed(value) -> int | None:
    """A seed in [0, 2**64) or None (drawn later)."""
    return None if value is None else integer("seed", value, 0, MAX_SEED)


def device(value) -> torch.device:
    """A device this build can run on: the CPU, or a CUDA device that exists. mps, meta, xpu, ... and CUDA on
    a machine without it are an :class:`InputError`."""
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{value!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"device {value!r}: bagel-rt runs on cpu or cuda only")
    if not torch.cuda.is_available():
        raise InputError(f"device {value!r} requested but CUDA is not available on this machine (use cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def finite(t: torch.Tensor, what: str, hint: str) -> None:
    """Raise :class:`NonFiniteError` when ``t`` holds a NaN or an infinity (one reduction, one host sync)."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NonFiniteError(f"{what} hold {bad} NaN/Inf values of {t.numel()}: {hint}")


NON_FINITE_HINT = ("no image is written; the weights may hold NaN/Inf (find them with: bagel-rt info --verify "
                   "DIR) or the settings overflow")


def token_limit(max_tokens, context_length: int, max_positions: int) -> int:
    """A decode limit that fits the model's context after the ``context_length`` tokens already in it."""
    room = max_positions - context_length - 1  # the fed start token takes a position too
    if room < 1:
        raise InputError(f"the prompt already fills the model's context ({context_length} of {max_positions} "
                         "positions); nothing can be decoded")
    return integer(f"the token limit (max_think_token_n / max new tokens; the context holds {max_positions} "
                   f"positions, {context_length} used by the prompt)", max_tokens, 1, room)
