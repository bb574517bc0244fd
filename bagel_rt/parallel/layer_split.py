"""Layer split (pipeline without micro-batches): rank r holds a contiguous range of decoder layers.

Every rank runs the same request. A forward enters rank 0's layers, whose last output is sent to rank 1
(one activation hand-off per rank boundary: [rows, hidden], 29 MB for a t2i step at 1024²), and so on; the
last rank broadcasts the final layer's output, so that every rank applies the final norms, ``lm_head`` and the
velocity head itself and the sampler state stays identical everywhere. The token embedding and ``lm_head``
are split by vocabulary rows (:mod:`.vocab`); the ViT and VAE are replicated. The ranks work one after another: the
point is memory (two 16 GB cards hold the bf16 model), not speed.

Module swap: the layers another rank holds become :class:`AbsentLayer` (no weights; passes the hidden state
through), and the hand-offs are forward hooks on the layers at the range boundaries — so
:meth:`bagel_rt.llm.LanguageModel.forward` runs unchanged. The packed denoiser, which reads the layers' weights
itself, calls :class:`LayerStage` directly. KV caches and the denoiser's arena hold this rank's layers only
(:attr:`bagel_rt.model.BagelModel.local_layers`, ``KVCache(first=...)``): a context costs each rank its share.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InputError
from .group import ParallelGroup


class AbsentLayer(nn.Module):
    """A decoder layer held by another rank: the hidden state passes through (it is replaced at the next
    hand-off)."""

    def __init__(self, index: int, holder: int):
        super().__init__()
        self.index, self.holder = index, holder

    def forward(self, x: Tensor, *args) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"layer {self.index} on rank {self.holder}"


def layer_ranges(num_layers: int, world: int) -> list[range]:
    """Contiguous, balanced layer ranges, one per rank (the first ranks take one more when it does not divide)."""
    if num_layers < world:
        raise InputError(f"a layer split over {world} processes needs at least {world} decoder layers; the model "
                         f"has {num_layers}")
    base, extra = divmod(num_layers, world)
    out, start = [], 0
    for r in range(world):
        n = base + (r < extra)
        out.append(range(start, start + n))
        start += n
    return out


class LayerStage:
    """This rank's layers and its hand-offs.

    Attributes:
        layers: the range of decoder layers this rank holds.
        last_layer: index of the model's last decoder layer (where the last rank shares the output).
    """

    def __init__(self, group: ParallelGroup, num_layers: int):
        self.group = group
        self.ranges = layer_ranges(num_layers, group.world)
        self.layers = self.ranges[group.rank]
        self.last_layer = num_layers - 1

    def holds(self, i: int) -> bool:
        return i in self.layers

    def receive(self, i: int, tensors: list[Tensor]) -> list[Tensor]:
        """Before layer i: at this rank's first layer (ranks > 0), the previous rank's outputs replace
        ``tensors`` (same shapes and dtypes: every rank runs the same request)."""
        if i != self.layers.start or self.group.rank == 0:
            return tensors
        out = [t.new_empty(t.shape) for t in tensors]
        for t in out:
            dist.recv(t, self.group.rank - 1)
        return out

    def send(self, i: int, tensors: list[Tensor]) -> None:
        """After layer i: at this rank's last layer (all ranks but the last), send the outputs on."""
        if i == self.layers.stop - 1 and self.group.rank < self.group.world - 1:
            for t in tensors:
                dist.send(t.contiguous(), self.group.rank + 1)

    def share(self, x: Tensor) -> Tensor:
        """After the model's last layer: the last rank's output, on every rank."""
        x = x.contiguous()
        dist.broadcast(x, self.group.world - 1)
        return x


def split_layers(model, group: ParallelGroup) -> LayerStage:
    """Keep this rank's decoder layers of ``model`` (the others become :class:`AbsentLayer`) and hook the
    hand-offs into the layers at the boundaries. Returns the :class:`LayerStage`."""
    layers = model.language_model.model.layers
    stage = LayerStage(group, len(layers))
    for i in range(len(layers)):
        if not stage.holds(i):
            layers[i] = AbsentLayer(i, next(r for r, rg in enumerate(stage.ranges) if i in rg))
    first, last = stage.layers.start, stage.layers.stop - 1

    def receive(module, args):
        return (stage.receive(first, [args[0]])[0], *args[1:])

    def send(module, args, out):
        stage.send(last, [out])

    def share(module, args, out):
        return stage.share(out)

    if group.rank > 0:
        layers[first].register_forward_pre_hook(receive)
    if group.rank < group.world - 1:
        layers[last].register_forward_hook(send)
    layers[stage.last_layer].register_forward_hook(share)
    return stage
