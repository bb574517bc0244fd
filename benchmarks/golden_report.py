"""Agreement of the torch backend with the official implementation's golden outputs (tests/golden), on CPU.

    python benchmarks/golden_report.py --out benchmarks/results/golden_cpu.jsonl

For each golden case: relative L2 of the first-step velocity, of all velocities, of the final latents, the
mean / max absolute difference of the decoded image (grey levels), greedy ids equality and logits relative
L2. Also the bf16-noise reference of the first case: an fp32 run of the same weights against the golden data,
and the unguided (cfg_text_scale 1) bf16-vs-fp32 gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import bagel_rt
from bagel_rt.bench import environment

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
KWARGS = ("think", "understanding_output", "max_think_token_n", "do_sample", "cfg_text_scale", "cfg_img_scale",
          "cfg_interval", "timestep_shift", "num_timesteps", "cfg_renorm_min", "cfg_renorm_type", "image_shapes")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run(pipe, case, **over):
    inputs = [Image.open(GOLDEN / x) if x.startswith("inputs/") else x for x in case["inputs"]]
    kw = {k: case[k] for k in KWARGS if k in case} | over
    return pipe.interleave(inputs, seed=case["seed"], record=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    env = environment()
    cases = json.loads((GOLDEN / "cases-a.json").read_text())["cases"]
    pipe = bagel_rt.load(GOLDEN / "tiny-a", device="cpu", dtype=torch.bfloat16, backend="torch")
    rows = []
    for case in cases:
        ref = load_file(GOLDEN / case["outputs"])
        res = run(pipe, case)
        row = dict(report="golden", case=case["name"], backend="torch", dtype="bf16")
        if "velocities" in ref:
            img = np.asarray(res.image).astype(np.int32)
            d = np.abs(img - ref["image"].numpy().astype(np.int32))
            row.update(first_velocity_rel_l2=rel(res.velocities[0], ref["velocities"][0]),
                       velocities_rel_l2=rel(res.velocities, ref["velocities"]),
                       latents_rel_l2=rel(res.latents, ref["latents"]),
                       image_mean_abs_diff=float(d.mean()), image_max_abs_diff=int(d.max()))
        if "text_ids" in ref:
            row.update(greedy_ids_equal=res.token_ids == ref["text_ids"].tolist(),
                       logits_rel_l2=rel(res.logits, ref["text_logits"]),
                       text_equal=bool(case["texts"]) and res.text == case["texts"][0])
        rows.append(row | env)
        print(json.dumps(row))
    case = cases[0]
    ref = load_file(GOLDEN / case["outputs"])
    p32 = bagel_rt.load(GOLDEN / "tiny-a", device="cpu", dtype=torch.float32, backend="torch")
    r32, r16 = run(p32, case), run(pipe, case)
    g32, g16 = run(p32, case, cfg_text_scale=1.0), run(pipe, case, cfg_text_scale=1.0)
    row = dict(report="bf16_noise_reference", case=case["name"],
               fp32_vs_golden_first_velocity=rel(r32.velocities[0], ref["velocities"][0]),
               bf16_vs_golden_first_velocity=rel(r16.velocities[0], ref["velocities"][0]),
               bf16_vs_fp32_first_velocity=rel(r16.velocities[0], r32.velocities[0]),
               unguided_bf16_vs_fp32_first_velocity=rel(g16.velocities[0], g32.velocities[0]))
    rows.append(row | env)
    print(json.dumps(row))
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
