"""The user-facing pipeline :class:`Bagel`: ``interleave``, ``generate``, ``edit``, ``understand``, ``session``.

Keyword names and meanings follow the official ``InterleaveInferencer`` so code written against it ports
directly. Defaults:

* :meth:`Bagel.interleave` uses the official ``interleave_inference`` signature defaults
  (cfg_text_scale 3.0, cfg_img_scale 1.5, interval (0.4, 1.0), shift 3.0, 50 steps, global renorm).
* :meth:`Bagel.generate`, :meth:`Bagel.edit` and :meth:`Bagel.understand` use the official app's defaults
  (reference doc 4.9): text-to-image cfg_text 4.0 with the app's *implicit* cfg_img 1.5 (an effective
  text scale of 5.5; the image-unconditional branch equals the conditional one there, so it costs nothing),
  interval (0.4, 1.0); editing cfg_text 4.0, cfg_img 2.0, interval (0.0, 1.0), text_channel renorm;
  understanding 512 new tokens, greedy; think mode 1024 tokens, greedy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from . import batch, validate
from .errors import InputError
from .sampler import MAX_SCALE, MAX_STEPS, CFGSettings
from .serial import new_lock, serialized
from .session import Result, Session, check_image_shape, gen_images, step_cache_for
from .step_cache import StepCacheSettings

#: The official app's aspect-ratio presets as (H, W).
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "4:3": (768, 1024), "3:4": (1024, 768), "16:9": (576, 1024), "9:16": (1024, 576),
}


class Bagel:
    """A loaded BAGEL model ready for requests. Create with :func:`bagel_rt.load`.

    Attributes:
        model: the :class:`bagel_rt.model.BagelModel` (LLM, ViT, glue).
        vae: the :class:`bagel_rt.vae.AutoEncoder` (fp32).
        tokenizer: the :class:`bagel_rt.tokenizer.TextTokenizer`.
    """

    def __init__(self, model, vae, tokenizer, path: Path | None = None, load_seconds: float = 0.0,
                 backend: str = "auto", weights: str = "bf16"):
        self.model, self.vae, self.tokenizer = model, vae, tokenizer
        #: the weight format as loaded: "bf16" (or the dtype's name), "int8", "nf4" or "df11"
        self.weights = weights
        self.path, self.load_seconds = path, load_seconds
        #: seconds per loading phase (set by :func:`bagel_rt.load`)
        self.load_phases: dict[str, float] = {}
        self.backend = resolve_backend(backend, model.device)
        #: capture CUDA graphs on the triton backend (turned off only to compare or debug)
        self.use_graphs = True
        self._decoder = None
        self._decode_gemv = "triton"  # bagel_rt.fast_decode.DEFAULT_GEMV (not imported here: Triton stays lazy)
        #: the last captured denoiser, reused while the request shapes stay the same (see bagel_rt.fast)
        self.fast_cache: dict = {}
        self.attention = "auto"
        #: compute="fp8" on bf16 weights keeps the bf16 generation-expert Linears here (A/B work) instead of
        #: dropping them; keyed by (id(parent module), attribute name)
        self.keep_bf16 = False
        self.bf16_linears: dict = {}
        #: the compressed DF11 units (:class:`bagel_rt.df11_resident.ResidentDF11`) when loaded with
        #: ``df11_resident=True``, each decoded just before use (set by the loader), else None
        self.df11 = None
        #: ViT, VAE, embeddings and lm_head live on the CPU between uses (set by :meth:`limit_gpu_memory`)
        self.offload = False
        self.gpu_budget_gib: float | None = None
        #: under the current budget a denoiser's CUDA-graph capture ran out of memory: later requests denoise
        #: eagerly from the start instead of trying again (each retry costs a capture's forward and its memory;
        #: a new budget clears it). See ``PackedDenoiser._refuse_graphs``.
        self.graphs_refused = False
        #: one request at a time: threads sharing this pipeline are served in turn (:mod:`bagel_rt.serial`)
        self.lock = new_lock()

    @property
    def df11_resident(self) -> bool:
        """The DF11 weights stay compressed on the device (``load(..., df11_resident=True)``)."""
        return self.df11 is not None

    def limit_gpu_memory(self, gib: float) -> dict:
        """Keep only what each phase needs on the GPU and cap the process at ``gib`` GiB
        (see :mod:`bagel_rt.placement`). Returns what stays resident."""
        from .placement import limit_gpu_memory

        return limit_gpu_memory(self, gib)

    @property
    def compute(self) -> str:
        """Denoising GEMM precision: "bf16" (exact path on bf16 weights), "fp8" (W8A8 on FP8 tensor cores,
        approximate) or "int8" (INT8 W8A8 on INT8 weights, approximate); read from the generation expert's
        modules. Setting it swaps those modules (see :mod:`bagel_rt.compute`)."""
        from .compute import current_compute

        return current_compute(self.model)

    @compute.setter
    def compute(self, value: str) -> None:
        from .compute import set_compute

        set_compute(self, value)
        self.fast_cache.clear()  # a captured denoiser holds the old modules

    @property
    def attention(self) -> str:
        """Latent-query attention of the triton backend's denoiser: "auto" (cuDNN's fused attention on Hopper
        with bf16/fp16 weights, else our Triton kernel), "triton" or "cudnn" (see
        :func:`bagel_rt.fast.resolve_attention`)."""
        return self._attention

    @attention.setter
    def attention(self, value: str) -> None:
        from .fast import resolve_attention

        resolve_attention(value, self.device, self.model.dtype)  # a value this machine cannot run fails here
        self._attention = value
        self.fast_cache.clear()  # a captured denoiser holds the old choice

    @property
    def decoder(self):
        """The triton backend's text decoder (built on first use; keeps its captured CUDA graphs)."""
        if self._decoder is None:
            from .fast_decode import GraphDecoder

            self._decoder = GraphDecoder(self.model, use_graphs=self.use_graphs, gemv=self._decode_gemv)
        return self._decoder

    @property
    def decode_gemv(self) -> str:
        """The triton backend's text-decoding GEMVs: "triton" (default; INT8 / FP8 weights on the tensor cores or
        the FMA kernels, whichever measured faster for their shape), "cublas" (bf16 weights through ``F.linear``),
        "triton-fma" / "triton-mma" (every INT8 / FP8 weight on one kind, for A/B runs), "triton-split" /
        "triton-fsplit" (A/B experiments: INT8 / FP8 projections split-K on the tensor cores / the FMA kernels, as
        NF4's down always is;
        see :data:`bagel_rt.fast_decode.GEMVS`). Setting it rebuilds the decoder at its next use."""
        return self._decode_gemv

    @decode_gemv.setter
    def decode_gemv(self, value: str) -> None:
        from .fast_decode import check_gemv

        self._decode_gemv = check_gemv(value)
        self._decoder = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def session(self, think: bool = False, understanding_only: bool = False, seed: int | None = None) -> Session:
        """A multi-turn session: add texts and images turn by turn, then understand or generate."""
        return Session(self, think=think, understanding_only=understanding_only, seed=seed)

    @serialized
    @torch.no_grad()
    def interleave(self, inputs: list, *, think: bool = False, understanding_output: bool = False,
                   max_think_token_n: int = 1000, do_sample: bool = False, text_temperature: float = 0.3,
                   cfg_text_scale: float = 3.0, cfg_img_scale: float = 1.5,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), timestep_shift: float = 3.0,
                   num_timesteps: int = 50, cfg_renorm_min: float = 0.0, cfg_renorm_type: str = "global",
                   image_shapes: tuple[int, int] = (1024, 1024), seed: int | None = None,
                   noise: Tensor | None = None, record: bool = False, progress: bool = False,
                   on_token=None, enable_taylorseer: bool = False,
                   taylorseer_settings: StepCacheSettings | None = None,
                   on_step: Callable[[int, int], None] | None = None) -> Result:
        """Run an interleaved request like the official ``interleave_inference``.

        Args:
            inputs: strings and PIL images, in order. Each image's size (after the VAE resize) becomes the
                output size, overriding ``image_shapes``.
            think: decode a planning (or reasoning) text first.
            understanding_output: return text (understanding) instead of an image.
            max_think_token_n: token limit of the decoded text (think text or answer).
            image_shapes: output (H, W) for text-to-image, multiples of 16 up to 1024.
            seed: seeds the CPU generator for VAE posterior noise (per input image, in order) and the initial
                noise; a random seed is drawn (and returned in ``Result.seed``) when None.
            noise: explicit initial latents [h*w, 64] (token layout) instead of drawing them.
            record: also return every step's combined velocity / every decoding step's logits.
            progress: show progress bars (stderr).
            on_token: optional callable taking each decoded token id as it comes (streaming the think text or
                the answer; ``tokenizer.decode`` turns ids into text). Interrupted, the ids seen so far stand.
            enable_taylorseer: step caching with the official TaylorSeer semantics (opt-in, approximate; see
                :meth:`bagel_rt.session.Session.gen_image`); ``Result.info["step_cache"]`` reports what ran.
            taylorseer_settings: a :class:`bagel_rt.step_cache.StepCacheSettings` (default: the official values).
            on_step: optional callable ``on_step(step_index, num_steps)`` after every denoising step (0-based;
                ``num_steps = num_timesteps - 1``, the last timestep is never evaluated). An exception raised in
                it stops the request at that step and propagates; the pipeline stays usable.
        Returns:
            :class:`Result` with ``text`` (understanding, or the think text), ``image`` and ``latents``.
        Raises:
            InputError: an argument is out of range (checked before any model work); NonFiniteError: the
            latents or the decoded image came out NaN/Inf. Requests from several threads run one at a time.
        """
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise InputError("inputs must be a non-empty list of strings and PIL images")
        seed = self._check_request(understanding_output, max_think_token_n, text_temperature, timestep_shift,
                                   num_timesteps, image_shapes, seed, noise)
        with self._budget_errors():
            return self._interleave(inputs, think, understanding_output, max_think_token_n, do_sample,
                                    text_temperature, cfg_text_scale, cfg_img_scale, cfg_interval, timestep_shift,
                                    num_timesteps, cfg_renorm_min, cfg_renorm_type, image_shapes, seed, noise,
                                    record, progress, on_token, enable_taylorseer, taylorseer_settings, on_step)

    @contextlib.contextmanager
    def _budget_errors(self):
        """Under a GPU memory budget, running out of memory is the clear :class:`InputError` of
        :func:`bagel_rt.placement.out_of_memory_error` (and the GPU is left usable for the next request)."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as e:
            if self.gpu_budget_gib is None:
                raise
            from .placement import out_of_memory_error

            self.fast_cache.clear()  # under a budget, leave the GPU usable for the next (smaller) request
            raise out_of_memory_error(self, e) from None

    def _check_request(self, understanding_output, max_tokens, temperature, timestep_shift, num_timesteps,
                       image_shapes, seed, noise) -> int | None:
        """Every number of a request checked before any model work (:class:`InputError` naming it); the seed."""
        validate.integer("max_think_token_n", max_tokens, 1, self.model.params.llm.max_positions - 1)
        validate.number("text_temperature", temperature, 0.0, MAX_SCALE, lo_open=True)
        if not understanding_output:
            validate.integer("num_timesteps", num_timesteps, 2, MAX_STEPS)
            validate.number("timestep_shift", timestep_shift, 0.0, MAX_SCALE, lo_open=True)
            check_image_shape(image_shapes, self.model.params)
            if noise is not None and not (isinstance(noise, Tensor) and noise.is_floating_point()):
                raise InputError(f"noise must be a float tensor, got {type(noise).__name__}")
        return validate.seed(seed)

    def _interleave(self, inputs, think, understanding_output, max_think_token_n, do_sample, text_temperature,
                    cfg_text_scale, cfg_img_scale, cfg_interval, timestep_shift, num_timesteps, cfg_renorm_min,
                    cfg_renorm_type, image_shapes, seed, noise, record, progress, on_token,
                    enable_taylorseer=False, taylorseer_settings=None, on_step=None) -> Result:
        cfg = cfg_settings(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type)
        s = self.session(think=think, understanding_only=understanding_output, seed=seed)
        for item in inputs:
            s.add(item)
        if understanding_output:
            return s.gen_text(max_think_token_n, do_sample, text_temperature, record, progress, "answering",
                              on_token)
        thought = (s.think(max_think_token_n, do_sample, text_temperature, record, progress, on_token) if think
                   else None)
        shapes = s.image_shapes or image_shapes
        res = s.gen_image(shapes, cfg, num_timesteps, timestep_shift, noise, record, progress, enable_taylorseer,
                          taylorseer_settings, on_step)
        if thought is not None:
            res.text, res.token_ids, res.logits = thought.text, thought.token_ids, thought.logits
        return res

    def generate(self, prompt: str | list[str], *, n: int = 1, image_shapes: tuple[int, int] = (1024, 1024),
                 think: bool = False, cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.5,
                 cfg_interval: tuple[float, float] = (0.4, 1.0), timestep_shift: float = 3.0,
                 num_timesteps: int = 50, cfg_renorm_min: float = 0.0, cfg_renorm_type: str = "global",
                 max_think_token_n: int = 1024, do_sample: bool = False, text_temperature: float = 0.3,
                 seed: int | list[int] | None = None, noise: Tensor | None = None, record: bool = False,
                 progress: bool = False, on_token=None, enable_taylorseer: bool = False,
                 taylorseer_settings: StepCacheSettings | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> Result | list[Result]:
        """Text-to-image with the official app's defaults (see the module docstring).

        One prompt (a string) and ``n == 1`` give one :class:`Result`. A list of prompts, or ``n > 1``, gives a
        list: prompt 0's ``n`` images, then prompt 1's, ..., denoised together (:mod:`bagel_rt.batch`: image k
        uses ``seed + k``, or ``seed[k]`` for a list, and is the image ``generate(prompt_k, seed=seed_k)``
        makes alone). ``noise`` is for single images only. See :meth:`interleave` for the other arguments."""
        prompts, single = batch.as_list("prompt", prompt, (str,), "a string")
        kw = dict(think=think, max_think_token_n=max_think_token_n, do_sample=do_sample,
                  text_temperature=text_temperature, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                  cfg_interval=cfg_interval, timestep_shift=timestep_shift, num_timesteps=num_timesteps,
                  cfg_renorm_min=cfg_renorm_min, cfg_renorm_type=cfg_renorm_type, image_shapes=image_shapes,
                  record=record, progress=progress, on_token=on_token, enable_taylorseer=enable_taylorseer,
                  taylorseer_settings=taylorseer_settings, on_step=on_step)
        images = batch.count(n, len(prompts))
        if single and n == 1:
            return self.interleave(prompts, seed=batch.seeds(seed, 1)[0] if seed is not None else None,
                                   noise=noise, **kw)
        return self._batch([[p] for p in prompts for _ in range(n)], batch.seeds(seed, images), noise, **kw)

    def edit(self, image: Image.Image | str | Path | list, instruction: str | list[str], *, n: int = 1,
             think: bool = False, cfg_text_scale: float = 4.0, cfg_img_scale: float = 2.0,
             cfg_interval: tuple[float, float] = (0.0, 1.0),
             timestep_shift: float = 3.0, num_timesteps: int = 50, cfg_renorm_min: float = 0.0,
             cfg_renorm_type: str = "text_channel", max_think_token_n: int = 1024, do_sample: bool = False,
             text_temperature: float = 0.3, seed: int | list[int] | None = None, noise: Tensor | None = None,
             record: bool = False, progress: bool = False, on_token=None, enable_taylorseer: bool = False,
             taylorseer_settings: StepCacheSettings | None = None,
             on_step: Callable[[int, int], None] | None = None) -> Result | list[Result]:
        """Edit ``image`` following ``instruction`` (app defaults). Output size = the VAE-resized input size.

        Lists of images and instructions pair up (equal lengths), or a single one goes with every item of the
        other; with ``n`` images per pair, pair-major, denoised together (as :meth:`generate`; images of
        different sizes pack into one forward too). One image, one instruction and ``n == 1`` give one
        :class:`Result`, else a list."""
        imgs, img_single = batch.as_list("image", image, (Image.Image, str, Path), "a PIL image or a path")
        texts, text_single = batch.as_list("instruction", instruction, (str,), "a string")
        pairs = batch.pair_up("image", imgs, img_single, "instruction", texts, text_single)
        images = batch.count(n, len(pairs))
        opened = {id(i): open_image(i) for i in imgs}  # each file read once, however often it is paired
        kw = dict(think=think, max_think_token_n=max_think_token_n, do_sample=do_sample,
                  text_temperature=text_temperature, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                  cfg_interval=cfg_interval, timestep_shift=timestep_shift, num_timesteps=num_timesteps,
                  cfg_renorm_min=cfg_renorm_min, cfg_renorm_type=cfg_renorm_type, record=record,
                  progress=progress, on_token=on_token, enable_taylorseer=enable_taylorseer,
                  taylorseer_settings=taylorseer_settings, on_step=on_step)
        inputs = [[opened[id(i)], t] for i, t in pairs for _ in range(n)]
        if img_single and text_single and n == 1:
            return self.interleave(inputs[0], seed=batch.seeds(seed, 1)[0] if seed is not None else None,
                                   noise=noise, **kw)
        return self._batch(inputs, batch.seeds(seed, images), noise, **kw)

    @serialized
    @torch.no_grad()
    def _batch(self, inputs: list[list], seeds: list[int], noise, *, think, max_think_token_n, do_sample,
               text_temperature, cfg_text_scale, cfg_img_scale, cfg_interval, timestep_shift, num_timesteps,
               cfg_renorm_min, cfg_renorm_type, record, progress, on_token, enable_taylorseer, taylorseer_settings,
               on_step, image_shapes=(1024, 1024)) -> list[Result]:
        """Images of ``inputs`` (one input list per image, in order) with ``seeds``, denoised together.

        Each image gets its own session (prefill, VAE noise, think text from its seed: decoded one image after
        another, ``on_token`` receiving each image's tokens in turn); then :func:`bagel_rt.session.gen_images`.
        Under a GPU memory budget the images run one at a time instead (packing multiplies the denoiser's
        activations and arena by the images; a budget is there because memory is short): the same images, and
        ``on_step`` then reports each image's steps in turn. ``Result.info["batch"]``: the image's index, the
        call's image count, and how many were denoised together."""
        if noise is not None:
            raise InputError("noise applies to single-image requests; each image of a batch draws its noise from "
                             "its seed")
        self._check_request(False, max_think_token_n, text_temperature, timestep_shift, num_timesteps,
                            image_shapes, None, None)
        cfg = cfg_settings(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type)
        step_cache_for(enable_taylorseer, taylorseer_settings)  # its errors before any model work
        for items in inputs:
            for item in items:
                if not isinstance(item, (str, Image.Image)):
                    raise InputError(f"inputs must be strings or PIL images, got {type(item).__name__}")
        group = 1 if self.gpu_budget_gib is not None else len(inputs)
        results = []
        with self._budget_errors():
            for g in range(0, len(inputs), group):
                sessions, thoughts = [], []
                for items, seed in zip(inputs[g:g + group], seeds[g:g + group]):
                    s = self.session(think=think, seed=seed)
                    for item in items:
                        s.add(item)
                    thoughts.append(s.think(max_think_token_n, do_sample, text_temperature, record, progress,
                                            on_token) if think else None)
                    sessions.append(s)
                done = gen_images(sessions, [s.image_shapes or image_shapes for s in sessions], cfg,
                                  num_timesteps, timestep_shift, None, record, progress, enable_taylorseer,
                                  taylorseer_settings, on_step)
                for res, thought in zip(done, thoughts):
                    if thought is not None:
                        res.text, res.token_ids, res.logits = thought.text, thought.token_ids, thought.logits
                    res.info["batch"] = {"index": len(results), "size": len(inputs), "packed": len(sessions)}
                    results.append(res)
        return results

    def understand(self, image: Image.Image | str | Path | None, question: str, *, think: bool = False,
                   max_think_token_n: int = 512, do_sample: bool = False, text_temperature: float = 0.3,
                   seed: int | None = None, record: bool = False, progress: bool = False, on_token=None) -> Result:
        """Answer ``question`` about ``image`` (or about nothing: text only). Returns ``Result.text``."""
        if not isinstance(question, str):
            raise InputError(f"question must be a string, got {type(question).__name__}")
        inputs = ([open_image(image)] if image is not None else []) + [question]
        return self.interleave(inputs, think=think, understanding_output=True, max_think_token_n=max_think_token_n,
                               do_sample=do_sample, text_temperature=text_temperature, seed=seed, record=record,
                               progress=progress, on_token=on_token)


def cfg_settings(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type) -> CFGSettings:
    """The request's :class:`CFGSettings` (checked: :class:`InputError` naming what is out of range)."""
    try:
        lo, hi = cfg_interval
    except (TypeError, ValueError):
        raise InputError(f"cfg_interval must be a pair (lo, hi), got {cfg_interval!r}") from None
    return CFGSettings(cfg_text_scale, cfg_img_scale, (lo, hi), cfg_renorm_min, cfg_renorm_type)


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" means triton on CUDA, torch elsewhere. triton off CUDA runs the kernels in the interpreter."""
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(f"the triton backend needs a CUDA device (got {device}); use backend 'torch', or set "
                         "TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter")
    return backend


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """A PIL image, or the image at a path (with a clear error when it cannot be read)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        p = Path(image).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: image file not found")
        try:
            img = Image.open(p)
            img.load()
            return img
        except Exception as e:  # PIL raises several types for unreadable files
            raise InputError(f"{p}: cannot be read as an image ({e})") from None
    raise InputError(f"expected a PIL image or a path, got {type(image).__name__}")
