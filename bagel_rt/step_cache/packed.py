"""The derivative store of the triton backend's packed denoiser: every branch's derivatives in one buffer.

A Taylor evaluation reads only this buffer and a small table of distance powers, so it can be captured once
per set of branches as a CUDA graph (see :meth:`bagel_rt.fast.PackedDenoiser.taylor_velocities`). Orders a
branch does not hold yet stay zero and add exact zeros, so one graph serves every order count.

The buffer belongs to the denoiser (which is reused across requests of the same shapes) and is zeroed at the
start of every request; the counters that decide what each evaluation is live in the request's own
:class:`bagel_rt.step_cache.StepCache`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedule import Evaluation
from .taylor import taylor_series, update_derivatives


class PackedDerivatives:
    """Derivatives [branches, orders, rows, hidden] of the final hidden state, in the hidden state's dtype.

    Args:
        branches: arena branches; orders: ``max_order + 1``; hidden: model width.
        rows: latent tokens of every branch, or a list of each branch's (a batch of images of several sizes:
            branch b uses the first ``rows[b]`` rows of its slot).
        max_distance: the largest Taylor distance (``fresh_threshold - 1``).
    """

    def __init__(self, branches: int, orders: int, rows: int | list[int], hidden: int, max_distance: int,
                 device: torch.device, dtype: torch.dtype):
        self.orders = orders
        self.rows = [rows] * branches if isinstance(rows, int) else list(rows)
        self.d = torch.zeros(branches, orders, max(self.rows), hidden, device=device, dtype=dtype)
        # powers[k, i] = k**i (exact in fp32 for these small integers); pow_in[b] = the row of b's distance
        self.powers = torch.tensor([[float(k ** i) for i in range(orders)] for k in range(max_distance + 1)],
                                   device=device)
        self.pow_in = torch.zeros(branches, orders, device=device)

    def fits(self, orders: int, max_distance: int) -> bool:
        return orders == self.orders and max_distance < self.powers.shape[0]

    def reset(self) -> None:
        """A new request: no branch holds anything."""
        self.d.zero_()

    def update(self, b: int, feature: Tensor, ev: Evaluation) -> None:
        """After branch ``b``'s full evaluation ``ev`` with hidden state ``feature`` [rows, hidden]."""
        n = self.rows[b]
        new = update_derivatives(list(self.d[b, : ev.orders - 1, :n]), feature, ev)
        for i, t in enumerate(new):
            self.d[b, i, :n].copy_(t)

    def set_distance(self, b: int, distance: int) -> None:
        """Branch ``b``'s next Taylor evaluation is at ``distance`` (a device-side copy: no host sync)."""
        self.pow_in[b].copy_(self.powers[distance])

    def series(self, sel: tuple[int, ...]) -> Tensor:
        """The predicted hidden states [sum of rows[b], hidden] of the branches ``sel``, packed in order
        (capturable)."""
        return torch.cat([taylor_series(list(self.d[b, :, : self.rows[b]]), list(self.pow_in[b])) for b in sel])
