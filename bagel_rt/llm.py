"""The Mixture-of-Transformers language model (Qwen2.5-7B base with an und and a gen expert).

Every decoder layer holds two complete weight sets: the understanding expert ``und`` (the Qwen2 names) and
the generation expert ``gen`` (the same names with ``_moe_gen``). Tokens are routed by kind: text, ViT
tokens and image markers use ``und``; VAE latent tokens use ``gen``. All tokens share one attention.

Routing without gather/scatter: a forward receives its tokens ordered ``[und tokens | gen tokens]`` and the
count ``n_und``; the two experts then work on two contiguous slices. The order of tokens inside an image
block is free because image blocks attend bidirectionally and are only ever seen whole by later tokens, so
the callers put the two marker tokens of a VAE block first (reference doc 3.2, 3.4, 6.12).

Numerics follow the reference (doc 4.10): bf16 residual stream, RMSNorm computed in fp32 and cast back
before the weight multiply; in "gen" forwards q/k are normed and rotated in fp32, in "und" forwards in the
activation dtype; the attention runs in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LLMParams
from .embeddings import embedding_table, rope_cos_sin


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


#: row granularity of the prefill MLP's chunks (see :class:`MLP`)
ROW_ALIGN = 256


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases.

    ``max_rows``: None (default) runs all rows at once; else row chunks of ``max_rows`` rows (a multiple of
    :data:`ROW_ALIGN`), the remainder joining the last chunk (so it has fewer than ``2 * max_rows``). Set under
    a memory budget by :func:`bagel_rt.placement.limit_gpu_memory`: three [rows, intermediate] tensors are live
    at once, 3 x 177 MiB for an edit's 4902-row ViT block at full size. Each output row depends on its input row
    only, but a GEMM's accumulation order may depend on where a row falls in the kernel's row tiles: on the CPU
    (MKL, one thread) chunks of 100 rows, equal chunks or a 2-row tail changed a few rows' last bits, while
    chunks starting at multiples of 256 rows with no small tail gave the whole block's bits at every size tried
    (tests/test_memory.py checks them). With several threads MKL also splits the rows between threads at
    M-dependent points, and cuBLAS picks kernels by M: there the chunked rows may differ in their last bits
    (bf16 rounding level), which is why chunks run only under a budget.
    """

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.max_rows: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        """x [M, hidden] -> [M, hidden]."""
        M, rows = x.shape[0], self.max_rows
        if rows is None or M < 2 * rows:
            return self._rows(x)
        step = max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)
        bounds = [i * step for i in range(M // step)] + [M]  # the remainder joins the last chunk
        out = x.new_empty(M, self.down_proj.out_features)
        for r0, r1 in zip(bounds, bounds[1:]):
            out[r0:r1] = self._rows(x[r0:r1])
        return out

    def _rows(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [M, heads, D]; cos/sin [M, D] (already in the activation dtype)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Plain attention of one sequence: q [Lq, Hq, D] against k/v [Lk, Hk, D] -> [Lq, Hq, D].

    ``causal`` aligns bottom-right: query i sees keys j <= Lk - Lq + i (text prefill with a cache in front).
    """
    lq, hq, d = q.shape
    lk, hk, _ = k.shape
    if hq != hk:  # GQA: each kv head serves hq/hk query heads (expanded so SDPA can use its fused kernels)
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    mask = None
    if causal and lq > 1:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        mask = j <= (lk - lq) + i
    # 4-D [1, heads, L, D]: SDPA's flash/efficient kernels need a batch and a head dimension (3-D inputs fall
    # back to the math kernel, which materialises the whole score matrix).
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
    return out[0].transpose(0, 1)


class SelfAttention(nn.Module):
    """Both experts' q/k/v/o projections and per-head q/k norms (``*_moe_gen`` = gen expert)."""

    def __init__(self, p: LLMParams):
        super().__init__()
        h, d = p.hidden_size, p.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = p.num_heads, p.num_kv_heads, d
        for sfx in ("", "_moe_gen"):
            setattr(self, "q_proj" + sfx, nn.Linear(h, p.num_heads * d, bias=True))
            setattr(self, "k_proj" + sfx, nn.Linear(h, p.num_kv_heads * d, bias=True))
            setattr(self, "v_proj" + sfx, nn.Linear(h, p.num_kv_heads * d, bias=True))
            setattr(self, "o_proj" + sfx, nn.Linear(p.num_heads * d, h, bias=False))
            setattr(self, "q_norm" + sfx, RMSNorm(d, p.rms_norm_eps))
            setattr(self, "k_norm" + sfx, RMSNorm(d, p.rms_norm_eps))

    def _proj(self, name: str, h: Tensor, n_und: int) -> Tensor:
        und = getattr(self, name)(h[:n_und])
        if n_und == h.shape[0]:
            return und
        return torch.cat([und, getattr(self, name + "_moe_gen")(h[n_und:])])

    def _qk_norm(self, name: str, x: Tensor, n_und: int) -> Tensor:
        und = getattr(self, name)(x[:n_und])
        if n_und == x.shape[0]:
            return und
        return torch.cat([und, getattr(self, name + "_moe_gen")(x[n_und:])])

    def forward(self, h: Tensor, n_und: int, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], start: int,
                causal: bool, fp32_qk: bool) -> Tensor:
        """h [L, H] normed input -> attention output projected back [L, H].

        ``kv`` are this layer's cache buffers [capacity, Hk, D]; the new keys/values are written at
        ``[start, start+L)`` and the attention covers ``[0, start+L)``. Whether they count as cached is the
        caller's decision (it advances the cache length or not).
        """
        L = h.shape[0]
        q = self._proj("q_proj", h, n_und).view(L, self.num_heads, self.head_dim)
        k = self._proj("k_proj", h, n_und).view(L, self.num_kv_heads, self.head_dim)
        v = self._proj("v_proj", h, n_und).view(L, self.num_kv_heads, self.head_dim)
        if fp32_qk:
            q, k = q.float(), k.float()
        q = apply_rope(self._qk_norm("q_norm", q, n_und), cos, sin).to(h.dtype)
        k = apply_rope(self._qk_norm("k_norm", k, n_und), cos, sin).to(h.dtype)
        k_buf, v_buf = kv
        k_buf[start:start + L] = k
        v_buf[start:start + L] = v
        o = attention(q, k_buf[:start + L], v_buf[:start + L], causal)
        return self._proj("o_proj", o.reshape(L, -1), n_und)


class DecoderLayer(nn.Module):
    """One MoT layer: expert-specific norms/projections/MLP around one shared attention."""

    def __init__(self, p: LLMParams):
        super().__init__()
        self.self_attn = SelfAttention(p)
        self.mlp = MLP(p.hidden_size, p.intermediate_size)
        self.mlp_moe_gen = MLP(p.hidden_size, p.intermediate_size)
        for sfx in ("", "_moe_gen"):
            setattr(self, "input_layernorm" + sfx, RMSNorm(p.hidden_size, p.rms_norm_eps))
            setattr(self, "post_attention_layernorm" + sfx, RMSNorm(p.hidden_size, p.rms_norm_eps))

    def _split(self, mod_und: nn.Module, mod_gen: nn.Module, x: Tensor, n_und: int) -> Tensor:
        if n_und == x.shape[0]:
            return mod_und(x)
        return torch.cat([mod_und(x[:n_und]), mod_gen(x[n_und:])])

    def forward(self, x: Tensor, n_und: int, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], start: int,
                causal: bool, fp32_qk: bool) -> Tensor:
        h = self._split(self.input_layernorm, self.input_layernorm_moe_gen, x, n_und)
        x = x + self.self_attn(h, n_und, cos, sin, kv, start, causal, fp32_qk)
        h = self._split(self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, x, n_und)
        h = self._split(self.mlp, self.mlp_moe_gen, h, n_und)
        return x + h


class Qwen2MoTModel(nn.Module):
    """``language_model.model``: embeddings, the MoT layers and both final norms."""

    def __init__(self, p: LLMParams):
        super().__init__()
        self.embed_tokens = embedding_table(p.vocab_size, p.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(p) for _ in range(p.num_layers))
        self.norm = RMSNorm(p.hidden_size, p.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(p.hidden_size, p.rms_norm_eps)


class LanguageModel(nn.Module):
    """``language_model``: the MoT model plus the untied ``lm_head``."""

    def __init__(self, p: LLMParams):
        super().__init__()
        self.params = p
        self.model = Qwen2MoTModel(p)
        self.lm_head = nn.Linear(p.hidden_size, p.vocab_size, bias=False)

    def forward(self, x: Tensor, n_und: int, positions: Tensor, cache, start: int, causal: bool,
                fp32_qk: bool, final_norm: bool = True) -> Tensor:
        """Run the layers over one packed query block and return the final-normed hidden states.

        Args:
            x: [L, H] input embeddings ordered [und tokens | gen tokens].
            n_und: number of leading und tokens (L for a pure understanding forward).
            positions: [L] RoPE position ids.
            cache: a :class:`bagel_rt.cache.KVCache` with room for ``start + L`` rows.
            start: row of the cache where this block's keys/values are written.
            causal: text prefill/decoding (True) or an image block (False).
            fp32_qk: q/k norm and RoPE in fp32 (the reference's "gen" mode).
            final_norm: apply the final norms (False: the last layer's output, what step caching extrapolates).
        Returns:
            [L, H] hidden states after ``norm`` (und rows) / ``norm_moe_gen`` (gen rows).
        """
        p = self.params
        cos, sin = rope_cos_sin(positions, p.head_dim, p.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            # a layer another rank holds (layer split) has no buffers here, and needs none
            x = layer(x, n_und, cos, sin, cache.layer(i) if cache.holds(i) else None, start, causal, fp32_qk)
        if not final_norm:
            return x
        m = self.model
        if n_und == x.shape[0]:
            return m.norm(x)
        return torch.cat([m.norm(x[:n_und]), m.norm_moe_gen(x[n_und:])])

