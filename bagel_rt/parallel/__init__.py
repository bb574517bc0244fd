"""Multi-GPU inference on ``torch.distributed``: CFG-parallel, tensor-parallel and layer split.

One process per GPU (NCCL; gloo on CPUs), launched by ``torchrun`` or by ``bagel-rt ... --gpus N``
(:mod:`.launch`). Every rank runs the same request with the same seeds; the collectives sit inside the
forwards, and only rank 0 writes outputs. ``bagel_rt.load(..., parallel="cfg" | "tp" | "layers")`` inside a
launched process joins the run (:func:`init_group`) and splits the model (:func:`parallelize`).

* ``cfg`` (:mod:`.cfg_parallel`): each rank computes some of the CFG branches of a step; the velocities meet
  once per step. Every rank holds the whole model. For speed on GPUs that each hold the model.
* ``tp`` (:mod:`.tensor_parallel`): heads and MLP columns split, two all-reduces per layer. For speed and
  memory on NVLink-connected GPUs.
* ``layers`` (:mod:`.layer_split`): consecutive decoder layers on consecutive ranks, one hand-off per rank
  boundary and forward. For memory on PCIe-connected cards.
"""

from __future__ import annotations

from .group import MODES, ParallelGroup, init_group

__all__ = ["MODES", "ParallelGroup", "check_fit", "init_group", "parallelize"]


def check_fit(params, group: ParallelGroup) -> None:
    """The model's shapes split over ``group`` in its mode (a clear :class:`bagel_rt.InputError` before any
    weight is read otherwise): heads, MLP width and vocabulary for "tp", layers and vocabulary for "layers"."""
    if group.mode == "tp":
        from .tensor_parallel import check_shapes

        check_shapes(params, group.world)
    elif group.mode == "layers":
        from .layer_split import layer_ranges
        from .vocab import check_vocab

        layer_ranges(params.llm.num_layers, group.world)
        check_vocab(params.llm.vocab_size, group.world)


def parallelize(model, vae, group: ParallelGroup) -> None:
    """Split ``model`` (a :class:`bagel_rt.model.BagelModel`) for ``group``'s mode, in place, and move it and
    ``vae`` to the rank's device. "cfg" keeps the whole model on every rank; "tp" shards the decoder layers;
    "layers" keeps this rank's decoder layers only; both split the token embedding and ``lm_head`` by vocabulary
    rows (:mod:`.vocab`)."""
    if group.mode in ("tp", "layers"):
        from .vocab import split_vocab

        split_vocab(model, group)
    if group.mode == "tp":
        from .tensor_parallel import shard_layers

        shard_layers(model, group)
    elif group.mode == "layers":
        from .layer_split import split_layers

        group.stage = split_layers(model, group)
    model.parallel = group
    model.to(group.device)
    vae.to(group.device)
