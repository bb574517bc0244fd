"""One request's step-cache state: a counter per branch, what ran, and the report for ``Result.info``."""

from __future__ import annotations

from torch import Tensor

from .schedule import BRANCHES, BranchCounter, Evaluation
from .settings import StepCacheSettings


class StepCache:
    """Create one per request (a new object starts every branch at its first evaluation).

    Attributes:
        settings: the :class:`StepCacheSettings`.
        counters: {branch: :class:`BranchCounter`} of the branches evaluated so far.
        derivatives: {branch: [orders] x [N, H]} (torch backend; the packed denoiser keeps its own buffers).
        stands_for: {"cond", "text", "img"}: the letters of the velocities the CFG combination used, step by
            step; a deduplicated branch gets the letters of the branch that supplied it.
        full_evaluations: full forwards actually run (deduplicated branches run none).
    """

    def __init__(self, settings: StepCacheSettings):
        self.settings = settings
        self.counters: dict[str, BranchCounter] = {}
        self.derivatives: dict[str, list[Tensor]] = {}
        self.stands_for = dict.fromkeys(BRANCHES, "")
        self.full_evaluations = 0

    def evaluation(self, branch: str) -> Evaluation:
        """Advance ``branch``'s counter: what its next evaluation is."""
        counter = self.counters.setdefault(branch, BranchCounter(self.settings))
        ev = counter.next()
        self.full_evaluations += ev.full
        return ev

    def record_step(self, sources: dict[str, str]) -> None:
        """After a step: ``sources`` maps each velocity the combination used to the branch that supplied it
        (:func:`bagel_rt.sampler.velocity_sources`)."""
        for needed, branch in sources.items():
            self.stands_for[needed] += self.counters[branch].letters[-1]

    def report(self) -> dict:
        """``Result.info["step_cache"]``: the method, the settings, each branch's schedule, the number of full
        forwards run, and that number per branch actually computed (``full_by_branch``)."""
        return {"method": self.settings.method, "settings": self.settings.as_dict(),
                "schedule": dict(self.stands_for), "full_evaluations": self.full_evaluations,
                "full_by_branch": {b: c.letters.count("F") for b, c in self.counters.items()}}
