"""Load time of a full-size checkpoint from the page cache (DESIGN §7: load ≤ 10 s) and the first image
after start, each in a fresh process as a CLI user would see them.

Writes a checkpoint of the real BAGEL-7B-MoT configuration with random weights in the official layout
(``ema.safetensors`` bf16, ``ae.safetensors`` fp32, the two configs, the embedded tiny tokenizer) to ``--dir``
(~29 GB; built on the GPU, written once), reads it once so it sits in the page cache, then runs
``--processes`` fresh Python processes that each time: import, CUDA init, ``bagel_rt.load`` and two 1024²
text-to-image requests (the first includes Triton compiles, autotuning and CUDA-graph captures; later
processes find Triton's on-disk cache warm).

    python benchmarks/load_time.py --dir /tmp/bagel7b --out load.jsonl [--commit abc] [--processes 2]

With ``--formats`` it also times compressed loads (one row per format): ``int8`` / ``nf4`` / ``df11`` convert the
bf16 checkpoint once (``bagel-rt quantize``, timed, into ``DIR-int8`` ...) and load those files (``df11+resident``:
the DF11 files kept compressed on the GPU, ``df11_resident=True``); ``bf16>int8`` /
``bf16>nf4`` quantize the bf16 files as they load. ``--images 0`` times the load alone.
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
dev = sys.argv[4]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
if dev == "cuda":
    torch.cuda.init(); torch.empty(1, device="cuda"); sync()
t2 = time.perf_counter()
weights, _, mode = sys.argv[2].partition("+")
pipe = bagel_rt.load(sys.argv[1], device=dev, weights=weights, df11_resident=mode == "resident")
sync()
t3 = time.perf_counter()
times = []
for _ in range(int(sys.argv[3])):
    s = time.perf_counter()
    pipe.generate("A red bagel on a white plate.", image_shapes=(int(sys.argv[5]),) * 2, seed=0)
    sync()
    times.append(round(time.perf_counter() - s, 3))
print(json.dumps(dict(import_s=round(t1 - t0, 3), cuda_init_s=round(t2 - t1, 3), load_s=round(t3 - t2, 3),
                      pipe_load_seconds=round(pipe.load_seconds, 3), load_phases=pipe.load_phases,
                      gpu_memory_gib=round(torch.cuda.memory_allocated() / 2**30, 2) if dev == "cuda" else None,
                      image_s=times,
                      first_image_s=times[0] if times else None, second_image_s=times[1] if times[1:] else None,
                      start_to_first_image_s=round(t3 - t0 + times[0], 3) if times else None)))
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


def timed_processes(ckpt: Path, weights: str, processes: int, images: int, device: str = "cuda",
                    size: int = 1024) -> list[dict]:
    """``processes`` fresh processes loading ``ckpt`` (as ``weights``) and making ``images`` t2i images each."""
    out = []
    for _ in range(processes):
        r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), weights, str(images), device, str(size)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"child failed:\n{r.stderr[-3000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    return out


def into_page_cache(path: Path) -> tuple[float, float]:
    """Read every safetensors file under ``path`` once: (GiB, seconds)."""
    files = sorted(path.rglob("*.safetensors"))
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return round(sum(f.stat().st_size for f in files) / 2**30, 2), round(time.perf_counter() - t0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="t2i requests per process after the load")
    ap.add_argument("--formats", default="bf16",
                    help="comma-separated: bf16, int8, nf4, df11, df11+resident (files converted once), "
                         "bf16>int8, bf16>nf4 (on load)")
    ap.add_argument("--params", default="bagel-7b-mot", help="configuration (tiny: a smoke test on the CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    from bagel_rt.bench import environment
    from bagel_rt.convert import convert_checkpoint

    env = environment(a.commit)
    write = {} if a.dir.exists() else write_checkpoint(a.dir, a.params, a.device)
    for fmt in a.formats.split(","):
        row = dict(bench="load_time", format=fmt, images=a.images, **env, **write)
        ckpt, weights = a.dir, "auto"
        stored = fmt.split("+")[0]  # the files' format; "+resident" only changes how they load
        if stored in ("int8", "nf4", "df11") and fmt in (stored, "df11+resident"):
            ckpt, weights = a.dir.with_name(f"{a.dir.name}-{stored}"), fmt
            if not ckpt.exists():
                t0 = time.perf_counter()
                convert_checkpoint(a.dir, ckpt, stored, progress=False)
                row["convert_s"] = round(time.perf_counter() - t0, 1)
        elif fmt.startswith("bf16>"):
            weights = fmt.split(">", 1)[1]
        elif fmt != "bf16":
            sys.exit(f"unknown format {fmt!r}")
        row["checkpoint_gib"], row["first_read_s"] = into_page_cache(ckpt)
        row["processes"] = timed_processes(ckpt, weights, a.processes, a.images, a.device, a.size)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
