"""Exp4: the resident form of a DFloat11 unit that the GPU decodes at memory speed, bits unchanged.

DF11 stores each bf16 weight as its sign + mantissa byte and a Huffman code of its 8-bit exponent (~2.9 bits at
full size: 11 bits per weight, ~70% of bf16). Decoding the Huffman stream is a serial chain of table lookups per
code: ~0.1 G weights/s per SM-wide window loop, 199 GB/s of bf16 output on the H200 (:mod:`df11_decode`), and a
packed denoiser step decodes both experts of every layer (26.1 GB of bf16), which is what kept DF11 t2i at 1.6x
bf16 under a 24 GiB budget. Exp4 trades a little of the compression for a decode with no lookups at all:

* ``sign_mantissa``: DF11's own byte per weight, kept as is;
* ``exp_codes``: one 4-bit code per weight (two per byte, element ``2i`` in the low nibble of byte ``i``): the
  exponent minus ``exp_base`` when it lies in ``[exp_base, exp_base + 15)``, else 15 (an *escape*);
* ``exp_base``: int32 [1], the start of the 15 consecutive exponents that cover the most weights of the unit;
* ``escape_index`` (int64 [E]) / ``escape_value`` (int16 [E]): the bf16 bits of every escaped weight.

12 bits per weight plus the escapes, ~75% of bf16: a normal(0, 0.02) bf16 weight of 18944 x 3584 escapes 1.5e-4
of its weights (the far tails and zeros) and takes 0.751 of its bf16 bytes (``benchmarks/exp4_size.py``, CPU).
:func:`exp4_decode` is one elementwise pass (read 1.5 bytes, write 2 per weight) and a scatter of the escapes;
:func:`exp4_encode` makes the buffers from the unit's bf16 bits (decoded once, when the unit is loaded).
``exp4_decode_ref`` is the PyTorch reference with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bagel_rt.kernels._device import is_interpreting
from torch import Tensor

__all__ = ["EXP4_NAMES", "ESCAPE", "exp4_encode", "exp4_decode", "exp4_decode_ref", "is_exp4"]

EXP4_NAMES = ("sign_mantissa", "exp_codes", "exp_base", "escape_index", "escape_value")
ESCAPE = 15  # the code of an exponent outside the unit's 15-exponent window
CHUNK = 1 << 26  # elements per encoding pass (bounded temporaries: ~0.6 GB of int32 at most)
BLOCK = 4096  # elements per decode program


def is_exp4(buffers: dict[str, Tensor]) -> bool:
    """Whether a unit's buffers are in the Exp4 form (else DF11's Huffman form)."""
    return "exp_codes" in buffers


def _exponents(bits: Tensor) -> Tensor:
    # int32 exponent field of bf16 bits (int16 [n])
    return (bits.to(torch.int32) >> 7) & 0xFF


def exp4_encode(bits: Tensor, sign_mantissa: Tensor | None = None) -> dict[str, Tensor]:
    """The Exp4 buffers of the bf16 weights ``bits`` (bf16 or its int16 view, [n], any device).

    ``sign_mantissa``: the unit's DF11 sign + mantissa bytes, reused instead of computing them (they are the
    same bytes). Temporaries are bounded by :data:`CHUNK` elements; reads the escape count (one sync).
    """
    bits = bits.reshape(-1).view(torch.int16)
    n, dev = bits.numel(), bits.device
    hist = torch.zeros(256, dtype=torch.int64, device=dev)
    for c0 in range(0, n, CHUNK):
        hist += torch.bincount(_exponents(bits[c0:c0 + CHUNK]), minlength=256)
    window = hist.unfold(0, ESCAPE, 1).sum(1)  # [242]: weights covered by [b, b + 15)
    base = int(window.argmax())
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
    escapes = []
    for c0 in range(0, n, CHUNK):
        c = _exponents(bits[c0:c0 + CHUNK]) - base
        c = torch.where((c >= 0) & (c < ESCAPE), c, ESCAPE)
        escapes.append(torch.nonzero(c == ESCAPE).reshape(-1) + c0)
        if c.numel() % 2:
            c = torch.cat([c, c.new_zeros(1)])
        codes[c0 // 2:c0 // 2 + c.numel() // 2] = (c[0::2] | (c[1::2] << 4)).to(torch.uint8)
    index = torch.cat(escapes)
    if sign_mantissa is None:
        b = bits.to(torch.int32)
        sign_mantissa = (((b >> 8) & 0x80) | (b & 0x7F)).to(torch.uint8)
    assert sign_mantissa.numel() == n and sign_mantissa.dtype == torch.uint8, "sign_mantissa must be uint8 [n]"
    return {"sign_mantissa": sign_mantissa, "exp_codes": codes,
            "exp_base": torch.tensor([base], dtype=torch.int32, device=dev),
            "escape_index": index, "escape_value": bits[index].clone()}


def _check(buffers: dict[str, Tensor], out: Tensor) -> int:
    for name in EXP4_NAMES:
        if name not in buffers:
            raise ValueError(f"Exp4 unit: missing buffer {name!r}")
    n = buffers["sign_mantissa"].numel()
    assert buffers["exp_codes"].numel() == (n + 1) // 2, "exp_codes must hold one nibble per weight"
    assert out.dtype in (torch.bfloat16, torch.int16), f"out must be bf16 (or its int16 view), got {out.dtype}"
    assert out.is_contiguous() and out.numel() == n, f"out must be contiguous with {n} elements"
    return n


def exp4_decode_ref(buffers: dict[str, Tensor], out: Tensor) -> Tensor:
    """Reference (PyTorch): writes the unit's bf16 weights into ``out`` (bf16 or int16, [n]) and returns it."""
    n = _check(buffers, out)
    s = buffers["sign_mantissa"].to(torch.int32)
    b = buffers["exp_codes"].to(torch.int32)
    code = torch.stack([b & 15, b >> 4], dim=1).reshape(-1)[:n]
    e = buffers["exp_base"].to(torch.int32) + code
    word = ((s & 0x80) << 8) | ((e & 0xFF) << 7) | (s & 0x7F)
    word = torch.where(word >= 1 << 15, word - (1 << 16), word)  # the int16 bit pattern
    flat = out.view(torch.int16)
    flat.copy_(word.to(torch.int16))
    flat[buffers["escape_index"]] = buffers["escape_value"]
    return out


@triton.jit
def _exp4_kernel(sm, codes, base, out, n, n_codes, BLOCK: tl.constexpr):
    # program p: elements [p BLOCK, (p + 1) BLOCK): BLOCK sign + mantissa bytes and BLOCK / 2 code bytes in,
    # BLOCK bf16 words out; escaped elements get a placeholder the scatter overwrites
    i = tl.program_id(0).to(tl.int64)
    o = i * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(sm + o, mask=o < n, other=0).to(tl.int32)
    o_h = i * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    # n_codes = (n + 1) // 2, an argument: Triton specialises it as a multiple of 16 (vector loads) when it is one
    b = tl.load(codes + o_h, mask=o_h < n_codes, other=0).to(tl.int32)
    code = tl.interleave(b & 15, b >> 4)  # element 2j: the low nibble of byte j
    e = (tl.load(base) + code) & 0xFF
    word = ((s & 0x80) << 8) | (e << 7) | (s & 0x7F)
    tl.store(out + o, word.to(tl.int16), mask=o < n)


def exp4_decode(buffers: dict[str, Tensor], out: Tensor) -> Tensor:
    """Decode the unit into ``out`` (bf16 or int16, [n], on the buffers' device) with the Triton kernel, then
    scatter the escapes: no allocation but the scatter's, no host synchronisation (CUDA-graph safe)."""
    n = _check(buffers, out)
    if n == 0:
        return out
    flat = out.view(torch.int16)
    blk = 256 if is_interpreting() else BLOCK
    _exp4_kernel[(triton.cdiv(n, blk),)](buffers["sign_mantissa"], buffers["exp_codes"], buffers["exp_base"], flat,
                                          n, (n + 1) // 2, BLOCK=blk, num_warps=4)
    if buffers["escape_index"].numel():
        flat.index_copy_(0, buffers["escape_index"], buffers["escape_value"])
    return out
