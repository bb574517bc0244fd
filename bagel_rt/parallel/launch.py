"""``--gpus N``: start N ranks of a command on this host, as ``torchrun --nproc-per-node N`` would.

Each rank is a fresh ``python`` process running the same command line with the ``torch.distributed``
environment set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``;
``NCCL_NVLS_ENABLE=0`` unless set). Rank 0 keeps this terminal; the other ranks' output is discarded (their
errors are kept and shown if they fail). When a rank fails, the others are stopped (a rank waiting in a
collective for a dead peer would wait forever). The exit code is rank 0's, or the first failing rank's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ..errors import InputError

MAX_GPUS = 64


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the rendezvous of the ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment of one rank."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def launch(command: list[str], gpus: int, poll_seconds: float = 0.05) -> int:
    """Run ``command`` (an argv list, e.g. ``[sys.executable, "-m", "bagel_rt.cli.entry", ...]``) as ``gpus``
    ranks and wait for them; returns the exit code (rank 0's, or the first failing rank's)."""
    if not 2 <= gpus <= MAX_GPUS:
        raise InputError(f"--gpus must be between 2 and {MAX_GPUS} to start several processes, got {gpus}")
    port = free_port()
    procs, errs = [], []
    try:
        for r in range(gpus):
            err = None if r == 0 else tempfile.TemporaryFile()
            errs.append(err)
            procs.append(subprocess.Popen(command, env=rank_env(r, gpus, port),
                                          stdout=None if r == 0 else subprocess.DEVNULL, stderr=err))
        return _wait(procs, errs, poll_seconds)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        _stop(procs)
        for e in errs:
            if e is not None:
                e.close()


def _wait(procs, errs, poll_seconds: float) -> int:
    """Wait for every rank; on the first failure stop the others and show the failed rank's error output."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r = failed[0]
            if errs[r] is not None:
                errs[r].seek(0)
                tail = errs[r].read()[-4000:].decode(errors="replace").strip()
                if tail:
                    sys.stderr.write(f"[rank {r}] {tail}\n")
            _stop(procs)
            return codes[0] if codes[0] not in (None, 0) else codes[r]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(poll_seconds)


def _stop(procs) -> None:
    """Terminate the ranks still running (SIGTERM, then SIGKILL after 10 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def relaunch_cli(gpus: int) -> int:
    """This ``bagel-rt`` command line, run again as ``gpus`` ranks (the ``--gpus N`` of the CLI)."""
    return launch([sys.executable, "-m", "bagel_rt.cli.entry", *sys.argv[1:]], gpus)
