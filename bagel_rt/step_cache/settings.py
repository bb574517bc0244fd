"""The step-cache settings, with the official TaylorSeer values as defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError


@dataclass(frozen=True)
class StepCacheSettings:
    """How often a branch runs its full forward and how far its cached derivatives go.

    Attributes:
        fresh_threshold: after the warm-up, one full evaluation in every ``fresh_threshold`` evaluations of a
            branch (the others are predicted). Official: 3.
        max_order: highest derivative order kept (the Taylor series has up to ``max_order + 1`` terms).
            0 reuses the last full evaluation's hidden state as it is (FORA). Official: 6.
        first_enhance: the first ``first_enhance`` evaluations of a branch are all full. Official: 5.
    """

    fresh_threshold: int = 3
    max_order: int = 6
    first_enhance: int = 5

    def __post_init__(self):
        for name, lo in (("fresh_threshold", 1), ("max_order", 0), ("first_enhance", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InputError(f"step cache {name} must be an integer >= {lo}, got {v!r}")

    @property
    def method(self) -> str:
        """"taylorseer", or "fora" for order 0 (plain reuse of the last full evaluation)."""
        return "taylorseer" if self.max_order > 0 else "fora"

    def as_dict(self) -> dict:
        return asdict(self)
