"""INT8 / NF4 / DFloat11 formats: round trips, bitsandbytes as independent reference, checkpoint keys, module swap.

Kernels are covered in test_quant_kernels.py; everything here runs the pure-PyTorch / numpy references.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bagel_rt.quant import (
    DF11Linear,
    Int8Linear,
    NF4Config,
    NF4Linear,
    compress_units,
    compression_ratio,
    decompress_unit,
    df11_config,
    df11_pattern_units,
    dfloat11,
    int8,
    int8_state,
    load_int8,
    load_nf4,
    nf4,
    nf4_state,
    quantize_model,
)
from torch import nn


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional, the independent reference (skips where bitsandbytes is not installed)."""
    return pytest.importorskip("bitsandbytes.functional")


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return float(20 * torch.log10(ref.norm() / (ref - x).norm()))


def gaussian(*shape: int, std: float = 0.02, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# ----------------------------------------------------------------------------------------------------------------
# INT8
# ----------------------------------------------------------------------------------------------------------------


def test_int8_roundtrip_sqnr():
    w = gaussian(256, 512)
    q = int8.quantize(w)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (256, 512)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (256,)
    assert q.qweight.abs().max() == 127
    assert sqnr(w, int8.dequantize(q)) > 40.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_matches_bitsandbytes(dtype, bnbf):
    w = gaussian(64, 320, std=1.0).to(dtype)
    cb, scb, _ = bnbf.int8_vectorwise_quant(w.clone())
    state = int8_state("layer", w)
    assert torch.equal(state["layer.weight"], cb)
    assert torch.equal(state["layer.SCB"], scb)
    assert state["layer.weight_format"].dtype == torch.uint8 and state["layer.weight_format"].item() == 0
    ours = int8.dequantize(load_int8("layer", state))
    torch.testing.assert_close(ours, bnbf.int8_vectorwise_dequant(cb, scb), rtol=1e-6, atol=1e-6)


def test_int8_state_loads_into_bitsandbytes_linear():
    bnb = pytest.importorskip("bitsandbytes")
    w, b = gaussian(48, 128, std=0.1), gaussian(48, seed=1)
    state = {k.removeprefix("fc."): v for k, v in int8_state("fc", w).items()}
    state["bias"] = b
    layer = bnb.nn.Linear8bitLt(128, 48, bias=True, has_fp16_weights=False, threshold=0.0).to("cpu")
    layer.load_state_dict(state)
    assert torch.equal(layer.weight.data, state["weight"]) and torch.equal(layer.weight.SCB, state["SCB"])


def test_int8_zero_row_and_errors():
    w = gaussian(4, 64)
    w[2] = 0
    q = int8.quantize(w)
    assert torch.equal(int8.dequantize(q)[2], torch.zeros(64))
    state = int8_state("a.b", w)
    with pytest.raises(ValueError, match=r"a\.b\.SCB"):
        load_int8("a.b", {"a.b.weight": state["a.b.weight"]})
    with pytest.raises(ValueError, match=r"a\.b\.SCB"):
        load_int8("a.b", {**state, "a.b.SCB": state["a.b.SCB"][:3]})
    with pytest.raises(ValueError, match=r"a\.b\.weight'"):
        load_int8("a.b", {**state, "a.b.weight": state["a.b.weight"].float()})
    with pytest.raises(ValueError, match="weight_format"):
        load_int8("a.b", {**state, "a.b.weight_format": torch.tensor(1, dtype=torch.uint8)})


# ----------------------------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------------------------


def test_nf4_roundtrip_sqnr():
    w = gaussian(256, 512)
    for dq in (False, True):
        q = nf4.quantize(w, NF4Config(double_quant=dq))
        assert q.packed.dtype == torch.uint8 and q.packed.shape == (256 * 512 // 2, 1)
        assert sqnr(w, nf4.dequantize(q)) > 18.0


def test_nf4_dynamic_map_matches_bitsandbytes(bnbf):
    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(nf4.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))


def _near_tie_only_mismatch(ours: torch.Tensor, theirs: torch.Tensor, scaled: torch.Tensor, code: torch.Tensor):
    """Ours is the exact nearest code. bitsandbytes' CPU 8-bit blockwise kernel (a binary search) can pick the
    other neighbour of a value within ~1% of the interval from a midpoint: allow only such near-ties, rarely."""
    bad = ours.long() != theirs.long()
    assert bad.sum() <= 0.01 * bad.numel()
    if bad.any():
        i, j = ours.long()[bad], theirs.long()[bad]
        assert ((i - j).abs() == 1).all()
        x, a, b = scaled[bad], code[i], code[j]
        assert ((x - a).abs() <= (x - b).abs() + 1e-7).all()
        assert (((x - a).abs() - (x - b).abs()).abs() < 0.01 * (a - b).abs()).all()


@pytest.mark.parametrize("shape", [(96, 320), (33, 64), (7, 9)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_bitsandbytes(shape, double_quant, bnbf):
    w = gaussian(*shape, std=0.05, seed=3).to(torch.bfloat16)
    q = nf4.quantize(w, NF4Config(double_quant=double_quant))
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert packed.shape == q.packed.shape
    n = w.numel()
    assert torch.equal(nf4.unpack_indices(q.packed, n), nf4.unpack_indices(packed, n))
    if not double_quant:
        assert torch.equal(q.absmax, qs.absmax)
    else:
        assert torch.equal(q.nested_absmax, qs.state2.absmax)
        assert q.nested_offset == pytest.approx(qs.offset.item(), rel=0, abs=0)
        absmax = nf4._blockwise_absmax(w.reshape(-1).float(), 64)
        scaled = nf4._blockwise_scale(absmax - q.nested_offset, q.nested_absmax, 256)
        live = q.nested_absmax.repeat_interleave(256)[: absmax.numel()] > 0  # a zero block: any index decodes to 0
        _near_tie_only_mismatch(q.absmax[live], qs.absmax[live], scaled[live], nf4.dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_state_is_readable_by_bitsandbytes(double_quant, dtype, bnbf):
    w = gaussian(80, 192, std=0.03, seed=5).to(dtype)
    state = nf4_state("model.fc", w, double_quant=double_quant)
    expected = {"model.fc.weight", "model.fc.weight.absmax", "model.fc.weight.quant_map",
                "model.fc.weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"model.fc.weight.nested_absmax", "model.fc.weight.nested_quant_map"}
    assert set(state) == expected
    meta = json.loads(bytes(state["model.fc.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["shape"] == [80, 192]
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    assert ("nested_offset" in meta) == double_quant
    qs = bnbf.QuantState.from_dict({k.removeprefix("model.fc.weight."): v for k, v in state.items()
                                              if k != "model.fc.weight"}, device=torch.device("cpu"))
    theirs = bnbf.dequantize_4bit(state["model.fc.weight"], qs)
    ours = nf4.dequantize(load_nf4("model.fc", state))
    assert theirs.dtype == ours.dtype == dtype and theirs.shape == ours.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    else:  # bnb's CPU kernel may round fp32 -> bf16 differently: allow one bf16 ulp
        torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=1e-6)


def test_load_nf4_errors():
    state = nf4_state("fc", gaussian(16, 64), double_quant=True)
    for missing in ("fc.weight.absmax", "fc.weight.quant_map", "fc.weight.nested_absmax",
                    "fc.weight.quant_state.bitsandbytes__nf4"):
        with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
            load_nf4("fc", {k: v for k, v in state.items() if k != missing})
    with pytest.raises(ValueError, match=r"fc\.weight'"):
        load_nf4("fc", {**state, "fc.weight": state["fc.weight"][:-1]})
    with pytest.raises(ValueError, match=r"fc\.weight\.absmax"):
        load_nf4("fc", {**state, "fc.weight.absmax": state["fc.weight.absmax"][:-1]})
    bad_meta = torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocksize"):
        load_nf4("fc", {**state, "fc.weight.quant_state.bitsandbytes__nf4": bad_meta})


# ----------------------------------------------------------------------------------------------------------------
# module swap and state dicts
# ----------------------------------------------------------------------------------------------------------------


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 192, bias=False)),
                          nn.Linear(192, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


@pytest.mark.parametrize("fmt", ["int8", "nf4", "df11"])
def test_quantize_model_swaps_and_matches_reference(fmt):
    model = _toy_model()
    x = torch.randn(5, 128)
    ref = model(x)
    qmodel = quantize_model(_toy_model(), fmt, filter_fn=lambda module, name: name != "3")
    cls = {"int8": Int8Linear, "nf4": NF4Linear, "df11": DF11Linear}[fmt]
    assert isinstance(qmodel[0], cls) and isinstance(qmodel[2][0], cls) and isinstance(qmodel[3], nn.Linear)
    assert qmodel[2][0].bias is None and qmodel[0].bias is not None
    # each quantized Linear equals F.linear with its dequantized weight
    lin = _toy_model()[0]
    x0 = torch.randn(3, 128)
    if fmt == "int8":
        w = int8.dequantize(qmodel[0].weights())
    elif fmt == "nf4":
        w = nf4.dequantize(qmodel[0].weights(), torch.float32)
    else:
        w = qmodel[0].decode().float()
        assert torch.equal(w, lin.weight.to(torch.bfloat16).float())
    torch.testing.assert_close(qmodel[0](x0), F.linear(x0, w, lin.bias), rtol=1e-5, atol=1e-5)
    out = qmodel(x)
    tol = {"int8": 0.02, "nf4": 0.15, "df11": 0.01}[fmt]
    assert (out - ref).norm() / ref.norm() < tol
    # the state dict round-trips through a freshly swapped model
    state = qmodel.state_dict()
    fresh = quantize_model(_toy_model(), fmt, filter_fn=lambda module, name: name != "3")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_state_dict_keys_are_bitsandbytes_and_dfloat11():
    keys = set(quantize_model(_toy_model(), "int8").state_dict())
    assert {"0.weight", "0.SCB", "0.weight_format", "0.bias", "2.0.weight", "2.0.SCB"} <= keys
    keys = set(quantize_model(_toy_model(), "nf4").state_dict())
    assert {"0.weight", "0.weight.absmax", "0.weight.quant_map", "0.weight.quant_state.bitsandbytes__nf4",
            "0.bias"} <= keys
    keys = set(quantize_model(_toy_model(), "df11").state_dict())
    assert {f"0.{k}" for k in ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps",
                               "split_positions", "bias")} <= keys


def test_nf4_linear_loads_double_quant_checkpoint():
    w = gaussian(64, 128)
    state = nf4_state("fc", w, double_quant=True)
    state["fc.bias"] = torch.zeros(64)
    model = nn.Module()
    model.fc = NF4Linear(128, 64)
    model.load_state_dict(state)
    expected = nf4.dequantize(load_nf4("fc", state), torch.float32)
    torch.testing.assert_close(nf4.dequantize(model.fc.weights(), torch.float32), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*fc\.weight\.bogus"):
        model.load_state_dict({**state, "fc.weight.bogus": torch.zeros(1)})


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize_model(_toy_model(), "int4")
    with pytest.raises(ValueError, match="'0'"):
        quantize_model(nn.Sequential(nn.Linear(100, 8)), "nf4")


# ----------------------------------------------------------------------------------------------------------------
# DFloat11
# ----------------------------------------------------------------------------------------------------------------


def skewed_bf16(n: int, seed: int = 0) -> torch.Tensor:
    """normal * 0.02 with a few outliers (huge, tiny, subnormal, zero): long Huffman codes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.02
    idx = torch.randint(0, n, (12,), generator=g)
    w[idx] = torch.tensor([300.0, -5e4, 1e-30, 3e-39, 0.0, -0.0, 1e10, 7e-20, 2.0, -1.0, 1e-8, 6e30])
    return w.to(torch.bfloat16)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def fibonacci_counts() -> tuple[np.ndarray, np.ndarray]:
    """A histogram whose unlimited Huffman code is 40+ bits deep (exercises the 32-bit limit and 4 LUT levels)."""
    fib = [1, 2]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    symbols = np.arange(90, 130)
    counts = np.zeros(256, dtype=np.int64)
    counts[symbols] = fib
    return counts, symbols


def bf16_from_fields(exps: np.ndarray, seed: int = 0) -> torch.Tensor:
    sm = np.random.default_rng(seed).integers(0, 256, exps.size).astype(np.uint16)
    words = ((sm & 0x80) << 8) | (exps.astype(np.uint16) << 7) | (sm & 0x7F)
    return torch.from_numpy(words.view(np.int16)).view(torch.bfloat16)


def sequential_decode(buffers: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Independent check of the layout: walk the bitstream from bit 0 with the tables; (exponents, code starts)."""
    luts = buffers["luts"].numpy()
    bits = np.unpackbits(np.concatenate([buffers["encoded_exponent"].numpy(), np.zeros(4, np.uint8)]))
    n = buffers["sign_mantissa"].numel()
    exps, starts, p = np.zeros(n, np.int64), np.zeros(n, np.int64), 0
    for i in range(n):
        row, level = 0, 0
        while True:
            byte = int(np.packbits(bits[p + 8 * level: p + 8 * level + 8])[0])
            d = int(luts[row, byte])
            if d < 240:
                break
            row, level = 256 - d, level + 1
        exps[i], starts[i] = d, p
        p += int(luts[-1, d])
    return exps, starts


def test_df11_buffers_follow_the_layout():
    w = skewed_bf16(50_000)
    b = compress_units([w.reshape(250, 200)])
    assert set(b) == {"luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps", "split_positions"}
    assert all(t.dtype == torch.uint8 for k, t in b.items() if k != "split_positions")
    assert b["split_positions"].dtype == torch.int64 and b["split_positions"].numel() == 0
    n_luts = b["luts"].shape[0]
    assert b["luts"].shape == (n_luts, 256) and 3 <= n_luts <= 18
    assert b["luts"][-1].max() > 8  # codes longer than one table level
    n_blocks = math.ceil(b["encoded_exponent"].numel() / 4096)
    assert n_blocks > 1
    pos = b["output_positions"].numpy().view(np.uint32)
    assert pos.size == n_blocks + 1 and pos[-1] == w.numel()
    assert b["gaps"].numel() == math.ceil(n_blocks * 512 * 5 / 8)
    # the independent sequential decoder agrees with the stored positions and gaps
    exps, starts = sequential_decode(b)
    u = w.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(exps, (u >> 7) & 0xFF)
    assert np.array_equal(b["sign_mantissa"].numpy(), ((u >> 8) & 0x80) | (u & 0x7F))
    windows = np.arange(n_blocks * 512) * 64
    first = np.searchsorted(starts, windows)
    assert np.array_equal(pos[:-1], first[::512])
    gaps = np.unpackbits(b["gaps"].numpy())[: 5 * windows.size].reshape(-1, 5) @ np.array([16, 8, 4, 2, 1])
    live = first < w.numel()
    assert np.array_equal(gaps[live], starts[first[live]] - windows[live])
    # ~11 bits per weight for normal weights
    assert 0.6 < compression_ratio(b) < 0.75


def test_df11_roundtrip_skewed():
    w = skewed_bf16(100_000, seed=1).reshape(400, 250)
    (out,) = decompress_unit(compress_units(w), [w.shape])
    assert_bits_equal(out, w)


def test_df11_roundtrip_three_weights():
    ws = [skewed_bf16(6_000, seed=2).reshape(60, 100), skewed_bf16(777, seed=3),
          skewed_bf16(9_000, seed=4).reshape(3, 3000)]
    b = compress_units(ws)
    assert b["split_positions"].tolist() == [6_000, 6_777]
    outs = decompress_unit(b, [w.shape for w in ws])
    for o, w in zip(outs, ws):
        assert_bits_equal(o, w)


def test_df11_all_same_exponent():
    g = torch.Generator().manual_seed(0)
    w = ((1 + 0.9 * torch.rand(20_000, generator=g)) * torch.randn(20_000, generator=g).sign()).to(torch.bfloat16)
    assert len(set(((w.view(torch.int16).numpy().view(np.uint16) >> 7) & 0xFF).tolist())) == 1
    b = compress_units(w)
    assert (b["luts"][-1] > 0).sum() == 2  # the exponent and the end-of-stream symbol, 1 bit each
    assert_bits_equal(decompress_unit(b)[0], w)


def test_df11_long_codes_and_length_limit():
    counts, symbols = fibonacci_counts()
    assert dfloat11._huffman_depths(counts[symbols]).max() > 32
    lengths = dfloat11.huffman_code_lengths(counts)
    assert lengths.max() == 32 and np.isclose((2.0 ** -lengths[lengths > 0]).sum(), 1.0)
    exps = np.random.default_rng(0).choice(symbols, 20_000)
    w = bf16_from_fields(exps)
    b = compress_units([w[:12_000], w[12_000:]], counts=counts)
    assert b["luts"][-1].max() == 32 and b["luts"].shape[0] >= 5  # root + sub-tables on 3 levels + lengths
    assert_bits_equal(torch.cat(decompress_unit(b)), w)


@pytest.mark.parametrize("n", [1, 2, 7, 9, 4095, 4096 * 8 + 3])
def test_df11_small_and_unaligned(n):
    w = skewed_bf16(max(n, 16), seed=n)[:n]
    assert_bits_equal(decompress_unit(compress_units(w))[0], w)


def test_df11_rejects_unencodable():
    with pytest.raises(ValueError, match="240"):
        compress_units(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="240"):
        compress_units(torch.tensor([1.0, 2.0**120], dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bf16"):
        compress_units(torch.zeros(4))
    with pytest.raises(ValueError, match="non-zero"):
        compress_units(torch.ones(4, dtype=torch.bfloat16), counts=np.ones(256) * (np.arange(256) < 100))


def test_df11_pattern_units():
    names = [f"layers.{i}.{m}.weight" for i in range(2) for m in ("attn.q", "attn.k", "mlp.up")]
    names += ["embed.weight", "layers.0.norm.weight", "head.weight"]
    pattern = {r"layers\.\d+": ["attn.q", "attn.k", "mlp.up"], r"embed": []}
    units = df11_pattern_units(names, pattern)
    assert list(units) == ["layers.0", "layers.1", "embed"]
    assert units["layers.1"] == ["layers.1.attn.q.weight", "layers.1.attn.k.weight", "layers.1.mlp.up.weight"]
    assert units["embed"] == ["embed.weight"]
    with pytest.raises(ValueError, match="mlp.down"):
        df11_pattern_units(names, {r"layers\.\d+": ["mlp.down"]})
    cfg = df11_config(pattern)
    assert cfg["threads_per_block"] == [512] and cfg["bytes_per_thread"] == 8 and cfg["pattern_dict"] == pattern
