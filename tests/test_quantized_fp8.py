"""FP8 checkpoints and the 12 GB recipe (fp8-gen-nf4-und) on the tiny checkpoint: layout and metadata, load =
quantize-on-load bit for bit, outputs close to bf16 (deviation printed), per-part formats in ``info``, errors
naming file and key."""

import shutil

import numpy as np
import pytest
import torch
from bagel_rt.cli.main import cli
from bagel_rt.quant import FP8Linear, NF4Linear
from click.testing import CliRunner
from conftest import rel_l2
from safetensors.torch import load_file, save_file
from test_quantized import GEN, PROMPT, Q, one_line_error, rewrite, same_state

import bagel_rt
from bagel_rt.checkpoint import read_header
from bagel_rt.convert import convert_checkpoint
from bagel_rt.errors import CheckpointError
from bagel_rt.info import checkpoint_info
from bagel_rt.quantized import quantize_in_place

RECIPE = "fp8-gen-nf4-und"
# latents rel. L2 vs bf16 on the torch backend (CPU reference forward: FP8 weights, fp32 products), tiny random
# model, 3 steps: measured 0.054 (fp8) and 0.126 (recipe, whose NF4 und expert dominates)
MAX_REL_L2 = {"fp8": 0.1, RECIPE: 0.25}
GEN_Q = "language_model.model.layers.1.mlp_moe_gen.down_proj"
UND_Q = "language_model.model.layers.1.self_attn.o_proj"


@pytest.fixture(scope="module")
def conv(tiny, tmp_path_factory):
    """fp8 through the CLI, the recipe and df11 through the library."""
    root = tmp_path_factory.mktemp("conv")
    r = CliRunner().invoke(cli, ["quantize", str(tiny), str(root / "fp8"), "--format", "fp8", "--no-progress"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    return {"fp8": root / "fp8", RECIPE: convert_checkpoint(tiny, root / RECIPE, RECIPE, progress=False),
            "df11": convert_checkpoint(tiny, root / "df11", "df11", progress=False)}


def llm_linears(model) -> dict[str, torch.nn.Module]:
    lm = model.language_model
    out = {"language_model.lm_head": lm.lm_head}
    out.update({f"language_model.model.{n}": m for n, m in lm.model.named_modules()
                if n.startswith("layers.") and n.count(".") == 3 and hasattr(m, "out_features")})
    return out


def test_fp8_layout_and_metadata(tiny, conv):
    src, h = read_header(tiny / "ema.safetensors"), read_header(conv["fp8"] / "ema.safetensors")
    assert h.metadata["bagel_rt.format"] == "fp8"
    model = bagel_rt.load(tiny, device="cpu").model
    lin = llm_linears(model)
    assert len(lin) == 2 * 14 + 1  # both experts' 7 Linears per layer, and lm_head
    for name, m in lin.items():
        w, s = h.tensors[f"{name}.weight"], h.tensors[f"{name}.weight_scale"]
        assert (w.dtype, w.shape, s.dtype, s.shape) == ("F8_E4M3", (m.out_features, m.in_features), "F32",
                                                         (m.out_features, 1)), name
    # everything else exactly as in the bf16 file
    for k, t in src.tensors.items():
        if k.removesuffix(".weight") not in lin:
            assert h.tensors[k].dtype == t.dtype and h.tensors[k].shape == t.shape, k
    assert set(h.tensors) == set(src.tensors) | {f"{n}.weight_scale" for n in lin}
    assert int(h.metadata["bagel_rt.quantized"]) == len(lin)


def test_recipe_layout(conv):
    h = read_header(conv[RECIPE] / "ema.safetensors")
    assert h.metadata["bagel_rt.format"] == RECIPE
    assert h.tensors[f"{GEN_Q}.weight"].dtype == "F8_E4M3" and f"{GEN_Q}.weight_scale" in h.tensors
    assert f"{UND_Q}.weight.quant_state.bitsandbytes__nf4" in h.tensors
    assert f"{UND_Q}.weight_scale" not in h.tensors
    assert "language_model.lm_head.weight.absmax" in h.tensors
    assert h.tensors["connector.fc1.weight"].dtype == "BF16"


@pytest.mark.parametrize("fmt", ["fp8", RECIPE])
def test_load_equals_quantize_on_load(tiny, conv, fmt):
    converted = bagel_rt.load(conv[fmt], device="cpu").model
    same_state(bagel_rt.load(tiny, device="cpu", weights=fmt).model, converted)
    same_state(bagel_rt.load(conv["df11"], device="cpu", weights=fmt).model, converted)  # df11 decodes first
    lin = llm_linears(converted)
    for name, m in lin.items():
        want = FP8Linear if fmt == "fp8" or "_moe_gen" in name else NF4Linear
        if isinstance(m, torch.nn.Linear):  # the recipe keeps NF4-incompatible und Linears (K % 64) bf16
            assert fmt == RECIPE and m.in_features % 64, name
            continue
        assert type(m) is want, name
    # no bf16 copy of a quantized weight: an FP8 module's tensors are its e4m3 codes, fp32 scales and bias
    for m in converted.modules():
        if isinstance(m, FP8Linear):
            assert [(n, t.dtype) for n, t in m.named_buffers()] == [
                ("weight", torch.float8_e4m3fn), ("weight_scale", torch.float32), ("bias", torch.bfloat16)][
                : 2 + (m.bias is not None)] and not list(m.parameters())


@pytest.mark.parametrize("fmt", ["fp8", RECIPE])
def test_outputs_close_to_bf16(tiny, conv, fmt):
    r0 = bagel_rt.load(tiny, device="cpu", backend="torch").generate(PROMPT, **GEN)
    pipe = bagel_rt.load(conv[fmt], device="cpu", backend="torch")
    r = pipe.generate(PROMPT, **GEN)
    a, b = (torch.from_numpy(np.asarray(x.image, dtype=np.float64)) for x in (r, r0))
    psnr = float(10 * torch.log10(255.0**2 / ((a - b) ** 2).mean()))
    gap = rel_l2(r.latents, r0.latents)
    print(f"{fmt}: latents rel. L2 vs bf16 {gap:.4f}, image PSNR {psnr:.1f} dB (tiny random weights)")
    assert 0 < gap < MAX_REL_L2[fmt]
    u = pipe.understand(None, "hi", max_think_token_n=4)
    assert len(u.token_ids) == 4


def test_info_shows_each_parts_format(conv):
    d = checkpoint_info(conv[RECIPE])
    assert d["format"] == RECIPE
    parts = {p: next(iter(f)) for p, f in d["part_formats"].items()}  # the largest share first
    assert parts == {"vit": "bf16", "connector": "bf16", "llm_und": "nf4", "llm_gen": "fp8",
                     "embed_tokens": "bf16", "lm_head": "nf4", "vae": "fp32"}
    assert set(d["part_formats"]["llm_gen"]) == {"fp8"}
    r = CliRunner().invoke(cli, ["info", str(conv["fp8"])])
    assert r.exit_code == 0 and "format       fp8 (" in r.stdout
    assert "  gen expert         fp8\n" in r.stdout and "  lm_head            fp8\n" in r.stdout


def test_weights_choices(tiny, conv):
    with pytest.raises(CheckpointError, match="cannot give weights='nf4'"):
        bagel_rt.load(conv["fp8"], device="cpu", weights="nf4")
    with pytest.raises(CheckpointError, match="cannot give weights='fp8'"):
        bagel_rt.load(conv[RECIPE], device="cpu", weights="fp8")
    assert bagel_rt.load(conv["fp8"], device="cpu", weights="fp8").weights == "fp8"


def test_corrupt_fp8_tensors(conv, tmp_path):
    d = shutil.copytree(conv["fp8"], tmp_path / "fp8")
    f = d / "ema.safetensors"
    scale = f"{Q}.weight_scale"
    rewrite(f, lambda t: t.update({scale: t[scale].reshape(-1)}))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "wrong shape", scale)
    rewrite(f, lambda t: t.update({scale: t[scale].reshape(-1, 1).double()}))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "wrong dtype", scale)
    rewrite(f, lambda t: t.update({scale: t[scale].float(), f"{Q}.weight": t[f"{Q}.weight"].bfloat16()}))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "wrong dtype", f"{Q}.weight")
    rewrite(f, lambda t: (t.pop(scale), t.update({f"{Q}.weight": t[f"{Q}.weight"].to(torch.float8_e4m3fn)})))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "missing", scale)


def test_quantize_in_place_equals_quantize_on_load(tiny):
    """``bench --random-weights --weights fp8-gen-nf4-und`` swaps in place what loading would quantize."""
    model = bagel_rt.load(tiny, device="cpu").model
    plan = quantize_in_place(model, RECIPE)
    assert plan[GEN_Q] == "fp8" and plan[UND_Q] == "nf4" and plan["language_model.lm_head"] == "nf4"
    same_state(model, bagel_rt.load(tiny, device="cpu", weights=RECIPE).model)


def test_info_infers_fp8_without_metadata(conv, tmp_path):
    d = shutil.copytree(conv["fp8"], tmp_path / "fp8")
    save_file(load_file(str(d / "ema.safetensors")), str(d / "ema.safetensors"))  # no metadata
    assert (checkpoint_info(d)["format"], checkpoint_info(d)["format_source"]) == (
        "fp8", "inferred from FP8 weight_scale keys")
