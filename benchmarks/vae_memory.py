"""Peak memory of the VAE decode and encode (the memory peak of a request under a budget), full FLUX VAE
configuration with random fp32 weights, no autograd.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` minus what was allocated before the call (weights
and input), so it includes cuDNN workspaces. On the CPU it is live-tensor accounting: a dispatch mode adds
the bytes of every storage an op creates and subtracts them when the storage is freed; the peak is the
largest sum seen after any op (op-internal scratch is not seen). Both count the output.

    python benchmarks/vae_memory.py --device cuda --sizes 512 1024 [--plain] [--check] [--out rows.jsonl]

``--device meta`` does the CPU accounting on meta tensors: the same allocations without the arithmetic (a
1024^2 decode in a second instead of minutes; same peaks as ``--device cpu``). ``--plain`` disables the lean
(banded) path, to show what it saves. ``--check`` also compares against the plain path (rel. L2, max abs) on
the same device. ``--rows`` sets the band height (``vae.LEAN_ROWS``): smaller bands, lower peak, more
recomputed halo rows.
"""

from __future__ import annotations

import argparse
import json
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bagel_rt import vae as V
from bagel_rt.config import VAEParams
from bagel_rt.random_weights import random_module

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive; ``peak`` is their maximum and
    ``largest`` the largest single storage. A view of a tensor made outside the mode counts its storage.

    A storage's Python object lives as long as the storage itself (PyTorch keeps it), so a finalizer on it
    fires when the memory is returned; views share their base's storage and are counted once.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live and st.nbytes() > 0:
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    self.largest = max(self.largest, st.nbytes())
                    weakref.finalize(st, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn, device: torch.device) -> tuple[int, float, torch.Tensor]:
    """(peak bytes above what was allocated before, seconds, result) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, time.perf_counter() - t0, out
    mode = LiveTensorBytes()
    t0 = time.perf_counter()
    with mode:
        out = fn()
    return mode.peak, time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--plain", action="store_true", help="disable the lean (banded) path")
    ap.add_argument("--check", action="store_true", help="also compare with the plain path")
    ap.add_argument("--rows", type=int, default=V.LEAN_ROWS, help="band height of the lean path")
    ap.add_argument("--out", help="append one JSON line per row")
    args = ap.parse_args()
    device = torch.device(args.device)
    params = VAEParams()
    V.LEAN_ROWS = args.rows
    if device.type == "meta":
        with device:
            ae = V.AutoEncoder(params).eval().requires_grad_(False)
    else:
        ae = random_module(lambda: V.AutoEncoder(params), device, torch.float32, seed=1)
    g = torch.Generator().manual_seed(0)
    lean_min = V.LEAN_MIN_PIXELS
    rows = []
    print(f"{'op':<7}{'size':>6}{'path':>7}{'peak MiB':>10}{'s':>8}{'rel L2':>10}{'max abs':>10}")
    for size in args.sizes:
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
        z = torch.randn(1, params.z_channels, size // 8, size // 8, generator=g).to(device)
        for op, fn in (("decode", lambda z=z: ae.decode(z)), ("encode", lambda x=x: ae.encode(x, None))):
            V.LEAN_MIN_PIXELS = 1 << 62 if args.plain else lean_min
            with torch.no_grad():
                if device.type == "cuda":
                    fn()  # warm-up: cuDNN autotuning and lazy init stay out of the peak
                peak, secs, out = peak_bytes(fn, device)
            name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
            row = dict(op=op, size=size, path="plain" if args.plain else "lean", rows=args.rows,
                       peak_mib=peak / MIB, seconds=secs, device=name, torch=torch.__version__)
            if args.check and not args.plain and device.type != "meta":
                V.LEAN_MIN_PIXELS = 1 << 62
                with torch.no_grad():
                    ref = fn()
                row["rel_l2"] = float((out - ref).norm() / ref.norm())
                row["max_abs"] = float((out - ref).abs().max())
            del out
            V.LEAN_MIN_PIXELS = lean_min
            rows.append(row)
            print(f"{op:<7}{size:>6}{row['path']:>7}{row['peak_mib']:>10.1f}{secs:>8.2f}"
                  f"{row.get('rel_l2', float('nan')):>10.2e}{row.get('max_abs', float('nan')):>10.2e}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
