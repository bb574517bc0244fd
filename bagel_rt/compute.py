"""Denoising compute precision (``Bagel.compute``): which module computes the generation expert's Linears.

Every weight format is a module that knows its own forward (see :func:`bagel_rt.fast.act_format`), so the
compute precision is a property of the modules, not a table beside the model:

* ``"bf16"``: bf16 products — plain ``nn.Linear`` or a weight-only compressed module (INT8/NF4/DF11
  dequantize before a bf16 GEMM; FP8 weights below compute capability 8.9 too).
* ``"fp8"``: ``FP8Linear`` modules computing W8A8 on FP8 tensor cores (Ada/Hopper; on the CPU
  ``torch._scaled_mm`` emulates it). On bf16 weights the generation expert's Linears are swapped for FP8
  ones and the bf16 weights are dropped (6.5 GB at full size) unless ``Bagel.keep_bf16`` asks to keep them
  for A/B work, so that ``compute = "bf16"`` can swap them back. An FP8 checkpoint loads as FP8 modules.
* ``"int8"``: INT8 W8A8 (per-token activation scales, an INT8 GEMM with both scales in its epilogue) on
  INT8 weights.

Only the generation expert changes: it runs the denoising GEMMs. The understanding expert keeps its format
(it sees two marker tokens per branch while denoising and decodes text memory-bound).
"""

from __future__ import annotations

from torch import nn

from .errors import InputError

COMPUTES = ("bf16", "fp8", "int8")
_GEN = ("self_attn.q_proj_moe_gen", "self_attn.k_proj_moe_gen", "self_attn.v_proj_moe_gen",
        "self_attn.o_proj_moe_gen", "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj")


def gen_linears(model) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, Linear module) of every generation-expert Linear, layer by layer (of
    the layers this process holds: another rank's layers are absent under a layer split)."""
    out = []
    for layer in model.language_model.model.layers:
        if not hasattr(layer, "self_attn"):
            continue
        for path in _GEN:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            out.append((parent, name, getattr(parent, name)))
    return out


def current_compute(model) -> str:
    """"fp8" / "int8" when every generation-expert Linear computes in that format, else "bf16"."""
    fmts = {getattr(m, "act_format", None) for _, _, m in gen_linears(model)}
    return fmts.pop() if len(fmts) == 1 and None not in fmts else "bf16"


def set_compute(bagel, value: str) -> None:
    """Switch the generation expert of ``bagel`` (a :class:`bagel_rt.pipeline.Bagel`) to ``value``.

    Raises :class:`InputError` where the weights cannot compute that way (e.g. fp8 on NF4 weights, bf16 on
    FP8 weights whose bf16 originals were not kept)."""
    if value not in COMPUTES:
        raise InputError(f"compute must be one of {', '.join(COMPUTES)}, got {value!r}")
    if value == current_compute(bagel.model):
        return
    linears = gen_linears(bagel.model)
    kinds = sorted({type(m).__name__ for _, _, m in linears})
    if value == "fp8":
        _to_fp8(bagel, linears, kinds)
    elif value == "int8":
        _to_int8(linears, kinds)
    else:
        _to_bf16(bagel, linears)


def _to_fp8(bagel, linears, kinds) -> None:
    from .kernels._device import has_capability
    from .quant.fp8 import FP8Linear

    dev = bagel.device
    if dev.type == "cuda" and not has_capability(8, 9, dev):
        import torch

        raise InputError(f"compute 'fp8' needs FP8 tensor cores (Ada/Hopper, compute capability >= 8.9); "
                         f"{torch.cuda.get_device_name(dev)} has none (FP8 weights still load there, "
                         f"computing in bf16)")
    if any(type(m) not in (nn.Linear, FP8Linear) for _, _, m in linears):
        raise InputError(f"compute 'fp8' needs bf16 (or DFloat11-decoded, or FP8) generation-expert weights; "
                         f"this model holds {', '.join(kinds)} (load the bf16 or fp8 checkpoint)")
    for parent, name, mod in linears:
        if type(mod) is nn.Linear:
            if bagel.keep_bf16:
                bagel.bf16_linears[(id(parent), name)] = mod
            new = FP8Linear.from_linear(mod)
            if dev.type == "cpu":
                new.w8a8 = True  # torch._scaled_mm runs on CPUs too: the same W8A8 arithmetic, for tests
            setattr(parent, name, new)
        elif getattr(mod, "act_format", None) != "fp8":
            raise InputError("these FP8 weights cannot compute in FP8 on this device")


def _to_int8(linears, kinds) -> None:
    from .quant.int8 import Int8Linear

    if any(type(m) is not Int8Linear for _, _, m in linears):
        raise InputError(f"compute 'int8' needs INT8 weights (bagel-rt quantize --format int8, or "
                         f"weights='int8'); this model's generation expert holds {', '.join(kinds)}")
    for _, _, mod in linears:
        mod.w8a8 = True


def _to_bf16(bagel, linears) -> None:
    from .quant.int8 import Int8Linear

    fp8 = [(p, n) for p, n, m in linears if getattr(m, "act_format", None) == "fp8"]
    if any((id(p), n) not in bagel.bf16_linears for p, n in fp8):  # checked before anything changes
        raise InputError("compute 'bf16' needs bf16 generation-expert weights: these are FP8 (an FP8 checkpoint, "
                         "or FP8 compute dropped the bf16 ones; keep_bf16=True keeps them for A/B work)")
    for parent, name in fp8:
        setattr(parent, name, bagel.bf16_linears.pop((id(parent), name)))
    for _, _, mod in linears:
        if type(mod) is Int8Linear:
            mod.w8a8 = False
