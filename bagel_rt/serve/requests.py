"""Serving requests: what a client asks for, checked and turned into the library's keyword arguments.

No HTTP here: the parsers take the decoded JSON object of an OpenAI-shaped request (``/v1/images/generations``,
``/v1/images/edits``, ``/v1/chat/completions``) and return a frozen request object, or raise
:class:`bagel_rt.errors.InputError` with the same messages as the library and the CLI (the checks are the
library's own: :mod:`bagel_rt.validate`, :class:`bagel_rt.sampler.CFGSettings`, ``check_image_shape``). All of it
runs before a request is queued, so a bad request never reaches the GPU worker.

BAGEL's options travel as extra fields with the official keyword names; the defaults are the library's
(the official app's, per task), read from the signatures of ``Bagel.generate`` and ``Bagel.edit`` so there is
one table of defaults. Images come only as bytes or ``data:`` URLs: the server never fetches a URL or opens a
path a client names.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import re
import secrets
from dataclasses import dataclass, field

from PIL import Image

from .. import validate
from ..batch import MAX_BATCH_IMAGES
from ..config import BagelParams
from ..errors import InputError
from ..pipeline import Bagel
from ..sampler import MAX_SCALE, MAX_STEPS, CFGSettings
from ..session import check_image_shape
from ..transforms import VAE_RESIZE, resize_dims

#: Most images one request may ask for (``n``); also the most of one batched call (``serve --max-batch``): the
#: library's limit of one call
MAX_N = MAX_BATCH_IMAGES
#: Longest prompt or message text, in characters (a prompt must also fit the model's context, in tokens).
MAX_TEXT_CHARS = 32_000
#: Most input images of one chat request (each costs up to ~4,900 ViT tokens of context).
MAX_CHAT_IMAGES = 4
#: Largest input image, in pixels (checked from the header, before the pixels are decoded).
MAX_INPUT_PIXELS = 8192 * 8192
#: Image formats read from a client (Pillow's names).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
#: Formats an image response can be encoded in (OpenAI's ``output_format``) -> Pillow's names.
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: Random seeds drawn for requests without one (as the CLI draws them).
RANDOM_SEED_BOUND = 2**31

#: BAGEL's options of an image request (the library's keyword names).
IMAGE_OPTIONS = ("num_timesteps", "cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_min",
                 "cfg_renorm_type", "timestep_shift", "think", "max_think_token_n", "do_sample",
                 "text_temperature", "enable_taylorseer")
#: OpenAI fields accepted and ignored: one model is served and these change nothing here.
IGNORED_FIELDS = ("model", "user", "quality", "style", "moderation")


@dataclass(frozen=True)
class Limits:
    """What the served model accepts: sizes and the context (from its parameters), and the most images a request
    may ask for."""

    params: BagelParams
    max_n: int = MAX_N

    @property
    def max_positions(self) -> int:
        return self.params.llm.max_positions


@dataclass(frozen=True)
class ImageRequest:
    """A text-to-image ("t2i") or edit request for ``n`` images.

    Attributes:
        seeds: one per image (``seed``, ``seed + 1``, ... as the library numbers them; drawn when not given).
        size: (H, W) of the output in pixels (an edit's is its input's size after the VAE resize).
        options: the library keyword arguments, defaults filled in, sorted: two requests with equal ``key`` can
            share one batched library call.
        image: the edit's input image (RGB or as decoded), None for t2i.
    """

    task: str
    prompt: str
    n: int
    seeds: tuple[int, ...]
    size: tuple[int, int]
    options: tuple[tuple[str, object], ...]
    output_format: str = "png"
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple:
        """Requests with the same key run together: same task, output size and settings."""
        return (self.task, self.size, self.options)

    @property
    def images(self) -> int:
        return self.n


@dataclass(frozen=True)
class ChatRequest:
    """An understanding request: the conversation as the library's interleaved inputs, and decoding settings."""

    inputs: tuple = field(repr=False)
    think: bool
    max_think_token_n: int
    do_sample: bool
    text_temperature: float
    seed: int
    stream: bool = False
    include_usage: bool = False

    key = None  # each runs alone: decoding is per sequence in the library
    images = 1


# -- images in ----------------------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[A-Za-z0-9=.+-]+)*;base64,", re.ASCII)


def image_from_data_url(url, what: str) -> Image.Image:
    """The image of a ``data:image/...;base64,...`` URL; any other URL or a path is refused, never fetched."""
    if not isinstance(url, str):
        raise InputError(f"{what} must be a data URL string (data:image/png;base64,...), got {type(url).__name__}")
    m = _DATA_URL.match(url)
    if m is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise InputError(f"{what} must be a base64 data URL (data:image/png;base64,...), got {shown!r}; the "
                         "server never fetches URLs or reads files")
    try:
        data = base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: the data URL's base64 payload is not valid base64") from None
    return image_from_bytes(data, what)


def image_from_bytes(data: bytes, what: str) -> Image.Image:
    """Decode an uploaded image (PNG, JPEG, WebP, GIF or BMP), its size checked before its pixels are read."""
    if not data:
        raise InputError(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Exception:  # Pillow raises several types for data it cannot identify
        raise InputError(f"{what} is not an image ({', '.join(INPUT_FORMATS)} are read)") from None
    w, h = img.size
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{what} is {w}x{h} pixels; at most {MAX_INPUT_PIXELS} pixels are accepted (it is "
                         "resized to at most 1024 on the long side anyway)")
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data
        raise InputError(f"{what} cannot be decoded ({e})") from None
    return img


# -- fields -------------------------------------------------------------------------------------------------------
def _check_fields(body, allowed: tuple[str, ...], what: str) -> dict:
    if not isinstance(body, dict):
        raise InputError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed) - set(IGNORED_FIELDS))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))} for {what}; accepted: "
                         f"{', '.join(allowed)}")
    return body


def _string(v, name: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise InputError(f"{name} must be a non-empty string, got {'nothing' if v is None else repr(v)[:40]}")
    if len(v) > MAX_TEXT_CHARS:
        raise InputError(f"{name} has {len(v)} characters; at most {MAX_TEXT_CHARS} are accepted")
    return v


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"{name} must be true or false, got {v!r}")
    return v


def _seeds(seed, n: int) -> tuple[int, ...]:
    """One seed per image: ``seed + k`` for image k (the library's numbering); drawn at random when None."""
    if seed is None:
        return tuple(secrets.randbelow(RANDOM_SEED_BOUND) for _ in range(n))
    s = validate.seed(seed)
    if s + n - 1 > validate.MAX_SEED:
        raise InputError(f"seed {s} + n - 1 exceeds the largest seed {validate.MAX_SEED}")
    return tuple(s + k for k in range(n))


def _library_defaults(method) -> dict:
    found = {name: p.default for name, p in inspect.signature(method).parameters.items() if name in IMAGE_OPTIONS}
    missing = sorted(set(IMAGE_OPTIONS) - set(found))
    assert not missing, f"{method.__qualname__} has no keyword default for {', '.join(missing)}"
    return found


#: The official app's defaults per task: the library's (one table, in the signatures).
TASK_DEFAULTS = {"t2i": _library_defaults(Bagel.generate), "edit": _library_defaults(Bagel.edit)}


def image_options(body: dict, task: str, limits: Limits) -> tuple[tuple[str, object], ...]:
    """BAGEL's options of an image request, checked, with the task's defaults for the ones not given."""
    o = {**TASK_DEFAULTS[task], **{k: body[k] for k in IMAGE_OPTIONS if k in body}}
    interval = o["cfg_interval"]
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2):
        raise InputError(f"cfg_interval must be a pair [lo, hi], got {interval!r}")
    cfg = CFGSettings(o["cfg_text_scale"], o["cfg_img_scale"], tuple(interval), o["cfg_renorm_min"],
                      o["cfg_renorm_type"])
    o.update(cfg_text_scale=cfg.cfg_text_scale, cfg_img_scale=cfg.cfg_img_scale,
             cfg_interval=tuple(float(v) for v in cfg.cfg_interval), cfg_renorm_min=float(cfg.cfg_renorm_min),
             num_timesteps=validate.integer("num_timesteps", o["num_timesteps"], 2, MAX_STEPS),
             timestep_shift=validate.number("timestep_shift", o["timestep_shift"], 0.0, MAX_SCALE, lo_open=True),
             max_think_token_n=validate.integer("max_think_token_n", o["max_think_token_n"], 1,
                                                limits.max_positions - 1),
             text_temperature=validate.number("text_temperature", o["text_temperature"], 0.0, MAX_SCALE,
                                              lo_open=True))
    for name in ("think", "do_sample", "enable_taylorseer"):
        _flag(name, o[name])
    return tuple(sorted(o.items()))


def _size(value, limits: Limits) -> tuple[int, int]:
    """OpenAI's ``size`` "WxH" (width first) as (H, W); "auto" is 1024x1024 (the app's default)."""
    if value is None or value == "auto":
        value = "1024x1024"
    m = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", value) if isinstance(value, str) else None
    if m is None:
        raise InputError(f"size must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {value!r}")
    return check_image_shape((int(m[2]), int(m[1])), limits.params)


def _common(body: dict, limits: Limits) -> tuple[int, str]:
    n = validate.integer("n", body.get("n", 1), 1, limits.max_n)
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise InputError(f"response_format {fmt!r} is not supported: images are returned inline, the server keeps "
                         "no files; use \"b64_json\"")
    out = body.get("output_format") or "png"
    if out not in OUTPUT_FORMATS:
        raise InputError(f"output_format {out!r} is not supported; choose one of {', '.join(OUTPUT_FORMATS)}")
    return n, out


GENERATION_FIELDS = ("prompt", "n", "size", "response_format", "output_format", "seed", *IMAGE_OPTIONS)
EDIT_FIELDS = ("image", *GENERATION_FIELDS)


def parse_generation(body, limits: Limits) -> ImageRequest:
    """A ``/v1/images/generations`` body -> :class:`ImageRequest` (text-to-image)."""
    body = _check_fields(body, GENERATION_FIELDS, "/v1/images/generations")
    prompt = _string(body.get("prompt"), "prompt")
    n, out = _common(body, limits)
    return ImageRequest("t2i", prompt, n, _seeds(body.get("seed"), n), _size(body.get("size"), limits),
                        image_options(body, "t2i", limits), out)


def parse_edit(body, limits: Limits) -> ImageRequest:
    """A ``/v1/images/edits`` body -> :class:`ImageRequest` (edit). ``image`` is the uploaded file's bytes (a
    multipart form) or a data URL (a JSON body)."""
    if isinstance(body, dict) and "mask" in body:
        raise InputError("mask is not supported: BAGEL edits follow the instruction over the whole image")
    body = _check_fields(body, EDIT_FIELDS, "/v1/images/edits")
    raw = body.get("image")
    if raw is None:
        raise InputError("image is missing: upload it as the form field 'image' (or a data URL in a JSON body)")
    img = image_from_bytes(raw, "image") if isinstance(raw, bytes) else image_from_data_url(raw, "image")
    prompt = _string(body.get("prompt"), "prompt")
    n, out = _common(body, limits)
    w, h = resize_dims(*img.size, *VAE_RESIZE)
    size = body.get("size")
    if size not in (None, "auto", f"{w}x{h}"):
        raise InputError(f"size {size!r}: an edit has its input's size after the official resize, here "
                         f"\"{w}x{h}\"; leave size out (or \"auto\")")
    return ImageRequest("edit", prompt, n, _seeds(body.get("seed"), n), (h, w),
                        image_options(body, "edit", limits), out, img)


CHAT_FIELDS = ("messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "max_think_token_n",
               "temperature", "text_temperature", "do_sample", "seed", "n", "think")
ROLES = ("system", "developer", "user", "assistant")


def _message_inputs(messages) -> list:
    """The conversation as the library's interleaved inputs: texts and images in order."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    inputs, images = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"{where} must be an object with a role of {', '.join(ROLES)} and a content")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            raise InputError(f"{where}.content must be a string or a non-empty list of content parts")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                inputs.append(_string(part.get("text"), f"{where}.content[{j}].text"))
            elif kind == "image_url" and m["role"] == "user":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images += 1
                if images > MAX_CHAT_IMAGES:
                    raise InputError(f"at most {MAX_CHAT_IMAGES} images per request")
                inputs.append(image_from_data_url(url, f"{where}.content[{j}].image_url"))
            else:
                raise InputError(f"{where}.content[{j}]: expected a text part"
                                 f"{' or an image_url part' if m['role'] == 'user' else ''}, got {kind!r}")
    if messages[-1]["role"] != "user":
        raise InputError("the last message must be the user's (the one answered)")
    return inputs


def parse_chat(body, limits: Limits) -> ChatRequest:
    """A ``/v1/chat/completions`` body -> :class:`ChatRequest`.

    ``temperature`` keeps OpenAI's meaning (0 is greedy, more samples at that temperature) unless the official
    ``do_sample`` / ``text_temperature`` are given; the default is the app's greedy decoding of up to 512 tokens.
    """
    body = _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    validate.integer("n", body.get("n", 1), 1, 1)
    inputs = _message_inputs(body.get("messages"))
    given = [k for k in ("max_tokens", "max_completion_tokens", "max_think_token_n") if body.get(k) is not None]
    if len(given) > 1:
        raise InputError(f"give one token limit, not {' and '.join(given)}")
    limit = validate.integer(given[0] if given else "max_tokens", body[given[0]] if given else 512, 1,
                             limits.max_positions - 1)
    do_sample, temperature = body.get("do_sample"), body.get("text_temperature")
    if body.get("temperature") is not None:
        t = validate.number("temperature", body["temperature"], 0.0, MAX_SCALE)
        do_sample = t > 0 if do_sample is None else do_sample
        temperature = t if temperature is None and t > 0 else temperature
    do_sample = _flag("do_sample", False if do_sample is None else do_sample)
    temperature = validate.number("text_temperature", 0.3 if temperature is None else temperature, 0.0, MAX_SCALE,
                                  lo_open=True)
    stream = _flag("stream", body.get("stream", False))
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise InputError(f"stream_options must be an object with include_usage only, got {opts!r}")
    seed = _seeds(body.get("seed"), 1)[0]
    return ChatRequest(tuple(inputs), _flag("think", body.get("think", False)), limit, do_sample, temperature,
                       seed, stream, _flag("stream_options.include_usage", opts.get("include_usage", False)))
