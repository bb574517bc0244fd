"""CFG-parallel: each rank computes some of a step's CFG branches; the velocities meet once per step.

The branches ever computed in a request (``order``: conditional first, then text- and image-unconditional,
after the exact skips of :func:`bagel_rt.sampler.velocity_sources`) are dealt to the ranks in turn, once per
request, so a branch always runs on the same rank: its KV cache (and, with step caching, its derivatives)
stay there. At each step a rank computes its active branches (one packed forward on the triton backend), and
one ``all_gather`` of ``[k, N, 64]`` per rank (k: the most active branches any rank holds at that step, a few
MB at 1024²) gives every rank every velocity; each then runs the same CFG combine + Euler update, so the
latents stay identical on every rank without further traffic.

Text prefill and decoding run replicated: every rank builds the same contexts and decodes the same tokens (a
decode step is memory-bound on one GPU; splitting it would cost a hand-off per token).

Balance: t2i has two branches inside the CFG interval (one per rank) and one outside it (rank 0 alone); an edit
has three, dealt 2 + 1 over two ranks. Splitting a branch's latent rows over ranks would balance both (not
implemented: it needs each layer's keys/values of the query block gathered).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..sampler import CFGSettings, schedule, velocity_sources
from .group import ParallelGroup

BRANCH_ORDER = ("cond", "text", "img")


def computed_branches(cfg: CFGSettings, num_timesteps: int, timestep_shift: float, text_is_cond: bool,
                      img_is_cond: bool) -> list[str]:
    """The branches a request ever computes, in arena order (conditional first)."""
    ts = schedule(num_timesteps, timestep_shift)
    ever = set().union(*(velocity_sources(*cfg.scales_at(float(t)), text_is_cond, img_is_cond).values()
                         for t in ts[:-1]))
    return [b for b in BRANCH_ORDER if b in ever]


class BranchExchange:
    """Which rank computes which branch, and the per-step exchange of their velocities.

    Args:
        group: the run's :class:`ParallelGroup` (mode "cfg").
        order: the branches the request ever computes, in arena order.
    """

    def __init__(self, group: ParallelGroup, order: list[str]):
        self.group, self.order = group, list(order)
        #: branch -> the rank that computes it (dealt in turn: cond on 0, text on 1, img on 2 % world)
        self.owner = {b: i % group.world for i, b in enumerate(self.order)}
        #: the branches this rank computes, in arena order
        self.mine = [b for b in self.order if self.owner[b] == group.rank]

    def local(self, needed) -> list[str]:
        """The branches of ``needed`` (names) that this rank computes, in arena order."""
        return [b for b in self.mine if b in needed]

    def gather(self, computed: dict[str, Tensor], needed, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype) -> dict[str, Tensor]:
        """Every velocity of ``needed`` on every rank, from each rank's ``computed`` ones ({branch: [N, C]}).

        One ``all_gather`` of [k, N, C] per rank (k: the most branches of ``needed`` one rank holds; ranks with
        fewer send zeros in the free slots). The exchange runs in fp32, which every collective backend supports
        and which carries bf16/fp16 values exactly; the result is cast back to ``dtype``."""
        per_rank = [[b for b in self.order if b in needed and self.owner[b] == r] for r in range(self.group.world)]
        send = torch.zeros((max(len(p) for p in per_rank), *shape), dtype=torch.float32, device=device)
        for j, b in enumerate(per_rank[self.group.rank]):
            send[j] = computed[b]
        recv = [torch.empty_like(send) for _ in range(self.group.world)]
        dist.all_gather(recv, send)
        return {b: recv[r][j].to(dtype) for r, branches in enumerate(per_rank) for j, b in enumerate(branches)}

    def count_others(self, step_cache, needed) -> None:
        """With step caching: advance the counters of the branches of ``needed`` that other ranks compute
        (bookkeeping only), so that every rank holds the same schedule and report."""
        if step_cache is not None:
            for b in self.order:
                if b in needed and self.owner[b] != self.group.rank:
                    step_cache.evaluation(b)


def parallel_velocity(exchange: BranchExchange, velocity: Callable[[str, Tensor, float], Tensor], cfg: CFGSettings,
                      text_is_cond: bool, img_is_cond: bool, dtype: torch.dtype,
                      step_cache=None) -> Callable[[str, Tensor, float], Tensor]:
    """A ``velocity(branch, x, t)`` for :func:`bagel_rt.sampler.denoise` (torch backend): on its first call at
    a new t it computes this rank's branches of the step and exchanges them; every branch of the step is then
    answered from the exchanged set. ``dtype``: the velocities' dtype (the model's)."""
    state: dict = {"t": None, "v": {}}

    def velocity_fn(branch: str, x: Tensor, t: float) -> Tensor:
        if state["t"] != t:
            needed = set(velocity_sources(*cfg.scales_at(t), text_is_cond, img_is_cond).values())
            exchange.count_others(step_cache, needed)
            mine = {b: velocity(b, x, t) for b in exchange.local(needed)}
            state["v"] = exchange.gather(mine, needed, tuple(x.shape), x.device, dtype)
            state["t"] = t
        return state["v"][branch]

    return velocity_fn


def spread_velocity(model, velocity: Callable[[str, Tensor, float], Tensor], cfg: CFGSettings, num_timesteps: int,
                    timestep_shift: float, step_cache, text_is_cond: bool,
                    img_is_cond: bool) -> Callable[[str, Tensor, float], Tensor]:
    """The torch backend's hook: ``velocity`` spread over the ranks under CFG-parallel (unchanged otherwise)."""
    group = model.parallel
    if group is None or group.mode != "cfg":
        return velocity
    order = computed_branches(cfg, num_timesteps, timestep_shift, text_is_cond, img_is_cond)
    return parallel_velocity(BranchExchange(group, order), velocity, cfg, text_is_cond, img_is_cond, model.dtype,
                             step_cache)
