"""DFloat11: lossless compression of bf16 weights by Huffman-coding their 8-bit exponents.

Layout and meaning of the buffers: docs/weight-formats.md section 3 (dfloat11 0.5.0). A compression unit is one
or more bf16 weights concatenated (flattened, in order); it is stored as the buffers

  luts              uint8 [n_luts, 256]  decode tables (entry = exponent, or >= 240 = go to table 256 - entry
                                         with the next byte); last row = code length of each exponent
  encoded_exponent  uint8 [n_bytes]      Huffman bitstream of the exponents, MSB first
  sign_mantissa     uint8 [n]            (w >> 8) & 0x80 | w & 0x7F of each bf16 word w
  output_positions  uint8 [4 (n_blocks + 1)]  uint32 index of the first code starting in each 4096-byte block; n
  gaps              uint8                5 bits (MSB first) per 8-byte window: offset of its first code
  split_positions   int64 [n_weights - 1] cumulative numels where the unit splits into its weights

The Huffman code is built from the exponent histogram of the unit plus an end-of-stream symbol (count 1, also
used to pad the last byte), its lengths limited to 32 bits (while longer, the counts of the k rarest symbols are
set to 1, k = 2, 3, ...). Codes are assigned canonically (shorter codes first), which keeps the number of
sub-tables small; the decoder only relies on the stored tables.

``compress_units`` is vectorised numpy (no per-weight Python loop). ``decompress_unit`` is the reference decoder
(numpy, ``df11_decode_ref``); ``df11_decode`` (Triton) decodes on the GPU. ``DF11Linear`` is the module swap for a
unit made of one Linear weight.
"""

import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .df11_decode import BUFFER_NAMES, BYTES_PER_THREAD, THREADS_PER_BLOCK, df11_decode, df11_decode_ref

__all__ = [
    "DF11Config",
    "DF11Linear",
    "DF11_VERSION",
    "MAX_CODE_LENGTH",
    "compress_units",
    "decompress_unit",
    "compression_ratio",
    "df11_config",
    "df11_pattern_units",
    "huffman_code_lengths",
    "canonical_codes",
    "build_luts",
]

DF11_VERSION = "0.5.0"
MAX_CODE_LENGTH = 32
FIRST_POINTER = 240  # table entries >= 240 point to sub-table 256 - entry: at most 16 sub-tables
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DF11Config:
    """DFloat11 launch geometry; fixed by the format (the decode kernels and ``output_positions`` depend on it)."""

    threads_per_block: int = THREADS_PER_BLOCK
    bytes_per_thread: int = BYTES_PER_THREAD

    def __post_init__(self) -> None:
        if (self.threads_per_block, self.bytes_per_thread) != (THREADS_PER_BLOCK, BYTES_PER_THREAD):
            raise ValueError(f"DFloat11 supports threads_per_block={THREADS_PER_BLOCK}, "
                             f"bytes_per_thread={BYTES_PER_THREAD} only, got {self}")


def df11_config(pattern_dict: dict[str, list[str]]) -> dict:
    """The ``dfloat11_config`` entry of a DF11 model's ``config.json``."""
    return {"version": DF11_VERSION, "threads_per_block": [THREADS_PER_BLOCK],
            "bytes_per_thread": BYTES_PER_THREAD, "pattern_dict": pattern_dict}


# ----------------------------------------------------------------------------------------------------------------
# Huffman code
# ----------------------------------------------------------------------------------------------------------------


def _huffman_depths(freq: Sequence[int]) -> np.ndarray:
    """Leaf depths of a Huffman tree over ``freq`` (>= 2 entries); ties broken by symbol order, then node age."""
    m = len(freq)
    heap = [(int(f), i) for i, f in enumerate(freq)]
    heapq.heapify(heap)
    parent = np.zeros(2 * m - 1, dtype=np.int64)
    node = m
    while len(heap) > 1:
        fa, a = heapq.heappop(heap)
        fb, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (fa + fb, node))
        node += 1
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for i in range(2 * m - 3, -1, -1):  # parents have larger ids than their children
        depth[i] = depth[parent[i]] + 1
    return depth[:m]


def huffman_code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Code length per symbol (int64 [len(counts)], 0 = absent) of a Huffman code for ``counts``, limited to
    ``max_length`` bits: while a code is longer, the counts of the k rarest symbols are set to 1 (k = 2, 3, ...).
    """
    counts = np.asarray(counts, dtype=np.int64)
    syms = np.flatnonzero(counts > 0)
    if syms.size < 2:
        raise ValueError(f"a Huffman code needs at least 2 symbols, got {syms.size}")
    if (1 << max_length) < syms.size:
        raise ValueError(f"{syms.size} symbols do not fit in codes of {max_length} bits")
    freq = counts[syms]
    rarest = np.argsort(freq, kind="stable")
    depths = _huffman_depths(freq)
    k = 1
    while depths.max() > max_length:
        k += 1
        f = freq.copy()
        f[rarest[:k]] = 1
        depths = _huffman_depths(f)
    lengths = np.zeros(counts.size, dtype=np.int64)
    lengths[syms] = depths
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint64, right-aligned) for code ``lengths``: shorter codes first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def build_luts(lengths: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The hierarchical 8-bit decode tables (uint8 [n_luts, 256], last row = code lengths) of a complete code."""
    tables = [np.full(256, -1, dtype=np.int64)]
    sub_of: dict[tuple[int, int], int] = {}  # (prefix length, prefix) -> table row
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        n_bits, code, row, used = int(lengths[s]), int(codes[s]), 0, 0
        while n_bits - used > 8:
            used += 8
            prefix = code >> (n_bits - used)
            if (used, prefix) not in sub_of:
                if len(tables) > 256 - FIRST_POINTER:
                    raise ValueError(f"the Huffman code needs more than {256 - FIRST_POINTER} decode sub-tables; "
                                     "this exponent distribution cannot be stored as DFloat11")
                sub_of[(used, prefix)] = len(tables)
                tables.append(np.full(256, -1, dtype=np.int64))
            tables[row][prefix & 0xFF] = 256 - sub_of[(used, prefix)]
            row = sub_of[(used, prefix)]
        rest = n_bits - used
        v = code & ((1 << rest) - 1)
        tables[row][v << (8 - rest): (v + 1) << (8 - rest)] = s
    if any((t < 0).any() for t in tables):
        raise ValueError("the code is not complete (Kraft sum < 1): some decode table entries are undefined")
    return np.stack(tables + [np.asarray(lengths, dtype=np.int64)]).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# compression
# ----------------------------------------------------------------------------------------------------------------


def _split_bf16(weights: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(exponent bytes, sign_mantissa bytes) of the concatenated weights."""
    parts = [w.detach().cpu().contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16) for w in weights]
    words = parts[0] if len(parts) == 1 else np.concatenate(parts)
    exps = np.empty(words.size, dtype=np.uint8)
    sign_mantissa = np.empty(words.size, dtype=np.uint8)
    for s in range(0, words.size, _CHUNK):  # chunked to stay in cache
        u = words[s: s + _CHUNK]
        exps[s: s + _CHUNK] = u >> 7  # the uint8 store drops the sign bit
        sign_mantissa[s: s + _CHUNK] = ((u >> 8) & 0x80) | (u & 0x7F)
    return exps, sign_mantissa


def _encode(exps: np.ndarray, hist: np.ndarray, lengths: np.ndarray, codes: np.ndarray, pad_sym: int | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bitstream bytes, first element index of every window and gap of every window (vectorised per chunk).

    Each code is left-aligned in 64 bits and shifted to its bit offset inside a 32-bit word; codes are <= 32 bits,
    so it lands in that word and the next. The (bit-disjoint) contributions of all codes starting in a word are
    summed with ``np.add.reduceat``. Because codes are <= 32 bits, every 32-bit word up to the last code holds the
    start of a code, so the first code of each 64-bit window is the first code of its even word.
    """
    n = exps.size
    len_tab = lengths.astype(np.uint8)
    left_tab = np.where(lengths > 0, codes << (64 - lengths).clip(0, 63).astype(np.uint64), 0).astype(np.uint64)
    total_bits = int(hist @ lengths)
    n_bytes = -(-total_bits // 8)
    n_threads = -(-n_bytes // (THREADS_PER_BLOCK * BYTES_PER_THREAD)) * THREADS_PER_BLOCK
    words = np.zeros(-(-total_bits // 32) + 2, dtype=np.uint32)
    first = np.full(n_threads, n, dtype=np.int64)
    gaps = np.zeros(n_threads, dtype=np.int64)

    def place(word0: int, starts: np.ndarray, left: np.ndarray, first_idx: int, owns_first_word: bool) -> None:
        """Codes at bit ``starts`` (int32, relative to word ``word0``) into ``words``; records window starts."""
        v = left >> (starts.view(np.uint32) & np.uint32(31))
        j = starts >> 5
        seg = np.flatnonzero(j[1:] != j[:-1])
        seg += 1
        seg = np.concatenate([[0], seg])
        # codes are <= 32 bits, so every word from j[0] = 0 to j[-1] holds a code start: seg[w] = its first code
        assert seg.size == int(j[-1]) + 1
        acc = np.add.reduceat(v, seg)
        w1 = word0 + seg.size
        words[word0:w1] |= (acc >> np.uint64(32)).astype(np.uint32)
        words[word0 + 1: w1 + 1] |= acc.astype(np.uint32)  # the low 32 bits
        # a window starts at an even word; its first code is that word's first code
        w_even = word0 + (word0 & 1)
        if w_even == word0 and not owns_first_word:
            w_even += 2
        i = seg[w_even - word0:: 2]
        t0 = w_even // 2
        first[t0: t0 + i.size] = first_idx + i
        gaps[t0: t0 + i.size] = starts[i] & 31

    base, prev_last = 0, -1
    for s in range(0, n, _CHUNK):
        e = exps[s: s + _CHUNK].astype(np.intp)  # gathers with intp indices are faster than with uint8
        ln = len_tab[e]
        starts = np.cumsum(ln, dtype=np.int32)
        starts -= ln
        starts += base & 31
        word0 = base >> 5
        place(word0, starts, left_tab[e], s, prev_last < 32 * word0)
        prev_last = base + int(starts[-1]) - (base & 31)
        base = prev_last + int(ln[-1])
    assert base == total_bits
    pad = 8 * n_bytes - total_bits
    if pad and pad_sym is not None:  # fill the last byte with the start of the end-of-stream code
        left = left_tab[[pad_sym]] >> np.uint64(64 - pad) << np.uint64(64 - pad)
        place(total_bits >> 5, np.array([total_bits & 31], dtype=np.int32), left, n, False)
    encoded = words.astype(">u4").view(np.uint8)[:n_bytes]
    return encoded, first, gaps


def compress_units(weights: Tensor | list[Tensor], counts: np.ndarray | None = None) -> dict[str, Tensor]:
    """Compresses one unit (the bf16 ``weights``, concatenated in order) into the DFloat11 buffers (CPU tensors).

    counts: optional exponent histogram [256] to build the code from instead of the unit's own (e.g. a code shared
    by several units); it must be non-zero for every exponent present.
    """
    weights = [weights] if isinstance(weights, Tensor) else list(weights)
    if not weights:
        raise ValueError("compress_units needs at least one weight")
    for i, w in enumerate(weights):
        if w.dtype != torch.bfloat16:
            raise TypeError(f"DFloat11 compresses bf16 weights; weight {i} is {w.dtype}")
    numels = [w.numel() for w in weights]
    n = sum(numels)
    if n == 0 or n >= 2**32:
        raise ValueError(f"a DFloat11 unit must hold between 1 and 2**32 - 1 elements, got {n}")
    exps, sign_mantissa = _split_bf16(weights)
    hist = torch.bincount(torch.from_numpy(exps), minlength=256).numpy().astype(np.int64)
    if hist[FIRST_POINTER:].any():
        bad = np.flatnonzero(hist[FIRST_POINTER:]) + FIRST_POINTER
        raise ValueError(f"DFloat11 cannot encode exponents >= {FIRST_POINTER} (|w| >= 2**113, inf or nan); "
                         f"found exponent(s) {bad.tolist()}")
    if counts is not None:
        counts = np.asarray(counts, dtype=np.int64).copy()
        if counts.shape != (256,) or (counts < 0).any() or counts[FIRST_POINTER:].any():
            raise ValueError("counts must be a non-negative [256] histogram with no mass on exponents >= 240")
        if (counts[hist > 0] == 0).any():
            raise ValueError("counts must be non-zero for every exponent present in the weights")
    else:
        counts = hist.copy()
    free = np.flatnonzero(counts[:FIRST_POINTER] == 0)
    pad_sym = int(free[0]) if free.size else None
    if pad_sym is not None:
        counts[pad_sym] = 1
    lengths = huffman_code_lengths(counts)
    codes = canonical_codes(lengths)
    luts = build_luts(lengths, codes)
    encoded, first, gaps = _encode(exps, hist, lengths, codes, pad_sym)
    positions = np.append(first[::THREADS_PER_BLOCK], n).astype(np.uint32)
    gap_bits = np.unpackbits(gaps.astype(np.uint8)[:, None], axis=1)[:, 3:]  # 5 low bits, MSB first
    return {
        "luts": torch.from_numpy(luts),
        "encoded_exponent": torch.from_numpy(encoded.copy()),
        "sign_mantissa": torch.from_numpy(sign_mantissa),
        "output_positions": torch.from_numpy(positions.view(np.uint8).copy()),
        "gaps": torch.from_numpy(np.packbits(gap_bits.reshape(-1))),
        "split_positions": torch.from_numpy(np.cumsum(numels[:-1], dtype=np.int64)),
    }


def decompress_unit(buffers: dict[str, Tensor], shapes: Sequence[Sequence[int]] | None = None) -> list[Tensor]:
    """Reference decoder: the unit's bf16 weights (CPU), flat or reshaped to ``shapes``."""
    out = torch.empty(buffers["sign_mantissa"].numel(), dtype=torch.bfloat16)
    df11_decode_ref(buffers, out)
    split = buffers.get("split_positions", torch.zeros(0, dtype=torch.int64)).cpu()
    parts = list(torch.tensor_split(out, split))
    if shapes is not None:
        if len(shapes) != len(parts):
            raise ValueError(f"the unit holds {len(parts)} weights, got {len(shapes)} shapes")
        parts = [p.view(tuple(s)) for p, s in zip(parts, shapes)]
    return parts


def compression_ratio(buffers: dict[str, Tensor]) -> float:
    """Compressed size / bf16 size, counted as the dfloat11 encoder prints it."""
    n = buffers["sign_mantissa"].numel()
    size = sum(buffers[k].numel() for k in ("encoded_exponent", "sign_mantissa", "output_positions", "gaps"))
    return size / (2 * n)


def df11_pattern_units(names: Iterable[str], pattern_dict: dict[str, list[str]]) -> dict[str, list[str]]:
    """Groups weight names into DFloat11 units as the dfloat11 compressor does with its ``pattern_dict``.

    names: parameter names (``"a.b.q_proj.weight"``, ...). pattern_dict: regex over module names -> the Linear
    sub-modules concatenated into that unit. A matching module that has its own ``.weight`` (a Linear or Embedding)
    is a unit of that one weight. Returns ``{unit module name: [weight names, in concatenation order]}``.
    """
    names = list(names)
    known = set(names)
    modules = list(dict.fromkeys(".".join(p.split(".")[:i]) for p in names for i in range(1, p.count(".") + 1)))
    units: dict[str, list[str]] = {}
    for pattern, attrs in pattern_dict.items():
        rx = re.compile(pattern)
        for m in modules:
            if m in units or not rx.fullmatch(m):
                continue
            if f"{m}.weight" in known:
                units[m] = [f"{m}.weight"]
                continue
            wanted = [f"{m}.{a}.weight" for a in attrs]
            missing = [w for w in wanted if w not in known]
            if missing or not wanted:
                raise ValueError(f"DFloat11 pattern {pattern!r} matches module {m!r}, but weights {missing} are "
                                 "missing")
            units[m] = wanted
    return units


# ----------------------------------------------------------------------------------------------------------------
# module swap
# ----------------------------------------------------------------------------------------------------------------


class DF11Linear(nn.Module):
    """``nn.Linear`` whose bf16 weight is a DFloat11 unit, decoded on each forward (exact weights).

    Buffers: the unit's ``luts``, ``encoded_exponent``, ``sign_mantissa``, ``output_positions``, ``gaps``,
    ``split_positions`` (the dfloat11 keys ``X.luts``, ...), and ``bias``. ``use_kernel``: ``None`` = Triton
    decode for CUDA buffers, numpy reference otherwise.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for name in BUFFER_NAMES:
            dtype = torch.int64 if name == "split_positions" else torch.uint8
            self.register_buffer(name, torch.zeros(0, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16, device=device))
        else:
            self.bias = None
        self.use_kernel: bool | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DF11Linear":
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device)
        mod.set_buffers({k: v.to(w.device) for k, v in compress_units([w.to(torch.bfloat16)]).items()})
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def set_buffers(self, buffers: dict[str, Tensor]) -> None:
        n = buffers["sign_mantissa"].numel()
        if n != self.in_features * self.out_features:
            raise ValueError(f"DFloat11 unit of {n} elements does not fit a "
                             f"{self.out_features}x{self.in_features} Linear")
        for name in BUFFER_NAMES:
            if name in buffers:
                setattr(self, name, buffers[name])

    def buffers_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def decode(self) -> Tensor:
        """The bf16 weight [N, K]."""
        out = torch.empty(self.out_features * self.in_features, dtype=torch.bfloat16, device=self.luts.device)
        use_kernel = self.luts.is_cuda if self.use_kernel is None else self.use_kernel
        (df11_decode if use_kernel else df11_decode_ref)(self.buffers_dict(), out)
        return out.view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.decode().to(x.dtype), bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the buffers' sizes depend on the data, so they are replaced rather than copied into
        names = list(BUFFER_NAMES) + (["bias"] if self.bias is not None else [])
        found = {}
        for name in names:
            if prefix + name in state_dict:
                found[name] = state_dict[prefix + name]
            elif name != "split_positions":
                missing_keys.append(prefix + name)
        if "bias" in found:
            self.bias = found.pop("bias")
        if "sign_mantissa" in found:
            try:
                self.set_buffers(found)
            except ValueError as e:
                error_msgs.append(str(e))
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in names)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
