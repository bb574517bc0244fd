"""The ``bagel-rt`` command line: one thin click group over the library.

Each command parses its options, checks what can be checked before the (slow) model load — option values,
input images, the output path — and calls one library function. Option groups shared by several commands
are defined once, as decorators, in :mod:`bagel_rt.cli.options`. Every error a user can cause (a
:class:`bagel_rt.BagelError`, an existing directory for ``init-tiny``, a bad option) is printed as one line
``error: ...`` on stderr and the exit code is 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

import bagel_rt
from bagel_rt import batch, validate
from bagel_rt.batch import MAX_BATCH_IMAGES
from bagel_rt.config import MAX_POSITIONS
from bagel_rt.convert import convert_checkpoint
from bagel_rt.errors import CheckpointError, InputError
from bagel_rt.info import _human, checkpoint_info, format_info
from bagel_rt.pipeline import ASPECT_PRESETS, open_image
from bagel_rt.quantized import FORMATS, LLM_FORMATS
from bagel_rt.sampler import MAX_STEPS
from bagel_rt.tiny import write_tiny_checkpoint

from .options import (
    DTYPES,
    IMAGE_FORMATS,
    TextStream,
    _cfg_kwargs,
    _check_device,
    _check_output,
    _Group,
    _image_result,
    _load,
    _random_pipe,
    _seed,
    _settings,
    _Side,
    _text_kwargs,
    image_options,
    load_options,
    model_options,
    numbered,
    parallel_options,
    seed_option,
    server_options,
    spread,
    text_options,
)


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
@click.argument("prompts", nargs=-1, required=True, metavar="PROMPT...")
@click.option("-n", "--num-images", "n", type=click.IntRange(1, MAX_BATCH_IMAGES), default=1,
              help=f"Images per prompt, denoised together with the other prompts' (at most {MAX_BATCH_IMAGES} "
                   "in all); image k gets seed + k.")
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
@parallel_options
def generate(prompts: tuple[str, ...], n: int, height, width, aspect, **o):
    """Text-to-image: draw PROMPT and write the image.

    Defaults are the official app's: 1024x1024, 50 steps, text CFG 4.0 with the app's implicit image CFG 1.5
    (an effective text scale of 5.5 at no extra cost), CFG interval 0.4-1.0, global renorm, timestep shift
    3.0; --think plans in up to 1024 tokens, greedily. Prints the image path (after the think text) on stdout.

    Several prompts and/or -n N make a batch, denoised together: prompt 0's N images, then prompt 1's, ...;
    image k uses seed + k and is written to PATH with -k before the extension (out.png -> out-0.png,
    out-1.png, ...; default bagel-<seed>.png each); one path (and, with --json, one JSON line) per image.
    """
    spread(o)
    if aspect is not None and (height is not None or width is not None):
        raise InputError("give either --aspect or --height/--width, not both")
    if (height is None) != (width is None):
        raise InputError("--height and --width go together (or use --aspect)")
    shape = (height, width) if height is not None else ASPECT_PRESETS[aspect or "1:1"]
    cfg, text, seed = _cfg_kwargs(o), _text_kwargs(o), _seed(o)
    seeds = batch.seeds(seed, batch.count(n, len(prompts)))
    if len(seeds) == 1:
        paths = [_check_output(o["output"], "bagel-{seed}.png", seed, o["overwrite"])]
    else:
        paths = [_check_output(o["output"] and numbered(o["output"], k), "bagel-{seed}.png", s, o["overwrite"])
                 for k, s in enumerate(seeds)]
    pipe = _load(o)
    t0 = time.perf_counter()
    # one image's think text streams as it is decoded; a batch's are printed with their images
    stream = TextStream(pipe.tokenizer, echo=not o["as_json"]) if len(seeds) == 1 else None
    res = pipe.generate(list(prompts) if len(prompts) > 1 else prompts[0], n=n, image_shapes=shape, seed=seed,
                        progress=not o["no_progress"], on_token=stream, **cfg, **text)
    seconds = time.perf_counter() - t0
    for k, (r, path) in enumerate(zip(res if isinstance(res, list) else [res], paths)):
        _image_result(pipe, r, path, o["overwrite"], seconds,
                      _settings(o, prompt=prompts[k // n], image_shapes=list(shape), **cfg, **text), o["as_json"],
                      stream, o["first_rank"])


@cli.command()
@click.argument("image")
@click.argument("instruction")
@image_options(4.0, 2.0, (0.0, 1.0), "text_channel", default_name="bagel-edit-<seed>.png",
               img_help="Image guidance scale (keeps the output close to the input image).")
@text_options(1024, "--max-think-tokens")
@seed_option
@model_options
@parallel_options
def edit(image: str, instruction: str, **o):
    """Edit IMAGE following INSTRUCTION and write the result.

    Defaults are the official app's: 50 steps, text CFG 4.0, image CFG 2.0, CFG interval 0.0-1.0,
    text_channel renorm, timestep shift 3.0. The output has the input's size after the VAE resize (long side
    at most 1024, short side at least 512, multiples of 16). Prints the image path on stdout.
    """
    spread(o)
    img = open_image(image)
    cfg, text, seed = _cfg_kwargs(o), _text_kwargs(o), _seed(o)
    path = _check_output(o["output"], "bagel-edit-{seed}.png", seed, o["overwrite"])
    pipe = _load(o)
    t0 = time.perf_counter()
    stream = TextStream(pipe.tokenizer, echo=not o["as_json"])
    res = pipe.edit(img, instruction, seed=seed, progress=not o["no_progress"], on_token=stream, **cfg, **text)
    _image_result(pipe, res, path, o["overwrite"], time.perf_counter() - t0,
                  _settings(o, image=image, instruction=instruction, **cfg, **text), o["as_json"], stream,
                  o["first_rank"])


@cli.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[IMAGE] QUESTION")
@text_options(512, "--max-new-tokens")
@seed_option
@model_options
@parallel_options
def understand(inputs: tuple[str, ...], **o):
    """Answer QUESTION about IMAGE (or, without IMAGE, as a text chat) and print the answer on stdout.

    Defaults are the official app's: up to 512 new tokens, greedy. With --think the answer starts with the
    model's reasoning in <think> </think> tags. The answer is printed as it is decoded; Ctrl-C keeps what was
    printed (with --json, the partial answer is printed with "interrupted": true).
    """
    spread(o)
    if len(inputs) > 2:
        raise click.UsageError(f"expected [IMAGE] QUESTION, got {len(inputs)} arguments (quote the question)")
    if len(inputs) == 1 and _looks_like_image(inputs[0]):
        raise InputError(f"{inputs[0]!r} looks like an image file but no question was given; use: bagel-rt "
                         "understand IMAGE \"QUESTION\"")
    image, question = (None, inputs[0]) if len(inputs) == 1 else inputs
    img = open_image(image) if image is not None else None
    text = _text_kwargs(o)
    seed = _seed(o)
    pipe = _load(o)
    t0 = time.perf_counter()
    stream = TextStream(pipe.tokenizer, echo=not o["as_json"])
    report = {"model": str(pipe.path), "device": str(pipe.device),
              "settings": _settings(o, image=image, question=question, **text)}
    try:
        res = pipe.understand(img, question, seed=seed, progress=not o["no_progress"], on_token=stream, **text)
    except KeyboardInterrupt:
        if o["as_json"]:
            partial = {"answer": stream.text, "tokens": len(stream.ids), "interrupted": True}
            click.echo(json.dumps({**partial, **report}))
        else:
            stream.finish(None)
        raise
    seconds = time.perf_counter() - t0
    if o["as_json"]:
        click.echo(json.dumps({
            "answer": res.text, "tokens": len(res.token_ids or []), "seed": res.seed,
            "seconds": {"load": round(pipe.load_seconds, 3), "run": round(seconds, 3)}, **report,
        }))
    else:
        stream.finish(res.text)


def _looks_like_image(arg: str) -> bool:
    """An argument that names an image file (an existing file, or one word ending in an image extension)."""
    p = Path(arg).expanduser()
    return (len(arg.split()) == 1 and p.suffix.lower() in (*IMAGE_FORMATS, ".gif", ".bmp", ".tif", ".tiff")) or (
        len(arg) < 4096 and p.is_file())


@cli.command("init-tiny")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(0, validate.MAX_SEED), default=0, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it exists.")
def init_tiny(directory: Path, seed: int, overwrite: bool):
    """Write a deterministic tiny BAGEL (random weights, a few MB) in the official layout to DIRECTORY."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file; init-tiny writes a directory")
    click.echo(str(write_tiny_checkpoint(directory, seed=seed, overwrite=overwrite)))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--verify", is_flag=True,
              help="Also read every tensor and report the ones holding NaN/Inf values (or a damaged DFloat11 "
                   "unit); exit code 2 if any.")
def info(directory: Path, as_json: bool, verify: bool):
    """Say what the checkpoint in DIRECTORY holds, from file headers only (no weights are loaded).

    Format (bf16 / int8 / nf4 / fp8 / fp8-gen-nf4-und / df11) and the format of each part (ViT, connector, und
    and gen experts, lm_head, VAE), files and sizes, tensor and parameter counts per component, the
    hyper-parameters, and an estimate of the GPU memory that bf16 inference at 1024x1024 needs. With --verify,
    every tensor is read (memory-mapped, in chunks) and checked for NaN/Inf.
    """
    d = checkpoint_info(directory)
    if verify:
        from bagel_rt.verify import format_report, verify_checkpoint

        d["verify"] = verify_checkpoint(directory)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))
    if verify:
        if not as_json:
            click.echo(format_report(d["verify"]))
        if d["verify"]["problems"]:
            first = d["verify"]["problems"][0]
            raise CheckpointError(f"{directory}: {len(d['verify']['problems'])} tensors fail verification, e.g. "
                                  f"{first['file']}: {first['key']}: {first['problem']}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="int8: per-row absmax (bitsandbytes Linear8bitLt layout); nf4: 4-bit NormalFloat, blocks of 64 "
                   "(bitsandbytes Linear4bit layout); fp8: e4m3 with one fp32 scale per output channel for the "
                   "LLM Linears of both experts and lm_head (W8A8 on FP8 tensor cores, weight-only below compute "
                   "capability 8.9); fp8-gen-nf4-und: the 12 GB recipe, generation expert fp8, understanding "
                   "expert and lm_head nf4; df11: DFloat11, lossless (the DFloat11/BAGEL-7B-MoT-DF11 layout).")
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Keep the Linear weights whose tensor name matches this regular expression (re.search) in "
                   "bf16; repeatable. Example: --skip lm_head --skip 'vit_model\\.'.")
@click.option("--double-quant", is_flag=True,
              help="NF4 Linears: also quantize the per-block scales (bitsandbytes compress_statistics; ~0.4 "
                   "bit/weight less).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (refused otherwise).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (stderr).")
def quantize(src: Path, dst: Path, fmt: str, skip: tuple[str, ...], double_quant: bool, overwrite: bool,
             no_progress: bool):
    """Convert the bf16 checkpoint SRC to int8, nf4, fp8, fp8-gen-nf4-und or df11 in the new directory DST.

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
@click.option("--steps", type=click.IntRange(2, MAX_STEPS), default=50, help="Denoising steps (num_timesteps).")
@click.option("--runs", type=click.IntRange(1, 1000), default=3, help="Timed runs per task (median reported).")
@click.option("--warmup", type=click.IntRange(0, 100), default=1, help="Untimed warm-up runs (reported apart).")
@click.option("--tokens", type=click.IntRange(1, MAX_POSITIONS), default=256,
              help="Tokens to decode for the decode task.")
@click.option("--compare-torch", is_flag=True,
              help="Also run the torch backend in the same process: speed ratio and relative L2 of final latents.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Append the JSON lines to this file.")
@click.option("--commit", default=None, help="Commit id to record (default: git rev-parse HEAD).")
@click.option("--device", default=None, callback=_check_device, show_default="cuda if available, else cpu")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16")
@click.option("--compute", type=click.Choice(["auto", "bf16", "fp8", "int8"]), default="auto",
              help="Denoising GEMM precision of the generation expert (auto: what the weights compute); fp8 and "
                   "int8 are approximate (with --compare-torch, fp8 keeps the bf16 weights for the torch run).")
@click.option("--attention", type=click.Choice(["auto", "triton", "cudnn"]), default="auto",
              help="Latent attention of the triton backend's denoiser (auto: cudnn on Hopper, else triton).")
@click.option("--weights", type=click.Choice(["auto", "int8", "nf4", *LLM_FORMATS]), default="auto",
              help="Quantize the LLM's Linears to int8/nf4/fp8, or the gen expert to fp8 and the und expert and "
                   "lm_head to nf4 (fp8-gen-nf4-und) (on load for --model, in place for --random-weights).")
@click.option("--taylorseer", is_flag=True,
              help="Image tasks with step caching (official TaylorSeer settings); rows carry step_cache and "
                   "full_evaluations.")
@click.option("--decode-gemv", type=click.Choice(["triton", "triton-fma", "triton-mma", "triton-split",
                                                  "triton-fsplit", "triton-prefetch", "triton-fp32", "triton-prmt",
                                                  "triton-wgmma", "triton-wgmma-split", "cublas"]),
              default="triton",
              help="Text decoding's GEMVs: triton (default: INT8/FP8 weights on the tensor cores or the FMA "
                   "kernels, the faster per shape; the FMA kernels of NF4/INT8/FP8 sum in packed bf16 pairs), "
                   "triton-fma / triton-mma (every INT8/FP8 weight on one kind), triton-split (triton, with "
                   "INT8/FP8 o/down split-K on the tensor cores; measured slower on the H200), triton-fsplit "
                   "(triton, with INT8/FP8 down split-K on the FMA kernels, as NF4's always is), triton-prefetch "
                   "(triton, each GEMV asking L2 for its weights before its PDL wait; measured slower on an "
                   "H100), triton-fp32 (triton with fp32 products: the default until the fifteenth stop), "
                   "triton-prmt (triton-fp32 with NF4 decoded by byte permutes), triton-wgmma / "
                   "triton-wgmma-split (triton / triton-split with the INT8/FP8 tensor-core GEMVs on Hopper's "
                   "wgmma, FP8 undecoded against e4m3 digits) — the alternatives are for A/B runs — or cublas "
                   "(bf16 weights through F.linear).")
@parallel_options
def bench(model_dir, random_weights, backend, tasks, size, steps, runs, warmup, tokens, compare_torch, out, commit,
          device, dtype, compute, attention, weights, taylorseer, decode_gemv, gpus, parallel):
    """Time text-to-image, editing and decoding (app defaults): seconds per image and per step, tokens/s, peak
    GPU memory, achieved TFLOP/s and its share of the measured bf16 matmul peak. One JSON line per result
    on stdout (and appended to --out)."""
    from bagel_rt.bench import run_bench

    o = {"gpus": gpus, "parallel": parallel}
    spread(o)
    mode = o["parallel_mode"]
    if mode is not None and compare_torch:
        raise InputError("--compare-torch runs one process; leave it out with several GPUs")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in task_list if t not in ("t2i", "edit", "decode")]
    if bad:
        raise InputError(f"unknown task(s) {', '.join(bad)}; choose from t2i, edit, decode")
    if model_dir is not None and random_weights is not None:
        raise InputError("give either --model or --random-weights, not both")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_dir is None and random_weights is None:
        random_weights = "7b" if dev.startswith("cuda") else "tiny"
    group = None
    if random_weights and mode is not None:
        from bagel_rt.parallel import init_group

        group = init_group(mode, device)
        dev = str(group.device)  # built whole on the rank's device, then split below
    if random_weights:
        pipe = _random_pipe(random_weights, dev, DTYPES[dtype], backend, weights)
        if group is not None:
            from bagel_rt.parallel import parallelize

            parallelize(pipe.model, pipe.vae, group)
    else:
        pipe = bagel_rt.load(model_dir, device=device if mode else dev, dtype=DTYPES[dtype], backend=backend,
                             weights=weights, parallel=mode)
    pipe.keep_bf16 = compare_torch  # the torch comparison runs the exact bf16 path
    if compute != "auto":
        pipe.compute = compute
    pipe.attention = attention
    pipe.decode_gemv = decode_gemv
    rows = run_bench(pipe, task_list, size=size, steps=steps, runs=runs, warmup=warmup, tokens=tokens,
                     compare_torch=compare_torch, weights=pipe.weights, commit=commit,
                     log=lambda line: click.echo(line, err=True), taylorseer=taylorseer)
    if pipe.model.parallel is not None:
        for r in rows:
            r.update(gpus=pipe.model.parallel.world, mode=mode)
    lines = [json.dumps(r) for r in rows]
    if out is not None and o["first_rank"]:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


@cli.command()
@server_options
@load_options
def serve(**o):
    """Serve the model over HTTP with an OpenAI-compatible API.

    POST /v1/images/generations, /v1/images/edits, /v1/chat/completions (streaming with "stream": true);
    GET /health, /metrics (Prometheus), /v1/models. BAGEL's options go as extra JSON fields with the official
    names (seed, num_timesteps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type,
    timestep_shift, think, max_think_token_n, enable_taylorseer). One GPU worker; waiting requests with the same
    task, size and settings run as one batch. Without --model: the embedded tiny model (random weights).
    """
    _run_server(o, with_app=False)


@cli.command()
@server_options
@load_options
def app(**o):
    """Serve the web app (text to image, edit, understanding, think) and the HTTP API of `serve` together.

    The app is at http://HOST:PORT/ and shows each request's progress; it runs on the same engine (queue,
    batching, one GPU worker) as the API under /v1. Needs the [app] extra (Gradio).
    """
    _run_server(o, with_app=True)


def _run_server(o: dict, with_app: bool) -> None:
    try:
        from bagel_rt.serve.api import create_app
        from bagel_rt.serve.engine import Engine
        from bagel_rt.serve.server import bound_socket, make_server
    except ImportError as e:
        raise InputError(f"serving needs the optional dependencies ({e.name} is missing): "
                         "pip install 'bagel-rt[serve]'") from None
    if with_app:
        try:
            from bagel_rt.serve.webapp import mount_webapp
        except ImportError as e:
            raise InputError(f"the web app needs the optional dependencies ({e.name} is missing): "
                             "pip install 'bagel-rt[app]'") from None
    if o["random_weights"] and o["model_dir"] is not None:
        raise InputError("give either --model or --random-weights, not both")
    try:
        sock = bound_socket(o["host"], o["port"])
    except OSError as e:
        raise InputError(f"cannot listen on {o['host']}:{o['port']} ({e.strerror or e})") from None
    if o["random_weights"]:
        dev = o["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = _random_pipe(o["random_weights"], dev, DTYPES[o["dtype"]], o["backend"], o["weights"])
        if o["compute"] != "auto":
            pipe.compute = o["compute"]
        pipe.attention = o["attention"]
        name = f"random-{o['random_weights']}"
    else:
        pipe = _load(o)
        name = Path(pipe.path).name if pipe.path is not None else "bagel"
    engine = Engine(pipe, max_batch=o["max_batch"], max_queue=o["max_queue"], timeout_s=o["request_timeout"])
    api = create_app(engine, model_name=name, max_body_bytes=int(o["max_body_mb"] * 2**20))
    if with_app:
        mount_webapp(api, engine)
    server = make_server(api, engine, o["host"], o["port"], o["grace"], o["log_level"])
    host, port = sock.getsockname()[:2]
    click.echo(f"serving {name} on http://{host}:{port} ({pipe.device}, {pipe.backend} backend, max batch "
               f"{o['max_batch']}, queue {o['max_queue']}){'; the web app is at /' if with_app else ''}", err=True)
    server.run(sockets=[sock])
    click.echo("stopped", err=True)


if __name__ == "__main__":
    sys.exit(cli())
