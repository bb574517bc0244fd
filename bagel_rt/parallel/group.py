"""The process group of a multi-GPU run: one process per GPU, every rank running the same request (SPMD).

A run is launched by ``torchrun --nproc-per-node N`` or by ``bagel-rt ... --gpus N`` (:mod:`.launch`), which
both set the ``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init_group` joins it: NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``), gloo on CPUs.
Every rank loads the model, gets the same inputs and seeds (so the same noise), and meets the others inside
the forwards; only rank 0 writes outputs and prints.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError

#: "cfg": CFG branches over ranks; "tp": heads and MLP columns over ranks; "layers": decoder layers over ranks
MODES = ("cfg", "tp", "layers")
LAUNCH_HINT = "launch with `torchrun --nproc-per-node N ...` or `bagel-rt COMMAND ... --gpus N`"


@dataclass
class ParallelGroup:
    """This process's place in a multi-process run.

    Attributes:
        mode: "cfg", "tp" or "layers".
        rank, world: this process's rank and the number of processes.
        local_rank: rank on this host (picks the GPU).
        device: this rank's device (``cuda:local_rank`` or ``cpu``).
        backend: "nccl" (CUDA) or "gloo" (CPU).
        owns_process_group: this object initialised ``torch.distributed`` (and tears it down in :meth:`close`).
        stage: mode "layers": this rank's :class:`bagel_rt.parallel.layer_split.LayerStage` (set when the model
            is split).
        share_leftover: mode "cfg", triton backend: run the leftover branches of uneven steps tensor-parallel
            over all ranks (:mod:`bagel_rt.parallel.cfg_parallel`; a split copy of the decoder layers per GPU).
        shared_view: (the Linears' formats it was split from, that split copy of the model), built on first use.
    """

    mode: str
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    owns_process_group: bool = False
    stage: object = None
    share_leftover: bool = True
    shared_view: object = None

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank that writes outputs and prints."""
        return self.rank == 0

    @property
    def load_device(self) -> torch.device:
        """Where the checkpoint is read before it is split: the CPU for "tp" and "layers" (a GPU then receives
        only its own part, never the whole model), this rank's device for "cfg" (every rank holds the model)."""
        return torch.device("cpu") if self.mode in ("tp", "layers") else self.device

    def close(self) -> None:
        """Leave the process group (when this object created it): waits for the others, then destroys it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False

    def describe(self) -> dict:
        """What a result or benchmark row reports about the run."""
        return {"mode": self.mode, "gpus": self.world, "rank": self.rank, "backend": self.backend}


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the ``torch.distributed`` environment, or None outside a launched
    run. A malformed environment is an :class:`InputError`."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (the torch.distributed "
                         f"environment); {LAUNCH_HINT}") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise InputError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} are inconsistent; {LAUNCH_HINT}")
    return rank, world, local


def check_mode(mode: str, world: int) -> None:
    """The mode is known and the number of processes suits it (model shapes are checked when splitting)."""
    if mode not in MODES:
        raise InputError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if world < 2:
        raise InputError(f"parallel={mode!r} needs at least 2 processes, this run has {world}; {LAUNCH_HINT}")
    if mode == "cfg" and world > 3:
        raise InputError(f"CFG-parallel spreads at most 3 CFG branches, one per process; {world} processes "
                         "were started (use 2 or 3, or parallel='tp' / 'layers' for more GPUs)")


def rank_device(device: torch.device | str | None, local_rank: int) -> torch.device:
    """This rank's device: ``cuda:local_rank`` for "cuda" (or no device with CUDA present), else the CPU.

    An explicit CUDA index is refused: each process of a run picks its GPU by its local rank."""
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"device {dev}: multi-process runs use cuda or cpu")
    if dev.index is not None:
        raise InputError(f"device {dev}: in a multi-process run each rank uses cuda:LOCAL_RANK; pass device "
                         "'cuda' (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available on this machine (use cpu)")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s); start at most that many processes per host")
    return torch.device("cuda", local_rank)


def init_group(mode: str, device: torch.device | str | None = None) -> ParallelGroup:
    """Join the launched run as one of its ranks (``torch.distributed`` initialised here unless the caller
    already did). NCCL for CUDA devices, gloo for the CPU.

    NVLink SHARP / multicast stays off (``NCCL_NVLS_ENABLE=0`` unless set): the collectives here are a few MB
    per step and the machines this runs on must not use it."""
    if mode not in MODES:
        raise InputError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    env = env_world()
    if env is None and not dist.is_initialized():
        raise InputError(f"parallel={mode!r} needs a multi-process run; {LAUNCH_HINT}")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env[2] if env is not None else rank
    else:
        rank, world, local = env
    check_mode(mode, world)
    dev = rank_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise InputError(f"MASTER_PORT is not set; {LAUNCH_HINT}")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
        owns = True
    elif dist.get_backend() != backend:
        raise InputError(f"the process group runs {dist.get_backend()} but device {dev} needs {backend}")
    group = ParallelGroup(mode, rank, world, local, dev, backend, owns)
    if owns:
        atexit.register(group.close)  # a clean exit leaves the group (NCCL warns about leaked groups)
    return group
