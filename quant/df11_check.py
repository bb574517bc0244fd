"""Structural checks of one DFloat11 unit, run once when it is loaded, before it is decoded.

A damaged unit must be an error, not wrong weights or a decoder that never stops. What the layout promises
(docs/weight-formats.md section 3, ``quant.df11_decode``) and is checked here, on the small buffers only:

* the decode tables: every pointer entry (>= 240) names a sub-table that exists, at most 3 pointers deep, each
  table reached at one depth only; every symbol entry has a code length that fits the depth it sits at
  (8 * depth + 1 ... 8 * depth + 8 bits). So each decode step advances by 1-32 bits and every lookup is in range.
* the bitstream length agrees with the element count and the code lengths (no halved or padded stream);
* ``output_positions`` starts at 0, never decreases, ends at the element count, and no block holds more codes
  than its bits allow; ``gaps`` has one 5-bit field per window.

What needs the bitstream itself (every window's codes hand over to the next window's gap; each block decodes
exactly the codes ``output_positions`` gives it) is checked by the reference decoder as it decodes
(``quant.df11_decode.df11_decode_ref``).
"""

import numpy as np
from torch import Tensor

from .df11_decode import BYTES_PER_THREAD, THREADS_PER_BLOCK, _unpack
from .dfloat11 import FIRST_POINTER

__all__ = ["check_unit", "MAX_LUTS"]

MAX_DEPTH = 3  # the decoders follow at most three pointers (four table levels)
MAX_LUTS = 256 - FIRST_POINTER + 2  # the root, 16 sub-tables and the code-length row
_BLOCK_BITS = 8 * THREADS_PER_BLOCK * BYTES_PER_THREAD


def _table_depths(luts: np.ndarray) -> np.ndarray:
    """Depth of each decode table reachable from the root (-1: unreachable); ValueError on a bad pointer."""
    n_tables = luts.shape[0] - 1
    depth = np.full(n_tables, -1, dtype=np.int64)
    depth[0] = 0
    frontier = [0]
    while frontier:
        row = frontier.pop()
        for target in np.unique(256 - luts[row][luts[row] >= FIRST_POINTER].astype(np.int64)):
            if not 1 <= target < n_tables:
                raise ValueError(f"'luts' row {row} points to table {target}, but there are {n_tables} tables")
            if depth[row] + 1 > MAX_DEPTH:
                raise ValueError(f"'luts' row {row} points deeper than {MAX_DEPTH} levels")
            if depth[target] == -1:
                depth[target] = depth[row] + 1
                frontier.append(int(target))
            elif depth[target] != depth[row] + 1:
                raise ValueError(f"'luts' table {target} is reached at two depths (a cycle or shared sub-table)")
    return depth


def check_unit(buffers: dict[str, Tensor]) -> None:
    """Raise ValueError naming the buffer when the unit's structure is inconsistent (see the module docstring).
    Reads only the small buffers (luts, positions) and the sizes of the others."""
    _unpack(buffers)  # dtypes, ranks and the sizes the block count implies
    luts = buffers["luts"].cpu().numpy()
    n = buffers["sign_mantissa"].numel()
    n_bytes = buffers["encoded_exponent"].numel()
    if not 2 <= luts.shape[0] <= MAX_LUTS:
        raise ValueError(f"'luts' has {luts.shape[0]} rows, expected 2 to {MAX_LUTS}")
    lengths = luts[-1].astype(np.int64)
    depth = _table_depths(luts)
    used = np.zeros(256, dtype=bool)
    for row in np.flatnonzero(depth >= 0):
        syms = luts[row][luts[row] < FIRST_POINTER].astype(np.int64)
        lo, hi = 8 * depth[row] + 1, 8 * depth[row] + 8
        bad = syms[(lengths[syms] < lo) | (lengths[syms] > hi)]
        if bad.size:
            raise ValueError(f"'luts' row {row} (depth {depth[row]}) decodes exponent {bad[0]} whose code length "
                             f"{lengths[bad[0]]} is not in [{lo}, {hi}] (last row = code lengths)")
        used[syms] = True
    if n == 0:
        raise ValueError("the unit holds no elements")
    min_len, max_len = int(lengths[used].min()), int(lengths[used].max())
    if not n * min_len <= 8 * n_bytes <= n * max_len + 8:
        raise ValueError(f"'encoded_exponent' has {n_bytes} bytes, but {n} codes of {min_len} to {max_len} bits "
                         f"need {-(-n * min_len // 8)} to {-(-n * max_len // 8)}")
    pos = buffers["output_positions"].cpu().numpy().view(np.uint32).astype(np.int64)
    if pos[0] != 0 or pos[-1] != n or (np.diff(pos) < 0).any() or (np.diff(pos) > _BLOCK_BITS // min_len).any():
        raise ValueError(f"'output_positions' must rise from 0 to the element count {n} by at most "
                         f"{_BLOCK_BITS // min_len} per block; got {_summary(pos)}")
    n_windows = (pos.size - 1) * THREADS_PER_BLOCK
    need = -(-5 * n_windows // 8)
    if not need <= buffers["gaps"].numel() <= need + 8:
        raise ValueError(f"'gaps' has {buffers['gaps'].numel()} bytes, expected {need} (5 bits for each of "
                         f"{n_windows} windows)")


def _summary(pos: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in pos[:4])
    return f"[{shown}{', ...' if pos.size > 5 else ''}{', ' + str(int(pos[-1])) if pos.size > 4 else ''}]"
