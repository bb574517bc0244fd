"""Small device helpers shared by the kernel launchers.

Nothing here runs at import time: every question is asked when a launcher calls it, so importing
``bagel_rt.kernels`` on a CPU-only machine never touches a driver.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import triton
import triton.language as tl


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must be set before the kernel modules are imported; reading it again at launch time is
    consistent with that as long as nobody changes it in between.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def cuda_capability(device: torch.device | int | None = None) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device, or None without CUDA (or while interpreting)."""
    if is_interpreting() or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def has_capability(major: int, minor: int = 0, device: torch.device | int | None = None) -> bool:
    """True when the CUDA device is at least compute capability ``major.minor`` (9.0 = Hopper)."""
    cap = cuda_capability(device)
    return cap is not None and cap >= (major, minor)


def warm_triton_cache_key() -> threading.Thread | None:
    """Start computing Triton's per-process cache key in a background thread; returns the thread (None when
    this Triton has no such key to warm).

    Triton hashes its own installation (the compiler's sources and the ~0.5 GB ``libtriton``) the first time
    a process looks a kernel up in its disk cache: 0.36-0.38 s of a fresh process's first request on the
    H200 host (``benchmarks/diagnose.py --only-first-request``). The loader starts this while the weights
    stream in, and the hashing (which releases the GIL) overlaps the copy. The key is memoised by Triton;
    should a kernel need it before the thread is done, Triton computes the same value again.
    """
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # another Triton layout: nothing to warm
        return None
    if not hasattr(triton_key, "cache_info"):  # not memoised: warming would not help
        return None
    thread = threading.Thread(target=triton_key, name="bagel-rt-triton-key", daemon=True)
    thread.start()
    return thread


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int | None:
    """Number of streaming multiprocessors of a CUDA device (cached), None for CPU / interpreter."""
    if is_interpreting() or device.type != "cuda":
        return None
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pdl_kwargs(pdl: bool, device: torch.device) -> dict:
    """Launch keywords for programmatic dependent launch (PDL, Hopper and newer).

    A kernel launched with PDL may start while the previous kernel on the stream is still finishing; it
    must call ``griddepcontrol.wait`` (``USE_GDC``) before it touches anything an earlier kernel writes or
    reads. Kernels taking ``USE_GDC`` do that wait first (the GEMVs first request a weight tile, which no
    kernel writes) and then let their own successor launch. Off (``USE_GDC=False``, normal launch) when not
    asked for, in the interpreter, without CUDA or before compute capability 9.0.
    """
    on = pdl and device.type == "cuda" and has_capability(9, 0, device)
    return dict(USE_GDC=True, launch_pdl=True) if on else dict(USE_GDC=False)


@triton.jit
def gdc_wait(USE_GDC: tl.constexpr):
    """In a kernel launched with :func:`pdl_kwargs`: wait for the previous kernel's writes, then let the next
    kernel launch (nothing without ``USE_GDC``). Call it before the first read or write of activations."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


class Switch:
    """An on/off option that kernel launchers read when they launch (an A/B experiment): ``default`` unless a
    block sets it with :meth:`on` (``on(False)`` turns a default-on option off for the A/B's other side)."""

    def __init__(self, default: bool = False) -> None:
        self.value = default

    @contextlib.contextmanager
    def on(self, value: bool = True):
        """Within the block, the switch is ``value``."""
        old, self.value = self.value, value
        try:
            yield
        finally:
            self.value = old


#: An A/B experiment of the decode GEMVs (``bagel_rt.fast_decode`` "triton-prefetch"; on top of the packed-product
#: decodes it made the decode slower: H100, 09db864 and 1ff1e2e, see fast_decode.GEMVS; bf16 alone not measured):
#: before a GEMV program waits for the previous kernel (PDL), it asks L2 for every weight line it will stream
#: (:func:`l2_prefetch`), not only its first tile, so that the DRAM keeps busy through the short kernels between
#: the GEMVs (norms, RoPE, attention; ~0.3 ms of a ~3.9 ms bf16 token on the H200). Read at launch by
#: :func:`prefetch_kwargs`; set with :func:`l2_prefetch_on`.
_L2_PREFETCH = Switch()
#: within the block, GEMV launches with PDL also prefetch their weights into L2 (see ``_L2_PREFETCH``)
l2_prefetch_on = _L2_PREFETCH.on


def prefetch_kwargs(pdl: bool, device: torch.device) -> dict:
    """:func:`pdl_kwargs` plus ``PREFETCH`` for the GEMV kernels that take it (on only with PDL, on CUDA, inside
    :func:`l2_prefetch_on`; the interpreter has no inline assembly)."""
    kw = pdl_kwargs(pdl, device)
    return dict(kw, PREFETCH=kw["USE_GDC"] and _L2_PREFETCH.value)


@triton.jit
def l2_prefetch(p_rows, m_rows, lo, hi, ON: tl.constexpr):
    """Ask L2 for elements [lo, hi) of each row starting at ``p_rows`` [R] (pointers; rows where ``m_rows`` is
    False are skipped): one ``prefetch.global.L2`` per 128-byte line, spread over the program's threads. Only
    for read-only buffers (weights), before ``gdc_wait``; nothing without ``ON``."""
    if ON:
        ES: tl.constexpr = p_rows.dtype.element_ty.primitive_bitwidth // 8
        LINES: tl.constexpr = 32
        a_rows = p_rows.to(tl.int64)
        # masked rows prefetch the first row again (addresses past a buffer are never formed)
        a_rows = tl.where(m_rows, a_rows, tl.min(a_rows, axis=0))
        b_lo = lo * ES  # byte offsets within a row (int32: a row is < 2 GB)
        b_hi = hi * ES
        o_l = tl.arange(0, LINES).to(tl.int64) * 128
        for c0 in range(b_lo, b_hi, LINES * 128):
            off = tl.where(c0 + o_l < b_hi, c0 + o_l, b_lo)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [a_rows[:, None] + off[None, :]], dtype=tl.int32, is_pure=False, pack=1)
