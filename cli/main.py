"""The ``bagel-rt`` command line: one thin click group over the library.

Each command parses its options, checks what can be checked before the (slow) model load — option values,
input images, the output path — and calls one library function. Option groups shared by several commands
are defined once, below, as decorators. Every error a user can cause (a :class:`bagel_rt.BagelError`, an
existing directory for ``init-tiny``, a bad option) is printed as one line ``error: ...`` on stderr and the
exit code is 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import click
import torch

import bagel_rt
from bagel_rt.convert import convert_checkpoint
from bagel_rt.errors import BagelError, InputError
from bagel_rt.info import _human, checkpoint_info, format_info
from bagel_rt.pipeline import ASPECT_PRESETS, open_image
from bagel_rt.quantized import FORMATS, WEIGHTS
from bagel_rt.sampler import RENORM_TYPES, CFGSettings
from bagel_rt.tiny import ensure_tiny_checkpoint, write_tiny_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SIZE_STEP, MAX_SIDE = 16, 1024


# -- errors: one line, exit code 2 ---------------------------------------------------------------------------
class UserError(click.ClickException):
    """A user error, shown as a single ``error: ...`` line on stderr."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _usage_error(e: click.UsageError) -> UserError:
    hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return UserError(e.format_message() + hint)


class _Group(click.Group):
    """Turns library errors and click's usage errors into :class:`UserError`."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_error(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_error(e) from None
        except (BagelError, FileExistsError) as e:
            raise UserError(str(e)) from None


# -- shared options -------------------------------------------------------------------------------------------
def _options(*decorators):
    """Apply option decorators so that ``--help`` lists them in the order given."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def _check_device(ctx, param, value):
    if value is None:
        return None
    try:
        return str(torch.device(value))
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a torch device (try cpu, cuda or cuda:1)") from None


class _Side(click.ParamType):
    """An image side in pixels: a multiple of 16 between 16 and 1024."""

    name = "PIXELS"

    def convert(self, value, param, ctx):
        try:
            v = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if v % SIZE_STEP or not SIZE_STEP <= v <= MAX_SIDE:
            self.fail(f"{v} must be a multiple of {SIZE_STEP} between {SIZE_STEP} and {MAX_SIDE}", param, ctx)
        return v


model_options = _options(
    click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
                 help="Checkpoint directory (the official BAGEL-7B-MoT layout). "
                      "Default: the embedded tiny model with RANDOM weights (outputs are noise), created on "
                      "first use in $BAGEL_RT_CACHE or ~/.cache/bagel-rt."),
    click.option("--device", default=None, callback=_check_device, show_default="cuda if available, else cpu",
                 help="Where the model runs (cpu, cuda, cuda:1, ...)."),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16",
                 help="Weights and activations of the LLM and ViT (the VAE always runs in fp32)."),
    click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto",
                 help="torch: reference PyTorch ops; triton: batched CFG, fused Triton kernels and CUDA graphs; "
                      "auto: triton on CUDA, torch elsewhere."),
    click.option("--weights", type=click.Choice(WEIGHTS), default="auto",
                 help="Weight format to run with. auto: what the checkpoint holds (declared in its files); "
                      "int8/nf4 on a bf16 (or df11) checkpoint: quantize as it loads; bf16 from df11: decode."),
    click.option("--compute", type=click.Choice(["bf16", "fp8"]), default="bf16",
                 help="Denoising GEMM precision (triton backend). fp8 is opt-in and approximate: FP8 "
                      "generation-expert GEMMs with per-token activation scales (Ada/Hopper GPUs)."),
    click.option("--max-gpu-memory", type=click.FloatRange(min=0, min_open=True), default=None, metavar="GIB",
                 help="GPU memory budget: the ViT, VAE and embeddings leave the GPU between their phases and "
                      "the process is capped at GIB; a request that cannot fit fails with a clear message."),
    click.option("--no-progress", is_flag=True, help="Hide the progress bars (stderr)."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text."),
)

seed_option = click.option("--seed", type=click.IntRange(min=0), default=None, show_default="random, reported",
                           help="Seeds the noise (and sampled text): the same seed gives the same output.")


def text_options(think_default_tokens: int, tokens_flag: str):
    """--think, the token limit, --do-sample and --temperature (decoding of think text or answers)."""
    return _options(
        click.option("--think", is_flag=True,
                     help="Think mode: decode a reasoning/planning text first (the official think prompts)."),
        click.option(tokens_flag, "max_tokens", type=click.IntRange(min=1), default=think_default_tokens,
                     help="Most tokens to decode."),
        click.option("--do-sample", is_flag=True, help="Sample the text instead of greedy decoding."),
        click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=0.3,
                     help="Sampling temperature for the text (with --do-sample)."),
    )


def image_options(cfg_text: float, cfg_img: float, interval: tuple[float, float], renorm: str, img_help: str,
                  default_name: str):
    """Sampler, CFG and output options, with the official app's defaults of the task."""
    return _options(
        click.option("--steps", type=click.IntRange(min=2), default=50, help="Denoising steps (num_timesteps)."),
        click.option("--cfg-text-scale", type=float, default=cfg_text, help="Text guidance (CFG) scale."),
        click.option("--cfg-img-scale", type=float, default=cfg_img, help=img_help),
        click.option("--cfg-interval", type=(float, float), default=interval, metavar="LO HI",
                     help="Guide only at timesteps t with LO < t <= HI (t runs from 1, noise, to 0)."),
        click.option("--cfg-renorm-min", type=float, default=0.0, help="Lower clamp of the CFG renorm factor."),
        click.option("--cfg-renorm-type", type=click.Choice(RENORM_TYPES), default=renorm,
                     help="How the guided velocity is renormalised."),
        click.option("--timestep-shift", type=float, default=3.0, help="Shift of the timestep schedule."),
        click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="PATH",
                     help=f"Image to write (.png, .jpg or .webp) [default: {default_name} in the current "
                          "directory]. Written atomically."),
        click.option("--overwrite", is_flag=True, help="Replace the output if it exists (refused otherwise)."),
    )


# -- helpers: everything checked before the model loads ---------------------------------------------------------
def _check_output(output: Path | None, default_name: str, seed: int, overwrite: bool) -> Path:
    path = (output or Path(default_name.format(seed=seed))).expanduser()
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise InputError(f"{path}: unknown image extension {path.suffix or '(none)'!r}; use .png, .jpg or .webp")
    if path.is_dir():
        raise InputError(f"{path} is a directory; -o takes an image file path")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: directory not found (for the output {path})")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path.parent}: directory is not writable (for the output {path})")
    return path


def _save_image(image, path: Path, overwrite: bool) -> None:
    """Write to a temporary sibling, then move it into place (never leaves a half-written image)."""
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **({} if fmt == "PNG" else {"quality": 95}))
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic and, unlike a rename, never replaces a file created meanwhile
        except FileExistsError:
            raise InputError(f"{path} already exists (pass --overwrite to replace it)") from None
        except OSError:  # file systems without hard links
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cfg_kwargs(o: dict) -> dict:
    """The sampler keyword arguments of the pipeline, validated now (CFGSettings raises InputError)."""
    cfg = CFGSettings(o["cfg_text_scale"], o["cfg_img_scale"], tuple(o["cfg_interval"]), o["cfg_renorm_min"],
                      o["cfg_renorm_type"])
    if o["timestep_shift"] <= 0:
        raise InputError(f"--timestep-shift must be positive, got {o['timestep_shift']}")
    return dict(cfg_text_scale=cfg.cfg_text_scale, cfg_img_scale=cfg.cfg_img_scale,
                cfg_interval=cfg.cfg_interval, cfg_renorm_min=cfg.cfg_renorm_min,
                cfg_renorm_type=cfg.cfg_renorm_type, timestep_shift=o["timestep_shift"], num_timesteps=o["steps"])


def _text_kwargs(o: dict) -> dict:
    return dict(think=o["think"], max_think_token_n=o["max_tokens"], do_sample=o["do_sample"],
                text_temperature=o["temperature"])


def _load(o: dict):
    """The pipeline for --model (or the embedded tiny model, with a notice on stderr)."""
    path = o["model_dir"]
    if path is None:
        try:
            path, created = ensure_tiny_checkpoint()
        except OSError as e:
            raise InputError(f"cannot create the embedded tiny model ({e}); set BAGEL_RT_CACHE to a writable "
                             "directory or pass --model DIR") from None
        click.echo(f"note: no --model given; using the embedded tiny BAGEL at {path}"
                   f"{' (created now)' if created else ''} (random weights: outputs are noise; "
                   "use --model DIR for the real checkpoint)", err=True)
    return bagel_rt.load(path, device=o["device"], dtype=DTYPES[o["dtype"]], progress=not o["no_progress"],
                         backend=o["backend"], weights=o["weights"], compute=o["compute"],
                         max_gpu_memory=o["max_gpu_memory"])


def _seed(o: dict) -> int:
    return o["seed"] if o["seed"] is not None else secrets.randbelow(2**31)


def _image_result(pipe, res, path: Path, overwrite: bool, seconds: float, settings: dict, as_json: bool) -> None:
    _save_image(res.image, path, overwrite)
    w, h = res.image.size
    if as_json:
        click.echo(json.dumps({
            "output": str(path), "seed": res.seed, "size": {"height": h, "width": w}, "think": res.text,
            "seconds": {"load": round(pipe.load_seconds, 3), "run": round(seconds, 3)},
            "model": str(pipe.path), "device": str(pipe.device), "settings": settings,
        }))
        return
    if res.text is not None:
        click.echo(res.text)
    click.echo(str(path))
    click.echo(f"{w}x{h}, seed {res.seed}, {seconds:.1f} s (+{pipe.load_seconds:.1f} s loading)", err=True)


def _settings(o: dict, **kw) -> dict:
    s = dict(kw, dtype=o["dtype"])
    if "cfg_interval" in s:
        s["cfg_interval"] = list(s["cfg_interval"])
    return s


# -- commands ---------------------------------------------------------------------------------------------------
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                           "max_content_width": 110})
@click.version_option(bagel_rt.__version__, prog_name="bagel-rt")
def cli():
    """bagel-rt: a lean, fast inference runtime for BAGEL-7B-MoT.

    Text-to-image (generate), image editing (edit), image understanding (understand), think mode (--think),
    with the official app's defaults. Without --model the commands use an embedded tiny model with random
    weights (outputs are noise): pass --model DIR with the downloaded ByteDance-Seed/BAGEL-7B-MoT.
    """


@cli.command()
@click.argument("prompt")
@click.option("--height", type=_Side(), default=None, help="Image height (a multiple of 16, at most 1024).")
@click.option("--width", type=_Side(), default=None, help="Image width (a multiple of 16, at most 1024).")
@click.option("--aspect", type=click.Choice(list(ASPECT_PRESETS)), default=None, show_default="1:1 = 1024x1024",
              help="The app's aspect presets (H x W): " + ", ".join(
                  f"{k} = {h}x{w}" for k, (h, w) in ASPECT_PRESETS.items()) + ". Not with --height/--width.")
@image_options(4.0, 1.5, (0.4, 1.0), "global", default_name="bagel-<seed>.png",
               img_help="Image guidance scale. 1.5 is the official app's implicit value; for text-to-image it "
                        "costs nothing, because the image-unconditional branch equals the conditional one.")
@text_options(1024, "--max-think-tokens")
@seed_option
@model_options
def generate(prompt: str, height, width, aspect, **o):
    """Text-to-image: draw PROMPT and write the image.

    Defaults are the official app's: 1024x1024, 50 steps, text CFG 4.0 with the app's implicit image CFG 1.5
    (an effective text scale of 5.5 at no extra cost), CFG interval 0.4-1.0, global renorm, timestep shift
    3.0; --think plans in up to 1024 tokens, greedily. Prints the image path (after the think text) on stdout.
    """
    if aspect is not None and (height is not None or width is not None):
        raise InputError("give either --aspect or --height/--width, not both")
    if (height is None) != (width is None):
        raise InputError("--height and --width go together (or use --aspect)")
    shape = (height, width) if height is not None else ASPECT_PRESETS[aspect or "1:1"]
    cfg, text, seed = _cfg_kwargs(o), _text_kwargs(o), _seed(o)
    path = _check_output(o["output"], "bagel-{seed}.png", seed, o["overwrite"])
    pipe = _load(o)
    t0 = time.perf_counter()
    res = pipe.generate(prompt, image_shapes=shape, seed=seed, progress=not o["no_progress"], **cfg, **text)
    _image_result(pipe, res, path, o["overwrite"], time.perf_counter() - t0,
                  _settings(o, prompt=prompt, image_shapes=list(shape), **cfg, **text), o["as_json"])


@cli.command()
@click.argument("image")
@click.argument("instruction")
@image_options(4.0, 2.0, (0.0, 1.0), "text_channel", default_name="bagel-edit-<seed>.png",
               img_help="Image guidance scale (keeps the output close to the input image).")
@text_options(1024, "--max-think-tokens")
@seed_option
@model_options
def edit(image: str, instruction: str, **o):
    """Edit IMAGE following INSTRUCTION and write the result.

    Defaults are the official app's: 50 steps, text CFG 4.0, image CFG 2.0, CFG interval 0.0-1.0,
    text_channel renorm, timestep shift 3.0. The output has the input's size after the VAE resize (long side
    at most 1024, short side at least 512, multiples of 16). Prints the image path on stdout.
    """
    img = open_image(image)
    cfg, text, seed = _cfg_kwargs(o), _text_kwargs(o), _seed(o)
    path = _check_output(o["output"], "bagel-edit-{seed}.png", seed, o["overwrite"])
    pipe = _load(o)
    t0 = time.perf_counter()
    res = pipe.edit(img, instruction, seed=seed, progress=not o["no_progress"], **cfg, **text)
    _image_result(pipe, res, path, o["overwrite"], time.perf_counter() - t0,
                  _settings(o, image=image, instruction=instruction, **cfg, **text), o["as_json"])


@cli.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[IMAGE] QUESTION")
@text_options(512, "--max-new-tokens")
@seed_option
@model_options
def understand(inputs: tuple[str, ...], **o):
    """Answer QUESTION about IMAGE (or, without IMAGE, as a text chat) and print the answer on stdout.

    Defaults are the official app's: up to 512 new tokens, greedy. With --think the answer starts with the
    model's reasoning in <think> </think> tags.
    """
    if len(inputs) > 2:
        raise click.UsageError(f"expected [IMAGE] QUESTION, got {len(inputs)} arguments (quote the question)")
    image, question = (None, inputs[0]) if len(inputs) == 1 else inputs
    img = open_image(image) if image is not None else None
    text = _text_kwargs(o)
    seed = _seed(o)
    pipe = _load(o)
    t0 = time.perf_counter()
    res = pipe.understand(img, question, seed=seed, progress=not o["no_progress"], **text)
    seconds = time.perf_counter() - t0
    if o["as_json"]:
        click.echo(json.dumps({
            "answer": res.text, "tokens": len(res.token_ids or []), "seed": res.seed,
            "seconds": {"load": round(pipe.load_seconds, 3), "run": round(seconds, 3)},
            "model": str(pipe.path), "device": str(pipe.device),
            "settings": _settings(o, image=image, question=question, **text),
        }))
    else:
        click.echo(res.text)


@cli.command("init-tiny")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it exists.")
def init_tiny(directory: Path, seed: int, overwrite: bool):
    """Write a deterministic tiny BAGEL (random weights, a few MB) in the official layout to DIRECTORY."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file; init-tiny writes a directory")
    click.echo(str(write_tiny_checkpoint(directory, seed=seed, overwrite=overwrite)))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info(directory: Path, as_json: bool):
    """Say what the checkpoint in DIRECTORY holds, from file headers only (no weights are loaded).

    Format (bf16 / int8 / nf4 / df11), files and sizes, tensor and parameter counts per component, the
    hyper-parameters, and an estimate of the GPU memory that bf16 inference at 1024x1024 needs.
    """
    d = checkpoint_info(directory)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="int8: per-row absmax (bitsandbytes Linear8bitLt layout); nf4: 4-bit NormalFloat, blocks of 64 "
                   "(bitsandbytes Linear4bit layout); df11: DFloat11, lossless (the DFloat11/BAGEL-7B-MoT-DF11 "
                   "layout).")
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Keep the Linear weights whose tensor name matches this regular expression (re.search) in "
                   "bf16; repeatable. Example: --skip lm_head --skip 'vit_model\\.'.")
@click.option("--double-quant", is_flag=True,
              help="NF4: also quantize the per-block scales (bitsandbytes compress_statistics; ~0.4 bit/weight "
                   "less).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (refused otherwise).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (stderr).")
def quantize(src: Path, dst: Path, fmt: str, skip: tuple[str, ...], double_quant: bool, overwrite: bool,
             no_progress: bool):
    """Convert the bf16 checkpoint SRC to int8, nf4 or df11 in the new directory DST.

    Tensor by tensor from the memory-mapped source (bounded memory); DST is written under a temporary name and
    renamed when complete. Which Linear weights are quantized, and which stay bf16 and why, is recorded in the
    metadata of DST's ema.safetensors (see bagel-rt info --json). Prints DST on stdout.
    """
    t0 = time.perf_counter()
    out = convert_checkpoint(src, dst, fmt, skip=list(skip), double_quant=double_quant,
                             progress=not no_progress, overwrite=overwrite)
    before, after = (sum(p.stat().st_size for p in d.rglob("*.safetensors")) for d in (src, out))
    click.echo(str(out))
    click.echo(f"{fmt}: safetensors {_human(before)} -> {_human(after)} ({after / max(before, 1):.1%}) "
               f"in {time.perf_counter() - t0:.1f} s", err=True)


@cli.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Checkpoint to benchmark (default: --random-weights 7b on CUDA, the tiny model on CPU).")
@click.option("--random-weights", type=click.Choice(["7b", "tiny"]), default=None,
              help="Build the model with random weights on the device instead of loading one: 7b is the real "
                   "BAGEL-7B-MoT configuration (29 GB of bf16 weights, built directly on the GPU).")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto",
              help="Backend to time (auto: triton on CUDA).")
@click.option("--tasks", default="t2i,edit,decode", show_default=True,
              help="Comma-separated: t2i (text-to-image), edit, decode (greedy text).")
@click.option("--size", type=_Side(), default=1024, help="Image side for t2i and the edit input.")
@click.option("--steps", type=click.IntRange(min=2), default=50, help="Denoising steps (num_timesteps).")
@click.option("--runs", type=click.IntRange(min=1), default=3, help="Timed runs per task (median reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, help="Untimed warm-up runs (reported apart).")
@click.option("--tokens", type=click.IntRange(min=1), default=256, help="Tokens to decode for the decode task.")
@click.option("--compare-torch", is_flag=True,
              help="Also run the torch backend in the same process: speed ratio and relative L2 of final latents.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Append the JSON lines to this file.")
@click.option("--commit", default=None, help="Commit id to record (default: git rev-parse HEAD).")
@click.option("--device", default=None, callback=_check_device, show_default="cuda if available, else cpu")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16")
@click.option("--compute", type=click.Choice(["bf16", "fp8"]), default="bf16",
              help="Denoising GEMM precision on the triton backend; fp8 is opt-in and approximate.")
@click.option("--weights", type=click.Choice(["auto", "int8", "nf4"]), default="auto",
              help="Quantize the LLM's Linears to int8/nf4 (on load for --model, in place for --random-weights).")
def bench(model_dir, random_weights, backend, tasks, size, steps, runs, warmup, tokens, compare_torch, out, commit,
          device, dtype, compute, weights):
    """Time text-to-image, editing and decoding (app defaults): seconds per image and per step, tokens/s, peak
    GPU memory, achieved TFLOP/s and its share of the measured bf16 matmul peak. One JSON line per result
    on stdout (and appended to --out)."""
    from bagel_rt.bench import run_bench
    from bagel_rt.random_weights import random_bagel
    from bagel_rt.tiny import TINY_PARAMS

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in task_list if t not in ("t2i", "edit", "decode")]
    if bad:
        raise InputError(f"unknown task(s) {', '.join(bad)}; choose from t2i, edit, decode")
    if model_dir is not None and random_weights is not None:
        raise InputError("give either --model or --random-weights, not both")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_dir is None and random_weights is None:
        random_weights = "7b" if dev.startswith("cuda") else "tiny"
    if random_weights == "7b" and not dev.startswith("cuda"):
        raise InputError("--random-weights 7b needs a CUDA GPU (29 GB of weights); use --random-weights tiny")
    if random_weights:
        pipe = random_bagel("bagel-7b-mot" if random_weights == "7b" else TINY_PARAMS, device=dev,
                            dtype=DTYPES[dtype], backend=backend)
        if weights != "auto":
            from bagel_rt.quant import quantize_model

            try:
                quantize_model(pipe.model.language_model, weights)
            except ValueError as e:
                raise InputError(f"cannot quantize the random model to {weights}: {e}") from None
            pipe.weights = weights
    else:
        pipe = bagel_rt.load(model_dir, device=dev, dtype=DTYPES[dtype], backend=backend, weights=weights)
    pipe.compute = compute
    rows = run_bench(pipe, task_list, size=size, steps=steps, runs=runs, warmup=warmup, tokens=tokens,
                     compare_torch=compare_torch, weights=pipe.weights, commit=commit,
                     log=lambda line: click.echo(line, err=True))
    lines = [json.dumps(r) for r in rows]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    sys.exit(cli())
