"""Decoding one DFloat11 compression unit (layout: docs/weight-formats.md section 3) into bf16.

The bitstream is cut into windows of ``BYTES_PER_THREAD`` = 8 bytes ("threads") and blocks of
``THREADS_PER_BLOCK`` = 512 windows (4096 bytes). A window decodes every code that *starts* inside it, the
first one at bit ``gap`` (5 bits per window in ``gaps``); codes are <= 32 bits, so a window reads its 8 bytes
plus 4 bytes of look-ahead. The element index of the first code of block ``b`` is ``output_positions[b]``;
inside a block a prefix sum over the windows' code counts gives each window's first index.

A code is decoded with the hierarchical tables ``luts[:-1]``: the entry for the next 8 bits is the exponent, or a
value >= 240 naming the table ``256 - value`` to be read with the following 8 bits (at most 4 levels).
``luts[-1][e]`` is the code length of exponent ``e``. The bf16 word is ``(s & 0x80) << 8 | e << 7 | (s & 0x7F)``
with ``s = sign_mantissa[i]``.

``df11_decode`` is the Triton kernel (one program = one block of 512 windows: decode to count, ``tl.cumsum``
seeded with ``output_positions[block]``, decode again and store). The counts depend on the bitstream only, so a
unit decoded again and again (kept compressed on the device, :mod:`bagel_rt.df11_resident`) counts once
(:func:`df11_window_counts`, one byte per 8-byte window) and every later decode skips the first pass: half of
the table lookups, bits unchanged. ``df11_decode_ref`` is a numpy reference with the same signature (it ignores
the counts), vectorised over windows.
"""

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["THREADS_PER_BLOCK", "BYTES_PER_THREAD", "BUFFER_NAMES", "df11_decode", "df11_decode_ref",
           "df11_window_counts", "df11_first_level"]

THREADS_PER_BLOCK = 512
#: warps of the decode kernel: one window per thread. With 8 (two windows per thread) Triton 3.6 stored the
#: output through a layout of one element per thread and converted pointers, values and masks into it through
#: shared memory on every decoded code; with 16 the loop is 62 sm_90 instructions per code with no barrier,
#: against 79 and 9 barriers (offline SASS, Triton 3.6 and 3.9). On the H200 (9c4a67a): 0.68 ms for an
#: 18944 x 3584 weight, 199 GB/s of bf16 output; DF11 t2i under 24 GiB 1.606x bf16 (c1fb778) vs 1.641x before
DECODE_WARPS = 16
BYTES_PER_THREAD = 8
BUFFER_NAMES = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps", "split_positions")


def _unpack(buffers: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    for name in BUFFER_NAMES[:5]:
        if name not in buffers:
            raise ValueError(f"DFloat11 unit: missing buffer {name!r}")
    luts, codes, sm = buffers["luts"], buffers["encoded_exponent"], buffers["sign_mantissa"]
    pos, gaps = buffers["output_positions"], buffers["gaps"]
    if luts.dtype != torch.uint8 or luts.ndim != 2 or luts.shape[1] != 256 or luts.shape[0] < 2:
        raise ValueError(f"DFloat11 unit: 'luts' must be uint8 [n_luts >= 2, 256], "
                         f"got {luts.dtype} {tuple(luts.shape)}")
    for name, t in (("encoded_exponent", codes), ("sign_mantissa", sm), ("output_positions", pos), ("gaps", gaps)):
        if t.dtype != torch.uint8 or t.ndim != 1:
            raise ValueError(f"DFloat11 unit: {name!r} must be a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    n_blocks = -(-codes.numel() // (THREADS_PER_BLOCK * BYTES_PER_THREAD))
    if pos.numel() != 4 * (n_blocks + 1):
        raise ValueError(f"DFloat11 unit: 'output_positions' must hold {n_blocks + 1} uint32 "
                         f"({4 * (n_blocks + 1)} bytes) for {codes.numel()} code bytes, got {pos.numel()} bytes")
    if gaps.numel() * 8 < 5 * n_blocks * THREADS_PER_BLOCK:
        raise ValueError(f"DFloat11 unit: 'gaps' must hold 5 bits for each of {n_blocks * THREADS_PER_BLOCK} "
                         f"windows, got {gaps.numel()} bytes")
    return luts, codes, sm, pos, gaps


def _check_out(out: Tensor, n: int) -> None:
    assert out.dtype in (torch.bfloat16, torch.int16), f"out must be bf16 (or its int16 view), got {out.dtype}"
    assert out.is_contiguous() and out.numel() == n, f"out must be contiguous with {n} elements"


# ----------------------------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------------------------


def _lut_decode_np(luts: np.ndarray, peek: np.ndarray) -> np.ndarray:
    """Exponents of the codes at the top of the 32-bit ``peek`` words (uint64 array)."""
    d = luts[0, (peek >> 24).astype(np.intp)].astype(np.intp)
    for level in (1, 2, 3):
        ptr = d >= 240
        if not ptr.any():
            break
        byte = ((peek[ptr] >> np.uint64(24 - 8 * level)) & np.uint64(0xFF)).astype(np.intp)
        d[ptr] = luts[256 - d[ptr], byte]
    return d


def _max_codes_per_window(luts: np.ndarray) -> int:
    lengths = luts[-1]
    min_len = int(lengths[lengths > 0].min()) if (lengths > 0).any() else 1
    return -(-64 // min_len)


def df11_decode_ref(buffers: dict[str, Tensor], out: Tensor) -> Tensor:
    """Reference decoder (numpy, on the CPU): writes the unit into ``out`` (bf16 or int16, [n]) and returns it."""
    luts_t, codes_t, sm_t, pos_t, gaps_t = _unpack(buffers)
    n = sm_t.numel()
    _check_out(out, n)
    luts = luts_t.cpu().numpy()
    codes, sm = codes_t.cpu().numpy(), sm_t.cpu().numpy()
    pos = pos_t.cpu().numpy().view(np.uint32).astype(np.int64)
    n_blocks = pos.size - 1
    n_threads = n_blocks * THREADS_PER_BLOCK
    gap_bits = np.unpackbits(gaps_t.cpu().numpy())[: 5 * n_threads].reshape(n_threads, 5)
    gaps = gap_bits.astype(np.int64) @ np.array([16, 8, 4, 2, 1], dtype=np.int64)
    buf = np.zeros(n_threads * BYTES_PER_THREAD + 4, dtype=np.uint8)
    buf[: codes.size] = codes
    max_iters = _max_codes_per_window(luts)
    exps = np.zeros(n, dtype=np.uint16)
    blocks_per_chunk = 64
    for b0 in range(0, n_blocks, blocks_per_chunk):
        b1 = min(b0 + blocks_per_chunk, n_blocks)
        t0, t1 = b0 * THREADS_PER_BLOCK, b1 * THREADS_PER_BLOCK
        # the window's 12 bytes as three big-endian 32-bit words
        idx = np.arange(t0, t1, dtype=np.int64)[:, None] * BYTES_PER_THREAD + np.arange(12)
        w = buf[idx].astype(np.uint64)
        w0, w1, w2 = ((w[:, 4 * i] << np.uint64(24)) | (w[:, 4 * i + 1] << np.uint64(16))
                      | (w[:, 4 * i + 2] << np.uint64(8)) | w[:, 4 * i + 3] for i in range(3))
        x_hi, x_lo = (w0 << np.uint64(32)) | w1, (w1 << np.uint64(32)) | w2
        p = gaps[t0:t1].copy()
        syms = np.zeros((max_iters, t1 - t0), dtype=np.int64)
        counts = np.zeros(t1 - t0, dtype=np.int64)
        in_data = np.zeros(t1 - t0, dtype=np.int64)  # codes that start before the end of the bitstream
        bit0 = np.arange(t0, t1, dtype=np.int64) * 64
        for k in range(max_iters):
            act = np.flatnonzero(p < 64)
            if act.size == 0:
                break
            pa = p[act]
            in_data[act] += bit0[act] + pa < 8 * codes.size
            sh_hi, sh_lo = np.minimum(pa, 31).astype(np.uint64), np.maximum(pa - 32, 0).astype(np.uint64)
            peek = np.where(pa < 32, (x_hi[act] << sh_hi) >> np.uint64(32), (x_lo[act] << sh_lo) >> np.uint64(32))
            d = _lut_decode_np(luts, peek)
            syms[k, act] = d
            counts[act] += 1
            p[act] += luts[-1, d]
        _check_stream(p, in_data, gaps, pos, b0, b1, n, codes.size)
        # first element index of each window: block offset + exclusive prefix sum inside the block
        c = counts.reshape(-1, THREADS_PER_BLOCK)
        start = (pos[b0:b1, None] + np.cumsum(c, axis=1) - c).reshape(-1)
        k = np.arange(max_iters)[:, None]
        o = start[None, :] + k
        m = (k < counts[None, :]) & (o < n)
        exps[o[m]] = syms[m]
    s = sm.astype(np.uint16)
    words = ((s & 0x80) << 8) | (exps << 7) | (s & 0x7F)
    out.view(torch.int16).copy_(torch.from_numpy(words.view(np.int16)))
    return out


def _check_stream(p: np.ndarray, in_data: np.ndarray, gaps: np.ndarray, pos: np.ndarray, b0: int, b1: int, n: int,
                  n_bytes: int) -> None:
    """What a sound bitstream satisfies, checked on blocks [b0, b1) as they are decoded (ValueError otherwise):
    each window's last code ends where the next window's gap says its first code starts, and each block holds
    the codes ``output_positions`` gives it (the last one up to 7 more: codes starting in the padding bits)."""
    nxt = np.arange(b0 * THREADS_PER_BLOCK, b1 * THREADS_PER_BLOCK) + 1
    # only where the next window holds a real code start (>= 32 bits before the padding): the encoder records
    # no gap for a window whose only start is the padding's
    inside = (nxt < gaps.size) & (nxt * BYTES_PER_THREAD + 5 <= n_bytes)
    bad = np.flatnonzero((p < 64) | (inside & (p - 64 != gaps[np.minimum(nxt, gaps.size - 1)])))
    if bad.size:
        w = int(nxt[bad[0]] - 1)
        raise ValueError(f"the bitstream does not decode consistently at window {w} (byte {w * BYTES_PER_THREAD} "
                         "of 'encoded_exponent'): damaged 'encoded_exponent', 'gaps' or 'luts'")
    got = in_data.reshape(-1, THREADS_PER_BLOCK).sum(axis=1)
    want = pos[b0 + 1: b1 + 1] - pos[b0:b1]
    last = b1 == pos.size - 1
    ok = got == want
    if last:
        ok[-1] = want[-1] <= got[-1] <= want[-1] + 7
    if not ok.all():
        b = b0 + int(np.flatnonzero(~ok)[0])
        raise ValueError(f"block {b} decodes {int(got[b - b0])} codes but 'output_positions' gives it "
                         f"{int(want[b - b0])}: damaged 'encoded_exponent' or 'output_positions'")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _later_levels(luts_ptr, b_peek, b_d):
    """The exponent of each code from its level-0 entry ``b_d``: entries >= 240 point to the next level's table,
    indexed by the code's next byte (codes of up to 32 bits: three more levels)."""
    for level in tl.static_range(1, 4):
        m_ptr = b_d >= 240
        b_byte = ((b_peek >> (24 - 8 * level)) & 0xFF).to(tl.int32)
        b_next = tl.load(luts_ptr + (256 - b_d) * 256 + b_byte, mask=m_ptr, other=0).to(tl.int32)
        b_d = tl.where(m_ptr, b_next, b_d)
    return b_d


@triton.jit
def _lut_decode(luts_ptr, b_peek, n_luts):
    """Exponent and code length of the code at the top of each 32-bit ``b_peek`` (uint64)."""
    b_d = _later_levels(luts_ptr, b_peek, tl.load(luts_ptr + (b_peek >> 24).to(tl.int32)).to(tl.int32))
    b_len = tl.load(luts_ptr + (n_luts - 1) * 256 + b_d).to(tl.int32)
    return b_d, b_len


@triton.jit
def _first_decode(first_ptr, luts_ptr, b_peek, n_luts):
    """:func:`_lut_decode` with the first level and the code length in one load from the combined table
    (:func:`df11_first_level`); codes of more than 8 bits (length field 0) continue through the next levels and
    the length table as before."""
    b_c = tl.load(first_ptr + (b_peek >> 24).to(tl.int32))
    b_d = _later_levels(luts_ptr, b_peek, b_c & 0xFF)
    m_long = b_c < 256  # length field 0: resolved past the first level
    b_len = tl.load(luts_ptr + (n_luts - 1) * 256 + b_d, mask=m_long, other=0).to(tl.int32)
    return b_d, tl.where(m_long, b_len, b_c >> 8)


@triton.jit
def _peek32(b_hi, b_lo, b_p):
    """Bits [p, p + 32) of the window (p in [0, 64)), from its words 0-1 (b_hi) and 1-2 (b_lo)."""
    sh_hi = tl.minimum(b_p, 31).to(tl.uint64)
    sh_lo = tl.maximum(b_p - 32, 0).to(tl.uint64)
    return tl.where(b_p < 32, (b_hi << sh_hi) >> 32, (b_lo << sh_lo) >> 32)


@triton.jit
def _window(codes_ptr, gaps_ptr, i_b, n_bytes, n_gap_bytes, THREADS: tl.constexpr, BYTES: tl.constexpr):
    """Block ``i_b``'s windows: the bits as two uint64 views (b_hi: words 0-1, b_lo: words 1-2 of the window's
    8 bytes and 4 look-ahead bytes, big-endian) and each window's first code's bit (its 5-bit gap)."""
    o_t = i_b * THREADS + tl.arange(0, THREADS)  # global window index
    o_byte = o_t * BYTES
    b_w0 = tl.zeros([THREADS], dtype=tl.uint64)
    b_w1 = tl.zeros([THREADS], dtype=tl.uint64)
    b_w2 = tl.zeros([THREADS], dtype=tl.uint64)
    for j in tl.static_range(4):
        o0, o1, o2 = o_byte + j, o_byte + 4 + j, o_byte + 8 + j
        b_w0 = (b_w0 << 8) | tl.load(codes_ptr + o0, mask=o0 < n_bytes, other=0).to(tl.uint64)
        b_w1 = (b_w1 << 8) | tl.load(codes_ptr + o1, mask=o1 < n_bytes, other=0).to(tl.uint64)
        b_w2 = (b_w2 << 8) | tl.load(codes_ptr + o2, mask=o2 < n_bytes, other=0).to(tl.uint64)
    b_hi = (b_w0 << 32) | b_w1
    b_lo = (b_w1 << 32) | b_w2
    # 5-bit gap of each window, MSB-first
    o_gbit = o_t * 5
    b_g0 = tl.load(gaps_ptr + o_gbit // 8).to(tl.int32)
    b_g1 = tl.load(gaps_ptr + o_gbit // 8 + 1, mask=o_gbit // 8 + 1 < n_gap_bytes, other=0).to(tl.int32)
    b_gap = (((b_g0 << 8) | b_g1) >> (11 - o_gbit % 8)) & 31
    return b_hi, b_lo, b_gap


@triton.jit
def _count(luts_ptr, b_hi, b_lo, b_gap, n_luts, THREADS: tl.constexpr):
    """[THREADS] the number of codes that start in each window (decoding them: phase 1)."""
    b_p = b_gap
    b_cnt = tl.zeros([THREADS], dtype=tl.int32)
    m_act = b_p < 64
    while tl.max(m_act.to(tl.int32), axis=0) > 0:
        b_d, b_len = _lut_decode(luts_ptr, _peek32(b_hi, b_lo, b_p), n_luts)
        b_p = tl.where(m_act, b_p + b_len, b_p)
        b_cnt += m_act.to(tl.int32)
        m_act = b_p < 64
    return b_cnt


@triton.jit
def _df11_count_kernel(luts_ptr, codes_ptr, gaps_ptr, cnt_ptr, n_luts, n_bytes, n_gap_bytes,
                       THREADS: tl.constexpr, BYTES: tl.constexpr):
    i_b = tl.program_id(0)
    b_hi, b_lo, b_gap = _window(codes_ptr, gaps_ptr, i_b, n_bytes, n_gap_bytes, THREADS, BYTES)
    # at most 64 codes start in a 64-bit window (codes are >= 1 bit): a byte each
    b_cnt = _count(luts_ptr, b_hi, b_lo, b_gap, n_luts, THREADS)
    tl.store(cnt_ptr + i_b * THREADS + tl.arange(0, THREADS), b_cnt.to(tl.uint8))


@triton.jit
def _df11_decode_kernel(luts_ptr, codes_ptr, sm_ptr, pos_ptr, gaps_ptr, cnt_ptr, first_ptr, out_ptr, n_luts,
                        n_bytes, n_elements, n_gap_bytes, HAS_COUNTS: tl.constexpr, HAS_FIRST: tl.constexpr,
                        THREADS: tl.constexpr, BYTES: tl.constexpr, WIDE: tl.constexpr = False):
    i_b = tl.program_id(0)
    b_hi, b_lo, b_gap = _window(codes_ptr, gaps_ptr, i_b, n_bytes, n_gap_bytes, THREADS, BYTES)
    # phase 1, the codes that start in each window: counted once when the unit was loaded, or now
    if HAS_COUNTS:
        b_cnt = tl.load(cnt_ptr + i_b * THREADS + tl.arange(0, THREADS)).to(tl.int32)
    else:
        b_cnt = _count(luts_ptr, b_hi, b_lo, b_gap, n_luts, THREADS)

    # block prefix sum, seeded with the block's first output index
    b_start = tl.load(pos_ptr + i_b) + tl.cumsum(b_cnt, axis=0) - b_cnt
    b_end = tl.minimum(b_start + b_cnt, n_elements)

    # phase 2: decode again and write bf16 words (int16 view). The block's longest window sets the trip count,
    # found with one reduction: a loop that asked the block "anyone left?" on every code paid a block-wide
    # reduction (barriers and shared memory: 9 of the loop's 158 sm_90 instructions were BAR, Triton 3.6) per
    # decoded code
    b_p = b_gap
    b_i = b_start
    n_iter = tl.max(b_end - b_start, axis=0)
    # WIDE: the 4-element groups of the output that lie inside a thread's range are read (sign/mantissa, one
    # 32-bit word) and written (bf16, one 64-bit word) once per group, not once per element: a thread's
    # elements are contiguous but a warp's 32 threads are ~24 elements apart, so every per-element access of
    # the warp touches 32 separate sectors
    b_acc = tl.zeros([THREADS], dtype=tl.int64)  # the current group's words, packed
    b_sw = tl.zeros([THREADS], dtype=tl.int32)  # the current group's sign/mantissa bytes
    for _ in range(0, n_iter):
        m_act = b_i < b_end
        if HAS_FIRST:  # one table load on the loop-carried chain for codes of up to 8 bits, not two
            b_d, b_len = _first_decode(first_ptr, luts_ptr, _peek32(b_hi, b_lo, b_p), n_luts)
        else:
            b_d, b_len = _lut_decode(luts_ptr, _peek32(b_hi, b_lo, b_p), n_luts)
        if WIDE:
            lane = b_i & 3
            g = b_i - lane  # the element's group
            whole = g + 3 < n_elements  # the group's sign/mantissa word lies inside the buffer
            m_new = m_act & whole & ((lane == 0) | (b_i == b_start))
            b_sw = tl.where(m_new, tl.load(sm_ptr.to(tl.pointer_type(tl.int32)) + (g >> 2), mask=m_new, other=0),
                            b_sw)
            b_s = tl.where(whole, (b_sw >> (8 * lane)) & 0xFF,
                           tl.load(sm_ptr + b_i, mask=m_act & ~whole, other=0).to(tl.int32))
        else:
            b_s = tl.load(sm_ptr + b_i, mask=m_act, other=0).to(tl.int32)
        b_word = ((b_s & 0x7F) | (b_d << 7)) - ((b_s & 0x80) << 8)  # signed 16-bit value of the bf16 word
        if WIDE:
            inside = (g >= b_start) & (g + 3 < b_end)  # the whole group is this thread's: one 64-bit store
            b_acc = tl.where(lane == 0, 0, b_acc) | ((b_word & 0xFFFF).to(tl.int64) << (16 * lane).to(tl.int64))
            tl.store(out_ptr.to(tl.pointer_type(tl.int64)) + (g >> 2), b_acc, mask=m_act & inside & (lane == 3))
            tl.store(out_ptr + b_i, b_word.to(tl.int16), mask=m_act & ~inside)
        else:
            tl.store(out_ptr + b_i, b_word.to(tl.int16), mask=m_act)
        b_p = tl.where(m_act, b_p + b_len, b_p)
        b_i += m_act.to(tl.int32)


def df11_window_counts(buffers: dict[str, Tensor]) -> Tensor:
    """The number of codes that start in each window of the unit (uint8 [blocks * THREADS_PER_BLOCK], on the
    buffers' device): phase 1 of :func:`df11_decode`, done once. Kept as ``buffers["window_counts"]``, it lets
    every later decode skip that phase (half of the table lookups) for one byte per 8 code bytes."""
    luts, codes, sm, pos, gaps = _unpack(buffers)
    n_blocks = pos.numel() // 4 - 1
    counts = torch.empty(n_blocks * THREADS_PER_BLOCK, dtype=torch.uint8, device=codes.device)
    if n_blocks:
        _df11_count_kernel[(n_blocks,)](luts, codes, gaps, counts, luts.shape[0], codes.numel(), gaps.numel(),
                                        THREADS=THREADS_PER_BLOCK, BYTES=BYTES_PER_THREAD, num_warps=8)
    return counts


def df11_first_level(buffers: dict[str, Tensor]) -> Tensor:
    """The unit's first lookup level and code lengths as one table: int32 [256] on the buffers' device, entry
    ``b`` = exponent | length << 8 for the code whose first byte is ``b`` when it is at most 8 bits long, else the
    level-0 entry alone (length field 0: the next levels resolve it).

    Kept as ``buffers["first_level"]``, it takes the length lookup off the decode loop's critical path: each
    code's position depends on the previous code's length, and that chain was two dependent table loads per code
    (level 0, then the length table) for the common short codes."""
    luts = _unpack(buffers)[0]
    d = luts[0].to(torch.int32)
    short = d < 240
    length = luts[-1].to(torch.int32)[torch.where(short, d, 0)]
    return torch.where(short, d | (length << 8), d).contiguous()


#: group the decode's sign/mantissa reads and bf16 writes four elements at a time (``_df11_decode_kernel``'s
#: WIDE) where the buffers are aligned for it. Not yet measured on a GPU: off until it is
WIDE_ACCESS = False


def df11_decode(buffers: dict[str, Tensor], out: Tensor, wide: bool | None = None) -> Tensor:
    """Decodes the unit ``buffers`` (all on one CUDA device) into ``out`` (bf16 or int16, [n]); returns ``out``.
    With ``buffers["window_counts"]`` (:func:`df11_window_counts`) the counting phase is skipped; with
    ``buffers["first_level"]`` (:func:`df11_first_level`) each short code costs one table load, not two.
    ``wide``: four-element reads and writes (None: :data:`WIDE_ACCESS`; used only where ``out`` is 8-byte and
    the sign/mantissa buffer 4-byte aligned)."""
    luts, codes, sm, pos, gaps = _unpack(buffers)
    n = sm.numel()
    _check_out(out, n)
    assert n < 2**31, "units of 2**31 or more elements are not supported"
    assert all(t.device == out.device and t.is_contiguous() for t in (luts, codes, sm, pos, gaps))
    n_blocks = pos.numel() // 4 - 1
    if n == 0:
        return out
    counts, first = buffers.get("window_counts"), buffers.get("first_level")
    if counts is not None:
        assert counts.dtype == torch.uint8 and counts.numel() == n_blocks * THREADS_PER_BLOCK, "window_counts"
    if first is not None:
        assert first.dtype == torch.int32 and first.shape == (256,) and first.device == out.device, "first_level"
    _df11_decode_kernel[(n_blocks,)](luts, codes, sm, pos.view(torch.int32), gaps,
                                     counts if counts is not None else sm, first if first is not None else sm,
                                     out.view(torch.int16), luts.shape[0], codes.numel(), n, gaps.numel(),
                                     HAS_COUNTS=counts is not None, HAS_FIRST=first is not None,
                                     THREADS=THREADS_PER_BLOCK, BYTES=BYTES_PER_THREAD, num_warps=DECODE_WARPS,
                                     WIDE=bool(WIDE_ACCESS if wide is None else wide) and out.data_ptr() % 8 == 0
                                     and sm.data_ptr() % 4 == 0)
    return out
