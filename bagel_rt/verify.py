"""``bagel-rt info --verify``: read every tensor of a checkpoint and report where NaN or Inf values sit.

Loading checks structure (headers, keys, shapes, DF11 units), not values: a NaN in a weight, a norm, a
quantization scale (``SCB``, ``absmax``) or the VAE loads and then turns every image black. The requests catch
that at their end (:class:`bagel_rt.errors.NonFiniteError`); this scan finds the tensors responsible. Float
tensors are read in chunks of rows from the memory map (bounded memory); integer tensors (INT8 weights, NF4
codes, DF11 buffers) cannot hold NaN/Inf, and each DF11 unit's structure is checked instead
(:func:`bagel_rt.quant.df11_check.check_unit`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint import _FLOAT, SafetensorsHeader, get_tensor, open_mapped, read_header
from .errors import CheckpointError
from .validate import readable_dir

_CHUNK_ELEMENTS = 1 << 24  # elements read (and checked) at once
_DF11_UNIT = ".encoded_exponent"


def checkpoint_files(path: Path) -> list[Path]:
    """Every safetensors file of the checkpoint directory (top level and ``vae/``), sorted."""
    readable_dir(path)
    files = sorted(p for p in (*path.glob("*.safetensors"), *path.glob("vae/*.safetensors")) if p.is_file())
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files to verify")
    return files


def verify_checkpoint(path: str | Path) -> dict:
    """Scan every tensor of the checkpoint at ``path``.

    Returns ``{"files": n, "tensors": n, "elements": n, "problems": [{"file", "key", "problem"}, ...]}``:
    a problem is a float tensor with NaN/Inf values (how many) or a DF11 unit whose structure is damaged.
    """
    path = Path(path).expanduser()
    report = {"files": 0, "tensors": 0, "elements": 0, "problems": []}
    for file in checkpoint_files(path):
        header = read_header(file)
        report["files"] += 1
        report["tensors"] += len(header.tensors)
        name = str(file.relative_to(path))
        for key, problem in _scan_file(header):
            report["problems"].append({"file": name, "key": key, "problem": problem})
        report["elements"] += sum(math.prod(t.shape) for t in header.tensors.values())
    return report


def _scan_file(header: SafetensorsHeader):
    """(key, problem) for each tensor of one file with NaN/Inf values or a damaged DF11 unit."""
    with open_mapped(header) as f:
        for key, info in header.tensors.items():
            if info.dtype in _FLOAT or info.dtype.startswith("F8"):
                bad = _count_nonfinite(f, header, key)
                if bad:
                    yield key, f"{bad} NaN/Inf values of {math.prod(info.shape)}"
            elif key.endswith(_DF11_UNIT):
                problem = _df11_unit_problem(f, header, key.removesuffix(_DF11_UNIT))
                if problem:
                    yield key.removesuffix(_DF11_UNIT), problem


def _count_nonfinite(f, header: SafetensorsHeader, key: str) -> int:
    shape = header.tensors[key].shape
    if not shape or math.prod(shape) <= _CHUNK_ELEMENTS:
        return int((~torch.isfinite(get_tensor(f, header, key).float())).sum())
    rows = max(1, _CHUNK_ELEMENTS // math.prod(shape[1:]))
    part = f.get_slice(key)
    return sum(int((~torch.isfinite(part[r: r + rows].float())).sum()) for r in range(0, shape[0], rows))


def _df11_unit_problem(f, header: SafetensorsHeader, unit: str) -> str | None:
    from .quant.df11_check import check_unit
    from .quant.df11_decode import BUFFER_NAMES

    buffers = {b: get_tensor(f, header, f"{unit}.{b}") for b in BUFFER_NAMES if f"{unit}.{b}" in header.tensors}
    try:
        check_unit(buffers)
    except (ValueError, KeyError) as e:
        return f"damaged DFloat11 unit ({e})"
    return None


def format_report(report: dict) -> str:
    """The scan's result as text: one summary line, then one line per problem."""
    head = (f"verify: {report['tensors']} tensors ({report['elements']:,} values) in {report['files']} files "
            f"read: ")
    if not report["problems"]:
        return head + "no NaN/Inf values, every DFloat11 unit sound"
    lines = [head + f"{len(report['problems'])} tensors have problems:"]
    lines += [f"  {p['file']}: {p['key']}: {p['problem']}" for p in report["problems"]]
    return "\n".join(lines)
