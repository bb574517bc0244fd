"""The serving engine: the loaded pipeline, the scheduler, and the one worker thread that runs the GPU.

Handlers call :meth:`Engine.submit` (validation already done, see :mod:`bagel_rt.serve.requests`) and wait on
the job's future; the worker takes batches from the scheduler and runs each as one library call
(:func:`bagel_rt.serve.runner.run_batch`). After every denoising step and every decoded token the worker checks
its jobs: a job that was cancelled (its client went away) or passed its deadline is settled at once, and when no
job of the batch is left waiting for the result the library call is stopped by raising inside its hook — the
GPU stops at that step. Jobs still running with others finish their images (a packed batch runs as a whole).

Shutdown: :meth:`close` stops taking requests (HTTP 503) while the queue drains; :meth:`shutdown` then waits up
to a grace period for the queued and running jobs, rejects what still waits and stops the running batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from ..errors import BagelError
from ..pipeline import Bagel
from .metrics import BATCH_BUCKETS, Metrics
from .requests import ChatRequest, Limits
from .runner import run_batch
from .scheduler import Cancelled, Job, Scheduler, TimedOut

log = logging.getLogger("bagel_rt.serve")


class _Stop(Exception):
    """Raised inside a library hook when no job of the running batch still wants its result."""


class Engine:
    """Owns a loaded :class:`bagel_rt.pipeline.Bagel` and serves requests on it from one worker thread.

    Args:
        bagel: the pipeline (weights and compute were chosen when it was loaded).
        max_batch: most images per batched call across requests (1: batching off).
        max_queue: most waiting requests (more get :class:`bagel_rt.serve.scheduler.QueueFull`).
        timeout_s: per-request deadline, queued plus running.
        runner: the batch -> library call function (tests pass a stand-in).
    """

    def __init__(self, bagel: Bagel, *, max_batch: int = 8, max_queue: int = 64, timeout_s: float = 600.0,
                 runner: Callable = run_batch, metrics: Metrics | None = None):
        self.bagel = bagel
        self.limits = Limits(bagel.model.params)
        self.scheduler = Scheduler(max_batch, max_queue, on_drop=self._count_stopped)
        self.timeout_s = timeout_s
        self.metrics = metrics or Metrics()
        self._runner = runner
        self.running: list[Job] = []
        self._thread = threading.Thread(target=self._work, name="bagel-rt-worker", daemon=True)
        self._thread.start()

    # -- the handlers' side ---------------------------------------------------------------------------------------
    def submit(self, request, *, on_token: Callable[[int], None] | None = None,
               on_step: Callable[[int, int], None] | None = None, timeout_s: float | None = None) -> Job:
        """Queue a validated request; raises ``QueueFull`` or ``ShuttingDown`` at once (nothing queued then)."""
        job = Job(request, self.timeout_s if timeout_s is None else timeout_s, on_token, on_step)
        try:
            self.scheduler.submit(job)
        except Exception as e:
            self.metrics.inc("bagel_rejected_total", reason=type(e).__name__)
            raise
        return job

    @property
    def draining(self) -> bool:
        return self.scheduler.closed

    def close(self) -> None:
        """Take no new requests; queued and running ones go on."""
        self.scheduler.close()

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop: no new requests, up to ``grace_s`` seconds for the queued and running ones to finish, then the
        waiting ones are rejected and the running batch stops at its next step."""
        self.close()
        end = time.monotonic() + grace_s
        while (self.scheduler.depth() or self.running) and time.monotonic() < end:
            time.sleep(0.05)
        rejected = self.scheduler.reject_waiting("the server shut down before this request ran")
        while self._thread.is_alive():  # again and again: the worker may be taking its next batch just now
            for job in list(self.running):
                job.cancel("the server shut down while this request ran")
            self._thread.join(0.05)
        if rejected:
            self.metrics.inc("bagel_stopped_total", rejected, reason="ShuttingDown")

    def gauges(self) -> dict:
        """Gauges for ``/metrics``: queue depth, running jobs and images, draining, GPU memory."""
        g = {
            "bagel_queue_depth": ("Requests waiting in the queue.", [({}, self.scheduler.depth())]),
            "bagel_queue_capacity": ("Most requests that may wait.", [({}, self.scheduler.max_queue)]),
            "bagel_running_jobs": ("Requests in the running batch.", [({}, len(self.running))]),
            "bagel_running_images": ("Images in the running batch.", [({}, sum(j.images for j in self.running))]),
            "bagel_max_batch_images": ("Most images per batch across requests.", [({}, self.scheduler.max_batch)]),
            "bagel_draining": ("1 while shutting down (new requests get 503).", [({}, int(self.draining))]),
        }
        dev = self.bagel.device
        if dev.type == "cuda":
            g["bagel_gpu_memory_bytes"] = ("GPU memory of the serving process, by kind.", [
                ({"kind": "allocated"}, torch.cuda.memory_allocated(dev)),
                ({"kind": "reserved"}, torch.cuda.memory_reserved(dev)),
                ({"kind": "peak_allocated"}, torch.cuda.max_memory_allocated(dev)),
                ({"kind": "total"}, torch.cuda.get_device_properties(dev).total_memory)])
        return g

    # -- the worker -----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (batch := self.scheduler.next_batch()) is not None:
            live = []
            for job in batch:
                if job.start():
                    live.append(job)
                else:  # settled between the queue's last look and now
                    self._count_stopped(job)
            if live:
                self._run(live)

    def _run(self, jobs: list[Job]) -> None:
        self.running = jobs
        t0 = time.monotonic()
        for job in jobs:
            self.metrics.observe("bagel_queue_wait_seconds", job.started - job.created)

        def alive() -> None:
            now = time.monotonic()
            for job in jobs:
                job.expire_if_late(now)
            if all(job.done for job in jobs):
                raise _Stop

        def on_step(i: int, total: int) -> None:
            for job in jobs:
                job.progress = (i + 1, total)
                if job.on_step is not None and not job.done:
                    job.on_step(i + 1, total)
            alive()

        def on_token(token: int) -> None:
            for job in jobs:
                if job.on_token is not None and not job.done:
                    job.on_token(token)
            alive()

        try:
            results = self._runner(self.bagel, jobs, on_step, on_token)
        except _Stop:
            pass  # every job was settled already (cancelled or timed out)
        except Exception as e:
            if not isinstance(e, BagelError):
                log.exception("a batch of %d request(s) failed", len(jobs))
            for job in jobs:
                job.settle(error=e)
        else:
            for job, res in zip(jobs, results):
                job.settle(result=res)
            if isinstance(jobs[0].request, ChatRequest):
                self.metrics.inc("bagel_tokens_total", sum(len(r.token_ids or []) for rs in results for r in rs))
            else:
                self.metrics.inc("bagel_images_total", sum(j.images for j in jobs))
        finally:
            seconds = time.monotonic() - t0
            self.running = []
            self.scheduler.record(seconds)
            self.metrics.observe("bagel_batch_seconds", seconds)
            self.metrics.observe("bagel_batch_images", sum(j.images for j in jobs), BATCH_BUCKETS)
            for job in jobs:
                self._count_stopped(job)

    def _count_stopped(self, job: Job) -> None:
        """Count a job settled before its work finished (cancelled, timed out), whether it ran or waited."""
        err = job.future.exception() if job.done else None
        if isinstance(err, (Cancelled, TimedOut)):
            self.metrics.inc("bagel_stopped_total", reason=type(err).__name__)
