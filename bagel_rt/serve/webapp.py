"""The web app (Gradio): the official app's tabs — text to image, edit, understanding — and a think tab, served
by the same :class:`bagel_rt.serve.engine.Engine` as the HTTP API (one queue, batching, one GPU worker).

Each tab builds the body of the matching API request and goes through the API's parsers
(:mod:`bagel_rt.serve.requests`), so the app and the API accept and refuse the same things with the same
messages. Image requests show the denoising progress (queue, then step i of n); answers stream token by token.
Defaults are the official app's (the library's): 50 steps, cfg_text 4.0, and per task the CFG interval, image
scale and renorm type; a seed of 0 draws a random one, as in the official app.

Gradio keeps uploaded images in its own temporary cache, as every Gradio app does; the HTTP API writes nothing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import queue

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a server

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ..errors import BagelError  # noqa: E402
from ..pipeline import ASPECT_PRESETS  # noqa: E402
from ..sampler import RENORM_TYPES  # noqa: E402
from ..tokenizer import TextDeltas  # noqa: E402
from .engine import Engine  # noqa: E402
from .requests import TASK_DEFAULTS, parse_chat, parse_edit, parse_generation  # noqa: E402
from .scheduler import QueueFull, ShuttingDown, TimedOut  # noqa: E402

#: System fonts only: the default theme would fetch web fonts, and a server may have no way out.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])

#: Gradio gives a function whose parameter defaults to a Progress its own tracker per call.
PROGRESS = gr.Progress()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _user_error(e: Exception) -> gr.Error:
    if isinstance(e, QueueFull):
        return gr.Error(f"{e}")
    if isinstance(e, (BagelError, ShuttingDown, TimedOut)):
        return gr.Error(str(e))
    return gr.Error(f"the request failed ({type(e).__name__}); see the server log")


def _wait(job, progress) -> list:
    """The job's results, showing the queue and the denoising steps on ``progress`` meanwhile."""
    while True:
        try:
            return job.future.result(timeout=0.1)
        except concurrent.futures.TimeoutError:
            done, total = job.progress
            if job.started is None:
                progress(0.0, desc="waiting in the queue")
            elif total:
                progress(done / total, desc=f"step {done} of {total}")
            else:  # before the first step: encoding the prompt or the input image, thinking
                progress(0.0, desc="working")


def _image_request(engine: Engine, task: str, body: dict, progress) -> tuple[Image.Image, str]:
    try:
        parse = parse_generation if task == "t2i" else parse_edit
        results = _wait(engine.submit(parse(body, engine.limits)), progress)
    except Exception as e:
        raise _user_error(e) from None
    res = results[0]
    return res.image, res.text or ""


def _settings(seed, steps, cfg_text, cfg_img, interval_lo, shift, renorm_type, renorm_min, taylorseer, think,
              think_tokens) -> dict:
    """The API fields of an image tab's settings (as :func:`_image_settings` lists them)."""
    body = {"num_timesteps": int(steps), "cfg_text_scale": float(cfg_text), "cfg_img_scale": float(cfg_img),
            "cfg_interval": [float(interval_lo), 1.0], "timestep_shift": float(shift),
            "cfg_renorm_type": renorm_type, "cfg_renorm_min": float(renorm_min),
            "enable_taylorseer": bool(taylorseer), "think": bool(think), "max_think_token_n": int(think_tokens)}
    if seed:
        body["seed"] = int(seed)
    return body


def _image_settings(task: str, tab: str, think: bool | None) -> list:
    """The Settings of an image tab with the task's defaults, in :func:`_settings`'s order: seed, steps, text and
    image guidance, CFG interval start, shift, renorm type and minimum, TaylorSeer, think (a checkbox, or fixed
    for a tab that always thinks) and the most think tokens."""
    d = TASK_DEFAULTS[task]
    with gr.Accordion("Settings", open=False, elem_id=f"{tab}-settings"):
        return [
            gr.Number(0, precision=0, minimum=0, label="Seed (0: random)"),
            gr.Slider(2, 100, d["num_timesteps"], step=1, label="Steps (num_timesteps)", elem_id=f"{tab}-steps"),
            gr.Slider(1.0, 8.0, d["cfg_text_scale"], step=0.1, label="Text guidance (cfg_text_scale)"),
            gr.Slider(1.0, 4.0, d["cfg_img_scale"], step=0.1, label="Image guidance (cfg_img_scale)"),
            gr.Slider(0.0, 1.0, d["cfg_interval"][0], step=0.1, label="Guidance from (cfg_interval start)"),
            gr.Slider(1.0, 5.0, d["timestep_shift"], step=0.5, label="Timestep shift"),
            gr.Dropdown(list(RENORM_TYPES), value=d["cfg_renorm_type"], label="CFG renorm type"),
            gr.Slider(0.0, 1.0, d["cfg_renorm_min"], step=0.1, label="CFG renorm minimum"),
            gr.Checkbox(d["enable_taylorseer"], label="TaylorSeer step caching (approximate, faster)"),
            gr.Checkbox(False, label="Think first (plan, then draw)") if think is None else gr.State(think),
            gr.Slider(64, 4096, 1024, step=64, label="Most think tokens"),
        ]


def build_webapp(engine: Engine) -> gr.Blocks:
    """The Blocks of the app, wired to ``engine``."""
    side = engine.limits.params.max_image_side
    step = engine.limits.params.latent_downsample

    def t2i(prompt, height, width, *settings, progress=PROGRESS):
        body = {"prompt": prompt, "size": f"{int(width)}x{int(height)}", **_settings(*settings)}
        return _image_request(engine, "t2i", body, progress)

    def edit(image, instruction, *settings, progress=PROGRESS):
        if image is None:
            raise gr.Error("upload an image to edit")
        body = {"image": _png(image), "prompt": instruction, **_settings(*settings)}
        return _image_request(engine, "edit", body, progress)

    def understand(image, question, think, do_sample, temperature, max_tokens):
        content = [{"type": "text", "text": question}]
        if image is not None:
            url = "data:image/png;base64," + base64.b64encode(_png(image)).decode("ascii")
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        tokens: queue.Queue = queue.Queue()
        try:
            req = parse_chat({"messages": [{"role": "user", "content": content}], "think": bool(think),
                              "do_sample": bool(do_sample), "text_temperature": float(temperature),
                              "max_tokens": int(max_tokens)}, engine.limits)
            job = engine.submit(req, on_token=tokens.put)
        except Exception as e:
            raise _user_error(e) from None
        deltas = TextDeltas(engine.bagel.tokenizer)
        try:
            while not (job.done and tokens.empty()):
                try:
                    if deltas.push(tokens.get(timeout=0.1)):
                        yield deltas.text
                except queue.Empty:
                    pass
            try:
                yield job.future.result()[0].text
            except Exception as e:
                raise _user_error(e) from None
        finally:  # the page went away: stop decoding
            job.cancel("the web page closed the request")

    def text_to_image_tab(tab: str, think: bool | None, button: str):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}-prompt")
                aspect = gr.Dropdown(list(ASPECT_PRESETS), value="1:1", label="Aspect ratio (H x W presets)")
                height = gr.Slider(step, side, 1024, step=step, label="Height", elem_id=f"{tab}-height")
                width = gr.Slider(step, side, 1024, step=step, label="Width", elem_id=f"{tab}-width")
                settings = _image_settings("t2i", tab, think)
                go = gr.Button(button, variant="primary", elem_id=f"{tab}-run")
            with gr.Column():
                image = gr.Image(type="pil", label="Image", format="png", elem_id=f"{tab}-image")
                plan = gr.Textbox(label="Plan (think mode)", lines=6)
        aspect.change(lambda a: ASPECT_PRESETS[a], aspect, [height, width])
        go.click(t2i, [prompt, height, width, *settings], [image, plan])

    with gr.Blocks(title="bagel-rt") as app:
        gr.Markdown("# BAGEL (bagel-rt)\nText to image, editing, understanding and think mode on one engine.")
        with gr.Tab("Text to Image"):
            text_to_image_tab("t2i", None, "Generate")

        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(type="pil", label="Image to edit")
                    instruction = gr.Textbox(label="Instruction", lines=2)
                    settings = _image_settings("edit", "edit", None)
                    go = gr.Button("Edit", variant="primary")
                with gr.Column():
                    edited = gr.Image(type="pil", label="Edited", format="png")
                    plan = gr.Textbox(label="Plan (think mode)", lines=6)
            go.click(edit, [source, instruction, *settings], [edited, plan])

        with gr.Tab("Understanding"):
            with gr.Row():
                with gr.Column():
                    seen = gr.Image(type="pil", label="Image (optional)")
                    question = gr.Textbox(label="Question", lines=2, elem_id="und-question")
                    think = gr.Checkbox(False, label="Think first (reasoning in <think> tags)")
                    with gr.Accordion("Settings", open=False):
                        sample = gr.Checkbox(False, label="Sample (instead of greedy)")
                        temperature = gr.Slider(0.1, 1.0, 0.3, step=0.1, label="Temperature")
                        max_new = gr.Slider(64, 4096, 512, step=64, label="Most new tokens")
                    go = gr.Button("Ask", variant="primary", elem_id="und-run")
                answer = gr.Textbox(label="Answer", lines=12, elem_id="und-answer")
            go.click(understand, [seen, question, think, sample, temperature, max_new], answer)

        with gr.Tab("Think"):
            gr.Markdown("Think mode: the model writes a plan first, then draws from its prompt and the plan.")
            text_to_image_tab("think", True, "Think and draw")
    return app


def mount_webapp(api, engine: Engine, path: str = "/"):
    """Serve the app at ``path`` of the FastAPI ``api`` (the API routes keep their paths)."""
    app = build_webapp(engine)
    app.queue(default_concurrency_limit=engine.scheduler.max_queue)  # the engine queues and batches
    return gr.mount_gradio_app(api, app, path=path, theme=THEME, ssr_mode=False, footer_links=[])
