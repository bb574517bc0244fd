"""CFG-parallel: each rank computes some of a step's CFG branches; the velocities meet once per step.

At every step the active branches (after the exact skips of :func:`bagel_rt.sampler.velocity_sources`), in
arena order (conditional, text-unconditional, image-unconditional), are dealt to the ranks in turn, and one
``all_gather`` of ``[k, N, 64]`` per rank (k: the most branches one rank computes at that step; 1 MB per
branch at 1024²) gives every rank every velocity; each rank then runs the same CFG combine + Euler update, so
the latents stay identical on every rank without further traffic. The active sets of a request are prefixes of
one list, so a branch is always dealt to the same rank: its KV cache (and with step caching its derivatives)
stay there.

**The leftover branches** of a step whose branch count does not divide by the ranks (t2i outside the CFG
interval: one branch on two GPUs; an edit: three) would leave ranks idle. On the triton backend they run
*shared*: tensor-parallel over all ranks (:mod:`.tensor_parallel`), in a second packed denoiser over a split
copy of the decoder layers (:func:`shared_view`; +13 GB per GPU at two GPUs) and the branches' KV caches cut to
each rank's key/value heads. A two-GPU edit then costs one branch per GPU plus half a branch, t2i half a
branch on its single-branch steps. Not with step caching (a branch's derivatives live in one denoiser, so every
branch is dealt whole) nor where the heads do not divide by the ranks (``ParallelGroup.share_leftover`` turns it
off).

Text prefill and decoding run replicated: every rank builds the same contexts and decodes the same tokens (a
decode step is memory-bound on one GPU; splitting it would cost a hand-off per token).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import Tensor

from ..sampler import CFGSettings, schedule, velocity_sources
from .group import ParallelGroup

BRANCH_ORDER = ("cond", "text", "img")


def needed_per_step(cfg: CFGSettings, num_timesteps: int, timestep_shift: float, text_is_cond: bool,
                    img_is_cond: bool) -> list[set[str]]:
    """The branches each step computes (the exact skips applied)."""
    ts = schedule(num_timesteps, timestep_shift)
    return [set(velocity_sources(*cfg.scales_at(float(t)), text_is_cond, img_is_cond).values()) for t in ts[:-1]]


class BranchExchange:
    """Which rank computes which branch at a step, and the exchange of their velocities.

    Args:
        group: the run's :class:`ParallelGroup` (mode "cfg").
        steps: the branches of each step of the request (:func:`needed_per_step`).
        share: run the leftover branches of uneven steps shared over all ranks (else deal every branch whole).
    """

    def __init__(self, group: ParallelGroup, steps: list[set[str]], share: bool):
        self.group, self.share = group, share
        plans = [self.plan(n) for n in steps]
        #: the branches this rank computes whole at some step, and those computed shared at some step (arena order)
        self.mine = [b for b in BRANCH_ORDER if any(o.get(b) == group.rank for o, _ in plans)]
        self.shared = [b for b in BRANCH_ORDER if any(b in sh for _, sh in plans)]

    def plan(self, needed) -> tuple[dict[str, int], list[str]]:
        """({branch: rank} of the branches dealt whole, [branches run shared]) of a step computing ``needed``."""
        ordered = [b for b in BRANCH_ORDER if b in needed]
        k = len(ordered) - (len(ordered) % self.group.world if self.share else 0)
        return {b: i % self.group.world for i, b in enumerate(ordered[:k])}, ordered[k:]

    def local(self, needed) -> list[str]:
        """The branches of the step computing ``needed`` that this rank computes whole, in arena order."""
        owners, _ = self.plan(needed)
        return [b for b in BRANCH_ORDER if owners.get(b) == self.group.rank]

    def gather(self, computed: dict[str, Tensor], needed, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype) -> dict[str, Tensor]:
        """Every whole branch's velocity of the step on every rank, from each rank's ``computed`` ones
        ({branch: [N, C]}).

        One ``all_gather`` of [k, N, C] per rank (k: the most branches one rank computes at this step; ranks
        with fewer send zeros in the free slots). The exchange runs in fp32, which every collective backend
        supports and which carries bf16/fp16 values exactly; the result is cast back to ``dtype``."""
        owners, _ = self.plan(needed)
        per_rank = [[b for b in BRANCH_ORDER if owners.get(b) == r] for r in range(self.group.world)]
        k = max(len(p) for p in per_rank)
        if k == 0:
            return {}
        send = torch.zeros((k, *shape), dtype=torch.float32, device=device)
        for j, b in enumerate(per_rank[self.group.rank]):
            send[j] = computed[b]
        recv = [torch.empty_like(send) for _ in range(self.group.world)]
        dist.all_gather(recv, send)
        return {b: recv[r][j].to(dtype) for r, branches in enumerate(per_rank) for j, b in enumerate(branches)}

    def count_others(self, step_cache, needed) -> None:
        """With step caching: advance the counters of the branches of ``needed`` that other ranks compute
        (bookkeeping only), so that every rank holds the same schedule and report."""
        if step_cache is not None:
            owners, _ = self.plan(needed)
            for b, r in owners.items():
                if r != self.group.rank:
                    step_cache.evaluation(b)


def exchange_for(model, cfg: CFGSettings, num_timesteps: int, timestep_shift: float, text_is_cond: bool,
                 img_is_cond: bool, share: bool) -> BranchExchange | None:
    """The request's :class:`BranchExchange` under CFG-parallel (None otherwise). ``share``: the caller can run
    shared branches (the triton backend without step caching); also needs the heads to divide by the ranks."""
    from .tensor_parallel import fits

    group = model.parallel
    if group is None or group.mode != "cfg":
        return None
    share = share and group.share_leftover and fits(model.params, group.world)
    steps = needed_per_step(cfg, num_timesteps, timestep_shift, text_is_cond, img_is_cond)
    return BranchExchange(group, steps, share)


def parallel_velocity(exchange: BranchExchange, velocity: Callable[[str, Tensor, float], Tensor], cfg: CFGSettings,
                      text_is_cond: bool, img_is_cond: bool, dtype: torch.dtype,
                      step_cache=None) -> Callable[[str, Tensor, float], Tensor]:
    """A ``velocity(branch, x, t)`` for :func:`bagel_rt.sampler.denoise` (torch backend, every branch dealt
    whole): on its first call at a new t it computes this rank's branches of the step and exchanges them; every
    branch of the step is then answered from the exchanged set. ``dtype``: the velocities' dtype (the model's)."""
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
    exchange = exchange_for(model, cfg, num_timesteps, timestep_shift, text_is_cond, img_is_cond, share=False)
    if exchange is None:
        return velocity
    return parallel_velocity(exchange, velocity, cfg, text_is_cond, img_is_cond, model.dtype, step_cache)


# -- shared branches: tensor-parallel over all ranks ------------------------------------------------------------
def shared_view(model):
    """``model`` with its decoder layers split tensor-parallel over the ranks (built once per model, kept on its
    group): a second copy of the decoder weights, split (13 GB per GPU at full size on two GPUs); everything
    else (embeddings, norms, glue) is the model's own."""
    from ..fast import linear_modules_signature
    from .tensor_parallel import shard_layer

    group = model.parallel
    formats = linear_modules_signature(model)  # a compute switch swaps the Linears: split them again
    if group.shared_view is not None and group.shared_view[0] == formats:
        return group.shared_view[1]
    group.shared_view = None  # the old copy goes before the new one is made

    tp_group = dataclasses.replace(group, mode="tp", owns_process_group=False, shared_view=None)
    view = _shallow(model)
    view.language_model = _shallow(model.language_model)
    view.language_model.model = _shallow(model.language_model.model)
    layers = []
    for layer in model.language_model.model.layers:
        new = _shallow(layer)
        for name in ("self_attn", "mlp", "mlp_moe_gen"):
            setattr(new, name, _shallow(getattr(layer, name)))
        shard_layer(new, model.params.llm, tp_group)
        layers.append(new)
    view.language_model.model.layers = torch.nn.ModuleList(layers)
    view.parallel = tp_group
    group.shared_view = (formats, view)
    return view


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` sharing its parameters and submodules, whose own submodules can be swapped without
    touching the original."""
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._modules = dict(module._modules)
    return new


class HeadSlice:
    """A context's KV cache seen through this rank's key/value heads (what a tensor-parallel denoiser copies
    into its arena): ``k``, ``v`` [layers, capacity, Hk/P, D] views, ``length``, ``rope`` and ``history``."""

    def __init__(self, ctx, rank: int, world: int):
        heads = ctx.cache.k.shape[2] // world
        sl = slice(rank * heads, (rank + 1) * heads)
        self.cache = SimpleNamespace(k=ctx.cache.k[:, :, sl], v=ctx.cache.v[:, :, sl], length=ctx.cache.length)
        self.rope, self.history = ctx.rope, ctx.history

    @property
    def length(self) -> int:
        return self.cache.length


def shared_contexts(model, ctxs: dict, branches: list[str]) -> list[HeadSlice]:
    """The contexts of the shared ``branches``, cut to this rank's key/value heads."""
    g = model.parallel
    return [HeadSlice(ctxs[b], g.rank, g.world) for b in branches]
