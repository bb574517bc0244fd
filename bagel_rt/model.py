"""``BagelModel``: the LLM, the ViT and the glue, with the four forwards the runtime needs.

Key names equal the official ``ema.safetensors`` keys, so the checkpoint loads without conversion. The
VAE (``ae.safetensors``) is a separate module (:class:`bagel_rt.vae.AutoEncoder`).

Forwards (reference doc section 4):

* :meth:`prefill_text`  — a framed text segment, causal, und expert, cached; rope += len.
* :meth:`prefill_vit`   — ``[<vision_start>, ViT tokens, <vision_end>]``, one rope id, und, cached; rope += 1.
* :meth:`prefill_vae`   — ``[markers, clean latent tokens]`` at t = 0, one rope id, markers und / latents
  gen, cached; rope += 1.
* :meth:`velocity`      — the same block over noised latents at time t, not cached -> velocity [N, 64]
  (:meth:`velocity_hidden` then :meth:`velocity_head`: the split step caching needs).
* :meth:`decode_step`   — one text token, causal, cached -> logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cache import Context, KVCache
from .config import BagelParams
from .embeddings import MLPConnector, PositionTable, TimestepEmbedder
from .llm import LanguageModel
from .transforms import flattened_position_ids, patchify
from .vit import ViTModel


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the four framing tokens, looked up by string in the tokenizer."""

    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>


class BagelModel(nn.Module):
    """Everything in ``ema.safetensors``: MoT LLM, SigLIP ViT, connector and glue."""

    def __init__(self, params: BagelParams, special: SpecialTokens):
        super().__init__()
        p = params
        H = p.llm.hidden_size
        self.params, self.special = p, special
        self.language_model = LanguageModel(p.llm)
        self.vit_model = ViTModel(p.vit)
        self.connector = MLPConnector(p.vit.hidden_size, H)
        self.vit_pos_embed = PositionTable(p.vit_max_num_patch_per_side, H)
        self.latent_pos_embed = PositionTable(p.max_latent_size, H)
        self.time_embedder = TimestepEmbedder(H, p.timestep_freq_dim)
        self.vae2llm = nn.Linear(p.patch_latent_dim, H)
        self.llm2vae = nn.Linear(H, p.patch_latent_dim)
        #: the multi-process run this model is split for (:class:`bagel_rt.parallel.ParallelGroup`), or None
        self.parallel = None

    # -- helpers -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        # the final norm stays resident on every rank; lm_head waits on the CPU under a budget (placement)
        return self.language_model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    def new_context(self, capacity: int = 0) -> Context:
        """An empty context (rope 0) with a cache of ``capacity`` rows reserved, for the key/value heads and
        decoder layers this process holds (all of them, or its share under tensor parallelism / a layer split)."""
        return Context(self.new_cache(capacity))

    def new_cache(self, capacity: int = 0) -> KVCache:
        """A :class:`KVCache` of ``capacity`` rows for this process's heads and layers (:meth:`new_context`)."""
        p, layers = self.params.llm, self.local_layers
        return KVCache(len(layers), self.local_heads[1], p.head_dim, self.device, self.dtype, capacity,
                       first=layers.start)

    @property
    def local_layers(self) -> range:
        """The decoder layers this process runs: all, or its range under a layer split."""
        if self.parallel is not None and self.parallel.mode == "layers":
            return self.parallel.stage.layers
        return range(self.params.llm.num_layers)

    @property
    def local_heads(self) -> tuple[int, int]:
        """(query heads, key/value heads) of the attention this process computes: its share under tensor
        parallelism, else all."""
        p = self.params.llm
        n = self.parallel.world if self.parallel is not None and self.parallel.mode == "tp" else 1
        return p.num_heads // n, p.num_kv_heads // n

    def embed(self, ids: list[int]) -> Tensor:
        """Embeddings [len(ids), H] on the model's device (looked up where the table lives: it may be kept
        on the CPU under a memory budget, see :mod:`bagel_rt.placement`)."""
        table = self.language_model.model.embed_tokens
        return table(torch.tensor(ids, device=table.weight.device)).to(self.device)

    def _forward(self, ctx: Context, x: Tensor, n_und: int, positions: Tensor, causal: bool, fp32_qk: bool,
                 commit: bool, final_norm: bool = True) -> Tensor:
        L = x.shape[0]
        ctx.cache.to(self.device).reserve(L)  # a cache set aside on the CPU under a budget comes back
        out = self.language_model(x, n_und, positions, ctx.cache, ctx.cache.length, causal, fp32_qk, final_norm)
        if commit:
            ctx.cache.length += L
        return out

    def _block_positions(self, ctx: Context, n: int) -> Tensor:
        return torch.full((n,), ctx.rope, dtype=torch.long, device=self.device)

    def latent_block(self, tokens: Tensor, t: float, h: int, w: int) -> Tensor:
        """Embeddings of a VAE block ``[<vision_start>, <vision_end>, h*w latents]`` -> [2 + h*w, H].

        Latent tokens get ``vae2llm(x) + time_embedder(t) + latent_pos_embed[r*64 + c]`` (doc 6.3); the two
        markers come first so the und/gen experts see contiguous rows.
        """
        s = self.special
        pos = flattened_position_ids(h, w, self.params.max_latent_size).to(self.device)
        t_emb = self.time_embedder(torch.tensor([t], dtype=torch.float32, device=self.device))
        lat = self.vae2llm(tokens.to(self.device, self.dtype)) + t_emb + self.latent_pos_embed(pos)
        return torch.cat([self.embed([s.start_of_image, s.end_of_image]), lat.to(self.dtype)])

    # -- the forwards ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill_text(self, ctx: Context, ids: list[int]) -> None:
        """Append a framed text segment (``[bos] + tokens + [eos]``, given whole) to ``ctx``."""
        pos = torch.arange(ctx.rope, ctx.rope + len(ids), device=self.device)
        self._forward(ctx, self.embed(ids), len(ids), pos, causal=True, fp32_qk=False, commit=True)
        ctx.rope += len(ids)

    @torch.no_grad()
    def vit_tokens(self, image: Tensor) -> Tensor:
        """image [3, H, W] in [-1, 1] (H, W multiples of the patch) -> LLM-width tokens [N, hidden]."""
        from .placement import phase_modules, visiting

        offloaded = self.vit_model.vision_model.post_layernorm.weight.device != self.device
        with contextlib.ExitStack() as stack:
            for m in phase_modules(self):
                stack.enter_context(visiting(m, self.device, offloaded))
            return self._vit_tokens(image)

    def _vit_tokens(self, image: Tensor) -> Tensor:
        pv = self.params.vit
        _, H, W = image.shape
        patches = patchify(image.to(self.device), pv.patch_size)
        pos = flattened_position_ids(H // pv.patch_size, W // pv.patch_size,
                                     self.params.vit_max_num_patch_per_side).to(self.device)
        feats = self.connector(self.vit_model(patches, pos))
        return (feats + self.vit_pos_embed(pos)).to(self.dtype)

    @torch.no_grad()
    def prefill_vit(self, ctx: Context, image: Tensor) -> None:
        """Append the ViT block of one image [3, H, W] in [-1, 1] to ``ctx``."""
        s = self.special
        x = torch.cat([self.embed([s.start_of_image]), self.vit_tokens(image), self.embed([s.end_of_image])])
        self._forward(ctx, x, x.shape[0], self._block_positions(ctx, x.shape[0]), causal=False, fp32_qk=False,
                      commit=True)
        ctx.rope += 1

    @torch.no_grad()
    def prefill_vae(self, ctx: Context, tokens: Tensor, h: int, w: int) -> None:
        """Append a clean VAE block (latent tokens [h*w, 64], token layout, at t = 0) to ``ctx``."""
        x = self.latent_block(tokens, 0.0, h, w)
        self._forward(ctx, x, 2, self._block_positions(ctx, x.shape[0]), causal=False, fp32_qk=True, commit=True)
        ctx.rope += 1

    @torch.no_grad()
    def velocity(self, ctx: Context, x_t: Tensor, t: float, h: int, w: int) -> Tensor:
        """Velocity of noised latents x_t [h*w, 64] at time t given ``ctx`` (not cached) -> [h*w, 64]."""
        return self.velocity_head(self.velocity_hidden(ctx, x_t, t, h, w))

    @torch.no_grad()
    def velocity_hidden(self, ctx: Context, x_t: Tensor, t: float, h: int, w: int) -> Tensor:
        """The last decoder layer's output [h*w, H] on the latent rows of :meth:`velocity`'s forward, before the
        final norm (what step caching keeps and extrapolates, :mod:`bagel_rt.step_cache`)."""
        x = self.latent_block(x_t, t, h, w)
        out = self._forward(ctx, x, 2, self._block_positions(ctx, x.shape[0]), causal=False, fp32_qk=True,
                            commit=False, final_norm=False)
        return out[2:]

    @torch.no_grad()
    def velocity_head(self, hidden: Tensor) -> Tensor:
        """Velocity [N, 64] of latent rows' last-layer output hidden [N, H]: final gen norm, then ``llm2vae``."""
        return self.llm2vae(self.language_model.model.norm_moe_gen(hidden))

    @torch.no_grad()
    def decode_step(self, ctx: Context, token: int) -> Tensor:
        """Feed one token at position ``ctx.rope`` (cached) and return its logits [vocab] (model dtype)."""
        pos = torch.tensor([ctx.rope], device=self.device)
        out = self._forward(ctx, self.embed([token]), 1, pos, causal=True, fp32_qk=False, commit=True)
        ctx.rope += 1
        return self.language_model.lm_head(out[0])
