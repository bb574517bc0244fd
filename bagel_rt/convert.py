"""Writing compressed checkpoints: ``bagel-rt quantize SRC DST --format int8|nf4|fp8|fp8-gen-nf4-und|df11``.

:func:`convert_checkpoint` reads the memory-mapped bf16 source one tensor (DF11: one compression unit) at a
time and streams the output file with :class:`SafetensorsWriter`, so it needs the memory of one tensor or unit,
not of the model; the output directory appears only when complete. The layouts and the choice of which weights
are quantized are described in :mod:`bagel_rt.quantized`, which also loads them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (
    SafetensorsHeader,
    check_keys,
    expected_shapes,
    get_tensor,
    open_mapped,
    read_header,
    writing_directory,
)
from .errors import CheckpointError, InputError
from .loader import _bytes_bar, read_params
from .model import BagelModel
from .quant import compress_units, df11_config, df11_pattern_units
from .quant.df11_decode import BUFFER_NAMES
from .quantized import (
    _NO_SPECIAL,
    _ST_DTYPES,
    AE_FILE,
    BAGEL_DF11_PATTERNS,
    CONFIG_FILE,
    DF11_FILE,
    DF11_VAE,
    EMA_FILE,
    FORMATS,
    LINEAR_FORMATS,
    LLM_FORMATS,
    NF4_BLOCKSIZE,
    _compile_skip,
    _linears,
    _shape_ok,
    checkpoint_format,
    linear_formats,
    quantize_linear,
    quantized_specs,
)

__all__ = ["convert_checkpoint", "SafetensorsWriter"]


# -- writing a safetensors file as its tensors are produced -----------------------------------------------------
class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, holding none of them.

    The tensor names (and the metadata) are given up front; each tensor's bytes are appended as it comes. The
    header, whose size is bounded from the names, goes last into the space reserved for it at the start of the
    file, padded with spaces as the format allows. Tensors may have up to 4 dimensions. Use as a context
    manager: the header is written when the block ends without an error.
    """

    _ENTRY = len(json.dumps({"": {"dtype": "BF16", "shape": [10**20] * 4, "data_offsets": [10**20] * 2}},
                            separators=(",", ":")))

    def __init__(self, path: Path, names: Sequence[str], metadata: dict[str, str]) -> None:
        self.path, self.names, self.metadata = Path(path), list(names), dict(metadata)
        assert len(set(self.names)) == len(self.names), "duplicate tensor names"
        size = sum(len(json.dumps(n)) + self._ENTRY for n in self.names)
        size += len(self._json({"__metadata__": metadata}))
        self.reserved = -(-size // 8) * 8
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.f = open(self.path, "wb")
        self.f.seek(8 + self.reserved)

    @staticmethod
    def _json(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

    def add(self, name: str, t: Tensor) -> None:
        assert name not in self.entries and t.ndim <= 4, name
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self.f:
            if exc_type is None:
                assert list(self.entries) == self.names, "tensors missing or out of order"
                header = self._json({"__metadata__": self.metadata, **self.entries})
                assert len(header) <= self.reserved
                self.f.seek(0)
                self.f.write(struct.pack("<Q", self.reserved) + header + b" " * (self.reserved - len(header)))


# -- conversion -------------------------------------------------------------------------------------------------
def convert_checkpoint(src: str | Path, dst: str | Path, fmt: str, skip: Sequence[str] = (),
                       double_quant: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert the bf16 checkpoint directory ``src`` to ``fmt`` (one of :data:`bagel_rt.quantized.FORMATS`: "int8",
    "nf4", "fp8", the 12 GB recipe "fp8-gen-nf4-und" or "df11") in ``dst``.

    Args:
        skip: regular expressions; Linear weights whose tensor name matches one (``re.search``) stay bf16 (df11:
            the units holding them stay uncompressed).
        double_quant: NF4 Linears only: also quantize the absmax scales (bitsandbytes ``compress_statistics``).
        progress: show a progress bar over the source bytes.
        overwrite: replace ``dst`` if it exists (refused otherwise).
    Returns:
        ``dst``. The output is written to a temporary sibling and renamed into place when complete;
        ``ae.safetensors`` (df11: as ``vae/ae.safetensors``), the configs and the tokenizer are copied unchanged.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if double_quant and "nf4" not in LINEAR_FORMATS.get(fmt, ()):
        raise InputError(f"double quantization applies to nf4 only, not {fmt}")
    _compile_skip(skip)
    if not src.is_dir():
        raise CheckpointError(f"{src}: {'is not a directory' if src.exists() else 'directory not found'}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory; refusing to replace a file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst} is the source checkpoint; write the conversion elsewhere")
    stored = checkpoint_format(src)
    if stored != "bf16":
        raise CheckpointError(f"{src}: holds {stored} weights; convert from the bf16 checkpoint")
    params = read_params(src)
    header = read_header(src / EMA_FILE)
    with torch.device("meta"):
        model = BagelModel(params, _NO_SPECIAL)
    check_keys(header, expected_shapes(model), "a BAGEL model with the sizes of llm_config.json/vit_config.json")
    meta = {"bagel_rt.format": fmt, "bagel_rt.source": _fingerprint(header.path)}
    bar = _bytes_bar(sum(t.nbytes for t in header.tensors.values()), progress, f"quantize {fmt}")
    try:
        with writing_directory(dst) as tmp:
            if fmt == "df11":
                _write_df11(header, tmp / DF11_FILE, skip, meta, bar)
                (tmp / "vae").mkdir()
            else:
                _write_quantized(header, model, tmp / EMA_FILE, fmt, skip, double_quant, meta, bar)
            _copy_side_files(src, tmp, fmt)
    finally:
        if bar:
            bar.close()
    return dst


def _fingerprint(path: Path) -> str:
    """The source's identity: sha256 of its safetensors header (every name, dtype, shape and offset)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return "sha256:" + hashlib.sha256(f.read(n)).hexdigest()


def _write_quantized(header: SafetensorsHeader, model: nn.Module, out: Path, fmt: str, skip: Sequence[str],
                     double_quant: bool, meta: dict, bar) -> None:
    plan, kept = linear_formats(model, fmt, skip)
    linears = _linears(model)
    specs = {f"{x}.weight": quantized_specs(x, linears[x].out_features, linears[x].in_features, f, double_quant)
             for x, f in plan.items()}
    names = [k for key in header.tensors for k in (specs[key] if key in specs else [key])]
    meta.update({"bagel_rt.quantized": str(len(plan)), "bagel_rt.kept": json.dumps(kept),
                 "bagel_rt.skip": json.dumps(list(skip))})
    if fmt in LLM_FORMATS:
        meta["bagel_rt.llm_formats"] = json.dumps(dict(zip(("gen", "und", "lm_head"), LLM_FORMATS[fmt])))
    if "nf4" in LINEAR_FORMATS[fmt]:
        meta.update({"bagel_rt.blocksize": str(NF4_BLOCKSIZE), "bagel_rt.double_quant": str(double_quant).lower()})
    with SafetensorsWriter(out, names, meta) as writer, open_mapped(header) as f:
        for key in header.tensors:
            t = get_tensor(f, header, key)
            if key in specs:
                x = key.removesuffix(".weight")
                q = quantize_linear(x, t, plan[x], double_quant)
                for k, (shape, dtype) in specs[key].items():
                    assert k in q and _ST_DTYPES[q[k].dtype] == dtype and _shape_ok(tuple(q[k].shape), shape), k
                    writer.add(k, q[k])
            else:
                writer.add(key, t)
            if bar:
                bar.update(header.tensors[key].nbytes)


def _write_df11(header: SafetensorsHeader, out: Path, skip: Sequence[str], meta: dict, bar) -> None:
    rx = _compile_skip(skip)
    try:
        units = df11_pattern_units(header.tensors, BAGEL_DF11_PATTERNS)
    except ValueError as e:
        raise CheckpointError(f"{header.path}: {e}") from None
    units = {u: ws for u, ws in units.items() if not any(r.search(w) for w in ws for r in rx)}
    covered = {w for ws in units.values() for w in ws}
    plain = [k for k in header.tensors if k not in covered]
    names = [f"{u}.{b}" for u in units for b in BUFFER_NAMES] + plain
    meta["bagel_rt.units"] = str(len(units))
    with SafetensorsWriter(out, names, meta) as writer, open_mapped(header) as f:
        for u, ws in units.items():
            buffers = compress_units([get_tensor(f, header, w) for w in ws])
            for b in BUFFER_NAMES:
                writer.add(f"{u}.{b}", buffers[b])
            if bar:
                bar.update(sum(header.tensors[w].nbytes for w in ws))
        for key in plain:
            writer.add(key, get_tensor(f, header, key))
            if bar:
                bar.update(header.tensors[key].nbytes)


def _copy_side_files(src: Path, dst: Path, fmt: str) -> None:
    """Configs, tokenizer and other small files, unchanged; ``ae.safetensors`` (df11: to ``vae/``). Other
    safetensors files are not copied (the DF11 loader reads every top-level one)."""
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.name == AE_FILE:
            shutil.copyfile(p, dst / (DF11_VAE if fmt == "df11" else AE_FILE))
        elif p.suffix == ".safetensors":
            continue
        elif p.name == CONFIG_FILE and fmt == "df11":
            continue
        else:
            shutil.copyfile(p, dst / p.name)
    if fmt == "df11":
        cfg = {}
        if (src / CONFIG_FILE).is_file():
            cfg = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
        cfg["dfloat11_config"] = df11_config(BAGEL_DF11_PATTERNS)
        (dst / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
