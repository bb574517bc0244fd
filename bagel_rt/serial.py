"""One request at a time per pipeline: the lock that makes a :class:`bagel_rt.pipeline.Bagel` safe to share
between threads.

A pipeline holds state that requests share: the model's weights, the triton backend's captured denoiser and
decoder (``fast_cache``, ``decoder``), the offload placement. Two requests running on it at once from two
threads would race on that state, so every entry point that runs the model (``Bagel.interleave`` and with it
``generate`` / ``edit`` / ``understand``, and the model-running methods of a ``Session``) holds the pipeline's
re-entrant lock: requests from several threads are served one after the other, each with the result it would
have had alone. For parallel requests, load one pipeline per GPU.
"""

from __future__ import annotations

import functools
import threading


def new_lock() -> threading.RLock:
    """The pipeline's lock (re-entrant: ``interleave`` runs ``Session`` methods, which take it again)."""
    return threading.RLock()


def serialized(method):
    """Run ``method`` holding the lock of its pipeline (``self.lock``, or ``self.bagel.lock`` for a Session)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with getattr(self, "bagel", self).lock:
            return method(self, *args, **kwargs)

    return run
