"""Step caching: run fewer full denoiser forwards and predict the others (TaylorSeer, and FORA as its order 0).

Layering (each layer imports only the ones above it):

* :mod:`.settings` — :class:`StepCacheSettings` (the official TaylorSeer values as defaults).
* :mod:`.schedule` — the per-branch counters that decide, evaluation by evaluation, between a full forward
  ("F") and a Taylor prediction ("T"), exactly as the official code does; and which exact-dedup shortcuts
  remain exact under step caching.
* :mod:`.taylor` — the finite-difference derivative update and the Taylor series, with the official
  arithmetic (the hidden state's dtype, the same operations in the same order).
* :mod:`.state` — :class:`StepCache`, one request's state (a counter per branch, what ran, the report).
  A new one is created for every request: nothing is carried from one request to the next.
* :mod:`.velocity` — the torch backend's cached velocity function (per-branch derivative lists).
* :mod:`.packed` — the triton backend's derivative store for the packed denoiser (one buffer for all
  branches, a Taylor evaluation that CUDA graphs can capture).

What is cached: only the final hidden state (the last decoder layer's output on the latent rows, before the
final norm). The official code caches every layer's output, but on a Taylor step each layer ignores its input,
so only the last layer's prediction reaches the velocity.
"""

from .schedule import BranchCounter, Evaluation, exact_dedup, plan_schedules
from .settings import StepCacheSettings
from .state import StepCache

__all__ = ["StepCacheSettings", "StepCache", "BranchCounter", "Evaluation", "plan_schedules", "exact_dedup"]
