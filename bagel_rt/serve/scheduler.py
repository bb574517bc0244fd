"""The waiting room between the request handlers and the GPU worker: a bounded queue of jobs, taken in batches.

A :class:`Job` is one request on its way: its deadline, its result (a ``concurrent.futures.Future``, settled
once, by whoever comes first: the worker with a result, a handler whose client went away, a timeout) and the
hooks that stream its tokens and steps. The :class:`Scheduler` holds the jobs that wait; the worker takes the
oldest and with it every waiting job of the same batch key (same task, output size and settings) while the
batch stays within ``max_batch`` images, so compatible requests share one batched forward. A request's own ``n``
images always run together, even past ``max_batch``. Thread-safe: handlers submit from the event loop's thread,
the worker takes from its own.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs; try again after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, retry_after: int, depth: int):
        super().__init__(f"the server is busy ({depth} requests waiting); retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


class TimedOut(Exception):
    """A job passed its deadline, waiting or running (HTTP 504)."""


class Cancelled(Exception):
    """A job's client went away; its GPU work stops at the next step."""


_ids = itertools.count(1)


class Job:
    """One request on its way through the engine.

    Args:
        request: a :class:`bagel_rt.serve.requests.ImageRequest` or ``ChatRequest``.
        timeout_s: seconds from now until the job fails with :class:`TimedOut`, queued or running.
        on_token: called with each decoded token id (chat), in the worker thread.
        on_step: called with (steps done, total) after each denoising step, in the worker thread.
    """

    def __init__(self, request, timeout_s: float, on_token: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None):
        self.id = next(_ids)
        self.request = request
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.started: float | None = None
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.on_token, self.on_step = on_token, on_step
        #: (steps done, total steps) of the denoising loop, for progress displays
        self.progress = (0, 0)

    @property
    def key(self):
        return self.request.key

    @property
    def images(self) -> int:
        return self.request.images

    @property
    def done(self) -> bool:
        return self.future.done()

    def start(self) -> bool:
        """Mark the job running; False when it was settled (cancelled, timed out) while it waited."""
        self.started = time.monotonic()
        try:
            return self.future.set_running_or_notify_cancel()
        except RuntimeError:  # settled with a result or an error (a timeout) meanwhile
            return False

    def settle(self, result=None, error: BaseException | None = None) -> bool:
        """Give the job its result or error; only the first call counts (returns whether this one did)."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
            return True
        except concurrent.futures.InvalidStateError:
            return False

    def cancel(self, why: str = "the client went away") -> bool:
        return self.settle(error=Cancelled(why))

    def expire_if_late(self, now: float) -> bool:
        """Fail the job with :class:`TimedOut` if its deadline has passed."""
        if now <= self.deadline:
            return False
        where = "while waiting in the queue" if self.started is None else "while running"
        return self.settle(error=TimedOut(f"the request timed out after {now - self.created:.1f} s ({where})"))


class Scheduler:
    """A bounded FIFO of waiting jobs, taken in batches of compatible jobs.

    Args:
        max_batch: most images of one batch made of several requests (1 turns batching off).
        max_queue: most waiting jobs; one more is refused with :class:`QueueFull`.
        on_drop: called with each waiting job dropped because it was settled (cancelled, timed out) before it
            ran — such a job never reaches a batch, so whoever counts stopped work hears of it here.
    """

    def __init__(self, max_batch: int = 8, max_queue: int = 64, on_drop: Callable[[Job], None] | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch}, {max_queue}")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_drop = on_drop
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        #: running average of a batch's seconds (the Retry-After estimate)
        self.batch_seconds = 1.0

    @property
    def closed(self) -> bool:
        return self._closed

    def depth(self) -> int:
        """Jobs waiting (not counting the running batch)."""
        with self._cond:
            self._prune()
            return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`ShuttingDown` after :meth:`close`, :class:`QueueFull` when full."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            self._prune()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after(), len(self._waiting))
            self._waiting.append(job)
            self._cond.notify()

    def next_batch(self) -> list[Job] | None:
        """Block until work is waiting: the oldest job and every waiting job with its key that fits in
        ``max_batch`` images, in arrival order. None once closed and empty."""
        with self._cond:
            while True:
                self._prune()
                if self._waiting:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._waiting.popleft()
            batch, images = [first], first.images
            if first.key is not None:
                for job in list(self._waiting):
                    if job.key == first.key and images + job.images <= self.max_batch:
                        self._waiting.remove(job)
                        batch.append(job)
                        images += job.images
            return batch

    def close(self) -> None:
        """Take no new jobs; the waiting ones are still handed out."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reject_waiting(self, why: str) -> int:
        """Fail every waiting job with :class:`ShuttingDown`; returns how many."""
        with self._cond:
            jobs, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        return sum(job.settle(error=ShuttingDown(why)) for job in jobs)

    def record(self, seconds: float) -> None:
        """A batch's run time, for the Retry-After estimate."""
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely moved on by one batch per ``max_batch`` waiting images."""
        waiting = sum(job.images for job in self._waiting)
        return max(1, math.ceil(self.batch_seconds * (waiting / self.max_batch + 1)))

    def _prune(self) -> None:
        """Drop waiting jobs that were settled (cancelled) or are past their deadline (caller holds the lock)."""
        now = time.monotonic()
        keep = [job for job in self._waiting if not job.done and not job.expire_if_late(now)]
        if len(keep) != len(self._waiting):
            if self.on_drop is not None:
                for job in self._waiting:
                    if job.done:
                        self.on_drop(job)
            self._waiting = deque(keep)
