"""NF4 weight-only quantization (W4A16) in the bitsandbytes ``Linear4bit`` layout.

The weight ``[N, K]`` is flattened row-major and cut into blocks of ``blocksize`` (64) values. Each block keeps its
absmax (fp32); each value becomes the index of the nearest of the 16 NF4 codes (``NF4_CODE``) to ``w / absmax``
(ties go to the lower code, as bitsandbytes does). Two indices share a byte, the HIGH nibble holding the even
element; the packed tensor is uint8 ``[(N*K + 1) // 2, 1]``.

Double quantization (``double_quant=True``, bitsandbytes ``compress_statistics``): ``offset = absmax.mean()``, and
``absmax - offset`` is itself quantized blockwise (blocks of 256) to 8 bits with the signed dynamic map
(``dynamic_map()``), leaving uint8 ``absmax`` plus fp32 ``nested_absmax`` and the float ``nested_offset``.

On disk a Linear named ``X`` is stored as ``QuantState.as_dict(packed=True)`` writes it: ``X.weight``,
``X.weight.absmax``, ``X.weight.quant_map``[, ``X.weight.nested_absmax``, ``X.weight.nested_quant_map``] and
``X.weight.quant_state.bitsandbytes__nf4`` (uint8 tensor of UTF-8 JSON with the non-tensor fields).
"""

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .matmul import GEMV_MAX_M, ROWS_MAX_M, nf4_dequant, nf4_dequant_ref, nf4_matmul, nf4_matmul_ref

__all__ = [
    "NF4_CODE",
    "NF4Config",
    "NF4Weights",
    "NF4Linear",
    "dynamic_map",
    "quantize",
    "dequantize",
    "nf4_state",
    "load_nf4",
]

# The 16 NF4 values (QLoRA, arXiv 2305.14314): quantiles of N(0, 1) scaled to [-1, 1], exactly as float32.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NESTED_BLOCKSIZE = 256
_QS_KEY = "quant_state.bitsandbytes__nf4"


def nf4_code(device: torch.device | str | None = None) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The signed 8-bit "dynamic" map (Dettmers, arXiv 1511.04561) used for double quantization: 256 sorted fp32.

    Exponent level ``i`` (0..6) contributes ``2**i`` fraction values: midpoints of ``linspace(0.1, 1, 2**i + 1)``
    scaled by ``10**(i - 6)``, with both signs; plus 0 and 1. All arithmetic is fp32 (as in bitsandbytes), so the
    values are identical to ``bitsandbytes.functional.create_dynamic_map(signed=True)``.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


#: The block sizes NF4 supports (bitsandbytes' set).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class NF4Config:
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4 blocksize must be a power of two in [32, 4096], got {self.blocksize}")


@dataclass
class NF4Weights:
    """Packed NF4 weights of one Linear, field for field bitsandbytes' ``QuantState``.

    packed: uint8 [(n + 1) // 2, 1]; absmax: fp32 [n_blocks] (uint8 when double-quantized);
    quant_map: fp32 [16]; nested_*: the double-quantization state (None without it).
    """

    packed: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    quant_map: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_quant_map: Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        if self.quant_map is None:
            self.quant_map = nf4_code(self.packed.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_fp32(self) -> Tensor:
        """The per-block absmax as fp32 [n_blocks] (resolving double quantization)."""
        if not self.double_quant:
            return self.absmax.float()
        absmax = _blockwise_dequant(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_blocksize)
        return absmax + self.nested_offset


def _blockwise_absmax(x: Tensor, blocksize: int) -> Tensor:
    n = x.numel()
    full = n - n % blocksize
    absmax = x[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, x[full:].abs().amax().reshape(1)])
    return absmax


def _blockwise_scale(x: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    """x / absmax per block, clamped to [-1, 1]; multiplies by the reciprocal for full blocks and divides for a
    partial last block, the same fp32 arithmetic as bitsandbytes so the chosen codes agree with it."""
    n = x.numel()
    full = n - n % blocksize
    am = absmax.clamp_min(1e-38)
    scaled = (x[:full].reshape(-1, blocksize) * (1.0 / am[: full // blocksize]).unsqueeze(1)).reshape(-1)
    if full < n:
        scaled = torch.cat([scaled, x[full:] / am[-1]])
    return scaled.clamp_(-1, 1)


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest entry of the sorted ``code``; an exact midpoint goes to the lower index."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def _blockwise_quant(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of a 1-D fp32 tensor with a 256-entry map: (uint8 indices, fp32 absmax)."""
    absmax = _blockwise_absmax(x, blocksize)
    q = _nearest(_blockwise_scale(x, absmax, blocksize), code).to(torch.uint8)
    return q, absmax


def _blockwise_dequant(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    vals = code.float()[q.long()]
    n = vals.numel()
    idx = torch.arange(n, device=vals.device) // blocksize
    return vals * absmax.float()[idx]


def quantize(w: Tensor, cfg: NF4Config | None = None) -> NF4Weights:
    """Quantizes a float weight (any shape, usually [N, K]) to NF4 in the bitsandbytes layout (pure torch)."""
    cfg = cfg or NF4Config()
    if not w.is_floating_point():
        raise TypeError(f"NF4 quantization expects a floating-point weight, got {w.dtype}")
    flat = w.detach().reshape(-1).float()
    code = nf4_code(w.device)
    absmax = _blockwise_absmax(flat, cfg.blocksize)
    idx = _nearest(_blockwise_scale(flat, absmax, cfg.blocksize), code).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    q = NF4Weights(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, blocksize=cfg.blocksize,
                   quant_map=code)
    if cfg.double_quant:
        offset = absmax.mean()
        dmap = dynamic_map(w.device)
        qabs, nested_absmax = _blockwise_quant(absmax - offset, dmap, NESTED_BLOCKSIZE)
        q.absmax, q.nested_absmax, q.nested_quant_map = qabs, nested_absmax, dmap
        q.nested_offset = offset.item()
    return q


def unpack_indices(packed: Tensor, n: int) -> Tensor:
    """uint8 [(n+1)//2, 1] -> uint8 NF4 indices [n] (high nibble first)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def dequantize(q: NF4Weights, dtype: torch.dtype | None = None) -> Tensor:
    """Reference dequantization: ``quant_map[idx] * absmax[block]`` in fp32, cast to ``dtype`` (default
    ``q.dtype``)."""
    n = math.prod(q.shape)
    vals = _blockwise_dequant(unpack_indices(q.packed, n), q.absmax_fp32(), q.quant_map, q.blocksize)
    return vals.reshape(q.shape).to(dtype or q.dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_to_state(name: str, q: NF4Weights) -> dict[str, Tensor]:
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype), "shape": list(q.shape)}
    out = {
        f"{name}.weight": q.packed,
        f"{name}.weight.absmax": q.absmax,
        f"{name}.weight.quant_map": q.quant_map,
    }
    if q.double_quant:
        out[f"{name}.weight.nested_absmax"] = q.nested_absmax
        out[f"{name}.weight.nested_quant_map"] = q.nested_quant_map
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.nested_offset)
    out[f"{name}.weight.{_QS_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return {k: v.contiguous() for k, v in out.items()}


def nf4_state(name: str, weight: Tensor, double_quant: bool = False, blocksize: int = 64) -> dict[str, Tensor]:
    """Quantizes ``weight`` and returns the bitsandbytes ``Linear4bit`` tensors (packed QuantState) of the Linear
    ``name``."""
    return _weights_to_state(name, quantize(weight, NF4Config(blocksize=blocksize, double_quant=double_quant)))


def load_nf4(prefix: str, tensors: dict[str, Tensor]) -> NF4Weights:
    """Reads the NF4 Linear ``prefix`` (bitsandbytes packed QuantState keys under ``prefix.weight``) from
    ``tensors``."""
    key = {s: f"{prefix}.weight{s}" for s in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")}
    qs_key = f"{prefix}.weight.{_QS_KEY}"
    for k in (key[""], key[".absmax"], key[".quant_map"], qs_key):
        if k not in tensors:
            if k == qs_key and f"{prefix}.weight.quant_state.bitsandbytes__fp4" in tensors:
                raise ValueError(f"NF4 checkpoint: {prefix!r} is FP4-quantized; only NF4 is supported")
            raise ValueError(f"NF4 checkpoint: missing tensor {k!r}")
    try:
        meta = json.loads(bytes(tensors[qs_key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"NF4 checkpoint: {qs_key!r} does not hold UTF-8 JSON ({e})") from e
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"NF4 checkpoint: {qs_key!r} lacks the field {field!r}")
    if meta["quant_type"] != "nf4":
        raise ValueError(f"NF4 checkpoint: {qs_key!r} has quant_type {meta['quant_type']!r}, expected 'nf4'")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"NF4 checkpoint: {qs_key!r} has an unknown dtype {meta['dtype']!r}")
    shape, blocksize = tuple(int(s) for s in meta["shape"]), int(meta["blocksize"])
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed, absmax, qmap = tensors[key[""]], tensors[key[".absmax"]], tensors[key[".quant_map"]]
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"NF4 checkpoint: {key['']!r} must be uint8 with {(n + 1) // 2} elements for shape "
                         f"{list(shape)}, got {packed.dtype} {tuple(packed.shape)}")
    if absmax.numel() != n_blocks:
        raise ValueError(f"NF4 checkpoint: {key['.absmax']!r} must have {n_blocks} elements "
                         f"(blocksize {blocksize}), got {tuple(absmax.shape)}")
    if qmap.numel() != 16:
        raise ValueError(f"NF4 checkpoint: {key['.quant_map']!r} must have 16 elements, got {tuple(qmap.shape)}")
    q = NF4Weights(packed=packed.reshape(-1, 1), absmax=absmax.reshape(-1), shape=shape, dtype=dtype,
                   blocksize=blocksize, quant_map=qmap.float().reshape(-1))
    if key[".nested_absmax"] in tensors or "nested_offset" in meta:
        for k in (key[".nested_absmax"], key[".nested_quant_map"]):
            if k not in tensors:
                raise ValueError(f"NF4 checkpoint: double-quantized {prefix!r} lacks tensor {k!r}")
        for field in ("nested_blocksize", "nested_offset"):
            if field not in meta:
                raise ValueError(f"NF4 checkpoint: {qs_key!r} lacks the field {field!r}")
        nb = int(meta["nested_blocksize"])
        nabs, nmap = tensors[key[".nested_absmax"]], tensors[key[".nested_quant_map"]]
        if absmax.dtype != torch.uint8:
            raise ValueError(f"NF4 checkpoint: double-quantized {key['.absmax']!r} must be uint8, "
                             f"got {absmax.dtype}")
        if nabs.numel() != -(-n_blocks // nb):
            raise ValueError(f"NF4 checkpoint: {key['.nested_absmax']!r} must have {-(-n_blocks // nb)} elements, "
                             f"got {tuple(nabs.shape)}")
        if nmap.numel() != 256:
            raise ValueError(f"NF4 checkpoint: {key['.nested_quant_map']!r} must have 256 elements, "
                             f"got {tuple(nmap.shape)}")
        q.nested_absmax, q.nested_quant_map = nabs.float().reshape(-1), nmap.float().reshape(-1)
        q.nested_offset, q.nested_blocksize = float(meta["nested_offset"]), nb
    elif not absmax.is_floating_point():
        raise ValueError(f"NF4 checkpoint: {key['.absmax']!r} is {absmax.dtype} but there is no nested "
                         "(double-quant) state")
    return q


class NF4Linear(nn.Module):
    """``nn.Linear`` with NF4 weights. Buffers: ``weight`` (packed uint8), ``absmax`` (fp32 per block),
    ``quant_map`` (fp32 [16]), ``bias``. Double-quantized checkpoints are resolved to fp32 absmax at load.

    ``state_dict()`` writes, and ``load_state_dict()`` reads, the bitsandbytes keys (``X.weight.absmax``, ...).
    ``use_kernel``: ``None`` = the Triton kernel on CUDA inputs and the reference elsewhere; ``True``/``False``
    force it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        super().__init__()
        NF4Config(blocksize=blocksize)
        if in_features % blocksize:
            raise ValueError(f"NF4Linear needs in_features ({in_features}) to be a multiple of the blocksize "
                             f"{blocksize}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.dtype = blocksize, dtype
        n = in_features * out_features
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n // blocksize, dtype=torch.float32, device=device))
        self.register_buffer("quant_map", nf4_code(device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.use_kernel: bool | None = None
        #: under a memory budget: a few rows (more than the GEMV's, at most ``ROWS_MAX_M``: the denoiser's
        #: image-marker rows) go through the fused GEMM, which never materialises the dequantized weight (dequant
        #: + cuBLAS would allocate the whole bf16 weight, 130 MiB for an MLP weight at full size; the GEMM took
        #: 103 us against 91 us for gate/up on an H200, quant_rows_h200.jsonl)
        self.lean = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64) -> "NF4Linear":
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, blocksize=blocksize,
                  dtype=w.dtype, device=w.device)
        mod.set_weights(quantize(w, NF4Config(blocksize=blocksize)))
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def set_weights(self, q: NF4Weights) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features) or q.blocksize != self.blocksize:
            raise ValueError(f"NF4 weights of shape {list(q.shape)} / blocksize {q.blocksize} do not fit "
                             f"{self.out_features}x{self.in_features} / blocksize {self.blocksize}")
        self.weight = q.packed.reshape(-1, 1)
        self.absmax = q.absmax_fp32()
        self.quant_map = q.quant_map.float()
        self.dtype = q.dtype

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight [N, K] in ``dtype`` (Triton on CUDA, the reference elsewhere): for callers
        that reuse it over several calls (row chunks of one product)."""
        shape = (self.out_features, self.in_features)
        if self.weight.is_cuda:
            return nf4_dequant(self.weight, self.absmax, self.blocksize, shape, self.quant_map, dtype)
        return nf4_dequant_ref(self.weight, self.absmax, self.blocksize, shape, self.quant_map).to(dtype)

    def weights(self) -> NF4Weights:
        return NF4Weights(packed=self.weight, absmax=self.absmax, shape=(self.out_features, self.in_features),
                          dtype=self.dtype, blocksize=self.blocksize, quant_map=self.quant_map)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        wshape = (self.out_features, self.in_features)
        use_kernel = x.is_cuda if self.use_kernel is None else self.use_kernel
        if not use_kernel:
            out = nf4_matmul_ref(x2, self.weight, self.absmax, self.blocksize, wshape, self.quant_map, self.bias)
        else:
            few = self.lean and GEMV_MAX_M < x2.shape[0] <= ROWS_MAX_M
            out = nf4_matmul(x2, self.weight, self.absmax, self.blocksize, wshape, quant_map=self.quant_map,
                             bias=self.bias, mode="gemm" if few else "auto")
        return out.reshape(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        name = prefix[:-1]
        for k, v in _weights_to_state(name, self.weights()).items():
            destination[k] = v
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        name = prefix[:-1]
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if prefix + "weight" not in mine:
            missing_keys.append(prefix + "weight")
            return
        try:
            self.set_weights(load_nf4(name, mine))
        except ValueError as e:
            error_msgs.append(str(e))
            return
        used = {prefix + "weight" + s for s in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                                  "." + _QS_KEY)}
        if self.bias is not None:
            if prefix + "bias" in mine:
                self.bias = mine[prefix + "bias"].to(self.weight.device)
                used.add(prefix + "bias")
            else:
                missing_keys.append(prefix + "bias")
        if strict:
            unexpected_keys.extend(k for k in mine if k not in used)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}")
