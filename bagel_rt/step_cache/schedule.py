"""Which evaluations of a branch run the full forward: the official TaylorSeer counters, per branch.

The official code (``cal_type`` in ``modeling/cache_utils/taylorseer.py``) keeps, for each CFG branch, its own
evaluation counter ``step`` (that branch's evaluations, not the sampler's steps), a ``cache_counter`` and the
list of full steps. An evaluation is full while ``step < first_enhance``, and afterwards whenever the counter
has reached ``fresh_threshold - 1``; otherwise it is a Taylor prediction at distance ``step - last full step``.
The derivative orders grow by one per full evaluation once ``step > first_enhance - 2`` (before that only the
value itself is kept), up to ``max_order``.

Consequence for exact dedup (DESIGN §3): a branch whose context equals the conditional one gives the same
velocities only while it was evaluated on the same steps as the conditional branch. Branches are evaluated on
a contiguous range of steps (the CFG interval), and the conditional one on all of them, so the shortcut stays
exact iff the branch is evaluated from step 0 on (then its i-th evaluation is the conditional one's i-th).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..sampler import CFGSettings, schedule
from .settings import StepCacheSettings

BRANCHES = ("cond", "text", "img")


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of one branch.

    Attributes:
        full: a full forward (True) or a Taylor prediction (False).
        distance: evaluations since the previous full one (full: the divisor of the finite differences;
            Taylor: where the series is evaluated).
        orders: derivative tensors (orders 0 .. orders-1) held after this evaluation (full) / used by it (Taylor).
    """

    full: bool
    distance: int
    orders: int

    @property
    def letter(self) -> str:
        return "F" if self.full else "T"


class BranchCounter:
    """The official per-branch counters. Call :meth:`next` once per evaluation of the branch."""

    def __init__(self, settings: StepCacheSettings):
        self.settings = settings
        self.step = 0  # this branch's evaluations so far
        self.counter = 0  # Taylor evaluations since the last full one
        self.last_full = 0  # the official ``activated_steps[-1]`` (it starts as [0])
        self.orders = 0
        self.letters = ""

    def next(self) -> Evaluation:
        s = self.settings
        if self.step < s.first_enhance or self.counter == s.fresh_threshold - 1:
            distance = self.step - self.last_full
            # a new difference needs the previous order and the warm-up rule; the value itself is always kept
            grow = self.step > s.first_enhance - 2
            self.orders = 1 + min(self.orders, s.max_order) if grow else 1
            self.counter, self.last_full = 0, self.step
            ev = Evaluation(True, distance, self.orders)
        else:
            self.counter += 1
            ev = Evaluation(False, self.step - self.last_full, self.orders)
        self.step += 1
        self.letters += ev.letter
        return ev


def needed_branches(cfg: CFGSettings, t: float) -> tuple[str, ...]:
    """The branches whose velocity the CFG combination needs at time t (before any dedup)."""
    st, si = cfg.scales_at(t)
    if st <= 1.0:
        return ("cond",)
    return ("cond", "text", "img") if si > 1.0 else ("cond", "text")


def plan_schedules(cfg: CFGSettings, num_timesteps: int, timestep_shift: float,
                   settings: StepCacheSettings) -> dict[str, str]:
    """The letters ("F"/"T") of every evaluation of each branch, in order ("" for a branch never needed): what
    the official code runs for these settings (its ``official_schedule`` in the golden data)."""
    counters = {b: BranchCounter(settings) for b in BRANCHES}
    for t in schedule(num_timesteps, timestep_shift)[:-1].tolist():
        for b in needed_branches(cfg, t):
            counters[b].next()
    return {b: c.letters for b, c in counters.items()}


def exact_dedup(cfg: CFGSettings, num_timesteps: int, timestep_shift: float, text_is_cond: bool,
                img_is_cond: bool) -> dict[str, bool]:
    """The exact-dedup flags that stay exact under step caching: a branch may reuse the conditional velocity
    only if it is needed from the first step on (see the module docstring)."""
    first = needed_branches(cfg, float(schedule(num_timesteps, timestep_shift)[0]))
    return dict(text_is_cond=text_is_cond and "text" in first, img_is_cond=img_is_cond and "img" in first)
