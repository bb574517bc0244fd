"""SigLIP NaViT vision encoder (so400m/14 in BAGEL-7B-MoT), as BAGEL uses it.

Differences from a stock SigLIP, all from the reference (doc 1.3, 3.5, 6.4-6.6): the patch embedding is a
Linear over patches flattened in (py, px, c) order (the checkpoint stores it that way, [hidden, 3*14*14]);
the learned position table is indexed by ``r * 70 + c`` (row stride = the table side, not the image
width); one layer fewer than the config file says is built and ``post_layernorm`` is still applied;
attention is full (bidirectional) within an image; no pooling head.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import ViTParams
from .embeddings import embedding_table


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class ViTAttention(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.num_heads, self.head_dim = p.num_heads, p.hidden_size // p.num_heads
        self.q_proj = nn.Linear(p.hidden_size, p.hidden_size)
        self.k_proj = nn.Linear(p.hidden_size, p.hidden_size)
        self.v_proj = nn.Linear(p.hidden_size, p.hidden_size)
        self.out_proj = nn.Linear(p.hidden_size, p.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C] tokens of one image -> [N, C]."""
        n = x.shape[0]
        q, k, v = (proj(x).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)  # 4-D so SDPA can pick a fused kernel
        return self.out_proj(o[0].transpose(0, 1).reshape(n, -1))


class ViTMLP(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.fc1 = nn.Linear(p.hidden_size, p.intermediate_size)
        self.fc2 = nn.Linear(p.intermediate_size, p.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ViTLayer(nn.Module):
    """Pre-LN block: x += attn(LN1 x); x += mlp(LN2 x)."""

    def __init__(self, p: ViTParams):
        super().__init__()
        self.layer_norm1 = LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.self_attn = ViTAttention(p)
        self.layer_norm2 = LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.mlp = ViTMLP(p)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViTEmbeddings(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.patch_embedding = nn.Linear(3 * p.patch_size**2, p.hidden_size)
        self.position_embedding = embedding_table(p.max_patches_per_side**2, p.hidden_size)


class ViTEncoder(nn.Module):
    def __init__(self, p: ViTParams):
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(p) for _ in range(p.num_layers))


class VisionModel(nn.Module):
    """``vit_model.vision_model``: patches of one image -> features [N, hidden]."""

    def __init__(self, p: ViTParams):
        super().__init__()
        self.params = p
        self.embeddings = ViTEmbeddings(p)
        self.encoder = ViTEncoder(p)
        self.post_layernorm = LayerNorm(p.hidden_size, eps=p.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        """patches [N, 3*P*P] in (py, px, c) order; position_ids [N] = r*side + c -> [N, hidden]."""
        w = self.embeddings.patch_embedding.weight
        x = self.embeddings.patch_embedding(patches.to(w.dtype)) + self.embeddings.position_embedding(position_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class ViTModel(nn.Module):
    """Wrapper giving the checkpoint prefix ``vit_model.vision_model``."""

    def __init__(self, p: ViTParams):
        super().__init__()
        self.vision_model = VisionModel(p)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        return self.vision_model(patches, position_ids)
