"""Reading checkpoints: safetensors headers, strict key/shape checks, memory-mapped loading.

Tensors go from the memory-mapped file straight to the target device and dtype, one at a time, into a
model built on the meta device (``load_state_dict(assign=True)``): no second full copy of the weights is
ever held in RAM (on CUDA the data passes through a 512 MiB ring of pinned buffers,
:mod:`bagel_rt.streaming`). Every failure a user can cause (missing file, truncated or corrupt file, wrong
keys, shapes or dtypes, a directory of another model) raises :class:`CheckpointError` naming the file and key.
"""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .errors import CheckpointError
from .validate import MAX_HEADER_BYTES, header_entries, parse_json, regular_file

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_FLOAT = {"BF16", "F16", "F32", "F64"}
_ITEMSIZE = {k: v.itemsize for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    #: absolute byte offset of the data in the file (where, not what: left out of comparisons)
    offset: int = field(default=0, compare=False)


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file declares, validated against its size (truncation is caught here)."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading its data.

    Everything the safetensors library would reject later is rejected here, as a :class:`CheckpointError` naming
    the file and key (:func:`bagel_rt.validate.header_entries`); the header length is bounded before it is read.
    """
    regular_file(path, "safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, "
                                      f"file size {size})")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    header = parse_json(text, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    entries, meta = header_entries(path, header, n, size, _ITEMSIZE)
    tensors = {k: TensorInfo(dtype, shape, b - a, 8 + n + a) for k, (dtype, shape, a, b) in entries.items()}
    return SafetensorsHeader(path, tensors, dict(meta))


def check_keys(header: SafetensorsHeader, expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Strict check: every expected key present with its shape, nothing unexpected; floats only.

    The message lists every missing, unexpected and mismatched key (first 20 of each, with counts).
    """
    got = header.shapes()
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing and len(missing) > 0.5 * len(expected):
        raise CheckpointError(
            f"{header.path}: does not hold {what}: {len(missing)} of {len(expected)} expected tensors are "
            f"missing (e.g. {missing[0]!r}) and {len(unexpected)} are unexpected"
            + (f" (e.g. {unexpected[0]!r})" if unexpected else ""))
    wrong = [f"{k}: file {list(got[k])}, expected {list(s)}" for k, s in expected.items()
             if k in got and tuple(got[k]) != tuple(s)]
    bad_dtype = [f"{k}: {header.tensors[k].dtype}" for k in expected
                 if k in got and header.tensors[k].dtype not in _FLOAT]
    raise_key_problems(header.path, what, (("missing", missing), ("unexpected", unexpected),
                                           ("wrong shape", wrong), ("not a float dtype", bad_dtype)))


def raise_key_problems(where, what: str, groups) -> None:
    """One-line :class:`CheckpointError` listing every problem group (first 20 names each, with counts);
    nothing when all groups are empty. ``groups`` is a sequence of (label, list of strings)."""
    parts = []
    for label, items in groups:
        if items:
            shown = "; ".join(items[:20]) + (f"; ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    if parts:
        raise CheckpointError(f"{where}: does not match {what}: " + " | ".join(parts))


@contextmanager
def writing_directory(path: Path):
    """Yield a temporary sibling of ``path`` to fill; on success it replaces ``path`` (atomic rename), on any
    failure it is removed, so no half-written directory is ever left at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_into(module: nn.Module, header: SafetensorsHeader, device: torch.device | str,
              dtype: torch.dtype | None, progress=None) -> None:
    """Materialise ``module`` (built on the meta device) from the file, tensor by tensor.

    Each tensor is read from the memory map, moved to ``device`` and cast to ``dtype`` (``None`` keeps the
    file's dtype), then assigned. ``progress`` is an optional callable taking the number of bytes done.
    On CUDA the reads and the host-to-device copies overlap (:mod:`bagel_rt.streaming`).
    """
    device = torch.device(device)
    keys = list(module.state_dict().keys())
    try:
        state = dict(iter_tensors(header, keys, device, progress))
        for key, t in state.items():
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                state[key] = t.to(dtype)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for corrupt data
        raise CheckpointError(f"{header.path}: cannot be read ({str(e).splitlines()[0]})") from None
    module.load_state_dict(state, strict=True, assign=True)


def iter_tensors(header: SafetensorsHeader, keys, device: torch.device,
                 progress=None) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor on ``device`` in the file's dtype) for the tensors ``keys`` of one file. On CUDA through the
    pinned-ring reader, in file order, each as it lands (:func:`bagel_rt.streaming.stream_tensors`); on the CPU
    memory-mapped, in ``keys`` order. ``progress``: optional callable taking each tensor's bytes."""
    if device.type == "cuda":
        from .streaming import stream_tensors

        yield from stream_tensors(header.path, stream_entries(header, keys), device, progress=progress)
        return
    with open_mapped(header) as f:
        for key in keys:
            t = get_tensor(f, header, key)
            if progress is not None:
                progress(header.tensors[key].nbytes)
            yield key, t


def open_mapped(header: SafetensorsHeader):
    """The file as a safetensors handle whose tensors are memory-mapped on the CPU (a context manager).
    :func:`read_header` has validated what safetensors checks; a file changed since then still fails cleanly."""
    try:
        return safe_open(str(header.path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type (and OSError) for unreadable files
        raise CheckpointError(f"{header.path}: cannot be read ({str(e).splitlines()[0]})") from None


def get_tensor(f, header: SafetensorsHeader, key: str) -> Tensor:
    """Tensor ``key`` from an :func:`open_mapped` handle; unreadable data raises :class:`CheckpointError`."""
    try:
        return f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error type for corrupt data
        raise CheckpointError(f"{header.path}: cannot read {key!r} ({str(e).splitlines()[0]})") from None


def stream_entries(header: SafetensorsHeader, keys) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """What :mod:`bagel_rt.streaming` needs of the tensors ``keys`` of a file: key -> (dtype, shape, offset,
    nbytes), each checked against its header entry (:class:`CheckpointError` names file and key)."""
    entries = {}
    for key in keys:
        info = header.tensors[key]
        dt = _DTYPES.get(info.dtype)
        if dt is None:
            raise CheckpointError(f"{header.path}: tensor {key!r} has dtype {info.dtype}, which bagel-rt cannot "
                                  f"read")
        numel = math.prod(info.shape)
        if numel * dt.itemsize != info.nbytes:
            raise CheckpointError(f"{header.path}: corrupt header: tensor {key!r} ({info.dtype} "
                                  f"{list(info.shape)}) spans {info.nbytes} bytes, expected {numel * dt.itemsize}")
        entries[key] = (dt, info.shape, info.offset, info.nbytes)
    return entries
