"""Sessions: the three CFG contexts of a conversation, extended turn by turn (reference doc 4.4).

A :class:`Session` owns ``gen`` (everything so far), ``cfg_text`` (``gen`` as it was before the last text:
the text-unconditional branch) and ``cfg_img`` (all texts, no images: the image-unconditional branch),
and updates them exactly as the official ``interleave_inference`` does:

* text:  ``cfg_text := gen`` (before the text), then the text goes into ``gen`` and ``cfg_img``;
* image: VAE block (unless understanding-only) then ViT block into ``gen``; ``cfg_text := gen``;
* think: a system prompt first into ``gen`` and ``cfg_img``; before an image, a planning text is decoded
  from ``gen`` and appended to ``gen`` only.

Earlier turns are never prefilled again: each call extends the cached contexts.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from . import placement, validate
from .batch import ImageJob
from .cache import Context
from .errors import InputError
from .memory_plan import TEXT_ROOM, vae_decode_bytes, vae_rows, vit_rows
from .placement import text_phase, visiting
from .sampler import CFGSettings, denoise_steps
from .serial import serialized
from .step_cache import StepCache, StepCacheSettings, exact_dedup
from .step_cache.velocity import cached_velocity
from .transforms import (
    VAE_RESIZE,
    VIT_RESIZE,
    image_to_tensor,
    patchify,
    resize_image,
    tensor_to_image,
    to_rgb,
    unpatchify,
)

SYSTEM_PROMPT_GEN = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here"
)
SYSTEM_PROMPT_VLM = (
    "You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
    "process here </think> answer here"
)


@dataclass
class Result:
    """What a request produced.

    Attributes:
        image: the generated/edited image (PIL RGB), or None for text-only requests.
        text: the answer (understanding) or the planning text (think mode), else None.
        latents: [h*w, 64] float32 final latents in token layout (image requests).
        token_ids: the decoded tokens in order, including the final ``<|im_end|>`` when decoding stopped on it.
        seed: the seed actually used.
        velocities: [steps, h*w, 64] float32 combined velocities, when requested with ``record=True``.
        logits: [n, vocab] float32 logits of each decoding step, when requested with ``record=True``.
    """

    image: Image.Image | None = None
    text: str | None = None
    latents: Tensor | None = None
    token_ids: list[int] | None = None
    seed: int = 0
    velocities: Tensor | None = None
    logits: Tensor | None = None
    info: dict = field(default_factory=dict)


class Session:
    """A multi-turn context set. Create with :meth:`bagel_rt.pipeline.Bagel.session`.

    Args:
        think: prefill the think-mode system prompt (generation variant unless ``understanding_only``).
        understanding_only: images get only a ViT block (no VAE block, no CFG contexts), as the official
            ``understanding_output=True`` path; such a session cannot generate images.
        seed: seeds the CPU generator that supplies, in order, each input image's VAE posterior noise and
            the initial latent noise; and the device generator used for sampled text.
    """

    def __init__(self, bagel, think: bool = False, understanding_only: bool = False, seed: int | None = None):
        self.bagel, self.model = bagel, bagel.model
        self.seed = secrets.randbits(62) if seed is None else validate.seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.text_generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        self.for_generation = not understanding_only
        self.gen: Context = self.model.new_context()
        self.cfg_text: Context = self.model.new_context()
        self.cfg_img: Context = self.model.new_context()
        self.image_shapes: tuple[int, int] | None = None
        self._images = 0
        if think:
            prompt = SYSTEM_PROMPT_GEN if self.for_generation else SYSTEM_PROMPT_VLM
            self._prefill_text(self.gen, prompt)
            if self.for_generation:
                self._prefill_text(self.cfg_img, prompt)

    # -- building the contexts ---------------------------------------------------------------------------
    def _prefill_text(self, ctx: Context, text: str) -> None:
        ids = self.bagel.tokenizer.frame(text)
        self.model.prefill_text(ctx, ids)
        ctx.history += (("text", tuple(ids)),)

    @serialized
    def add_text(self, text: str) -> None:
        """Append a text turn (``cfg_text`` becomes the context before it)."""
        if not isinstance(text, str):
            raise InputError(f"expected a text string, got {type(text).__name__}")
        if self.for_generation:
            self.cfg_text = self.gen  # the old copy is released before the new one is made (not both at once)
            self.cfg_text = self.gen.fork()
        self._prefill_text(self.gen, text)
        if self.for_generation:
            self._prefill_text(self.cfg_img, text)

    @serialized
    @torch.no_grad()
    def add_image(self, image: Image.Image) -> Image.Image:
        """Append an image turn: VAE block (generation sessions) then ViT block. Returns the resized image.

        The image is converted to RGB and resized with the VAE rule (max 1024, min 512, stride 16); the ViT
        sees a second resize of that image (max 980, min 224, stride 14), as in the reference.
        """
        if not isinstance(image, Image.Image):
            raise InputError(f"expected a PIL image, got {type(image).__name__}")
        img = resize_image(to_rgb(image), *VAE_RESIZE)
        vit_img = resize_image(img, *VIT_RESIZE)
        placement.release_denoiser(self.bagel)  # under a budget: room for the ViT and the VAE encode
        self._images += 1
        key = self._images
        # room for both blocks and a text at once: growing the cache block by block would copy it each time and,
        # at 1024^2, hold a 0.24 GiB and a 0.5 GiB cache at the same time
        p, (H, W) = self.model.params, (img.height, img.width)
        rows = vit_rows(p, H, W) + (vae_rows(p, H, W) if self.for_generation else 0) + TEXT_ROOM
        self.gen.cache.to(self.model.device).reserve(rows)
        if self.for_generation:
            x = image_to_tensor(img)[None].to(self.model.device)
            with visiting(self.bagel.vae, self.model.device, self.bagel.offload):
                z = self.bagel.vae.encode(x, self.generator)[0]  # [16, H/8, W/8]
            p, ds = self.model.params.latent_patch_size, self.model.params.latent_downsample
            h, w = img.height // ds, img.width // ds
            self.model.prefill_vae(self.gen, patchify(z[:, : h * p, : w * p], p), h, w)
            self.gen.history += (("vae", key),)
        self.model.prefill_vit(self.gen, image_to_tensor(vit_img))
        self.gen.history += (("vit", key),)
        self.image_shapes = (img.height, img.width)
        if self.for_generation:
            self.cfg_text = self.gen  # the old copy is released before the new one is made
            self.cfg_text = self.gen.fork()
        return img

    def add(self, item) -> None:
        """Append a string or a PIL image."""
        if isinstance(item, str):
            self.add_text(item)
        elif isinstance(item, Image.Image):
            self.add_image(item)
        else:
            raise InputError(f"inputs must be strings or PIL images, got {type(item).__name__}")

    # -- text ---------------------------------------------------------------------------------------------
    @serialized
    @torch.no_grad()
    def gen_text(self, max_length: int = 512, do_sample: bool = False, temperature: float = 0.3,
                 record: bool = False, progress: bool = False, desc: str = "decoding", on_token=None) -> Result:
        """Decode from a copy of ``gen``: feed ``<|im_start|>``, stop at ``<|im_end|>`` or ``max_length``.
        ``on_token``: optional callable taking each predicted id as it is decoded (streaming)."""
        validate.token_limit(max_length, self.gen.length, self.model.params.llm.max_positions)
        if do_sample and not temperature > 0:
            raise InputError(f"text_temperature must be > 0 when sampling, got {temperature}")
        tok, sp = self.bagel.tokenizer, self.model.special
        ctx = self.gen.fork(extra=max_length)
        # the graph decoder copies the weights of every layer: not for split models (tensor-parallel, layer split)
        split = self.model.parallel is not None and self.model.parallel.mode != "cfg"
        graphs = self.bagel.backend == "triton" and not self.bagel.df11_resident and not split
        # under a budget: lm_head (and, for the graph decoder, the token table) visits the GPU for this phase only,
        # and running out of memory is the pipeline's clear InputError (sessions are used directly too)
        with self.bagel._budget_errors(), text_phase(self.bagel, embeddings=graphs):
            if graphs:
                from .fast_decode import fast_gen_text

                predicted, logits = fast_gen_text(self.bagel.decoder, ctx, max_length, do_sample, temperature,
                                                  self.text_generator, record, on_token)
            else:
                predicted, logits = self._decode_loop(ctx, max_length, do_sample, temperature, record,
                                                      _bar(max_length, desc, progress), on_token)
        # the reference decodes the fed tokens (start token + every prediction but the last), then cuts
        text = tok.decode([sp.bos, *predicted[:-1]]).split("<|im_end|>")[0].split("<|im_start|>")[1]
        return Result(text=text, token_ids=predicted, seed=self.seed, logits=logits)

    def _decode_loop(self, ctx: Context, max_length: int, do_sample: bool, temperature: float, record: bool,
                     bar, on_token=None) -> tuple[list[int], Tensor | None]:
        """The torch path's token loop: (predicted ids incl. a final stop token, [n, vocab] logits or None)."""
        sp = self.model.special
        token, predicted, logits_rec = sp.bos, [], []
        for step in range(max_length):
            logits = self.model.decode_step(ctx, token)
            if record:
                logits_rec.append(logits.float().cpu())
            if do_sample:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.text_generator))
            else:
                token = int(torch.argmax(logits))
            predicted.append(token)
            if on_token is not None:
                on_token(token)
            if bar:
                bar.update(1)
            if token == sp.eos or step == max_length - 1:
                break
        if bar:
            bar.close()
        return predicted, torch.stack(logits_rec) if record else None

    def reply(self, max_length: int = 512, do_sample: bool = False, temperature: float = 0.3,
              record: bool = False, progress: bool = False, on_token=None) -> Result:
        """Answer from ``gen`` and append the answer as a text turn, so later turns see the conversation
        (``cfg_text`` becomes the context before the answer, ``cfg_img`` gets it too, as for any text)."""
        res = self.gen_text(max_length, do_sample, temperature, record, progress, "answering", on_token)
        self.add_text(res.text)
        return res

    def think(self, max_length: int = 1024, do_sample: bool = False, temperature: float = 0.3,
              record: bool = False, progress: bool = False, on_token=None) -> Result:
        """Decode a planning text and append it to ``gen`` only (think mode before an image)."""
        res = self.gen_text(max_length, do_sample, temperature, record, progress, "thinking", on_token)
        self._prefill_text(self.gen, res.text)
        return res

    # -- images -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def branches(self) -> tuple[dict[str, Context], dict[str, bool]]:
        """The CFG branch contexts {"cond", "text", "img"} and the exact-dedup flags (``text_is_cond``,
        ``img_is_cond``: that branch's context equals the conditional one, so its velocity is reused)."""
        ctxs = {"cond": self.gen, "text": self.cfg_text, "img": self.cfg_img}
        dedup = dict(text_is_cond=self.cfg_text.history == self.gen.history,
                     img_is_cond=self.cfg_img.history == self.gen.history)
        return ctxs, dedup

    @serialized
    def gen_image(self, image_shapes: tuple[int, int] | None = None, cfg: CFGSettings | None = None,
                  num_timesteps: int = 50, timestep_shift: float = 3.0, noise: Tensor | None = None,
                  record: bool = False, progress: bool = False, enable_taylorseer: bool = False,
                  taylorseer_settings: StepCacheSettings | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> Result:
        """Denoise an image conditioned on the three contexts and decode it with the VAE.

        Args:
            image_shapes: (H, W) in pixels, multiples of 16 up to 1024 (default: the last input image's size).
            noise: optional [h*w, 64] initial latents; otherwise drawn from the session's CPU generator.
            enable_taylorseer: step caching (approximate, opt-in; :mod:`bagel_rt.step_cache`): most evaluations
                of each CFG branch are Taylor predictions from its last full forwards. ``Result.info
                ["step_cache"]`` then reports the schedule that ran.
            taylorseer_settings: a :class:`bagel_rt.step_cache.StepCacheSettings` (default: the official values;
                ``max_order=0`` is FORA); only with ``enable_taylorseer``.
            on_step: ``on_step(step_index, num_steps)`` after every denoising step (see :func:`gen_images`).
        """
        return gen_images([self], [image_shapes], cfg, num_timesteps, timestep_shift, [noise], record, progress,
                          enable_taylorseer, taylorseer_settings, on_step)[0]

    def image_job(self, image_shapes: tuple[int, int] | None, cfg: CFGSettings, num_timesteps: int,
                  timestep_shift: float, noise: Tensor | None, step_cache: StepCache | None) -> ImageJob:
        """This session's image of a denoising call: its grid, its initial noise (drawn now from the session's
        generator unless given), its branch contexts and exact-dedup flags."""
        if not self.for_generation:
            raise InputError("this session was created for understanding only; it cannot generate images")
        H, W = check_image_shape(image_shapes or self.image_shapes or (1024, 1024), self.model.params)
        ds = self.model.params.latent_downsample
        h, w = H // ds, W // ds
        n, c = h * w, self.model.params.patch_latent_dim
        if noise is None:
            noise = torch.randn((n, c), generator=self.generator, dtype=torch.float32)
        elif tuple(noise.shape) != (n, c):
            raise InputError(f"noise has shape {list(noise.shape)}, expected [{n}, {c}] for {H}x{W}")
        ctxs, dedup = self.branches()
        if step_cache is not None:  # dedup stays exact only for branches evaluated on the conditional one's steps
            dedup = exact_dedup(cfg, num_timesteps, timestep_shift, **dedup)
        return ImageJob(ctxs, noise, h, w, step_cache=step_cache, **dedup)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, h: int, w: int) -> Image.Image:
        """Final latents [h*w, 64] (token layout) -> PIL image of (16h, 16w) via the VAE (fp32)."""
        p = self.model.params
        z = unpatchify(latents.float(), h, w, p.latent_patch_size, p.latent_channels)
        bagel = self.bagel
        kept = bagel.offload and bool(bagel.fast_cache)  # under a budget: a denoiser still holds GPU memory
        if kept and not placement.vae_fits(bagel, 16 * h, 16 * w):
            placement.release_denoiser(bagel)  # its arena and graph pool make room for the VAE
            kept = False
        img = None
        try:
            img = self._vae_decode(z)
        except torch.cuda.OutOfMemoryError:
            if not kept:
                raise
        if img is None:  # the predicted room was not there: again without the denoiser (outside the except: its
            placement.release_denoiser(bagel)  # traceback would keep the failed decode's memory alive)
            img = self._vae_decode(z)
        validate.finite(img, "the decoded image", validate.NON_FINITE_HINT)
        return tensor_to_image(img[0].cpu())

    def _vae_decode(self, z: Tensor) -> Tensor:
        """The VAE's decode of latents z [C, h, w] on the model's device (visiting it under a budget)."""
        with visiting(self.bagel.vae, self.model.device, self.bagel.offload):
            return self.bagel.vae.decode(z[None].to(self.model.device, torch.float32))


def gen_images(sessions: list[Session], image_shapes: list, cfg: CFGSettings | None = None,
               num_timesteps: int = 50, timestep_shift: float = 3.0, noises: list | None = None,
               record: bool = False, progress: bool = False, enable_taylorseer: bool = False,
               taylorseer_settings: StepCacheSettings | None = None,
               on_step: Callable[[int, int], None] | None = None) -> list[Result]:
    """One image per session, denoised together (a batch: :mod:`bagel_rt.batch`), each decoded with the VAE.

    The triton backend runs every image's CFG branches as one packed forward per step
    (:func:`bagel_rt.fast.denoise_batch`); the torch backend steps the images in lockstep, one after another
    within each step (the same operations as alone, so the same bits). Settings are shared; ``image_shapes``
    and ``noises`` are per session (None: the session's last input image's size / noise drawn from its
    generator). ``on_step(step_index, num_steps)`` is called after every denoising step of the batch
    (``num_steps = num_timesteps - 1``: the last timestep, 0, is never evaluated); an exception raised there
    stops the work and propagates. Each :class:`Result` has its image's seed, latents, step-cache report and
    ``info["denoise_seconds"]``: the denoising loop's wall time, shared by the images denoised together.
    """
    bagel = sessions[0].bagel
    assert all(s.bagel is bagel for s in sessions), "the sessions of a batch share one pipeline"
    with bagel.lock, torch.no_grad(), bagel._budget_errors():
        cfg = cfg or CFGSettings()
        noises = noises or [None] * len(sessions)
        jobs = [s.image_job(shape, cfg, num_timesteps, timestep_shift, noise,
                            step_cache_for(enable_taylorseer, taylorseer_settings))
                for s, shape, noise in zip(sessions, image_shapes, noises, strict=True)]
        steps = num_timesteps - 1
        vels: list[list[Tensor]] = [[] for _ in jobs]
        if record:  # opt-in: copying each step's velocity to the host syncs the loop
            for job, rec in zip(jobs, vels):
                job.on_step = lambda i, v, rec=rec: rec.append(v.float().cpu())
        bar = _bar(steps + len(jobs), "denoising", progress)

        def batch_step(i: int) -> None:
            if bar:
                bar.update(1)
            if on_step is not None:
                on_step(i, steps)

        model, t0 = bagel.model, time.perf_counter()
        try:
            if bagel.backend == "triton":
                from . import fast
                from .placement import mlp_chunks

                if bagel.offload:  # the arena holds copies of the caches: the originals wait on the CPU
                    for job in jobs:
                        for c in job.ctxs.values():
                            c.cache.to("cpu")
                rows = fast.latent_rows(jobs, cfg, num_timesteps, timestep_shift)
                ds = model.params.latent_downsample
                decode = max(vae_decode_bytes(ds * job.h, ds * job.w) for job in jobs)  # the largest image's
                chunks = mlp_chunks(bagel, rows, fast.arena_bytes(model, jobs, cfg, num_timesteps, timestep_shift),
                                    decode)
                xs = fast.denoise_batch(model, jobs, num_timesteps, timestep_shift, cfg,
                                        use_graphs=bagel.use_graphs and not bagel.graphs_refused,
                                        on_step=batch_step, cache=bagel.fast_cache, mlp_chunks=chunks,
                                        df11=bagel.df11, lean=bagel.offload, attention=bagel.attention)
                bagel.graphs_refused |= fast.graphs_refused(bagel.fast_cache)
            else:
                xs = _denoise_lockstep(model, jobs, num_timesteps, timestep_shift, cfg, batch_step)
            for x in xs:
                validate.finite(x, "the final latents", validate.NON_FINITE_HINT)
            seconds = time.perf_counter() - t0
            if bar:
                bar.set_description("decoding")
            results = []
            for k, (s, job, x) in enumerate(zip(sessions, jobs, xs)):
                res = Result(image=s.decode_latents(x, job.h, job.w), latents=x.float().cpu(), seed=s.seed,
                             velocities=torch.stack(vels[k]) if record else None)
                if job.step_cache is not None:
                    res.info["step_cache"] = job.step_cache.report()
                res.info["denoise_seconds"] = round(seconds, 3)
                results.append(res)
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()
        return results


def _denoise_lockstep(model, jobs: list[ImageJob], num_timesteps: int, timestep_shift: float, cfg: CFGSettings,
                      on_step: Callable[[int], None]) -> list[Tensor]:
    """The torch backend's batch: each image's own :func:`bagel_rt.sampler.denoise_steps` loop, all advanced one
    step at a time (the images run one after another within a step; nothing is packed)."""
    loops = []
    for job in jobs:
        vel = lambda branch, x, t, job=job: model.velocity(job.ctxs[branch], x, t, job.h, job.w)
        if job.step_cache is not None:
            hidden = lambda branch, x, t, job=job: model.velocity_hidden(job.ctxs[branch], x, t, job.h, job.w)
            vel = cached_velocity(job.step_cache, hidden, model.velocity_head)
        if model.parallel is not None:  # CFG-parallel: this rank's branches, exchanged each step
            from .parallel.cfg_parallel import spread_velocity

            vel = spread_velocity(model, vel, cfg, num_timesteps, timestep_shift, job.step_cache,
                                  text_is_cond=job.text_is_cond, img_is_cond=job.img_is_cond)
        loops.append(denoise_steps(vel, job.noise.to(model.device), num_timesteps, timestep_shift, cfg,
                                   job.text_is_cond, job.img_is_cond, job.step_cache))
    xs: list[Tensor] = [job.noise for job in jobs]
    for i in range(num_timesteps - 1):
        for k, (job, loop) in enumerate(zip(jobs, loops)):
            _, xs[k], v = next(loop)
            if job.on_step is not None:
                job.on_step(i, v)
        on_step(i)
    return xs


def step_cache_for(enable_taylorseer: bool, settings: StepCacheSettings | None) -> StepCache | None:
    """A new request's step-cache state (None when off): each request starts from empty caches."""
    if not enable_taylorseer:
        if settings is not None:
            raise InputError("taylorseer_settings are given but enable_taylorseer is off")
        return None
    if settings is not None and not isinstance(settings, StepCacheSettings):
        raise InputError(f"taylorseer_settings must be a StepCacheSettings, got {type(settings).__name__}")
    return StepCache(settings or StepCacheSettings())


def check_image_shape(shape, params) -> tuple[int, int]:
    """Validate (H, W): integers, multiples of 16, between 16 and the model's maximum side (1024)."""
    try:
        H, W = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise InputError(f"image_shapes must be (height, width), got {shape!r}") from None
    ds, mx = params.latent_downsample, params.max_image_side
    for name, v in (("height", H), ("width", W)):
        if v % ds or not (ds <= v <= mx):
            raise InputError(f"image {name} {v} must be a multiple of {ds} between {ds} and {mx}")
    return H, W


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)
