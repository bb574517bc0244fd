"""The torch backend's cached velocity: a ``velocity(branch, x, t)`` for :func:`bagel_rt.sampler.denoise`."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .state import StepCache
from .taylor import taylor_series, update_derivatives


def cached_velocity(cache: StepCache, hidden: Callable[[str, Tensor, float], Tensor],
                    head: Callable[[Tensor], Tensor]) -> Callable[[str, Tensor, float], Tensor]:
    """A velocity function that runs ``hidden(branch, x, t)`` (the last layer's output [N, H]) on a branch's
    full evaluations and predicts it from that branch's derivatives on the others; ``head`` maps the hidden
    state to the velocity [N, 64] (final norm, ``llm2vae``) either way."""

    def velocity(branch: str, x: Tensor, t: float) -> Tensor:
        ev = cache.evaluation(branch)
        if ev.full:
            h = hidden(branch, x, t)
            cache.derivatives[branch] = update_derivatives(cache.derivatives.get(branch, []), h, ev)
        else:
            d = cache.derivatives[branch]
            h = taylor_series(d, [ev.distance ** i for i in range(len(d))])
        return head(h)

    return velocity
