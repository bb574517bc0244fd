"""Shared pieces of the ``bagel-rt`` commands: the one-line user errors, option groups as decorators, and
the checks and helpers that run before and after a model call (output paths, image saving, settings)."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import click
import torch

import bagel_rt
from bagel_rt import validate
from bagel_rt.config import MAX_POSITIONS, llm_params_from_json
from bagel_rt.errors import BagelError, InputError, OutputError
from bagel_rt.parallel.group import MODES, env_world
from bagel_rt.parallel.launch import MAX_GPUS
from bagel_rt.quantized import WEIGHTS
from bagel_rt.sampler import MAX_SCALE, MAX_STEPS, RENORM_TYPES, CFGSettings
from bagel_rt.serve.requests import MAX_N
from bagel_rt.tiny import ensure_tiny_checkpoint
from bagel_rt.tokenizer import TextDeltas

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
SIZE_STEP, MAX_SIDE = 16, 1024


# -- errors: one line, exit code 2 ---------------------------------------------------------------------------
class UserError(click.ClickException):
    """A user error, shown as a single ``error: ...`` line on stderr."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code

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
        except KeyboardInterrupt:  # what was already printed (streamed text) stays; exit code 130 as a shell's
            raise UserError("interrupted (Ctrl-C)", exit_code=130) from None


# -- shared options -------------------------------------------------------------------------------------------
def _options(*decorators):
    """Apply option decorators so that ``--help`` lists them in the order given."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def _check_device(ctx, param, value):
    """Only devices this build can run on (cpu; cuda when present): mps or meta are refused, not run on the CPU."""
    if value is None:
        return None
    try:
        return str(validate.device(value))
    except InputError as e:
        raise click.BadParameter(str(e)) from None


class _Number(click.ParamType):
    """A finite float in [lo, hi] (``(lo, hi]`` with ``lo_open``): nan, inf and out-of-range values are refused
    when the options are parsed, before any model work."""

    name = "FLOAT"

    def __init__(self, lo: float, hi: float, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return validate.number("the value", v, self.lo, self.hi, self.lo_open)
        except InputError as e:
            self.fail(str(e).replace("the value must be", "must be"), param, ctx)


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


#: where and how the model runs (every command that loads one; also ``serve`` and ``app``)
load_options = _options(
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
                      "int8/nf4/fp8/fp8-gen-nf4-und on a bf16 (or df11) checkpoint: quantize as it loads; bf16 "
                      "from df11: decode."),
    click.option("--compute", type=click.Choice(["auto", "bf16", "fp8", "int8"]), default="auto",
                 help="Denoising GEMM precision of the generation expert. auto: what the weights compute (FP8 "
                      "weights in FP8 on Ada/Hopper, else bf16); fp8 (Ada/Hopper) and int8 (INT8 weights) are "
                      "approximate W8A8 with per-token activation scales; fp8 on bf16 weights drops their bf16 "
                      "copies."),
    click.option("--attention", type=click.Choice(["auto", "triton", "cudnn"]), default="auto",
                 help="Latent attention of the triton backend's denoiser: cudnn (cuDNN fused attention via "
                      "PyTorch SDPA), triton (bagel-rt's kernel) or auto (cudnn on Hopper, else triton)."),
    click.option("--max-gpu-memory", type=_Number(0, 1e6, lo_open=True), default=None, metavar="GIB",
                 help="GPU memory budget: the ViT, VAE and embeddings leave the GPU between their phases and "
                      "the process is capped at GIB; a request that cannot fit fails with a clear message."),
)

model_options = _options(
    load_options,
    click.option("--no-progress", is_flag=True, help="Hide the progress bars (stderr)."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text."),
)

parallel_options = _options(
    click.option("--gpus", type=click.IntRange(1, MAX_GPUS), default=1, metavar="N",
                 help="Run on N GPUs of this host: starts N processes, one per GPU (as torchrun "
                      "--nproc-per-node N does; under torchrun leave it out). Rank 0 prints and writes."),
    click.option("--parallel", type=click.Choice(MODES), default="cfg",
                 help="How several GPUs share the work: cfg (CFG branches per GPU; each GPU holds the model), "
                      "tp (tensor parallel: heads and MLP columns split; NVLink), layers (consecutive layers per "
                      "GPU; for memory on PCIe cards)."),
)

#: the options of the commands that serve the model over HTTP (``serve``, ``app``)
server_options = _options(
    click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    click.option("--port", type=click.IntRange(0, 65535), default=8000, help="TCP port (0: a free one)."),
    click.option("--random-weights", type=click.Choice(["7b", "tiny"]), default=None,
                 help="Serve a model with random weights built on the device instead of --model (7b: the real "
                      "BAGEL-7B-MoT configuration, for throughput measurements on a GPU)."),
    click.option("--max-batch", type=click.IntRange(1, MAX_N), default=8,
                 help="Most images of one batched forward made of several waiting requests with the same task, "
                      "size and settings; 1 turns batching across requests off (a request's own n images always "
                      "run together)."),
    click.option("--max-queue", type=click.IntRange(1, 100_000), default=64,
                 help="Most requests waiting; more are refused with HTTP 429 and a Retry-After estimate."),
    click.option("--request-timeout", type=_Number(0, 1e6, lo_open=True), default=600.0, metavar="SECONDS",
                 help="A request still queued or running after this fails with HTTP 504 (its work stops)."),
    click.option("--max-body-mb", type=_Number(0, 4096, lo_open=True), default=32.0, metavar="MB",
                 help="Largest request body (images included); larger ones get HTTP 413."),
    click.option("--grace", type=_Number(0, 3600), default=30.0, metavar="SECONDS",
                 help="On SIGTERM or Ctrl-C: seconds to finish the queued and running requests (new ones get "
                      "503) before the rest is rejected."),
    click.option("--log-level", type=click.Choice(["warning", "info", "debug"]), default="info",
                 help="uvicorn's log level (debug adds the access log)."),
)

seed_option = click.option("--seed", type=click.IntRange(0, validate.MAX_SEED), default=None,
                           show_default="random, reported",
                           help="Seeds the noise (and sampled text): the same seed gives the same output.")


def text_options(think_default_tokens: int, tokens_flag: str):
    """--think, the token limit, --do-sample and --temperature (decoding of think text or answers)."""
    return _options(
        click.option("--think", is_flag=True,
                     help="Think mode: decode a reasoning/planning text first (the official think prompts)."),
        click.option(tokens_flag, "max_tokens", type=click.IntRange(1, MAX_POSITIONS),
                     default=think_default_tokens,
                     help="Most tokens to decode (at most the model's context, max_position_embeddings)."),
        click.option("--do-sample", is_flag=True, help="Sample the text instead of greedy decoding."),
        click.option("--temperature", type=_Number(0.0, MAX_SCALE, lo_open=True), default=0.3,
                     help="Sampling temperature for the text (with --do-sample)."),
    )


def image_options(cfg_text: float, cfg_img: float, interval: tuple[float, float], renorm: str, img_help: str,
                  default_name: str):
    """Sampler, CFG and output options, with the official app's defaults of the task."""
    return _options(
        click.option("--steps", type=click.IntRange(2, MAX_STEPS), default=50,
                     help="Denoising steps (num_timesteps)."),
        click.option("--cfg-text-scale", type=_Number(0.0, MAX_SCALE), default=cfg_text,
                     help="Text guidance (CFG) scale."),
        click.option("--cfg-img-scale", type=_Number(0.0, MAX_SCALE), default=cfg_img, help=img_help),
        click.option("--cfg-interval", type=(_Number(0.0, 1.0), _Number(0.0, 1.0)), default=interval,
                     metavar="LO HI",
                     help="Guide only at timesteps t with LO < t <= HI (t runs from 1, noise, to 0)."),
        click.option("--cfg-renorm-min", type=_Number(0.0, 1.0), default=0.0,
                     help="Lower clamp of the CFG renorm factor."),
        click.option("--cfg-renorm-type", type=click.Choice(RENORM_TYPES), default=renorm,
                     help="How the guided velocity is renormalised."),
        click.option("--timestep-shift", type=_Number(0.0, MAX_SCALE, lo_open=True), default=3.0,
                     help="Shift of the timestep schedule."),
        click.option("--taylorseer", is_flag=True,
                     help="Step caching with the official TaylorSeer settings (opt-in, approximate): most "
                          "denoiser evaluations are predicted from the last full ones. --json reports the "
                          "schedule that ran."),
        click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="PATH",
                     help=f"Image to write (.png, .jpg or .webp) [default: {default_name} in the current "
                          "directory]. Written atomically."),
        click.option("--overwrite", is_flag=True, help="Replace the output if it exists (refused otherwise)."),
    )


# -- helpers: everything checked before the model loads ---------------------------------------------------------
def _check_output(output: Path | None, default_name: str, seed: int, overwrite: bool) -> Path:
    path = (output or Path(default_name.format(seed=seed))).expanduser()
    if path.is_dir():
        raise InputError(f"{path} is a directory; -o takes an image file path (e.g. {path / 'out.png'})")
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise InputError(f"{path}: unknown image extension {path.suffix or '(none)'!r}; use .png, .jpg or .webp")
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path} is a symbolic link to a missing file ({os.readlink(path)}); remove it or choose "
                         "another output path")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: directory not found (for the output {path})")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path.parent}: directory is not writable (for the output {path})")
    return path


def numbered(path: Path, k: int) -> Path:
    """The output of a batch's image k: ``out.png`` -> ``out-k.png``."""
    return path.with_name(f"{path.stem}-{k}{path.suffix}")


def _save_image(image, path: Path, overwrite: bool) -> None:
    """Write to a temporary sibling, then move it into place (never leaves a half-written image)."""
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format=fmt, **({} if fmt == "PNG" else {"quality": 95}))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk, a lost mount, a quota: the temporary file goes in `finally`
            raise OutputError(f"{path}: cannot be written ({e.strerror or e}); nothing was left behind") from None
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
                cfg_renorm_type=cfg.cfg_renorm_type, timestep_shift=o["timestep_shift"], num_timesteps=o["steps"],
                enable_taylorseer=o["taylorseer"])


def _text_kwargs(o: dict) -> dict:
    return dict(think=o["think"], max_think_token_n=o["max_tokens"], do_sample=o["do_sample"],
                text_temperature=o["temperature"])


def _load(o: dict):
    """The pipeline for --model (or the embedded tiny model, with a notice on stderr). The token limit is checked
    against the checkpoint's context (its llm_config.json) before anything is loaded."""
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
    context = llm_params_from_json(Path(path).expanduser() / "llm_config.json").max_positions
    if o.get("max_tokens") is not None and o["max_tokens"] >= context:
        raise InputError(f"a token limit of {o['max_tokens']} does not fit the model's context of {context} "
                         f"positions (max_position_embeddings of {path}/llm_config.json); use less")
    return bagel_rt.load(path, device=o["device"], dtype=DTYPES[o["dtype"]], progress=not o.get("no_progress"),
                         backend=o["backend"], weights=o["weights"], compute=o["compute"],
                         attention=o["attention"], max_gpu_memory=o["max_gpu_memory"],
                         parallel=o.get("parallel_mode"))


def spread(o: dict) -> None:
    """Multi-GPU runs, first thing in a command: with ``--gpus N`` outside a launched run, start N ranks of this
    command line and exit with their code; inside one (``--gpus`` or ``torchrun``), set ``o["parallel_mode"]``
    and silence every rank but 0 (only rank 0 prints, shows progress and writes the output)."""
    world = env_world()
    if world is None:
        if o["gpus"] > 1:
            from bagel_rt.parallel.launch import relaunch_cli

            click.get_current_context().exit(relaunch_cli(o["gpus"]))
        o["parallel_mode"], o["first_rank"] = None, True
        return
    rank, n, _ = world
    if o["gpus"] > 1 and o["gpus"] != n:
        raise InputError(f"--gpus {o['gpus']} but this run has {n} processes (WORLD_SIZE); under torchrun leave "
                         "--gpus out")
    o["parallel_mode"], o["first_rank"] = (o["parallel"] if n > 1 else None), rank == 0
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # for the life of the process
        o["no_progress"] = True


def _random_pipe(kind: str, device: str, dtype: torch.dtype, backend: str, weights: str):
    """A pipeline with random weights (``--random-weights``): "7b" is the real BAGEL-7B-MoT configuration, built
    directly on the GPU; "tiny" the tiny one. ``weights`` other than auto quantizes its LLM Linears in place."""
    from bagel_rt.quantized import LLM_FORMATS, quantize_in_place
    from bagel_rt.random_weights import random_bagel
    from bagel_rt.tiny import TINY_PARAMS

    if kind == "7b" and not device.startswith("cuda"):
        raise InputError("--random-weights 7b needs a CUDA GPU (29 GB of weights); use --random-weights tiny")
    pipe = random_bagel("bagel-7b-mot" if kind == "7b" else TINY_PARAMS, device=device, dtype=dtype,
                        backend=backend)
    if weights != "auto":
        from bagel_rt.quant import quantize_model

        try:
            if weights in LLM_FORMATS:
                quantize_in_place(pipe.model, weights)
            else:
                quantize_model(pipe.model.language_model, weights)
        except ValueError as e:
            raise InputError(f"cannot quantize the random model to {weights}: {e}") from None
        pipe.weights = weights
    return pipe


def _seed(o: dict) -> int:
    return o["seed"] if o["seed"] is not None else secrets.randbelow(2**31)


class TextStream(TextDeltas):
    """Prints decoded text on stdout as the token ids arrive (``on_token`` of the pipeline), so an answer or a
    think text shows while it is decoded and a Ctrl-C keeps what was shown (``text``; see :class:`TextDeltas`)."""

    def __init__(self, tokenizer, echo: bool):
        super().__init__(tokenizer)
        self.echo = echo

    def __call__(self, token: int) -> None:
        ready = self.push(token)
        if ready and self.echo:
            click.echo(ready, nl=False)

    def finish(self, final: str | None) -> None:
        """End the shown text with what the final text adds (normally nothing) and a newline."""
        if self.echo:
            click.echo(self.rest(final))


def _image_result(pipe, res, path: Path, overwrite: bool, seconds: float, settings: dict, as_json: bool,
                  stream: TextStream | None = None, write: bool = True) -> None:
    if write:  # (rank 0 of a multi-GPU run writes; the other ranks hold the same image)
        _save_image(res.image, path, overwrite)
    w, h = res.image.size
    if as_json:
        click.echo(json.dumps({
            "output": str(path), "seed": res.seed, "size": {"height": h, "width": w}, "think": res.text,
            "seconds": {"load": round(pipe.load_seconds, 3), "run": round(seconds, 3)},
            "model": str(pipe.path), "device": str(pipe.device), "settings": settings,
            **({"step_cache": res.info["step_cache"]} if "step_cache" in res.info else {}),
            **({"batch": res.info["batch"]} if "batch" in res.info else {}),
        }))
        return
    if res.text is not None:
        if stream is not None:
            stream.finish(res.text)
        else:
            click.echo(res.text)
    click.echo(str(path))
    click.echo(f"{w}x{h}, seed {res.seed}, {seconds:.1f} s (+{pipe.load_seconds:.1f} s loading)", err=True)


def _settings(o: dict, **kw) -> dict:
    s = dict(kw, dtype=o["dtype"])
    if o.get("parallel_mode"):
        s.update(parallel=o["parallel_mode"], gpus=env_world()[1])
    if "cfg_interval" in s:
        s["cfg_interval"] = list(s["cfg_interval"])
    return s
