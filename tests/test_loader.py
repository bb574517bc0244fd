"""Loading: configs with the reference overrides, strict key checks, and one-line errors for bad input."""

import json
import shutil

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file, save_file

import bagel_rt
from bagel_rt.checkpoint import read_header
from bagel_rt.errors import CheckpointError
from bagel_rt.loader import read_params
from bagel_rt.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny, dst)
    return dst


def test_params_follow_reference_overrides():
    p = read_params(GOLDEN / "tiny-a")
    assert p.vit.num_layers == 2  # vit_config.json says 3; one fewer is used
    assert (p.llm.hidden_size, p.llm.num_layers, p.llm.num_heads, p.llm.num_kv_heads) == (64, 2, 4, 2)
    assert (p.vae.ch, p.vae.ch_mult, p.vae.num_res_blocks) == (32, (1, 2, 2, 2), 2)


def test_full_size_key_count():
    """The 7B configuration has exactly the reference's 1223 tensors and 14,607,260,128 parameters."""
    from bagel_rt.config import CONFIGS
    from bagel_rt.model import BagelModel, SpecialTokens

    with torch.device("meta"):
        m = BagelModel(CONFIGS["bagel-7b-mot"], SpecialTokens(0, 1, 2, 3))
    sd = m.state_dict()
    assert len(sd) == 1223
    assert sum(v.numel() for v in sd.values()) == 14_607_260_128


def test_loads_on_requested_dtype(tiny):
    pipe = bagel_rt.load(tiny, device="cpu", dtype=torch.float32)
    assert pipe.model.dtype == torch.float32
    assert next(pipe.vae.parameters()).dtype == torch.float32


def _err(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        bagel_rt.load(path, device="cpu")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_directory(tmp_path):
    _err(tmp_path / "nope", "directory not found")


def test_file_instead_of_directory(tiny):
    _err(tiny / "ema.safetensors", "is a file")


def test_missing_file(copy):
    (copy / "ema.safetensors").unlink()
    _err(copy, r"ema\.safetensors: file not found")


def test_truncated_file(copy):
    f = copy / "ema.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _err(copy, "truncated")


def test_corrupt_header(copy):
    f = copy / "ae.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 100)
    _err(copy, r"ae\.safetensors: corrupt safetensors header")


def test_not_safetensors(copy):
    (copy / "ema.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 3)
    _err(copy, "not a safetensors file")


def test_wrong_shapes_are_named(copy):
    cfg = json.loads((copy / "llm_config.json").read_text())
    cfg["intermediate_size"] = 96
    (copy / "llm_config.json").write_text(json.dumps(cfg))
    msg = _err(copy, "wrong shape")
    assert "language_model.model.layers.0.mlp.gate_proj.weight: file [160, 64], expected [96, 64]" in msg


def test_missing_and_unexpected_keys_are_listed(copy):
    sd = load_file(copy / "ema.safetensors")
    sd.pop("llm2vae.bias")
    sd["extra.thing"] = torch.zeros(2, dtype=torch.bfloat16)
    save_file(sd, copy / "ema.safetensors")
    msg = _err(copy, "1 missing: llm2vae.bias")
    assert "1 unexpected: extra.thing" in msg


def test_non_float_weights(copy):
    sd = load_file(copy / "ema.safetensors")
    sd["llm2vae.weight"] = sd["llm2vae.weight"].to(torch.int8)
    save_file(sd, copy / "ema.safetensors")
    _err(copy, "not a float dtype: llm2vae.weight: I8")


def test_other_model_directory(copy):
    cfg = json.loads((copy / "llm_config.json").read_text())
    cfg["model_type"] = "llama"
    (copy / "llm_config.json").write_text(json.dumps(cfg))
    _err(copy, "model_type is 'llama', expected 'qwen2'")


def test_other_weights_file(copy, tmp_path):
    save_file({"model.layers.0.weight": torch.zeros(4, 4)}, copy / "ema.safetensors")
    _err(copy, "does not hold a BAGEL model")


def test_bad_json(copy):
    (copy / "vit_config.json").write_text("{ nope")
    _err(copy, r"vit_config\.json: not valid JSON")


def test_tokenizer_without_special_tokens(copy):
    tj = json.loads((copy / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|vision_end|>"]
    (copy / "tokenizer.json").write_text(json.dumps(tj))
    _err(copy, "special token '<\\|vision_end\\|>' is missing")


def test_no_tokenizer(copy):
    (copy / "tokenizer.json").unlink()
    _err(copy, "no tokenizer found")


def test_vocab_merges_fallback_matches_tokenizer_json(copy):
    """vocab.json + merges.txt + tokenizer_config.json give the same ids as tokenizer.json."""
    from bagel_rt.tokenizer import TextTokenizer

    tj = json.loads((copy / "tokenizer.json").read_text())
    ref = TextTokenizer.from_dir(copy)
    (copy / "vocab.json").write_text(json.dumps(tj["model"]["vocab"]))
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    (copy / "merges.txt").write_text("\n".join(merges) + "\n")
    added = {str(t["id"]): {"content": t["content"], "special": True} for t in tj["added_tokens"]}
    (copy / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    (copy / "tokenizer.json").unlink()
    fb = TextTokenizer.from_dir(copy)
    assert fb.special == ref.special
    for text in ["A red bagel on a white plate.", "Two dogs play in the park!", "<|im_start|>x<|im_end|>"]:
        assert fb.encode(text) == ref.encode(text)
    ids = ref.frame("The quick brown fox")
    assert fb.decode(ids) == ref.decode(ids)


def test_header_reader_counts(tiny):
    h = read_header(tiny / "ema.safetensors")
    assert h.metadata.get("bagel_rt.format") == "bf16"
    assert all(t.dtype == "BF16" for t in h.tensors.values())


def test_loaded_parameters_need_no_grad(tiny):
    """Inference only: autograd must never record (it kept 17 GiB alive in a 1024^2 edit's VAE encode)."""
    pipe = bagel_rt.load(tiny, device="cpu")
    assert not any(p.requires_grad for p in pipe.model.parameters())
    assert not any(p.requires_grad for p in pipe.vae.parameters())


def _entries(header):
    from bagel_rt.checkpoint import _DTYPES

    return {k: (_DTYPES[i.dtype], i.shape, i.offset, i.nbytes) for k, i in header.tensors.items()}


@pytest.mark.parametrize("chunk, buffers, threads", [(4096, 3, 2), (1000, 2, 1), (1000, 1, 1), (1 << 20, 8, 4)])
def test_streaming_reader_matches_safetensors(tiny, chunk, buffers, threads):
    """The chunked reader (tensors split over chunks, buffers reused round-robin, odd chunk sizes) gives every
    tensor bit for bit, in the file's dtype."""
    from bagel_rt.streaming import stream_tensors

    for name in ("ema.safetensors", "ae.safetensors"):
        h = read_header(tiny / name)
        seen = []
        got = dict(stream_tensors(h.path, _entries(h), torch.device("cpu"), chunk_bytes=chunk,
                                  num_buffers=buffers, num_threads=threads, progress=seen.append))
        ref = load_file(str(h.path))
        assert got.keys() == ref.keys() and sum(seen) == sum(i.nbytes for i in h.tensors.values())
        for k, t in ref.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_stream_tensors_yields_in_file_order_and_can_stop(tiny):
    """The streaming generator hands tensors over in file order as each completes, and a consumer that stops
    early leaves nothing open (the file's memory map is closed, the reader threads are joined)."""
    from bagel_rt.streaming import stream_tensors

    h = read_header(tiny / "ema.safetensors")
    entries = _entries(h)
    keys = [k for k, _ in stream_tensors(h.path, entries, torch.device("cpu"), chunk_bytes=4096, num_buffers=3)]
    assert keys == sorted(entries, key=lambda k: entries[k][2])
    gen = stream_tensors(h.path, entries, torch.device("cpu"), chunk_bytes=4096, num_buffers=3)
    first = [next(gen) for _ in range(3)]
    gen.close()
    ref = load_file(str(h.path))
    assert all(torch.equal(t, ref[k]) for k, t in first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_matches_the_file(tiny):
    """Loading onto the GPU (pinned ring, copy stream) gives the file's values, cast as asked."""
    pipe = bagel_rt.load(tiny, device="cuda", dtype=torch.float16, backend="torch")
    ref = load_file(str(tiny / "ema.safetensors"))
    state = pipe.model.state_dict()
    for k, t in ref.items():
        assert state[k].is_cuda and torch.equal(state[k].cpu(), t.to(torch.float16)), k
    vae = load_file(str(tiny / "ae.safetensors"))
    for k, t in pipe.vae.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t.cpu(), vae[k]), k
