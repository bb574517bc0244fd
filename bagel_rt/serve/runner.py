"""One batch of jobs -> one library call.

Image jobs of one batch share a key (task, output size, settings), so their images go into one
``Bagel.generate`` / ``Bagel.edit`` call as a flat list, request-major, each image with its own seed; the
library packs them into one forward per denoising step and returns the images in the same order, which are cut
back into each job's ``n``. A chat job runs alone through ``Bagel.interleave``. The hooks are the engine's:
``on_step`` after each denoising step and ``on_token`` after each decoded token; raising in them stops the work.
"""

from __future__ import annotations

from collections.abc import Callable

from ..pipeline import Bagel
from ..session import Result
from .requests import ChatRequest
from .scheduler import Job


def run_batch(bagel: Bagel, jobs: list[Job], on_step: Callable[[int, int], None],
              on_token: Callable[[int], None]) -> list[list[Result]]:
    """Run ``jobs`` (one key) as one library call; returns each job's results (``n`` images, or one answer)."""
    req = jobs[0].request
    if isinstance(req, ChatRequest):
        assert len(jobs) == 1, "chat jobs run alone"
        return [[bagel.interleave(list(req.inputs), understanding_output=True, think=req.think,
                                  max_think_token_n=req.max_think_token_n, do_sample=req.do_sample,
                                  text_temperature=req.text_temperature, seed=req.seed, on_token=on_token)]]
    prompts = [j.request.prompt for j in jobs for _ in range(j.request.n)]
    seeds = [s for j in jobs for s in j.request.seeds]
    images = [j.request.image for j in jobs for _ in range(j.request.n)]
    kwargs = dict(req.options)
    if req.task == "t2i":
        kwargs["image_shapes"] = req.size
    if req.task == "t2i":
        results = bagel.generate(prompts, seed=seeds, on_step=on_step, **kwargs)
    else:
        results = bagel.edit(images, prompts, seed=seeds, on_step=on_step, **kwargs)
    out, k = [], 0
    for j in jobs:
        out.append(list(results[k:k + j.request.n]))
        k += j.request.n
    assert k == len(results), f"the library returned {len(results)} images for {k} asked"
    return out
