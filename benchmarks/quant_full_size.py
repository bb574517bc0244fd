"""Full-size (random 7B) text-to-image with compressed weights: latency, peak GPU memory, deviation from bf16.

    python benchmarks/quant_full_size.py --out quant.jsonl [--formats bf16,int8,nf4] [--steps 50]

Weights are quantized in place on the GPU from the random bf16 model (the same conversion the quantize
command applies tensor by tensor), then a 1024x1024 text-to-image request runs with app defaults on the
triton backend. Peak memory is measured for the request alone (weights + activations); with --cap-gib the
process is limited by ``torch.cuda.set_per_process_memory_fraction`` to emulate a smaller card. Deviation
from bf16 (relative L2 of the final latents, PSNR of the images) on random weights is only a proxy for
real-weight quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch
from bagel_rt.quant import quantize_model
from bagel_rt.quant.df11_decode import BUFFER_NAMES

import bagel_rt
from bagel_rt.bench import environment
from bagel_rt.random_weights import random_bagel

# emulated cards (GiB) for each format; targets: NF4 <= 10, INT8 <= 17, DF11 <= 21 GiB peak
CAPS = {"nf4": 12, "int8": 24, "bf16": 32, "df11": 24}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def copy_layer0(layers) -> None:
    """Every decoder layer's parameters := layer 0's."""
    with torch.no_grad():
        for layer in layers[1:]:
            for (_, p0), (_, p) in zip(layers[0].named_parameters(), layer.named_parameters()):
                p.copy_(p0)


def df11_from_layer0(pipe) -> None:
    """Make every LLM layer a copy of layer 0 and swap its Linears for DF11 units compressed once.

    Compressing 14.6B random weights on the host takes minutes; with identical layers one compression serves
    all 28 (each layer still holds its own copy of the compressed buffers, so memory is counted right), and
    the bf16 reference run on the same (copied) weights must give the same bits, DF11 being lossless.
    """
    from bagel_rt.quant import DF11Linear

    layers = pipe.model.language_model.model.layers
    copy_layer0(layers)
    compressed = {}
    for name, mod in list(layers[0].named_modules()):
        if isinstance(mod, torch.nn.Linear):
            compressed[name] = DF11Linear.from_linear(mod)
    for layer in layers:
        for name, q in compressed.items():
            parent, _, child = name.rpartition(".")
            clone = DF11Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.luts.device)
            clone.set_buffers({k: getattr(q, k).clone() for k in BUFFER_NAMES})
            if q.bias is not None:
                clone.bias = q.bias.clone()
            setattr(layer.get_submodule(parent) if parent else layer, child, clone)


def track_phase_peaks() -> dict:
    """Record the peak GPU memory of each phase of a request (prefill / denoise / VAE decode) by wrapping
    the two calls that separate them; returns the dict the wrappers fill (GiB, of the last request)."""
    import bagel_rt.fast as fast
    import bagel_rt.session as session

    peaks: dict = {}

    def phase(name, fn):
        def wrapped(*args, **kwargs):
            torch.cuda.synchronize()
            peaks[f"before_{name}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            return out
        return wrapped

    fast.denoise_batch = phase("denoise", fast.denoise_batch)  # what Session.gen_image runs
    session.Session.decode_latents = phase("vae_decode", session.Session.decode_latents)
    return peaks


def weights_gib(model, vae) -> float:
    n = sum(t.numel() * t.element_size() for m in (model, vae) for t in list(m.parameters()) + list(m.buffers()))
    return n / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--formats", default="bf16,int8,nf4")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cap", action="store_true", help="cap the process memory at the card size of the format")
    ap.add_argument("--phases", action="store_true", help="also record the peak of each phase of the request")
    a = ap.parse_args()
    phase_peaks = track_phase_peaks() if a.phases else None
    env = environment(a.commit)
    ref = None
    rows = []
    for fmt in a.formats.split(","):
        pipe = random_bagel("bagel-7b-mot", device="cuda", backend="triton")
        if fmt == "df11":
            # reference on the same (layer-0-copied) weights, then the compressed model
            copy_layer0(pipe.model.language_model.model.layers)
            df11_ref = pipe.generate("A red bagel on a white plate, studio light.", image_shapes=(a.size, a.size),
                                     num_timesteps=a.steps, seed=0).latents
            pipe.fast_cache.clear()
            df11_from_layer0(pipe)
            pipe.model.to("cpu")
            gc.collect()
            torch.cuda.empty_cache()
            pipe.model.to("cuda")
        elif fmt != "bf16":
            # the ViT, connector and glue stay bf16 here (small); the LLM's Linears of both experts + lm_head
            quantize_model(pipe.model.language_model, fmt)
            # building 29 GB of bf16 and quantizing in place leaves the allocator fragmented (a real load
            # quantizes tensor by tensor): a round trip through host memory packs the weights again
            pipe.model.to("cpu")
            gc.collect()
            torch.cuda.empty_cache()
            pipe.model.to("cuda")
        gc.collect()
        torch.cuda.empty_cache()
        w_gib = weights_gib(pipe.model, pipe.vae)
        cap = CAPS.get(fmt) if a.cap else None
        placement = None
        if cap:
            placement = pipe.limit_gpu_memory(cap)  # ViT/VAE/embeddings off the GPU between uses + the cap
        row = dict(task="t2i", backend="triton", weights=fmt, height=a.size, width=a.size, num_timesteps=a.steps,
                   weights_gib=round(w_gib, 2), cap_gib=cap, placement=placement, **env)
        try:
            pipe.generate("warm up", image_shapes=(a.size, a.size), num_timesteps=3, seed=1)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = pipe.generate("A red bagel on a white plate, studio light.", image_shapes=(a.size, a.size),
                                num_timesteps=a.steps, seed=0)
            torch.cuda.synchronize()
            row.update(seconds=round(time.perf_counter() - t0, 3), tokens_per_s=None)
            if phase_peaks is not None:  # the wrappers reset the peak between phases: the request's is their max
                row.update(phase_peaks_gib=dict(phase_peaks), peak_gib=max(phase_peaks.values()))
            else:
                row.update(peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
            img = np.asarray(res.image)
            if fmt == "df11":
                row.update(bit_identical_to_bf16_same_weights=bool(torch.equal(res.latents, df11_ref)),
                           note="every layer a copy of layer 0 (one compression serves all)")
            elif ref is None and fmt == "bf16":
                ref = (res.latents, img)
            elif ref is not None:
                lat = res.latents.double()
                row.update(rel_l2_latents_vs_bf16=float((lat - ref[0].double()).norm() / ref[0].double().norm()),
                           psnr_vs_bf16_db=round(psnr(img, ref[1]), 2),
                           note="deviation on random weights: a proxy, not real-weight quality")
        except (torch.cuda.OutOfMemoryError, bagel_rt.InputError) as e:
            row.update(error=f"does not fit under the cap: {str(e).splitlines()[0][:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.set_per_process_memory_fraction(1.0)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for r in rows:
        print(f"{r['weights']:5s} weights {r['weights_gib']:6.2f} GiB  peak {r.get('peak_gib', '-')} GiB  "
              f"{r.get('seconds', '-')} s  rel L2 {r.get('rel_l2_latents_vs_bf16', '-')}  "
              f"PSNR {r.get('psnr_vs_bf16_db', '-')}  {r.get('error', '')}")


if __name__ == "__main__":
    main()
