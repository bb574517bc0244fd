"""The HTTP API: OpenAI-shaped routes over the :class:`bagel_rt.serve.engine.Engine` (FastAPI).

``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart upload or JSON with a data URL),
``POST /v1/chat/completions`` (understanding; ``stream: true`` sends tokens as server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``: bad input 400 (the
library's messages), a body over the limit 413, an unsupported content type 415, a full queue 429 with
``Retry-After``, a timeout 504, shutting down 503. Bodies are read into memory up to the limit (multipart parts
included: nothing is spooled to disk) and parsed before a job is queued. A handler whose client disconnects
cancels its job; the worker stops that GPU work at the next denoising step or token.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BagelError, InputError, NonFiniteError
from ..tokenizer import TextDeltas
from .engine import Engine
from .requests import OUTPUT_FORMATS, ChatRequest, parse_chat, parse_edit, parse_generation
from .scheduler import QueueFull, ShuttingDown, TimedOut

log = logging.getLogger("bagel_rt.serve")

#: Default largest request body: a 1024x1024 PNG as base64 is ~4 MB; several chat images fit too.
MAX_BODY_BYTES = 32 << 20
#: Most parts of a multipart form (an edit has a handful of fields).
MAX_FORM_PARTS = 64
#: Seconds between SSE keep-alive comments while nothing else is sent (also how soon a silent stream notices
#: that its client is gone: only a write can tell).
HEARTBEAT_S = 1.0
#: Form fields kept as text; the others are read as JSON values ("4.0", "true", "[0.4, 1.0]").
TEXT_FIELDS = ("prompt", "size", "response_format", "output_format", "cfg_renorm_type", "model", "user",
               "quality", "style", "moderation")


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (from Content-Length at once, else while reading)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = _error(413, f"the request body has {length.decode('latin-1')[:20]} bytes; at most "
                                   f"{self.max_bytes} are accepted", "request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def error_response(e: BaseException) -> JSONResponse:
    """The HTTP answer for an exception raised before or while a job runs."""
    if isinstance(e, QueueFull):
        return _error(429, str(e), "queue_full", {"Retry-After": str(e.retry_after)})
    if isinstance(e, ShuttingDown):
        return _error(503, str(e), "shutting_down", {"Retry-After": "5"})
    if isinstance(e, TimedOut):
        return _error(504, str(e), "timeout")
    if isinstance(e, BodyTooLarge):
        return _error(413, "the request body is larger than the server accepts", "request_too_large")
    if isinstance(e, NonFiniteError):
        return _error(500, str(e), "non_finite")
    if isinstance(e, BagelError):
        return _error(400, str(e))
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return _error(503, "the GPU ran out of memory for this request; try fewer or smaller images", "oom")
    log.error("request failed", exc_info=e)
    return _error(500, f"internal error ({type(e).__name__}); see the server log")


# -- bodies -------------------------------------------------------------------------------------------------------
def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise InputError("the body's JSON is nested too deeply") from None


def parse_form(body: bytes, content_type: str) -> dict:
    """A multipart/form-data body -> {name: text or JSON value, or the bytes of an uploaded file}, in memory."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError("multipart/form-data without a boundary parameter")
    parts: list[tuple[dict, bytearray]] = []
    header = {"field": b"", "value": b""}

    def on_header_end():
        parts[-1][0][header["field"].decode("latin-1").lower()] = header["value"].decode("latin-1")
        header.update(field=b"", value=b"")

    def on_part_begin():
        if len(parts) >= MAX_FORM_PARTS:
            raise InputError(f"the form has more than {MAX_FORM_PARTS} parts")
        parts.append(({}, bytearray()))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": lambda d, s, e: header.update(field=header["field"] + d[s:e]),
        "on_header_value": lambda d, s, e: header.update(value=header["value"] + d[s:e]),
        "on_header_end": on_header_end,
        "on_part_data": lambda d, s, e: parts[-1][1].extend(d[s:e]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except InputError:
        raise
    except Exception as e:  # python-multipart's parse errors
        raise InputError(f"the multipart form cannot be parsed ({e})") from None
    fields = {}
    for headers, data in parts:
        _, disp = parse_options_header(headers.get("content-disposition", ""))
        name = disp.get(b"name", b"").decode("utf-8", "replace").removesuffix("[]")
        if not name:
            raise InputError("a form part has no name (Content-Disposition: form-data; name=...)")
        if name in fields:
            raise InputError(f"the form field {name!r} is given more than once (one image per edit request)")
        if b"filename" in disp or name == "image":
            fields[name] = bytes(data)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"the form field {name!r} is not UTF-8 text") from None
        try:
            fields[name] = text if name in TEXT_FIELDS else json.loads(text)
        except json.JSONDecodeError:
            fields[name] = text  # validation names the field and what it expected
    return fields


async def read_body(request: Request) -> dict:
    """The JSON object or multipart form of a request (415 for other content types)."""
    ctype = request.headers.get("content-type", "")
    body = await request.body()
    if ctype.startswith("multipart/form-data"):
        return parse_form(body, ctype)
    if ctype.startswith("application/json") or not ctype:
        return parse_json(body)
    raise _Unsupported(ctype)


class _Unsupported(Exception):
    pass


# -- waiting for a job --------------------------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def result_of(job) -> asyncio.Future:
    """The job's result as an asyncio future of the running loop (its error counts as seen even when nobody
    is left to read it: a job cancelled for a client that went away)."""
    result = asyncio.wrap_future(job.future)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())
    return result


async def wait(request: Request, job) -> list:
    """The job's results; cancels the job when the client goes away or the handler is cancelled."""
    watcher = asyncio.ensure_future(_disconnected(request))
    result = result_of(job)
    try:
        while True:
            left = job.deadline - time.monotonic()
            done, _ = await asyncio.wait({result, watcher}, timeout=max(left, 0) + 0.05,
                                         return_when=asyncio.FIRST_COMPLETED)
            if result in done:
                return result.result()
            if watcher in done:
                job.cancel()
                raise ClientGone
            job.expire_if_late(time.monotonic())
    finally:
        watcher.cancel()
        if not job.done:
            job.cancel("the request handler stopped")


def _encode(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=OUTPUT_FORMATS[fmt], **({} if fmt == "png" else {"quality": 95}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str = "bagel-7b-mot", max_body_bytes: int = MAX_BODY_BYTES,
               shutdown_grace_s: float = 0.0) -> FastAPI:
    """The FastAPI app serving ``engine``; on shutdown the engine stops after ``shutdown_grace_s`` seconds."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_grace_s)

    app = FastAPI(title="bagel-rt", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine = engine
    metrics = engine.metrics

    async def answer(request: Request, endpoint: str, handle) -> Response:
        """Run ``handle`` and turn what it raises into an error response; record status and latency."""
        t0 = time.monotonic()
        try:
            response = await handle()
        except ClientGone:
            response = Response(status_code=499)  # nobody reads it; nginx's code for a closed request
        except _Unsupported as e:
            response = _error(415, f"content type {str(e)[:60]!r} is not accepted; send application/json"
                                   f"{' or multipart/form-data' if 'edits' in endpoint else ''}")
        except Exception as e:
            response = error_response(e)
        metrics.inc("bagel_requests_total", endpoint=endpoint, status=str(response.status_code))
        metrics.observe("bagel_request_seconds", time.monotonic() - t0, endpoint=endpoint)
        return response

    async def images(request: Request, parse, endpoint: str) -> Response:
        async def handle():
            req = parse(await read_body(request), engine.limits)
            results = await wait(request, engine.submit(req))
            data = await asyncio.to_thread(lambda: [
                {"b64_json": _encode(r.image, req.output_format), "revised_prompt": r.text, "seed": r.seed}
                for r in results])
            h, w = req.size
            return JSONResponse({"created": int(time.time()), "model": model_name, "data": data,
                                 "output_format": req.output_format, "size": f"{w}x{h}"})
        return await answer(request, endpoint, handle)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await images(request, parse_generation, "/v1/images/generations")

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await images(request, parse_edit, "/v1/images/edits")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        async def handle():
            req = parse_chat(await read_body(request), engine.limits)
            if req.stream:
                return await stream_chat(request, req)
            res = (await wait(request, engine.submit(req)))[0]
            return JSONResponse(_completion(res, model_name, engine.bagel.model.special.eos))
        return await answer(request, "/v1/chat/completions", handle)

    async def stream_chat(request: Request, req: ChatRequest) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        job = engine.submit(req, on_token=lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t))
        result = result_of(job)
        cid, created = _chat_id(), int(time.time())

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": model_name, "choices": choices, **extra}) + "\n\n"

        async def events():
            deltas = TextDeltas(engine.bagel.tokenizer)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:  # the worker puts every token before it settles the result (both in order on the loop)
                    if tokens.empty() and result.done():
                        break
                    getter = asyncio.ensure_future(tokens.get())
                    await asyncio.wait({getter, result}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        if piece := deltas.push(getter.result()):
                            yield chunk({"content": piece})
                        continue
                    getter.cancel()
                    if not result.done():
                        job.expire_if_late(time.monotonic())
                        yield ": keep-alive\n\n"
                try:
                    res = result.result()[0]
                except Exception as e:
                    yield "data: " + json.dumps(json.loads(error_response(e).body)) + "\n\n"
                    return
                if rest := deltas.rest(res.text):
                    yield chunk({"content": rest})
                yield chunk({}, _finish_reason(res, engine.bagel.model.special.eos))
                if req.include_usage:
                    yield chunk(None, usage=_usage(res))
                yield "data: [DONE]\n\n"
            finally:
                if not job.done:
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "bagel-rt"}]}

    @app.get("/health")
    async def health():
        body = {"status": "draining" if engine.draining else "ok", "model": model_name,
                "queue_depth": engine.scheduler.depth(), "running": len(engine.running),
                "max_batch": engine.scheduler.max_batch, "max_queue": engine.scheduler.max_queue}
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.gauges()), media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge):
        return error_response(e)

    return app


def _chat_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _finish_reason(res, eos: int) -> str:
    return "stop" if res.token_ids and res.token_ids[-1] == eos else "length"


def _completion(res, model_name: str, eos: int) -> dict:
    return {"id": _chat_id(), "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                         "finish_reason": _finish_reason(res, eos)}],
            "seed": res.seed, "usage": _usage(res)}


def _usage(res) -> dict:
    """Decoded tokens (the prompt's are not counted: the library does not report them)."""
    return {"completion_tokens": len(res.token_ids or [])}
