"""Weight formats: INT8 and NF4 (bitsandbytes layouts, W8A16/W4A16 Triton matmuls), FP8 (e4m3, W8A8 on FP8 tensor
cores) and DFloat11 (lossless).

Quantization is a module swap: ``quantize_model(model, "int8" | "nf4" | "fp8" | "df11")`` replaces ``nn.Linear``
modules by ``Int8Linear`` / ``NF4Linear`` / ``FP8Linear`` / ``DF11Linear``, whose ``state_dict()`` uses the
bitsandbytes / compressed-tensors / dfloat11 keys. Each format's ``quantize`` / ``dequantize`` (the reference) live
in ``quant.int8``, ``quant.nf4``, ``quant.fp8`` and ``quant.dfloat11`` (``compress_units`` / ``decompress_unit``).
"""

from collections.abc import Callable

from torch import nn

from . import dfloat11, fp8, int8, nf4
from .df11_decode import df11_decode, df11_decode_ref, df11_first_level, df11_window_counts
from .dfloat11 import (
    DF11Config,
    DF11Linear,
    compress_units,
    compression_ratio,
    decompress_unit,
    df11_config,
    df11_pattern_units,
)
from .fp8 import FP8Config, FP8Linear, FP8Weights, fp8_state, load_fp8
from .int8 import Int8Config, Int8Linear, Int8Weights, enable_int8_compute, int8_state, load_int8
from .int8_w8a8 import int8_w8a8_matmul, int8_w8a8_matmul_ref
from .matmul import int8_matmul, int8_matmul_ref, nf4_matmul, nf4_matmul_ref
from .nf4 import NF4Config, NF4Linear, NF4Weights, load_nf4, nf4_state

__all__ = [
    "dfloat11",
    "fp8",
    "int8",
    "nf4",
    "FORMATS",
    "quantize_model",
    "Int8Config",
    "Int8Weights",
    "Int8Linear",
    "int8_state",
    "load_int8",
    "enable_int8_compute",
    "int8_w8a8_matmul",
    "int8_w8a8_matmul_ref",
    "NF4Config",
    "NF4Weights",
    "NF4Linear",
    "nf4_state",
    "load_nf4",
    "FP8Config",
    "FP8Weights",
    "FP8Linear",
    "fp8_state",
    "load_fp8",
    "DF11Config",
    "DF11Linear",
    "compress_units",
    "decompress_unit",
    "compression_ratio",
    "df11_config",
    "df11_pattern_units",
    "df11_decode",
    "df11_decode_ref",
    "df11_first_level",
    "df11_window_counts",
    "int8_matmul",
    "int8_matmul_ref",
    "nf4_matmul",
    "nf4_matmul_ref",
]

FORMATS = {"int8": Int8Config, "nf4": NF4Config, "fp8": FP8Config, "df11": DF11Config}
Config = Int8Config | NF4Config | FP8Config | DF11Config


def _converter(cfg: Config) -> Callable[[nn.Linear], nn.Module]:
    if isinstance(cfg, Int8Config):
        return Int8Linear.from_linear
    if isinstance(cfg, NF4Config):
        return lambda linear: NF4Linear.from_linear(linear, blocksize=cfg.blocksize)
    if isinstance(cfg, FP8Config):
        return lambda linear: FP8Linear.from_linear(linear, fast_accum=cfg.fast_accum)
    if isinstance(cfg, DF11Config):
        return DF11Linear.from_linear
    raise TypeError(f"unknown quantization config {cfg!r}")


def quantize_model(model: nn.Module, fmt: str | Config,
                   filter_fn: Callable[[nn.Module, str], bool] = lambda module, name: True) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` for which ``filter_fn(linear, qualified_name)`` holds by its
    quantized counterpart (bias kept) and returns the model (the same object, unless ``model`` is itself a Linear).

    fmt: "int8", "nf4", "fp8", "df11" or a config (``NF4Config(blocksize=...)``). NF4 modules keep fp32 absmax at
    runtime; double quantization only concerns checkpoints (``nf4_state``).
    """
    if isinstance(fmt, str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {sorted(FORMATS)}")
        fmt = FORMATS[fmt]()
    convert = _converter(fmt)
    if isinstance(model, nn.Linear):
        return convert(model) if filter_fn(model, "") else model
    targets = [(parent, child_name, f"{prefix}.{child_name}" if prefix else child_name, child)
               for prefix, parent in model.named_modules()
               for child_name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, child_name, name, child in targets:
        if not filter_fn(child, name):
            continue
        try:
            setattr(parent, child_name, convert(child))
        except ValueError as e:
            raise ValueError(f"cannot quantize {name!r}: {e}") from e
    return model
