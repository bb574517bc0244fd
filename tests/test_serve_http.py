"""``bagel-rt serve`` over loopback on the tiny model (CPU): the OpenAI-shaped endpoints against the library's own
results, streaming, errors before any model work, client disconnects, load (200 requests at concurrency 16),
and a server killed mid-request or stopped with SIGTERM (subprocesses)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from bagel_rt.cli.main import cli
from click.testing import CliRunner
from conftest import requires_cuda
from PIL import Image

import bagel_rt

pytest.importorskip("fastapi")
from bagel_rt.serve.api import create_app  # noqa: E402
from bagel_rt.serve.engine import Engine  # noqa: E402
from bagel_rt.serve.requests import parse_edit  # noqa: E402
from bagel_rt.serve.server import bound_socket, make_server  # noqa: E402

SMALL = {"size": "32x32", "num_timesteps": 3}


@pytest.fixture(scope="module")
def pipe(tiny):
    return bagel_rt.load(tiny, device="cpu", dtype=torch.float32)


@contextmanager
def serving(pipe, max_body_bytes: int = 2 << 20, **engine_kw):
    """The API on a free loopback port, in this process (uvicorn in a thread); yields (base URL, engine)."""
    engine = Engine(pipe, **engine_kw)
    app = create_app(engine, "tiny", max_body_bytes=max_body_bytes)
    sock = bound_socket("127.0.0.1", 0)
    server = make_server(app, engine, "127.0.0.1", 0, grace_s=2, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 30 and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe) as (url, engine):
        yield url, engine


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def batches(engine) -> int:
    return sum(h.count for h in engine.metrics._hists["bagel_batch_seconds"].values())


# -- endpoints ----------------------------------------------------------------------------------------------------
def test_generations_are_the_librarys_images_for_the_same_seeds(server, pipe):
    url, _ = server
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "a red bagel", "n": 2, "seed": 5,
                                                         "size": "48x32", "num_timesteps": 3,
                                                         "cfg_text_scale": 3.0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "48x32" and [d["seed"] for d in body["data"]] == [5, 6]
    for d in body["data"]:
        alone = pipe.generate("a red bagel", seed=d["seed"], image_shapes=(32, 48), num_timesteps=3,
                              cfg_text_scale=3.0)
        assert decode(d).shape == (32, 48, 3)  # size is WxH
        assert np.array_equal(decode(d), pixels(alone.image))
    assert decode(body["data"][0]).tolist() != decode(body["data"][1]).tolist()
    think = httpx.post(url + "/v1/images/generations", json={"prompt": "a red bagel", "seed": 2, "think": True,
                                                             "max_think_token_n": 12, **SMALL}, timeout=60).json()
    alone = pipe.generate("a red bagel", seed=2, think=True, max_think_token_n=12, image_shapes=(32, 32),
                          num_timesteps=3)
    assert think["data"][0]["revised_prompt"] == alone.text and alone.text
    assert np.array_equal(decode(think["data"][0]), pixels(alone.image))


def test_edits_by_upload_and_by_data_url(server, pipe):
    url, engine = server
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    form = {"prompt": "make it blue", "seed": "3", "num_timesteps": "2", "cfg_img_scale": "1.5"}
    r = httpx.post(url + "/v1/images/edits", data=form, files={"image": ("in.png", buf.getvalue(), "image/png")},
                   timeout=120)
    assert r.status_code == 200, r.text
    alone = pipe.edit(src, "make it blue", seed=3, num_timesteps=2, cfg_img_scale=1.5)
    w, h = alone.image.size
    assert r.json()["size"] == f"{w}x{h}" and np.array_equal(decode(r.json()["data"][0]), pixels(alone.image))
    # a JSON body with a data URL is the same request (an edit at >= 512 px is slow on a CPU: not run twice)
    as_json = parse_edit({"image": png_data_url(src), "prompt": "make it blue", "seed": 3, "num_timesteps": 2,
                          "cfg_img_scale": 1.5}, engine.limits)
    as_form = parse_edit({"image": buf.getvalue(), "prompt": "make it blue", "seed": 3, "num_timesteps": 2,
                          "cfg_img_scale": 1.5}, engine.limits)
    assert as_json == as_form and np.array_equal(pixels(as_json.image), pixels(src))


def chat_body(**kw):
    img = Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8))
    content = [{"type": "image_url", "image_url": {"url": png_data_url(img)}},
               {"type": "text", "text": "What is in this picture?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "seed": 1, **kw}


def test_chat_completion_and_its_stream_say_the_same(server, pipe):
    url, engine = server
    tokens_before = engine.metrics.counter("bagel_tokens_total")
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(), timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    img = Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8))
    alone = pipe.understand(img, "What is in this picture?", max_think_token_n=24)
    assert choice["message"]["content"] == alone.text
    assert choice["finish_reason"] == ("stop" if alone.token_ids[-1] == pipe.model.special.eos else "length")
    pieces, finish, usage = [], None, None
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json=chat_body(stream=True, stream_options={"include_usage": True})) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            pieces.append(c["delta"].get("content") or "")
            finish = c["finish_reason"] or finish
    assert len(pieces) > 3 and "".join(pieces) == alone.text and finish == choice["finish_reason"]
    assert usage == {"completion_tokens": len(alone.token_ids)}
    assert engine.metrics.counter("bagel_tokens_total") == tokens_before + 2 * len(alone.token_ids)
    think = httpx.post(url + "/v1/chat/completions", json=chat_body(think=True), timeout=60)
    assert think.status_code == 200
    assert think.json()["choices"][0]["message"]["content"] == pipe.understand(
        img, "What is in this picture?", max_think_token_n=24, think=True).text


def test_health_models_and_metrics(server):
    url, _ = server
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["queue_depth"] == 0
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    httpx.post(url + "/v1/images/generations", json={"prompt": "x", **SMALL}, timeout=60)
    text = httpx.get(url + "/metrics").text
    for needle in ("bagel_queue_depth 0", "bagel_running_jobs 0", "# TYPE bagel_request_seconds histogram",
                   'bagel_requests_total{endpoint="/v1/images/generations",status="200"}',
                   'bagel_request_seconds_bucket{endpoint="/v1/images/generations",le="+Inf"}',
                   "bagel_queue_wait_seconds_count", "bagel_batch_images_count"):
        assert needle in text, needle


# -- bad requests: a 4xx with a clear message, before any model work ----------------------------------------------
GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def _image_part(url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


BAD = [
    (GEN, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    (GEN, {"json": {"prompt": "x", "n": 100000}}, 400, "n must be between 1 and 16"),
    (GEN, {"json": {"prompt": "x", "size": "99999x99999"}}, 400, "must be a multiple of 16"),
    (GEN, {"json": {"prompt": "x", "size": "4096x4096"}}, 400, "between 16 and 1024"),
    (GEN, {"json": {"prompt": "x", "size": "big"}}, 400, "WIDTHxHEIGHT"),
    (GEN, {"json": {"prompt": ""}}, 400, "prompt must be a non-empty string"),
    (GEN, {"json": {"prompt": "x", "cfg_txt_scale": 4}}, 400, "unknown field(s) 'cfg_txt_scale'"),
    (GEN, {"json": {"prompt": "x", "cfg_text_scale": "nan"}}, 400, "cfg_text_scale"),
    (GEN, {"json": {"prompt": "x", "num_timesteps": 10**9}}, 400, "num_timesteps"),
    (GEN, {"json": {"prompt": "x", "response_format": "url"}}, 400, "keeps no files"),
    (GEN, {"json": ["prompt"]}, 400, "must be a JSON object"),
    (GEN, {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
    (GEN, {"content": b"x" * (3 << 20), "headers": {"content-type": "application/json"}}, 413, "at most"),
    (EDIT, {"data": {"prompt": "x"}, "files": {"image": ("notes.txt", b"some text, no pixels", "text/plain")}},
     400, "image is not an image"),
    (EDIT, {"json": {"prompt": "x", "image": "/etc/passwd"}}, 400, "never fetches URLs or reads files"),
    (EDIT, {"json": {"prompt": "x", "image": "file:///etc/passwd"}}, 400, "never fetches"),
    (EDIT, {"json": {"prompt": "x"}}, 400, "image is missing"),
    (CHAT, {"json": {"messages": _image_part("http://127.0.0.1:1/x.png")}}, 400, "never fetches"),
    (CHAT, {"json": {"messages": _image_part("data:image/png;base64,AAAA")}}, 400, "is not an image"),
    (CHAT, {"json": {"messages": []}}, 400, "messages must be a non-empty list"),
    (CHAT, {"json": {"messages": HI, "max_tokens": 10**7}}, 400, "max_tokens must be between"),
    (CHAT, {"json": {"messages": HI, "n": 2}}, 400, "n must be"),
    ("/v1/nothing", {"json": {}}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,kwargs,status,message", BAD, ids=[f"{i}:{b[3][:24]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_clear_4xx_before_any_model_work(server, path, kwargs, status, message):
    url, engine = server
    before = batches(engine)
    r = httpx.post(url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert batches(engine) == before  # nothing reached the worker


def test_chunked_bodies_over_the_limit_and_a_draining_server(pipe):
    with serving(pipe, max_body_bytes=1 << 20) as (url, engine):
        chunks = (b"x" * 65536 for _ in range(40))  # no Content-Length: counted while read
        r = httpx.post(url + GEN, content=chunks, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 413 and "larger than the server accepts" in r.json()["error"]["message"]
        engine.close()  # what SIGTERM does first
        r = httpx.post(url + GEN, json={"prompt": "x", **SMALL}, timeout=30)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["status"] == "draining"


# -- clients that go away -----------------------------------------------------------------------------------------
def test_a_client_that_disconnects_stops_its_work(server):
    url, engine = server
    before = engine.metrics.counter("bagel_stopped_total", reason="Cancelled")
    images = engine.metrics.counter("bagel_images_total")
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(url + "/v1/images/generations", json={"prompt": "slow", "n": 16, "size": "16x16",
                                                          "num_timesteps": 400}, timeout=0.5)
    t0 = time.monotonic()
    while engine.metrics.counter("bagel_stopped_total", reason="Cancelled") == before:
        assert time.monotonic() - t0 < 20, "the work of the gone client was not stopped"
        time.sleep(0.02)
    assert engine.metrics.counter("bagel_images_total") == images and not engine.running
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "next", **SMALL}, timeout=30)
    assert r.status_code == 200

    # a stream whose reader leaves after the first tokens
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json=chat_body(stream=True, max_tokens=4000)) as s:
        next(s.iter_lines())
    t0 = time.monotonic()
    while engine.metrics.counter("bagel_stopped_total", reason="Cancelled") == before + 1:
        assert time.monotonic() - t0 < 20, "the stream's decoding was not stopped"
        time.sleep(0.02)


# -- load ---------------------------------------------------------------------------------------------------------
def test_200_requests_at_concurrency_16_all_answered_once(pipe, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from serve_load import run_load, summarize

    with serving(pipe, max_queue=8) as (url, engine):
        run = asyncio.run(run_load(url, 200, 16, size=16, steps=2, timeout_s=60))
        s = summarize(run, 200)
        print(f"\nserve load (tiny, CPU, 16x16, 2 steps): {s['ok']} ok, {s['n429']} x 429, p50 {s['p50_s']} s, "
              f"p99 {s['p99_s']} s, {s['requests_per_s']} requests/s over {s['seconds']} s")
        assert s["answered"] == 200 and s["errors"] == 0, s["problems"]
        assert set(s["statuses"]) <= {"200", "429"} and s["ok"] + s["n429"] == 200 and s["ok"] >= 16
        retry_after = [ra for status, _, ra, _ in run["outcomes"].values() if status == 429]
        assert all(ra is not None and int(ra) >= 1 for ra in retry_after)
        served = engine.metrics.counter("bagel_requests_total", endpoint="/v1/images/generations", status="200")
        assert served == s["ok"] and engine.metrics.counter("bagel_images_total") == s["ok"]
        batch_images = engine.metrics._hists["bagel_batch_images"][()]
        assert batch_images.sum == s["ok"] and batch_images.count < s["ok"]  # some requests shared a batch


def test_serve_command_options_and_errors(tiny):
    helped = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    for option in ("--max-batch", "--max-queue", "--request-timeout", "--max-body-mb", "--grace",
                   "--random-weights", "--weights", "--compute", "--max-gpu-memory"):
        assert option in helped
    assert "--json" not in helped and "1 turns batching across requests off" in helped
    r = CliRunner().invoke(cli, ["serve", "--model", str(tiny), "--random-weights", "tiny"])
    assert r.exit_code == 2 and "either --model or --random-weights" in r.output
    with bound_socket("127.0.0.1", 0) as busy:
        busy.listen()
        r = CliRunner().invoke(cli, ["serve", "--model", str(tiny), "--port", str(busy.getsockname()[1])])
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output


# -- the server process: killed mid-request, restarted, stopped gracefully ----------------------------------------
def _start(tiny, port: int = 0, *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "bagel_rt.cli.entry", "serve", "--model", str(tiny), "--device",
                             "cpu", "--port", str(port), "--log-level", "warning", *extra],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if m := re.search(r"serving .* on (http://\S+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            url = m[1]
            break
    else:
        raise AssertionError(f"the server did not start (exit code {proc.wait()})")
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)


def test_server_killed_mid_request_restarts_cleanly_and_stops_gracefully(tiny):
    proc, url = _start(tiny)
    port = int(url.rsplit(":", 1)[1])
    outcome = {}

    def slow():
        try:
            outcome["r"] = httpx.post(url + "/v1/images/generations", json={"prompt": "slow", "n": 16, "size":
                                      "16x16", "num_timesteps": 1000}, timeout=60)
        except httpx.HTTPError as e:
            outcome["e"] = e

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    t.join(30)
    assert proc.wait(10) == -signal.SIGKILL
    assert "e" in outcome and isinstance(outcome["e"], (httpx.RemoteProtocolError, httpx.ReadError))

    proc, url = _start(tiny, port, "--grace", "120")  # the same port, at once
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "after", **SMALL}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1

    # SIGTERM: the request in flight finishes, then the process exits 0
    t = threading.Thread(target=lambda: outcome.update(r=httpx.post(
        url + "/v1/images/generations", json={"prompt": "finish me", "size": "16x16", "num_timesteps": 100},
        timeout=60)))
    t.start()
    t0 = time.monotonic()
    while "running_jobs 1" not in httpx.get(url + "/metrics").text.replace("bagel_", ""):
        assert time.monotonic() - t0 < 20
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert outcome["r"].status_code == 200 and len(outcome["r"].json()["data"]) == 1, outcome["r"].text
    assert proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


@requires_cuda
@pytest.mark.gpu
def test_on_a_gpu_batched_requests_and_memory_metrics(tiny):
    """The triton backend behind the server: the images of one batched call are each within float noise of the
    library's image alone for its seed, and /metrics reports GPU memory."""
    gpu = bagel_rt.load(tiny, device="cuda")
    with serving(gpu) as (url, engine):
        r = httpx.post(url + GEN, json={"prompt": "a red bagel", "size": "64x64", "num_timesteps": 4, "n": 2,
                                        "seed": 1}, timeout=300)
        assert r.status_code == 200, r.text
        for item in r.json()["data"]:
            alone = gpu.generate("a red bagel", seed=item["seed"], image_shapes=(64, 64), num_timesteps=4)
            assert np.abs(decode(item).astype(int) - pixels(alone.image).astype(int)).mean() < 2.0
        text = httpx.get(url + "/metrics").text
        assert 'bagel_gpu_memory_bytes{kind="peak_allocated"}' in text and 'kind="total"' in text
