"""The serving engine without HTTP or a model: scheduling, batching, the bounded queue, cancellation, deadlines
and shutdown, with a stand-in runner that keeps the library's hook contract (``on_step`` after every step;
raising in it stops the work)."""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from bagel_rt.errors import InputError
from bagel_rt.serve.engine import Engine
from bagel_rt.serve.requests import Limits, parse_chat, parse_edit, parse_generation
from bagel_rt.serve.scheduler import Cancelled, QueueFull, ShuttingDown, TimedOut
from bagel_rt.session import Result
from bagel_rt.tiny import TINY_PARAMS

LIMITS = Limits(TINY_PARAMS)


class FakeRunner:
    """Records each batch; runs ``num_timesteps`` steps of ``step_s`` seconds each, calling ``on_step`` after each.
    The first batch can be held until ``release`` is set (to let requests pile up)."""

    def __init__(self, step_s: float = 0.0, hold_first: bool = False):
        self.step_s = step_s
        self.batches: list[list[int]] = []
        self.stopped_at: list[int] = []
        self.release = threading.Event()
        self.holding = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, bagel, jobs, on_step, on_token):
        self.batches.append([j.id for j in jobs])
        if len(self.batches) == 1:
            self.holding.set()
            assert self.release.wait(10)
        req = jobs[0].request
        if getattr(req, "prompt", None) == "fail":
            raise InputError("the library refused this")
        steps = dict(req.options)["num_timesteps"] if req.key is not None else 3
        for i in range(steps):
            time.sleep(self.step_s)
            try:
                on_step(i, steps)
            except BaseException:
                self.stopped_at.append(i)
                raise
        return [[Result(seed=s, text=j.request.prompt) for s in j.request.seeds] if j.request.key is not None
                else [Result(text="answer")] for j in jobs]


def t2i(prompt="a cat", size="64x64", n=1, seed=0, steps=2, **kw):
    return parse_generation(dict(prompt=prompt, size=size, n=n, seed=seed, num_timesteps=steps, **kw), LIMITS)


def chat(text="hi"):
    return parse_chat({"messages": [{"role": "user", "content": text}]}, LIMITS)


def engine(runner, **kw) -> Engine:
    bagel = SimpleNamespace(model=SimpleNamespace(params=TINY_PARAMS), device=torch.device("cpu"))
    return Engine(bagel, runner=runner, **kw)


def test_compatible_requests_share_a_batch_in_arrival_order():
    run = FakeRunner(hold_first=True)
    eng = engine(run, max_batch=8)
    blocker = eng.submit(t2i("blocker"))
    assert run.holding.wait(5)
    a, b, c = eng.submit(t2i("a")), eng.submit(t2i("b", size="32x32")), eng.submit(t2i("c", n=2, seed=7))
    d, e = eng.submit(chat()), eng.submit(t2i("e", steps=3))
    f = eng.submit(t2i("f"))
    run.release.set()
    for job in (blocker, a, b, c, d, e, f):
        job.future.result(5)
    assert run.batches == [[blocker.id], [a.id, c.id, f.id], [b.id], [d.id], [e.id]]
    # each job gets its own images, with its own seeds (seed, seed + 1, ...)
    assert [r.seed for r in c.future.result()] == [7, 8] and [r.text for r in a.future.result()] == ["a"]
    assert eng.metrics.counter("bagel_images_total") == 7
    eng.shutdown(1)


def test_max_batch_bounds_the_images_of_a_batch_and_1_turns_batching_off():
    for max_batch, expected in ((3, [[1], [2, 3], [4], [5]]), (1, [[1], [2], [3], [4], [5]])):
        run = FakeRunner(hold_first=True)
        eng = engine(run, max_batch=max_batch)
        jobs = [eng.submit(t2i("x"))]
        assert run.holding.wait(5)
        # the second and third fit 3 images (1 + 2); the fourth (n=2) would not; a request's own n stays whole
        jobs += [eng.submit(t2i("x", n=n)) for n in (1, 2, 2, 4)]
        run.release.set()
        for job in jobs:
            job.future.result(5)
        first = jobs[0].id - 1
        assert [[i - first for i in b] for b in run.batches] == expected
        eng.shutdown(1)


def test_full_queue_refuses_with_retry_after():
    run = FakeRunner(hold_first=True)
    eng = engine(run, max_queue=2)
    eng.submit(t2i())
    assert run.holding.wait(5)
    eng.submit(t2i())
    eng.submit(t2i())
    with pytest.raises(QueueFull) as e:
        eng.submit(t2i())
    assert e.value.retry_after >= 1 and "busy" in str(e.value)
    assert eng.metrics.counter("bagel_rejected_total", reason="QueueFull") == 1
    run.release.set()
    eng.shutdown(5)


def test_cancelled_job_stops_the_work_at_the_next_step_and_the_worker_goes_on():
    run = FakeRunner(step_s=0.002)
    eng = engine(run)
    long = eng.submit(t2i(steps=1000))
    while long.progress[0] < 5:
        time.sleep(0.001)
    long.cancel()
    with pytest.raises(Cancelled):
        long.future.result(5)
    nxt = eng.submit(t2i("next"))
    assert [r.text for r in nxt.future.result(5)] == ["next"]
    assert len(run.stopped_at) == 1 and run.stopped_at[0] < 200  # stopped, not run to its 1000 steps
    assert eng.metrics.counter("bagel_stopped_total", reason="Cancelled") == 1
    eng.shutdown(1)


def test_a_cancelled_job_in_a_batch_leaves_the_others_running():
    run = FakeRunner(step_s=0.002, hold_first=True)
    eng = engine(run)
    eng.submit(t2i("blocker", steps=2))
    assert run.holding.wait(5)
    a, b = eng.submit(t2i("a", steps=50)), eng.submit(t2i("b", steps=50))
    a.cancel()  # while it waits: it is dropped from the queue
    c, d = eng.submit(t2i("c", steps=50)), eng.submit(t2i("d", steps=50))
    run.release.set()
    while c.progress[0] < 3:
        time.sleep(0.001)
    c.cancel()  # while it runs with b and d
    assert [r.text for r in b.future.result(5)] == ["b"] and [r.text for r in d.future.result(5)] == ["d"]
    assert run.batches[1] == [b.id, c.id, d.id] and run.stopped_at == []
    with pytest.raises(Cancelled):
        c.future.result()
    # both count as stopped work: c stopped while it ran, a was dropped from the queue before it ran (a stream
    # whose client leaves before the worker takes it up is such a job)
    assert eng.metrics.counter("bagel_stopped_total", reason="Cancelled") == 2
    eng.shutdown(1)


def test_deadlines_while_waiting_and_while_running():
    run = FakeRunner(step_s=0.002, hold_first=True)
    eng = engine(run, timeout_s=0.2)
    first = eng.submit(t2i(steps=2), timeout_s=30)
    assert run.holding.wait(5)
    waiting = eng.submit(t2i())
    time.sleep(0.3)
    run.release.set()
    with pytest.raises(TimedOut, match="while waiting"):
        waiting.future.result(5)
    first.future.result(5)
    running = eng.submit(t2i(steps=1000))
    with pytest.raises(TimedOut, match="while running"):
        running.future.result(5)
    t0 = time.monotonic()
    while run.stopped_at == [] and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert run.stopped_at and run.stopped_at[0] < 500
    assert eng.metrics.counter("bagel_stopped_total", reason="TimedOut") == 2  # the waiting and the running one
    eng.shutdown(1)


def test_library_errors_reach_their_job_only():
    eng = engine(FakeRunner())
    bad, good = eng.submit(t2i("fail", size="16x16")), eng.submit(t2i("ok"))
    with pytest.raises(InputError, match="refused"):
        bad.future.result(5)
    assert good.future.result(5)[0].text == "ok"
    eng.shutdown(1)


def test_shutdown_drains_within_the_grace_period_and_rejects_the_rest():
    run = FakeRunner(step_s=0.01, hold_first=True)
    eng = engine(run)
    first = eng.submit(t2i(steps=2))
    assert run.holding.wait(5)
    queued = [eng.submit(t2i(steps=2)) for _ in range(2)]
    threading.Timer(0.05, run.release.set).start()
    eng.shutdown(grace_s=5)  # enough: everything queued finishes
    assert all(len(j.future.result(0)) == 1 for j in (first, *queued))
    with pytest.raises(ShuttingDown):
        eng.submit(t2i())

    run = FakeRunner(step_s=0.01, hold_first=True)
    eng = engine(run)
    first = eng.submit(t2i(steps=1000))
    assert run.holding.wait(5)
    queued = [eng.submit(t2i(steps=2)) for _ in range(3)]
    run.release.set()
    eng.shutdown(grace_s=0.1)  # too short: the waiting are rejected, the running one stops
    for job in queued:
        with pytest.raises(ShuttingDown):
            job.future.result(0)
    with pytest.raises(Cancelled, match="shut down"):
        first.future.result(0)
    assert not eng._thread.is_alive() and run.stopped_at


class ContractBagel:
    """The batched library API (``generate``/``edit`` with prompt lists, per-image seeds and ``on_step``) as a
    recording stand-in: one call per batch, ``num_timesteps`` steps, one Result per image in order."""

    def __init__(self):
        self.model = SimpleNamespace(params=TINY_PARAMS)
        self.device = torch.device("cpu")
        self.calls = []

    def _run(self, name, prompts, images, seed, on_step, kw):
        self.calls.append((name, list(prompts), images, list(seed), kw))
        for i in range(kw["num_timesteps"]):
            on_step(i, kw["num_timesteps"])
        return [Result(seed=s, text=p) for p, s in zip(prompts, seed)]

    def generate(self, prompt, *, n=1, seed=None, on_step=None, **kw):
        return self._run("generate", prompt, None, seed, on_step, kw)

    def edit(self, image, instruction, *, n=1, seed=None, on_step=None, **kw):
        return self._run("edit", instruction, image, seed, on_step, kw)


def test_runner_makes_one_library_call_per_batch_request_major():
    bagel = ContractBagel()
    eng = Engine(bagel, max_batch=8)
    hold = threading.Event()
    blocker = eng.submit(t2i("blocker"), on_step=lambda i, n: hold.wait(5))
    a = eng.submit(t2i("a", size="48x32", n=2, seed=10, cfg_text_scale=5.0))
    b = eng.submit(t2i("b", size="48x32", n=1, seed=3, cfg_text_scale=5.0))
    hold.set()
    assert [r.seed for r in a.future.result(5)] == [10, 11] and [r.text for r in b.future.result(5)] == ["b"]
    blocker.future.result(5)
    name, prompts, _, seeds, kw = bagel.calls[1]
    assert (name, prompts, seeds) == ("generate", ["a", "a", "b"], [10, 11, 3])
    assert kw["image_shapes"] == (32, 48) and kw["cfg_text_scale"] == 5.0 and kw["cfg_renorm_type"] == "global"
    img = Image.new("RGB", (40, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    e = eng.submit(parse_edit({"image": buf.getvalue(), "prompt": "blue", "n": 2, "seed": 1}, LIMITS))
    assert len(e.future.result(5)) == 2
    name, prompts, images, seeds, kw = bagel.calls[2]
    assert (name, prompts, seeds, len(images)) == ("edit", ["blue", "blue"], [1, 2], 2)
    assert images[0].size == (40, 30) and "image_shapes" not in kw and kw["cfg_img_scale"] == 2.0
    eng.shutdown(1)
