"""Compressed checkpoints (bagel_rt.quantized): conversion, format dispatch, loading, quantize-on-load, errors.

All on the tiny checkpoint (random weights) on the CPU. Accuracy of the int8/nf4 models is measured on the final
latents of a 3-step 32x32 generation, relative L2 against the bf16 model; measured on seeds 0-4 at 32x32 and
64x64: int8 0.020-0.027, nf4 0.17-0.20 (with or without double quantization). DFloat11 is lossless: exact.
"""

import json
import shutil

import pytest
import torch
from bagel_rt.cli.main import cli
from bagel_rt.quant import Int8Linear, NF4Linear, int8, int8_state, load_int8, load_nf4, nf4, nf4_state
from bagel_rt.quant.exp4 import is_exp4
from click.testing import CliRunner
from conftest import rel_l2, requires_cuda, requires_interpreter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bagel_rt
from bagel_rt import df11_resident
from bagel_rt.checkpoint import read_header
from bagel_rt.convert import SafetensorsWriter, convert_checkpoint
from bagel_rt.df11_resident import FORMS
from bagel_rt.errors import CheckpointError, InputError
from bagel_rt.info import checkpoint_info
from bagel_rt.quantized import BAGEL_DF11_PATTERNS, DTYPE_PROBES, quantize_linear

PROMPT = "a red bagel"
GEN = dict(image_shapes=(32, 32), num_timesteps=3, seed=0)
MAX_REL_L2 = {"int8": 0.06, "nf4": 0.3}  # measured 0.020-0.027 and 0.17-0.20 (module docstring)
Q = "language_model.model.layers.0.self_attn.q_proj"  # a Linear every format quantizes (K = 64, with bias)


@pytest.fixture(scope="module")
def conv(tiny, tmp_path_factory):
    """The tiny checkpoint converted: int8 through the CLI, the others through the library."""
    root = tmp_path_factory.mktemp("conv")
    r = CliRunner().invoke(cli, ["quantize", str(tiny), str(root / "int8"), "--format", "int8", "--no-progress"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert r.stdout.strip() == str(root / "int8") and "int8: safetensors" in r.stderr
    out = {"int8": root / "int8"}
    for name, fmt, kw in (("nf4", "nf4", {}), ("nf4dq", "nf4", {"double_quant": True}), ("df11", "df11", {})):
        out[name] = convert_checkpoint(tiny, root / name, fmt, progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def ref(tiny):
    pipe = bagel_rt.load(tiny, device="cpu")
    return pipe, pipe.generate(PROMPT, **GEN), pipe.understand(None, "hi", max_think_token_n=4)


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(bits(sa[k]), bits(sb[k])), k


def one_line_error(exc_type, fn, *mentions):
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for m in mentions:
        assert m in msg, (m, msg)
    return msg


def rewrite(path, change):
    """Rewrite the safetensors file ``path`` with ``change(tensors)`` applied, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


# -- layouts and info --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fmt", [("int8", "int8"), ("nf4", "nf4"), ("nf4dq", "nf4"), ("df11", "df11")])
def test_info_reports_format(conv, name, fmt):
    d = checkpoint_info(conv[name])
    assert d["format"] == fmt
    r = CliRunner().invoke(cli, ["info", str(conv[name])])
    assert r.exit_code == 0 and f"format       {fmt} (" in r.stdout


def test_int8_nf4_layout_and_metadata(tiny, conv):
    src = read_header(tiny / "ema.safetensors")
    for name in ("int8", "nf4", "nf4dq"):
        h = read_header(conv[name] / "ema.safetensors")
        m = h.metadata
        assert m["bagel_rt.source"].startswith("sha256:") and json.loads(m["bagel_rt.skip"]) == []
        kept = json.loads(m["bagel_rt.kept"])
        assert set(DTYPE_PROBES) <= set(kept)
        assert all(h.tensors[f"{x}.weight"].dtype == "BF16" for x in kept)
        assert h.tensors[f"{Q}.weight"].dtype != "BF16" and h.tensors[f"{Q}.bias"].dtype == "BF16"
        # embeddings, norms, tables and biases are copied as they are
        for k in ("language_model.model.embed_tokens.weight", "latent_pos_embed.pos_embed",
                  "language_model.model.norm.weight", f"{Q}.bias"):
            assert h.tensors[k] == src.tensors[k]
        for f in ("ae.safetensors", "llm_config.json", "vit_config.json", "tokenizer.json"):
            assert (conv[name] / f).read_bytes() == (tiny / f).read_bytes()
    i8, n4 = (read_header(conv[n] / "ema.safetensors").metadata for n in ("int8", "nf4"))
    assert i8["bagel_rt.format"] == "int8" and int(i8["bagel_rt.quantized"]) == 46
    assert n4["bagel_rt.format"] == "nf4" and n4["bagel_rt.blocksize"] == "64"
    # NF4 keeps the Linears whose in_features (tiny: 160, 32) is not a multiple of the block size
    reasons = json.loads(n4["bagel_rt.kept"])
    assert "not a multiple of the block size 64" in reasons["language_model.model.layers.0.mlp.down_proj"]
    assert int(n4["bagel_rt.quantized"]) == 31


def test_df11_layout(tiny, conv):
    d = conv["df11"]
    assert not (d / "ema.safetensors").exists() and not (d / "ae.safetensors").exists()
    assert (d / "vae" / "ae.safetensors").read_bytes() == (tiny / "ae.safetensors").read_bytes()
    cfg = json.loads((d / "config.json").read_text())["dfloat11_config"]
    assert cfg["threads_per_block"] == [512] and cfg["bytes_per_thread"] == 8
    assert cfg["pattern_dict"] == BAGEL_DF11_PATTERNS
    assert len(cfg["pattern_dict"][r"language_model\.model\.layers\.\d+"]) == 14
    h = read_header(d / "model.safetensors")
    unit = "language_model.model.layers.0"
    assert {f"{unit}.{b}" for b in ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps",
                                    "split_positions")} <= set(h.tensors)
    assert h.tensors[f"{unit}.split_positions"].shape == (13,)
    assert f"{Q}.weight" not in h.tensors and f"{Q}.bias" in h.tensors  # biases stay plain
    assert "language_model.lm_head.luts" in h.tensors and "language_model.model.embed_tokens.luts" in h.tensors


# -- loading: accuracy, exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fmt", [("int8", "int8"), ("nf4", "nf4"), ("nf4dq", "nf4")])
def test_quantized_outputs_close_to_bf16(conv, ref, name, fmt):
    _, r0, _ = ref
    pipe = bagel_rt.load(conv[name], device="cpu")
    cls = Int8Linear if fmt == "int8" else NF4Linear
    n = sum(isinstance(m, cls) for m in pipe.model.modules())
    assert n == int(read_header(conv[name] / "ema.safetensors").metadata["bagel_rt.quantized"])
    r = pipe.generate(PROMPT, **GEN)
    assert rel_l2(r.latents, r0.latents) < MAX_REL_L2[fmt]
    u = pipe.understand(None, "hi", max_think_token_n=4)
    assert isinstance(u.text, str) and len(u.token_ids) == 4


def test_df11_is_bit_identical(conv, ref, tiny):
    pipe0, r0, u0 = ref
    pipe = bagel_rt.load(conv["df11"], device="cpu")
    same_state(pipe.model, pipe0.model)
    same_state(pipe.vae, pipe0.vae)
    assert torch.equal(pipe.generate(PROMPT, **GEN).latents, r0.latents)
    assert pipe.understand(None, "hi", max_think_token_n=4).token_ids == u0.token_ids
    # other dtypes and weights="bf16" decode the same weights
    same_state(bagel_rt.load(conv["df11"], device="cpu", dtype=torch.float32).model,
               bagel_rt.load(tiny, device="cpu", dtype=torch.float32).model)
    same_state(bagel_rt.load(conv["df11"], device="cpu", weights="bf16").model, pipe0.model)


@pytest.mark.parametrize("form", [None, *FORMS])
def test_df11_resident_is_bit_identical(conv, ref, form):
    """Either resident form (DF11's Huffman buffers, or transcoded to Exp4 when loaded; Exp4 by default, load's
    ``df11_form`` picks): bit-identical results."""
    _, r0, u0 = ref
    pipe = bagel_rt.load(conv["df11"], device="cpu", df11_resident=True, df11_form=form)
    assert {is_exp4(u.buffers) for u in pipe.df11.units.values()} == {(form or "exp4") == "exp4"}
    lm = pipe.model.language_model
    assert "weight" not in lm.lm_head._parameters  # compressed: decoded on use into the shared buffer
    assert not any(k.endswith("q_proj.weight") for k in pipe.model.state_dict())
    assert torch.equal(pipe.generate(PROMPT, **GEN).latents, r0.latents)
    assert pipe.understand(None, "hi", max_think_token_n=4).token_ids == u0.token_ids
    assert torch.equal(pipe.generate(PROMPT, **GEN).latents, r0.latents)  # again, after other units ran


@pytest.mark.parametrize("form", FORMS)
def test_df11_resident_on_the_triton_backend(conv, form, monkeypatch):
    """The packed denoiser decodes each layer's unit just before it uses the weights: same result as the
    weights decoded at load (interpreter on the CPU, kernels on a GPU), in either resident form."""
    monkeypatch.setattr(df11_resident, "DEFAULT_FORM", form)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    at_load = bagel_rt.load(conv["df11"], device=dev, backend="triton")
    resident = bagel_rt.load(conv["df11"], device=dev, backend="triton", df11_resident=True)
    a = at_load.generate(PROMPT, **GEN)
    b = resident.generate(PROMPT, **GEN)
    assert torch.equal(a.latents, b.latents)
    torch_pipe = bagel_rt.load(conv["df11"], device=dev, backend="torch")
    ids = torch_pipe.understand(None, "hi", max_think_token_n=4).token_ids
    assert resident.understand(None, "hi", max_think_token_n=4).token_ids == ids  # decoded on the torch path


@requires_interpreter
def test_df11_resident_layers_decoded_for_good_and_slots(conv, ref):
    """Budget split: layers decoded for good get bf16 parameters and drop their compressed buffers; the rest
    alternate between the two slots; the results stay bit-identical on the torch and the packed path."""
    _, r0, _ = ref
    pipe = bagel_rt.load(conv["df11"], device="cpu", df11_resident=True)
    store = pipe.df11
    units = store.layer_units()
    assert [u.slot for u in units] == [0, 1]  # consecutive layers decode into different slots
    before = store.nbytes()
    freed = store.keep_decoded(units[1].name)
    store.layout()
    assert freed > 0 and store.nbytes() < before
    layer1 = pipe.model.language_model.model.layers[1]
    assert isinstance(layer1.mlp.up_proj.weight, torch.nn.Parameter)  # an ordinary weight again: moves carry it
    assert store.layer_units()[1] is None and store.layer_units()[0].slot == 0
    assert torch.equal(pipe.generate(PROMPT, **GEN).latents, r0.latents)
    fast = bagel_rt.load(conv["df11"], device="cpu", backend="triton", df11_resident=True)
    fast.df11.keep_decoded(fast.df11.layer_units()[0].name)
    fast.df11.layout()
    at_load = bagel_rt.load(conv["df11"], device="cpu", backend="triton")
    assert torch.equal(fast.generate(PROMPT, **GEN).latents, at_load.generate(PROMPT, **GEN).latents)


def test_df11_layer_prefetch_order():
    """The packed denoiser's decode schedule: c0 and c1 decode at the start; c_{k+2} decodes into c_k's slot
    only once c_k is done, so no layer's weights are overwritten before it ran (layers 2 and 4 decoded for good
    take no slot)."""
    from types import SimpleNamespace

    from bagel_rt.df11_resident import LayerPrefetch

    log = []
    units = [SimpleNamespace(name=f"u{i}", slot=0) if i not in (2, 4) else None for i in range(7)]
    compressed = [u for u in units if u is not None]
    for k, u in enumerate(compressed):
        u.slot = k % 2
    store = SimpleNamespace(layer_units=lambda: units, decode=lambda u: log.append(("decode", u.name, u.slot)))
    pf = LayerPrefetch(store, torch.device("cpu"))
    pf.start()
    for i in range(len(units)):
        pf.before(i, None)
        log.append(("run", i))
        pf.after(i, None)
    pf.finish()
    in_slot = {}
    for e in log:
        if e[0] == "decode":
            in_slot[e[2]] = e[1]
        elif units[e[1]] is not None:
            u = units[e[1]]
            assert in_slot[u.slot] == u.name, (e, log)  # its slot still holds its own weights when it runs
    assert [e[1] for e in log if e[0] == "decode"] == [u.name for u in compressed]  # each decoded once


def test_df11_resident_errors(conv):
    one_line_error(InputError, lambda: bagel_rt.load(conv["int8"], device="cpu", df11_resident=True),
                   "needs DFloat11 weights")
    one_line_error(InputError, lambda: bagel_rt.load(conv["df11"], device="cpu", dtype=torch.float32,
                                                     df11_resident=True), "bf16")
    one_line_error(InputError, lambda: bagel_rt.load(conv["df11"], device="cpu", df11_resident=True,
                                                     df11_form="exp5"), "df11_form must be one of huffman, exp4")
    one_line_error(InputError, lambda: bagel_rt.load(conv["df11"], device="cpu", df11_form="huffman"),
                   "needs df11_resident=True")


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantize_on_load_equals_converted(tiny, conv, fmt):
    converted = bagel_rt.load(conv[fmt], device="cpu").model
    same_state(bagel_rt.load(tiny, device="cpu", weights=fmt).model, converted)
    same_state(bagel_rt.load(conv["df11"], device="cpu", weights=fmt).model, converted)  # df11 decodes first


def test_format_comes_from_metadata_not_names(tiny, conv, tmp_path):
    renamed = shutil.copytree(conv["nf4"], tmp_path / "int8-bf16")
    model = bagel_rt.load(renamed, device="cpu").model
    assert isinstance(model.get_submodule(Q), NF4Linear)
    plain = shutil.copytree(tiny, tmp_path / "nf4")
    assert type(bagel_rt.load(plain, device="cpu").model.get_submodule(Q)) is torch.nn.Linear
    df11 = shutil.copytree(conv["df11"], tmp_path / "ema")
    assert checkpoint_info(df11)["format"] == "df11"
    assert type(bagel_rt.load(df11, device="cpu").model.get_submodule(Q)) is torch.nn.Linear


# -- bitsandbytes reads the converted files ----------------------------------------------------------------------
def test_bitsandbytes_reads_int8(conv):
    bnb = pytest.importorskip("bitsandbytes")
    with safe_open(str(conv["int8"] / "ema.safetensors"), "pt") as f:
        state = {k.removeprefix(Q + "."): f.get_tensor(k) for k in f.keys() if k.startswith(Q + ".")}
    assert set(state) == {"weight", "SCB", "weight_format", "bias"}
    n, k = state["weight"].shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=0.0).to("cpu")
    layer.load_state_dict(state)
    assert torch.equal(layer.weight.data, state["weight"]) and torch.equal(layer.weight.SCB, state["SCB"])
    theirs = layer.weight.data.float() * (layer.weight.SCB.unsqueeze(1) / 127)
    ours = bagel_rt.load(conv["int8"], device="cpu").model.get_submodule(Q)
    torch.testing.assert_close(int8.dequantize(ours.weights()), theirs, rtol=1e-6, atol=0)
    assert torch.equal(int8.dequantize(load_int8(Q, {f"{Q}.{k}": v for k, v in state.items()})),
                       int8.dequantize(ours.weights()))


@pytest.mark.parametrize("name", ["nf4", "nf4dq"])
def test_bitsandbytes_reads_nf4(conv, name):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = f"{Q}.weight"
    with safe_open(str(conv[name] / "ema.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(w)}
    assert (f"{w}.nested_absmax" in state) == (name == "nf4dq")
    qs = bnbf.QuantState.from_dict({k.removeprefix(w + "."): v for k, v in state.items() if k != w},
                                   device=torch.device("cpu"))
    theirs = bnbf.dequantize_4bit(state[w], qs)
    ours = nf4.dequantize(load_nf4(Q, state))
    assert theirs.shape == ours.shape and theirs.dtype == ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=1e-6)  # bnb's CPU kernel may round to bf16 apart


# -- conversion pieces -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_linear_by_chunks_equals_whole(double_quant):
    g = torch.Generator().manual_seed(0)
    w = (0.05 * torch.randn(300, 192, generator=g)).to(torch.bfloat16)
    chunked = quantize_linear("a.b", w, "nf4", double_quant, chunk_elements=7 * 192 + 5)
    whole = nf4_state("a.b", w, double_quant=double_quant)
    assert chunked.keys() == whole.keys()
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)
    chunked = quantize_linear("a.b", w, "int8", chunk_elements=1000)
    whole = int8_state("a.b", w)
    assert chunked.keys() == whole.keys() and all(torch.equal(chunked[k], whole[k]) for k in whole)


def test_safetensors_writer(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "scalar": torch.tensor(7, dtype=torch.uint8),
               "empty": torch.zeros(0, dtype=torch.int64), "b.c": torch.arange(10, dtype=torch.int8).view(2, 5),
               "d": torch.randn(2, 1, 3, 2)}
    with SafetensorsWriter(tmp_path / "x.safetensors", list(tensors), {"k": "v"}) as w:
        for k, t in tensors.items():
            w.add(k, t)
    back = load_file(str(tmp_path / "x.safetensors"))  # the reference reader validates offsets and size
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(bits(back[k]), bits(t)) for k, t in tensors.items())
    assert read_header(tmp_path / "x.safetensors").metadata == {"k": "v"}
    assert (tmp_path / "x.safetensors").read_bytes()[:8] != b"\0" * 8


def test_skip_patterns(tiny, tmp_path):
    d = convert_checkpoint(tiny, tmp_path / "q", "int8", skip=["lm_head", r"\.mlp_moe_gen\."], progress=False)
    h = read_header(d / "ema.safetensors")
    kept = json.loads(h.metadata["bagel_rt.kept"])
    assert kept["language_model.lm_head"] == "skip pattern"
    assert h.tensors["language_model.lm_head.weight"].dtype == "BF16"
    assert h.tensors["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"].dtype == "BF16"
    assert h.tensors["language_model.model.layers.1.mlp.up_proj.weight"].dtype == "I8"
    model = bagel_rt.load(d, device="cpu").model
    assert type(model.language_model.lm_head) is torch.nn.Linear
    same_state(bagel_rt.load(tiny, device="cpu", weights="int8", skip=["lm_head", r"\.mlp_moe_gen\."]).model,
               model)
    d = convert_checkpoint(tiny, tmp_path / "df", "df11", skip=["lm_head"], progress=False)
    h = read_header(d / "model.safetensors")
    assert "language_model.lm_head.weight" in h.tensors and "language_model.lm_head.luts" not in h.tensors
    same_state(bagel_rt.load(d, device="cpu").model, bagel_rt.load(tiny, device="cpu").model)


def test_conversion_is_atomic(tiny, tmp_path, monkeypatch):
    import bagel_rt.convert as qz  # where convert_checkpoint looks quantize_linear up

    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return quantize_linear(*args, **kw)

    monkeypatch.setattr(qz, "quantize_linear", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(tiny, tmp_path / "out", "nf4", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory is left


# -- errors ------------------------------------------------------------------------------------------------------
def cli_error(args, *mentions):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for m in mentions:
        assert m in lines[0], (m, lines[0])


def test_cli_errors(tiny, conv, tmp_path):
    cli_error(["quantize", tiny, tmp_path / "x", "--format", "int4"], "--format", "int4")
    cli_error(["quantize", tiny, conv["nf4"], "--format", "int8"], str(conv["nf4"]), "already exists")
    cli_error(["quantize", tiny, tmp_path / "x", "--format", "int8", "--skip", "("], "skip pattern")
    cli_error(["quantize", tiny, tmp_path / "x", "--format", "int8", "--double-quant"], "nf4 only")
    cli_error(["quantize", conv["nf4"], tmp_path / "x", "--format", "int8"], "holds nf4 weights")
    cli_error(["understand", "hi", "--model", conv["nf4"], "--weights", "bf16", "--no-progress"],
              "holds nf4 weights", "weights='bf16'")
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(cli, ["understand", "hi", "--model", tiny, "--weights", "nf4", "--no-progress",
                                 "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.stderr


def test_overwrite(tiny, tmp_path):
    d = convert_checkpoint(tiny, tmp_path / "q", "int8", progress=False)
    convert_checkpoint(tiny, d, "nf4", progress=False, overwrite=True)
    assert checkpoint_info(d)["format"] == "nf4"
    one_line_error(InputError, lambda: convert_checkpoint(d, d, "int8", progress=False, overwrite=True),
                   "is the source")


def test_weights_the_checkpoint_cannot_give(tiny, conv):
    one_line_error(CheckpointError, lambda: bagel_rt.load(conv["nf4"], device="cpu", weights="bf16"),
                   str(conv["nf4"]), "holds nf4 weights", "weights='bf16'")
    one_line_error(CheckpointError, lambda: bagel_rt.load(conv["int8"], device="cpu", weights="nf4"), "int8")
    one_line_error(CheckpointError, lambda: bagel_rt.load(tiny, device="cpu", weights="df11"), "--format df11")
    one_line_error(InputError, lambda: bagel_rt.load(tiny, device="cpu", weights="fp4"), "fp4")


def test_df11_missing_vae(conv, tmp_path):
    d = shutil.copytree(conv["df11"], tmp_path / "df11")
    (d / "vae" / "ae.safetensors").unlink()
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), "vae/ae.safetensors", "not found")


def test_df11_corrupt_unit(conv, tmp_path):
    d = shutil.copytree(conv["df11"], tmp_path / "df11")
    unit = "language_model.model.layers.1"
    key = f"{unit}.sign_mantissa"
    rewrite(d / "model.safetensors", lambda t: t.update({key: t[key][:-1]}))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(d), "wrong shape", key)
    rewrite(d / "model.safetensors", lambda t: t.pop(f"{unit}.gaps"))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), "missing", f"{unit}.gaps")


def test_corrupt_quantized_tensors(conv, tmp_path):
    d = shutil.copytree(conv["int8"], tmp_path / "int8")
    f = d / "ema.safetensors"
    rewrite(f, lambda t: t.update({f"{Q}.SCB": t[f"{Q}.SCB"][:-1]}))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "wrong shape", f"{Q}.SCB")
    d = shutil.copytree(conv["nf4"], tmp_path / "nf4")
    f = d / "ema.safetensors"
    rewrite(f, lambda t: t.pop(f"{Q}.weight.absmax"))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "missing",
                   f"{Q}.weight.absmax")
    rewrite(f, lambda t: t.update({f"{Q}.weight.absmax": torch.zeros(16, dtype=torch.float16)}))
    one_line_error(CheckpointError, lambda: bagel_rt.load(d, device="cpu"), str(f), "wrong dtype",
                   f"{Q}.weight.absmax")


# -- on the GPU: Triton DF11 decode, quantization on the device ------------------------------------------------
@requires_cuda
def test_cuda_loading(tiny, conv):
    load = lambda d, **kw: bagel_rt.load(d, device="cuda", backend="torch", **kw)  # noqa: E731
    ref = load(tiny)
    df11 = load(conv["df11"])
    same_state(df11.model, ref.model)  # the Triton decoder is exact (units decoded as their buffers stream in)
    r0 = ref.generate(PROMPT, **GEN)
    resident = load(conv["df11"], df11_resident=True)
    assert torch.equal(resident.generate(PROMPT, **GEN).latents, df11.generate(PROMPT, **GEN).latents)
    # quantization is elementwise IEEE arithmetic (no reductions but max), so the GPU gives the CPU's tensors
    for fmt in ("int8", "nf4"):
        converted = load(conv[fmt])
        same_state(load(tiny, weights=fmt).model, converted.model)
        # the files through the pinned-ring reader give what the CPU's memory map holds
        on_cpu = bagel_rt.load(conv[fmt], device="cpu", backend="torch").model.state_dict()
        for k, t in converted.model.state_dict().items():
            assert t.dtype == on_cpu[k].dtype and torch.equal(bits(t.cpu()), bits(on_cpu[k])), k
        assert rel_l2(converted.generate(PROMPT, **GEN).latents, r0.latents) < MAX_REL_L2[fmt]
