"""Load time of a full-size checkpoint from the page cache (DESIGN §7: load ≤ 10 s) and the first image
after start, each in a fresh process as a CLI user would see them.

Writes a checkpoint of the real BAGEL-7B-MoT configuration with random weights in the official layout
(``ema.safetensors`` bf16, ``ae.safetensors`` fp32, the two configs, the embedded tiny tokenizer) to ``--dir``
(~29 GB; built on the GPU, written once), reads it once so it sits in the page cache, then runs
``--processes`` fresh Python processes that each time: import, CUDA init, ``bagel_rt.load`` and two 1024²
text-to-image requests (the first includes Triton compiles, autotuning and CUDA-graph captures; later
processes find Triton's on-disk cache warm).

    python benchmarks/load_time.py --dir /tmp/bagel7b --out load.jsonl [--commit abc] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import bagel_rt
t1 = time.perf_counter()
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
t2 = time.perf_counter()
pipe = bagel_rt.load(sys.argv[1], device="cuda")
torch.cuda.synchronize()
t3 = time.perf_counter()
times = []
for _ in range(2):
    s = time.perf_counter()
    pipe.generate("A red bagel on a white plate.", image_shapes=(1024, 1024), seed=0)
    torch.cuda.synchronize()
    times.append(round(time.perf_counter() - s, 3))
print(json.dumps(dict(import_s=round(t1 - t0, 3), cuda_init_s=round(t2 - t1, 3), load_s=round(t3 - t2, 3),
                      pipe_load_seconds=round(pipe.load_seconds, 3), load_phases=pipe.load_phases,
                      first_image_s=times[0],
                      second_image_s=times[1], start_to_first_image_s=round(t3 - t0 + times[0], 3))))
"""


def write_checkpoint(path: Path, params="bagel-7b-mot", device: str = "cuda") -> dict:
    """A configuration (default: the real one) with random weights, in the official file layout."""
    import torch
    from safetensors.torch import save_file

    from bagel_rt.checkpoint import writing_directory
    from bagel_rt.random_weights import random_bagel
    from bagel_rt.tiny import write_configs_and_tokenizer

    t0 = time.perf_counter()
    pipe = random_bagel(params, device=device)
    with writing_directory(path) as tmp:
        for name, module in (("ema.safetensors", pipe.model), ("ae.safetensors", pipe.vae)):
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / name))
            del state
        write_configs_and_tokenizer(tmp, pipe.model.params)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(write_s=round(time.perf_counter() - t0, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--processes", type=int, default=2)
    a = ap.parse_args()
    from bagel_rt.bench import environment

    row = dict(bench="load_time", **environment(a.commit))
    if not a.dir.exists():
        row.update(write_checkpoint(a.dir))
    files = sorted(a.dir.glob("*.safetensors"))
    row["checkpoint_gib"] = round(sum(f.stat().st_size for f in files) / 2**30, 2)
    t0 = time.perf_counter()
    for f in files:  # into the page cache (and the disk's read rate on the way)
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    row["first_read_s"] = round(time.perf_counter() - t0, 1)
    row["processes"] = []
    for _ in range(a.processes):
        r = subprocess.run([sys.executable, "-c", CHILD, str(a.dir)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"child failed:\n{r.stderr[-3000:]}")
        row["processes"].append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(row["processes"][-1]), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
