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


def _settings(seed, steps, cfg_text, interval_lo, shift, renorm_type, renorm_min, taylorseer, think,
              think_tokens) -> dict:
    body = {"num_timesteps": int(steps), "cfg_text_scale": float(cfg_text),
            "cfg_interval": [float(interval_lo), 1.0], "timestep_shift": float(shift),
            "cfg_renorm_type": renorm_type, "cfg_renorm_min": float(renorm_min),
            "enable_taylorseer": bool(taylorseer), "think": bool(think), "max_think_token_n": int(think_tokens)}
    if seed:
        body["seed"] = int(seed)
    return body


def _sampler_controls(task: str, tab: str) -> list:
    """Seed, steps, text CFG, CFG interval start, shift, renorm type and minimum, TaylorSeer (task defaults)."""
    d = TASK_DEFAULTS[task]
    return [
        gr.Number(0, precision=0, minimum=0, label="Seed (0: random)"),
        gr.Slider(2, 100, d["num_timesteps"], step=1, label="Steps (num_timesteps)", elem_id=f"{tab}-steps"),
        gr.Slider(1.0, 8.0, d["cfg_text_scale"], step=0.1, label="Text guidance (cfg_text_scale)"),
        gr.Slider(0.0, 1.0, d["cfg_interval"][0], step=0.1, label="Guidance from (cfg_interval start)"),
        gr.Slider(1.0, 5.0, d["timestep_shift"], step=0.5, label="Timestep shift"),
        gr.Dropdown(list(RENORM_TYPES), value=d["cfg_renorm_type"], label="CFG renorm type"),
        gr.Slider(0.0, 1.0, d["cfg_renorm_min"], step=0.1, label="CFG renorm minimum"),
        gr.Checkbox(d["enable_taylorseer"], label="TaylorSeer step caching (approximate, faster)"),
    ]


def build_webapp(engine: Engine) -> gr.Blocks:
    """The Blocks of the app, wired to ``engine``."""
    side = engine.limits.params.max_image_side
    step = engine.limits.params.latent_downsample

    def t2i(prompt, height, width, *rest, progress=PROGRESS):
        *sampler, think, think_tokens = rest
        body = {"prompt": prompt, "size": f"{int(width)}x{int(height)}",
                **_settings(*sampler, think, think_tokens)}
        return _image_request(engine, "t2i", body, progress)

    def edit(image, instruction, cfg_img, *rest, progress=PROGRESS):
        if image is None:
            raise gr.Error("upload an image to edit")
        *sampler, think_box, think_tokens = rest
        body = {"image": _png(image), "prompt": instruction, "cfg_img_scale": float(cfg_img),
                **_settings(*sampler, think_box, think_tokens)}
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

    def size_from_aspect(aspect):
        h, w = ASPECT_PRESETS[aspect]
        return h, w

    with gr.Blocks(title="bagel-rt") as app:
        gr.Markdown("# BAGEL (bagel-rt)\nText to image, editing, understanding and think mode on one engine.")
        with gr.Tab("Text to Image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="t2i-prompt")
                    aspect = gr.Dropdown(list(ASPECT_PRESETS), value="1:1", label="Aspect ratio (H x W presets)")
                    height = gr.Slider(step, side, 1024, step=step, label="Height", elem_id="t2i-height")
                    width = gr.Slider(step, side, 1024, step=step, label="Width", elem_id="t2i-width")
                    with gr.Accordion("Settings", open=False, elem_id="t2i-settings"):
                        sampler = _sampler_controls("t2i", "t2i")
                        think = gr.Checkbox(False, label="Think first (plan in text, then draw)")
                        think_tokens = gr.Slider(64, 4096, 1024, step=64, label="Most think tokens")
                    go = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                with gr.Column():
                    image = gr.Image(type="pil", label="Image", format="png", elem_id="t2i-image")
                    plan = gr.Textbox(label="Thinking", lines=4)
            aspect.change(size_from_aspect, aspect, [height, width])
            go.click(t2i, [prompt, height, width, *sampler, think, think_tokens], [image, plan])

        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(type="pil", label="Image to edit")
                    instruction = gr.Textbox(label="Instruction", lines=2)
                    with gr.Accordion("Settings", open=False):
                        sampler_e = _sampler_controls("edit", "edit")
                        cfg_img = gr.Slider(1.0, 4.0, TASK_DEFAULTS["edit"]["cfg_img_scale"], step=0.1,
                                            label="Image guidance (cfg_img_scale)")
                        think_e = gr.Checkbox(False, label="Think first")
                        think_tokens_e = gr.Slider(64, 4096, 1024, step=64, label="Most think tokens")
                    go_e = gr.Button("Edit", variant="primary")
                with gr.Column():
                    edited = gr.Image(type="pil", label="Edited", format="png")
                    plan_e = gr.Textbox(label="Thinking", lines=4)
            go_e.click(edit, [source, instruction, cfg_img, *sampler_e, think_e, think_tokens_e], [edited, plan_e])

        with gr.Tab("Understanding"):
            with gr.Row():
                with gr.Column():
                    seen = gr.Image(type="pil", label="Image (optional)")
                    question = gr.Textbox(label="Question", lines=2)
                    think_u = gr.Checkbox(False, label="Think first (reasoning in <think> tags)")
                    with gr.Accordion("Settings", open=False):
                        sample = gr.Checkbox(False, label="Sample (instead of greedy)")
                        temperature = gr.Slider(0.1, 1.0, 0.3, step=0.1, label="Temperature")
                        max_new = gr.Slider(64, 4096, 512, step=64, label="Most new tokens")
                    go_u = gr.Button("Ask", variant="primary")
                answer = gr.Textbox(label="Answer", lines=12)
            go_u.click(understand, [seen, question, think_u, sample, temperature, max_new], answer)

        with gr.Tab("Think"):
            gr.Markdown("Think mode: the model writes a plan first, then draws from its prompt and the plan.")
            with gr.Row():
                with gr.Column():
                    prompt_t = gr.Textbox(label="Prompt", lines=2)
                    height_t = gr.Slider(step, side, 1024, step=step, label="Height")
                    width_t = gr.Slider(step, side, 1024, step=step, label="Width")
                    with gr.Accordion("Settings", open=False):
                        sampler_t = _sampler_controls("t2i", "think")
                        think_tokens_t = gr.Slider(64, 4096, 1024, step=64, label="Most think tokens")
                    go_t = gr.Button("Think and draw", variant="primary")
                with gr.Column():
                    plan_t = gr.Textbox(label="Plan", lines=6)
                    image_t = gr.Image(type="pil", label="Image", format="png")
            go_t.click(t2i, [prompt_t, height_t, width_t, *sampler_t, gr.State(True), think_tokens_t],
                       [image_t, plan_t])
    return app


def mount_webapp(api, engine: Engine, path: str = "/"):
    """Serve the app at ``path`` of the FastAPI ``api`` (the API routes keep their paths)."""
    app = build_webapp(engine)
    app.queue(default_concurrency_limit=engine.scheduler.max_queue)  # the engine queues and batches
    return gr.mount_gradio_app(api, app, path=path, theme=THEME, ssr_mode=False, footer_links=[])
