"""The finite-difference derivatives of a cached hidden state and its Taylor series, with the official arithmetic.

The official code keeps its derivatives in the hidden state's own dtype (bf16 under its autocast: the decoder
layers' outputs are bf16) and computes in that dtype with Python scalars:

* after a full evaluation: ``d0' = feature``, ``d(i+1)' = (di' - di) / distance`` for the orders it keeps;
* a Taylor evaluation: ``sum_i ((1 / i!) * di) * distance**i``, accumulated term by term, left to right.

These functions do the same operations in the same order, so in bf16 they round where the official rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from .schedule import Evaluation


def update_derivatives(old: list[Tensor], feature: Tensor, ev: Evaluation) -> list[Tensor]:
    """The derivatives [orders] x [N, H] after a full evaluation ``ev`` whose hidden state is ``feature``
    [N, H]; ``old`` are the derivatives before it (at least ``ev.orders - 1`` of them)."""
    new = [feature]
    for i in range(ev.orders - 1):
        new.append((new[i] - old[i]) / ev.distance)
    return new


def taylor_series(derivatives: list[Tensor], powers: Sequence) -> Tensor:
    """The predicted hidden state [N, H] at distance k past the last full evaluation.

    ``powers[i]`` is k**i: Python ints (the official's scalars), or 0-dim fp32 tensors holding them (a
    captured graph reads the distance from a buffer); a 0-dim tensor does not promote the derivatives' dtype
    and multiplies in fp32 like a scalar, so both round alike. Zero derivatives (unused orders of a packed
    buffer) add exact zeros."""
    out = None
    for i, d in enumerate(derivatives):
        term = (1 / math.factorial(i)) * d * powers[i]
        out = term if out is None else out + term
    return out
