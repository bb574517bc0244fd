"""The token embedding and ``lm_head`` split by vocabulary rows over the ranks (tensor parallelism and layer
split): 1.09 GB each at full size, of which a rank keeps ``1/world``.

* :class:`VocabParallelEmbedding`: rank r holds rows ``[r*V/P, (r+1)*V/P)``; a lookup gives this rank's rows
  (zeros for the ids it does not hold) and one ``all_reduce`` adds them up — exact, since every id has exactly
  one non-zero contribution.
* :class:`VocabParallelHead`: rank r computes the logits of its vocabulary rows (any weight format: the rows
  split with their scales) and one ``all_gather`` puts the vocabulary together on every rank, so that every
  rank picks the same next token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .group import ParallelGroup


def check_vocab(vocab: int, world: int) -> None:
    if vocab % world:
        raise InputError(f"the vocabulary ({vocab} rows) does not split evenly over {world} processes; use a "
                         "number of processes that divides it")


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows ``[lo, lo + n)`` of the embedding table; ``forward`` returns the full embeddings."""

    def __init__(self, table: nn.Embedding, group: ParallelGroup):
        vocab, dim = table.weight.shape
        check_vocab(vocab, group.world)
        n = vocab // group.world
        self.lo = group.rank * n
        super().__init__(n, dim, _weight=table.weight.data[self.lo: self.lo + n].contiguous())
        self.weight.requires_grad_(False)
        self.vocab = vocab

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.lo
        held = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * held.unsqueeze(-1)
        dist.all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return f"rows {self.lo}..{self.lo + self.num_embeddings} of {self.vocab}, dim {self.embedding_dim}"


class VocabParallelHead(nn.Module):
    """``lm_head`` computing this rank's vocabulary rows (``inner``, any weight format), gathered on every rank."""

    def __init__(self, lm_head: nn.Module, group: ParallelGroup):
        from .tensor_parallel import shard_linear

        super().__init__()
        check_vocab(lm_head.out_features, group.world)
        self.inner, self.world = shard_linear(lm_head, 0, group.rank, group.world), group.world
        self.in_features, self.out_features = lm_head.in_features, lm_head.out_features

    @property
    def weight(self) -> Tensor:
        """The local weight (what ``BagelModel.device`` reads)."""
        return self.inner.weight

    def forward(self, x: Tensor) -> Tensor:
        local = self.inner(x).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)


def split_vocab(model, group: ParallelGroup) -> None:
    """Swap the token embedding and ``lm_head`` of ``model`` for their vocabulary-split versions, in place."""
    lm = model.language_model
    lm.model.embed_tokens = VocabParallelEmbedding(lm.model.embed_tokens, group)
    lm.lm_head = VocabParallelHead(lm.lm_head, group)
