"""The allocator's peak by phase of each format / budget / task on the GPU, beside the predicted peak.

    python benchmarks/budget_memory.py --out benchmarks/results/budget_memory_h200.jsonl \
        [--runs int8@16:edit,fp8@15.5:edit,nf4@12:edit,fp8-gen-nf4-und@12:t2i,df11@24:t2i] [--steps 50]
        [--size 1024] [--uncapped] [--history]

Each run builds the random full-size model in its format (``compressed_speed.make_pipe``; DF11: every LLM layer
a copy of layer 0, compressed once and kept resident as one DF11 unit per layer, so the run takes seconds
instead of the minutes a full compression would), places it for the budget (``limit_gpu_memory``), warms the
task up with a 3-step request and then runs the app-defaults request, recording per phase (prefill, denoise,
VAE decode) the allocator's peak (``max_memory_allocated``) and reserved peak (``max_memory_reserved``: what the
budget caps). ``predicted_gib`` is :func:`bagel_rt.memory_plan.request_transients` on top of the resident
weights. ``--uncapped`` places the model for the budget but lifts the cap, to see what a request needs where it
does not fit; a task ending in ``+eager`` (``int8@16:edit+eager``) runs without CUDA graphs, ``+chunksN`` with the
denoiser's MLPs in N row chunks, ``+drop`` with the denoiser released before every VAE decode, ``+copied`` with
every branch's cache copied into the arena (no shared prefixes, :mod:`bagel_rt.arena`: the layout before it),
``+layered`` with the query blocks in every layer's arena and no per-layer copy of the caches (the arena before
the cache store: the chunk count is still chosen for today's smaller arena).
A failed run records the phase it failed in and the allocator's pools then (``--history``: with the code that
holds the CUDA-graph pools' live blocks). DF11 runs also time the request against bf16 in the same process
(``vs_bf16``; the target is 1.25x) and check the bits (``bit_identical``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compressed_speed import make_pipe, release_gpu, request  # noqa: E402
from diagnose import emit  # noqa: E402

from bagel_rt import arena, fast, placement  # noqa: E402
from bagel_rt.bench import environment  # noqa: E402
from bagel_rt.df11_resident import DEFAULT_FORM, FORMS  # noqa: E402
from bagel_rt.errors import InputError  # noqa: E402
from bagel_rt.memory_plan import request_transients  # noqa: E402

GIB = 2**30


#: when the current phase began (time.perf_counter; :func:`timed` sets it as a request starts)
PHASE_START = [0.0]


PLACEMENT_CHUNKS = placement.mlp_chunks
PLACEMENT_VAE_FITS = placement.vae_fits
SHARED_PREFIXES = arena.shared_prefixes


def no_shared_prefixes(histories: list, lens: list[int], image_of: list[int]) -> list[None]:
    """A stand-in for ``arena.shared_prefixes``: every branch's cache copied into the arena."""
    return [None] * len(lens)


LAYER_ARENA = fast.PackedDenoiser.layer_arena
REFILL = fast.PackedDenoiser.refill


def _layered_refill(self, ctxs: list) -> None:
    """``+layered``: the caches copied once into a [layers, total] arena (no store)."""
    L = self.k.shape[0]
    if self.arena_k.shape[0] != L:
        self.k = torch.empty(L, 0, self.Hk, self.D, device=self.device, dtype=self.dtype)
        self.v = torch.empty_like(self.k)
        self.arena_k = torch.empty(L, self.layout.total, self.Hk, self.D, device=self.device, dtype=self.dtype)
        self.arena_v = torch.empty_like(self.arena_k)
    for b in self.layout.copied():
        c = ctxs[b]
        a0, a1 = self.layout.cache_range(b)
        self.arena_k[:, a0:a1] = c.cache.k[:, : c.length]
        self.arena_v[:, a0:a1] = c.cache.v[:, : c.length]


def layered_arena(on: bool) -> None:
    """The denoiser's arena with every layer's query blocks (``+layered``) or as today (a cache store and two
    one-layer arenas)."""
    fast.PackedDenoiser.refill = _layered_refill if on else REFILL
    fast.PackedDenoiser.layer_arena = (lambda self, i: (self.arena_k[i - self.first], self.arena_v[i - self.first])
                                       ) if on else LAYER_ARENA


def chunk_counter(n: int | None, used: list[int]):
    """A stand-in for ``placement.mlp_chunks``: ``n`` row chunks under a budget (None: placement's choice),
    each count it gives appended to ``used``."""
    def count(bagel, rows: int, arena_bytes: int = 0, decode_bytes: int = 0) -> int:
        used.append(PLACEMENT_CHUNKS(bagel, rows, arena_bytes, decode_bytes)
                    if n is None or not bagel.offload else n)
        return used[-1]
    return count


def phase_tracker() -> dict:
    """Wraps the calls that separate a request's phases; fills {phase: (peak allocated GiB, peak reserved GiB,
    seconds)} of the last request (the peaks are reset and the clock restarted at each phase start)."""
    import bagel_rt.fast as fast
    import bagel_rt.session as session

    peaks: dict = {}

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        peaks[name] = (round(torch.cuda.max_memory_allocated() / GIB, 2),
                       round(torch.cuda.max_memory_reserved() / GIB, 2), round(now - PHASE_START[0], 3))
        PHASE_START[0] = now
        torch.cuda.reset_peak_memory_stats()

    def phase(name, fn, before: str | None = None):
        def wrapped(*args, **kwargs):
            if before:
                mark(before)
            out = fn(*args, **kwargs)
            mark(name)
            return out
        return wrapped

    # the session calls the denoiser as fast.denoise_batch (a module attribute, so the wrapper is seen)
    fast.denoise_batch = phase("denoise", fast.denoise_batch, before="prefill")
    session.Session.decode_latents = phase("vae_decode", session.Session.decode_latents)
    return peaks


def df11_pipe(task: str, size: int, steps: int, form: str):
    """(pipe, bf16 reference (seconds, latents), seconds to add the 28 units): the random model with each LLM
    layer a copy of layer 0, timed in bf16 first, then kept as resident DF11 units (one compression serves all
    layers; DF11 is lossless, so the latents must come out bit-identical); ``form``: the units' resident form
    (bagel_rt.df11_resident.FORMS).
    The last value is what a load pays on the GPU for the form (Exp4: each unit decoded and transcoded once)."""
    from bagel_rt.quant import compress_units

    from bagel_rt.df11_resident import ResidentDF11
    from bagel_rt.quantized import _LLM_LINEARS

    pipe = make_pipe("bf16")
    layers = pipe.model.language_model.model.layers
    with torch.no_grad():
        for layer in layers[1:]:
            for (_, p0), (_, p) in zip(layers[0].named_parameters(), layer.named_parameters()):
                p.copy_(p0)
    timed(pipe, task, size, 3, seed=1)
    ref = timed(pipe, task, size, steps)
    pipe.fast_cache.clear()
    shapes = [tuple(layers[0].get_submodule(n).weight.shape) for n in _LLM_LINEARS]
    t0 = time.perf_counter()
    buffers = compress_units([layers[0].get_submodule(n).weight.detach().cpu() for n in _LLM_LINEARS])
    print(f"compressed one layer in {time.perf_counter() - t0:.1f} s", flush=True)
    split = torch.tensor([a * b for a, b in shapes]).cumsum(0)[:-1].tolist()
    store = ResidentDF11(pipe.device, form)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(len(layers)):
        unit = {k: v.to(pipe.device) for k, v in buffers.items()}
        unit["split_positions"] = torch.tensor(split, dtype=torch.int64, device=pipe.device)
        names = [(f"language_model.model.layers.{i}.{n}.weight", s) for n, s in zip(_LLM_LINEARS, shapes)]
        store.add(pipe.model, f"language_model.model.layers.{i}", names, unit, split)
    store.layout()
    torch.cuda.synchronize()
    build = time.perf_counter() - t0
    print(f"added {len(layers)} resident units ({form}) in {build:.2f} s", flush=True)
    pipe.df11 = store
    gc.collect()
    torch.cuda.empty_cache()
    return pipe, ref, build


def ours(filename: str, benchmarks: bool = False) -> bool:
    """Whether a frame is in the project's code (with ``benchmarks``, these scripts count too)."""
    return "bagel_rt" in filename or "/quant/" in filename or (benchmarks and "benchmarks" in filename)


def memory_gib() -> dict:
    """The allocator's allocated and reserved GiB now."""
    return dict(allocated=round(torch.cuda.memory_allocated() / GIB, 2),
                reserved=round(torch.cuda.memory_reserved() / GIB, 2))


def memory_at_failure(top: int = 8) -> dict:
    """The allocator's segments at a failure, by pool (the default pool is ``(0, 0)``; CUDA-graph pools are
    private): reserved and allocated MiB, and, with ``--history``, the largest live blocks of the private pools
    with the bagel_rt frames that allocated them."""
    try:
        snap = torch.cuda.memory._snapshot()
    except Exception as e:  # a diagnosis must not hide the failure it diagnoses
        return dict(snapshot_error=str(e)[:200])
    pools: dict = {}
    live = []
    for seg in snap["segments"]:
        key = str(tuple(seg.get("segment_pool_id", (0, 0))))
        p = pools.setdefault(key, dict(reserved_mib=0.0, allocated_mib=0.0, segments=0))
        p["reserved_mib"] += seg["total_size"] / 2**20
        p["allocated_mib"] += seg["allocated_size"] / 2**20
        p["segments"] += 1
        if key != str((0, 0)):
            for b in seg["blocks"]:
                if b["state"] == "active_allocated":
                    frames = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in b.get("frames", [])
                              if ours(f["filename"])]
                    live.append((b["size"] / 2**20, key, frames[:4]))
    for p in pools.values():
        p["reserved_mib"], p["allocated_mib"] = round(p["reserved_mib"], 1), round(p["allocated_mib"], 1)
    live.sort(key=lambda t: -t[0])
    return dict(pools=pools, private_live=[dict(mib=round(m, 2), pool=k, frames=f) for m, k, f in live[:top]])


def timed(pipe, task: str, size: int, steps: int, seed: int = 0):
    """(seconds, final latents) of one app-defaults request, the allocator's peaks reset first."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    PHASE_START[0] = time.perf_counter()
    return request(pipe, task, size, steps, seed)[:2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--runs", default="int8@16:edit,fp8@15.5:edit,nf4@12:edit,fp8-gen-nf4-und@12:t2i,df11@24:t2i",
                    help="comma-separated FORMAT@GIB:TASK[+eager][+chunksN][+drop][+copied] (GIB 0: no budget; "
                         "eager: without CUDA graphs; chunksN: the denoiser's MLPs in N row chunks under the "
                         "budget, instead of placement.mlp_chunks' choice; drop: the denoiser released before "
                         "every VAE decode, captured again by the next request, as before placement.vae_fits; "
                         "copied: no shared prefixes in the arena)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--uncapped", action="store_true", help="place for the budget but lift the cap")
    ap.add_argument("--history", action="store_true",
                    help="record the allocator's history, so that a failure reports which code holds the memory "
                         "of the CUDA-graph pools (slower; for diagnosis)")
    ap.add_argument("--late-expandable", action="store_true",
                    help="switch to expandable segments at the placement only, not at the process start (where "
                         "bagel_rt.load with max_gpu_memory switches): the bf16 model a DF11 run is built from "
                         "then strands ~5 GiB in fixed segments partly in use, and the DF11 t2i under 24 GiB "
                         "fails (H200, c1fb778)")
    ap.add_argument("--df11-wide", action="store_true",
                    help="DF11 decodes with four-element reads and writes (quant.df11_decode.WIDE_ACCESS)")
    ap.add_argument("--df11-form", choices=FORMS, default=DEFAULT_FORM,
                    help="the form resident DF11 units are kept in (bagel_rt.df11_resident.FORMS): DF11's Huffman "
                         "buffers, or transcoded to Exp4 (quant.exp4: 4-bit exponent codes, decoded fast)")
    a = ap.parse_args()
    if a.df11_wide:
        import importlib

        importlib.import_module("bagel_rt.quant.df11_decode").WIDE_ACCESS = True
    if not a.late_expandable:
        from bagel_rt.placement import expandable_segments

        expandable_segments()
    if a.history:
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
    env = environment(a.commit)
    peaks = phase_tracker()
    for run in a.runs.split(","):
        peaks.clear()
        spec, _, task = run.partition(":")
        task, *modes = task.split("+")  # "+eager": without CUDA graphs; "+chunksN": N denoiser MLP row chunks
        chunks = next((int(m[len("chunks"):]) for m in modes if m.startswith("chunks")), None)
        used_chunks: list[int] = []
        placement.mlp_chunks = chunk_counter(chunks, used_chunks)  # the session imports it at each request
        placement.vae_fits = (lambda *_: False) if "drop" in modes else PLACEMENT_VAE_FITS
        arena.shared_prefixes = no_shared_prefixes if "copied" in modes else SHARED_PREFIXES
        layered_arena("layered" in modes)
        fmt, _, gib = spec.partition("@")
        gib = float(gib or 0)
        ref = build = None
        if fmt == "df11":
            pipe, ref, build = df11_pipe(task, a.size, a.steps, a.df11_form)
        else:
            pipe = make_pipe(fmt)
        if "eager" in modes:
            pipe.use_graphs = False
        row = dict(diag="budget_memory", weights=fmt, budget_gib=gib or None, task=task, modes=modes,
                   height=a.size, width=a.size, num_timesteps=a.steps, uncapped=a.uncapped,
                   use_graphs=pipe.use_graphs, expandable_start=not a.late_expandable, df11_wide=a.df11_wide,
                   **(dict(df11_form=a.df11_form, units_added_s=round(build, 3)) if fmt == "df11" else {}),
                   **env)
        row["setup_gib"] = memory_gib()
        try:
            if gib:
                row["placement"] = pipe.limit_gpu_memory(gib)
                row["placed_gib"] = memory_gib()
                if a.uncapped:
                    torch.cuda.set_per_process_memory_fraction(1.0)
            resident = torch.cuda.memory_allocated() / GIB
            timed(pipe, task, a.size, 3, seed=1)  # warm-up: compiles, captures
            peaks.clear()  # the phases of the measured request only
            sec, lat = timed(pipe, task, a.size, a.steps)
            weight_only = fmt in ("int8", "nf4")
            plan = request_transients(pipe.model.params, task, a.size, a.size, weight_only=weight_only,
                                      mlp_chunks=used_chunks[-1] if used_chunks else 1)
            row.update(seconds=round(sec, 3), resident_gib=round(resident, 2),
                       cuda_graphs=pipe.use_graphs and not pipe.graphs_refused,  # False: a capture did not fit
                       denoiser_kept=bool(pipe.fast_cache),  # through the VAE decode (placement.vae_fits)
                       phase_peak_gib={k: v[0] for k, v in peaks.items()},
                       phase_reserved_gib={k: v[1] for k, v in peaks.items()},
                       phase_seconds={k: v[2] for k, v in peaks.items()},
                       mlp_chunks=used_chunks[-1] if used_chunks else None,
                       peak_gib=max(v[0] for v in peaks.values()),
                       reserved_peak_gib=max(v[1] for v in peaks.values()),
                       predicted_gib={k: round(resident + v / GIB, 2) for k, v in plan.items()})
            if ref is not None:
                row.update(vs_bf16=round(sec / ref[0], 3), bf16_seconds=round(ref[0], 3),
                           bit_identical=bool(torch.equal(lat, ref[1])))
        except (torch.cuda.OutOfMemoryError, InputError, RuntimeError) as e:
            # where it failed: the first phase the request did not finish, and the allocator's state then
            failed = next((p for p in ("prefill", "denoise", "vae_decode") if p not in peaks), "after")
            # the innermost frames of the project's code (which allocation ran out)
            cause = e.__context__ if isinstance(e, InputError) and e.__context__ is not None else e  # the OOM
            frames = [f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                      for f in traceback.extract_tb(cause.__traceback__) if ours(f.filename, True)]
            row.update(error=str(e).splitlines()[0][:1000], failed_in=failed, failed_at=frames[-6:],
                       at_failure_gib=memory_gib(),
                       at_failure=memory_at_failure())
            del cause  # its traceback's frames hold the failed request's tensors: the next run would find them
        emit(row, a.out)
        placement.mlp_chunks, placement.vae_fits = PLACEMENT_CHUNKS, PLACEMENT_VAE_FITS
        arena.shared_prefixes = SHARED_PREFIXES
        del pipe
        release_gpu()


if __name__ == "__main__":
    main()
