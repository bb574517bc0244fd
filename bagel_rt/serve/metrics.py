"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: a few counters and histograms
need no client library.

Counters and histograms are updated from the handlers and the worker thread (one lock); gauges (queue depth,
running jobs, GPU memory) are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

#: Latency buckets in seconds: a 64x64 tiny-model request takes milliseconds, a 1024x1024 one tens of seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Batch sizes in images.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """Counters and histograms of one server, keyed by metric name and a tuple of (label, value) pairs."""

    HELP = {
        "bagel_requests_total": ("counter", "Requests answered, by endpoint and HTTP status."),
        "bagel_request_seconds": ("histogram", "Seconds from a request's arrival to its answer (a stream's "
                                                 "start), by endpoint."),
        "bagel_queue_wait_seconds": ("histogram", "Time a job waited in the queue before its batch started."),
        "bagel_batch_images": ("histogram", "Images (a chat: 1) in one batched library call."),
        "bagel_batch_seconds": ("histogram", "Run time of one batched library call."),
        "bagel_images_total": ("counter", "Images generated or edited."),
        "bagel_tokens_total": ("counter", "Tokens decoded for chat completions."),
        "bagel_rejected_total": ("counter", "Requests refused before running, by reason."),
        "bagel_stopped_total": ("counter", "Jobs settled before their work finished, by reason."),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._hists: dict[str, dict[tuple, Histogram]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS, **labels) -> None:
        with self._lock:
            key = tuple(sorted(labels.items()))
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = Histogram(buckets)
            h.observe(value)

    def counter(self, name: str, **labels) -> float:
        """The current value of one counter (0 when never incremented)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict, float]]]]) -> str:
        """The exposition text: counters and histograms, then ``gauges`` (name -> (help, [(labels, value)]))."""
        out = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                out += self._head(name)
                out += [f"{name}{_labels(k)} {_num(v)}" for k, v in sorted(series.items())]
            for name, series in sorted(self._hists.items()):
                out += self._head(name)
                for k, h in sorted(series.items()):
                    for b, c in zip(h.buckets, h.counts):
                        out.append(f"{name}_bucket{_labels(k + (('le', _num(b)),))} {c}")
                    out.append(f"{name}_bucket{_labels(k + (('le', '+Inf'),))} {h.count}")
                    out.append(f"{name}_sum{_labels(k)} {_num(h.sum)}")
                    out.append(f"{name}_count{_labels(k)} {h.count}")
        for name, (help_text, series) in gauges.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            out += [f"{name}{_labels(tuple(sorted(lab.items())))} {_num(v)}" for lab, v in series]
        return "\n".join(out) + "\n"

    def _head(self, name: str) -> list[str]:
        kind, help_text = self.HELP.get(name, ("untyped", name))
        return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
