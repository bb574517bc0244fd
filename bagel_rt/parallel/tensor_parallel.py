"""Tensor-parallel decoder layers: attention heads and MLP columns split over the ranks (Megatron-style).

Module swap on every decoder layer, both experts alike:

* q/k/v projections keep the rows of this rank's heads: query heads ``[r*Hq/P, (r+1)*Hq/P)`` and key/value heads
  ``[r*Hk/P, (r+1)*Hk/P)`` — with Hk divisible by P, each local query head still finds its GQA key/value head
  among the local ones. gate/up keep rows ``[r*I/P, (r+1)*I/P)``. Column-parallel Linears need no
  communication, so they stay ordinary (smaller) modules.
* o_proj and down_proj keep the matching columns and become :class:`RowParallelLinear`: a partial product
  followed by one ``all_reduce`` — the layer's two all-reduces.
* The attention modules learn their local head counts, so the KV caches (``BagelModel.new_context``) and the
  packed denoiser's arena hold only this rank's key/value heads.

The token embedding and ``lm_head`` are split by vocabulary rows (:mod:`.vocab`); replicated on every rank: the
norms, ViT, connector, VAE and the latent glue.

Compressed formats split exactly, because every one keeps its scales per output row or in blocks along a
row: INT8 and FP8 (a scale per output row) split rows with their scales and columns under unchanged scales;
NF4 (absmax per block of 64 along the flattened row) splits rows, and columns at multiples of the blocksize.
DFloat11 kept compressed (``df11_resident``) does not split (its units are whole layers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InputError
from .group import ParallelGroup

_COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROW = ("self_attn.o_proj", "mlp.down_proj")


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split over the ranks: this rank's partial product, summed over the
    ranks by one ``all_reduce``. ``inner`` is this rank's column slice (any weight format); the bias, if any,
    is added once (rank 0 keeps it)."""

    def __init__(self, inner: nn.Module, group: ParallelGroup):
        super().__init__()
        self.inner, self.group = inner, group
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @property
    def act_format(self) -> str | None:
        return getattr(self.inner, "act_format", None)

    def forward(self, x: Tensor) -> Tensor:
        return self._reduce(self.inner(x))

    def forward_quantized(self, xq: tuple[Tensor, Tensor], out_dtype: torch.dtype) -> Tensor:
        """The 8-bit product of rows already quantized (see :func:`bagel_rt.fast.act_format`), reduced."""
        return self._reduce(self.inner.forward_quantized(xq, out_dtype))

    @staticmethod
    def _reduce(y: Tensor) -> Tensor:
        dist.all_reduce(y)
        return y

    def extra_repr(self) -> str:
        return f"ranks={self.group.world}"


def check_shapes(params, world: int) -> None:
    """Heads, key/value heads and the MLP width must divide by the number of ranks (clear error otherwise)."""
    p = params.llm
    for name, n in (("attention heads", p.num_heads), ("key/value heads", p.num_kv_heads),
                    ("MLP width (intermediate_size)", p.intermediate_size), ("vocabulary", p.vocab_size)):
        if n % world:
            raise InputError(f"tensor parallelism over {world} processes needs the model's {name} ({n}) to be "
                             f"divisible by {world}; use {_divisors(p, world)} processes or parallel='layers'")


def _divisors(p, world: int) -> str:
    ok = [d for d in range(2, max(world, 8) + 1)
          if not (p.num_heads % d or p.num_kv_heads % d or p.intermediate_size % d or p.vocab_size % d)]
    return " or ".join(map(str, ok)) if ok else "no other number of"


def shard_linear(mod: nn.Module, dim: int, rank: int, world: int) -> nn.Module:
    """This rank's part of a Linear (any weight format): output rows (``dim`` 0) or input columns (``dim`` 1)
    ``[rank*n/world, (rank+1)*n/world)``. Exact for every format (the scales follow their rows / blocks).
    A bias goes with the rows (dim 0) or stays on rank 0 only (dim 1, added once after the reduce)."""
    from ..quant.fp8 import FP8Linear
    from ..quant.int8 import Int8Linear
    from ..quant.nf4 import NF4Linear

    n_out, n_in = mod.out_features, mod.in_features
    size = (n_out if dim == 0 else n_in) // world
    lo, hi = rank * size, (rank + 1) * size
    out_f, in_f = (size, n_in) if dim == 0 else (n_out, size)
    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias = bias[lo:hi] if dim == 0 else (bias if rank == 0 else None)

    def part(t: Tensor) -> Tensor:  # rows or columns of a [N, K] tensor
        return (t[lo:hi] if dim == 0 else t[:, lo:hi]).contiguous()

    if type(mod) is nn.Linear:
        new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(part(mod.weight.data), requires_grad=False)
    elif isinstance(mod, Int8Linear):
        new = Int8Linear(in_f, out_f, bias=bias is not None, device="meta")
        new.weight, new.weight_format = part(mod.weight), mod.weight_format
        new.SCB = mod.SCB[lo:hi].contiguous() if dim == 0 else mod.SCB
        new.use_kernel, new.w8a8 = mod.use_kernel, mod.w8a8
    elif isinstance(mod, FP8Linear):
        dtype = torch.bfloat16 if bias is None else bias.dtype
        new = FP8Linear(in_f, out_f, bias=bias is not None, dtype=dtype, device="meta", fast_accum=mod.fast_accum)
        new.weight = part(mod.weight)
        new.weight_scale = mod.weight_scale[lo:hi].contiguous() if dim == 0 else mod.weight_scale
        new.use_kernel, new.w8a8 = mod.use_kernel, mod.w8a8
    elif isinstance(mod, NF4Linear):
        new = _shard_nf4(mod, dim, lo, hi, out_f, in_f, bias is not None)
    else:
        raise InputError(f"tensor parallelism cannot split {type(mod).__name__} weights (DFloat11 kept "
                         "compressed does not split: load it decoded, df11_resident=False)")
    if bias is not None:  # a Parameter of nn.Linear, a registered buffer of the compressed modules
        new.bias = nn.Parameter(bias.data.clone(), requires_grad=False) if type(new) is nn.Linear else bias.clone()
    return new


def _shard_nf4(mod, dim: int, lo: int, hi: int, out_f: int, in_f: int, bias: bool):
    """NF4 codes are packed two per byte in row-major order, with one absmax per ``blocksize`` codes: rows split
    whole (K is a multiple of the blocksize), columns at multiples of the blocksize."""
    from ..quant.nf4 import NF4Linear

    bs, n_in = mod.blocksize, mod.in_features
    if dim == 1 and lo % bs:
        raise InputError(f"NF4 weights split over columns at multiples of their blocksize {bs}: {n_in} input "
                         f"features over {n_in // (hi - lo)} processes give {hi - lo} per process")
    packed = mod.weight.reshape(mod.out_features, n_in // 2)
    absmax = mod.absmax.reshape(mod.out_features, n_in // bs)
    if dim == 0:
        packed, absmax = packed[lo:hi], absmax[lo:hi]
    else:
        packed, absmax = packed[:, lo // 2: hi // 2], absmax[:, lo // bs: hi // bs]
    new = NF4Linear(in_f, out_f, bias=bias, blocksize=bs, dtype=mod.dtype, device="meta")
    new.weight = packed.contiguous().reshape(-1, 1)
    new.absmax = absmax.contiguous().reshape(-1)
    new.quant_map = mod.quant_map
    new.use_kernel = mod.use_kernel
    return new


def shard_layers(model, group: ParallelGroup) -> None:
    """Split every decoder layer of ``model`` (a :class:`bagel_rt.model.BagelModel`) over the ranks, in place."""
    check_shapes(model.params, group.world)
    for layer in model.language_model.model.layers:
        shard_layer(layer, model.params.llm, group)


def shard_layer(layer: nn.Module, p, group: ParallelGroup) -> None:
    """Split one decoder layer (both experts) over the ranks, in place: its Linears swapped for this rank's
    parts, its attention told the local head counts."""
    r, n = group.rank, group.world
    for sfx in ("", "_moe_gen"):
        for path in _COLUMN:
            _swap(layer, _expert(path, sfx), lambda m: shard_linear(m, 0, r, n))
        for path in _ROW:
            _swap(layer, _expert(path, sfx), lambda m: RowParallelLinear(shard_linear(m, 1, r, n), group))
    layer.self_attn.num_heads = p.num_heads // n
    layer.self_attn.num_kv_heads = p.num_kv_heads // n


def fits(params, world: int) -> bool:
    """Whether tensor parallelism over ``world`` ranks can split this model (see :func:`check_shapes`)."""
    try:
        check_shapes(params, world)
    except InputError:
        return False
    return True


def _expert(path: str, sfx: str) -> str:
    """The module path of ``path`` in the expert ``sfx`` ("" und, "_moe_gen" gen): ``mlp.x`` -> ``mlp_moe_gen.x``,
    ``self_attn.q_proj`` -> ``self_attn.q_proj_moe_gen``."""
    parent, _, name = path.rpartition(".")
    return f"{parent}{sfx}.{name}" if parent == "mlp" else f"{parent}.{name}{sfx}"


def _swap(layer: nn.Module, path: str, make) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path)
    setattr(parent, name, make(getattr(parent, name)))
