"""Fuzzing the loaders: generated corruptions of the four tiny checkpoint formats (bf16, int8, nf4, df11).

Each case copies a pristine checkpoint (hard links; a damaged file is always rewritten, never edited in place),
damages it one way, loads it and, when it loads, runs a tiny text-to-image request. What each case must end in:

* ``error``: a :class:`bagel_rt.BagelError` whose one-line message names the damaged file (or key);
* ``harmless``: the damage provably changes nothing: it loads and gives the pristine image bit for bit;
* ``nonfinite``: NaN/Inf planted in a tensor the image depends on: the request raises ``NonFiniteError`` and
  ``info --verify`` names the tensor;
* ``planted``: NaN/Inf somewhere a text-to-image request may not reach: ``info --verify`` names the tensor and
  the request either succeeds or raises ``NonFiniteError``;
* ``any``: damage no structure check can see (bit flips in the data): a clean error or a load, nothing else.

Each case also runs ``bagel-rt info``'s reader (:func:`bagel_rt.info.checkpoint_info`): a report or a clean error.

Never a traceback (any other exception) and never a hang (each case runs under a timer; a hang in C code that
the timer cannot interrupt is caught by faulthandler, which ends the run).
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import bagel_rt
from bagel_rt.convert import convert_checkpoint
from bagel_rt.errors import BagelError, NonFiniteError
from bagel_rt.info import checkpoint_info
from bagel_rt.tiny import write_tiny_checkpoint
from bagel_rt.verify import verify_checkpoint

FORMATS = ("bf16", "int8", "nf4", "df11")
CASE_SECONDS = 20  # a case that takes longer is a hang
GEN_LINEAR = "language_model.model.layers.0.mlp_moe_gen.gate_proj"  # quantized in every format (in_features 64)


# -- raw safetensors editing ----------------------------------------------------------------------------------
def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def join(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def rewrite(path: Path, data: bytes) -> None:
    """Replace the file (the copies are hard links: editing in place would damage the pristine one)."""
    path.unlink()
    path.write_bytes(data)


def edit_header(path: Path, change) -> None:
    header, data = split(path)
    change(header)
    rewrite(path, join(header, data))


def edit_bytes(path: Path, key: str, change) -> None:
    """Apply ``change(bytearray of the tensor's bytes)`` in place of tensor ``key``'s data."""
    header, data = split(path)
    a, b = header[key]["data_offsets"]
    buf = bytearray(data)
    part = bytearray(buf[a:b])
    change(part)
    assert len(part) == b - a
    buf[a:b] = part
    rewrite(path, join(header, bytes(buf)))


def replace_tensors(path: Path, new: dict[str, torch.Tensor]) -> None:
    header, _ = split(path)
    tensors = load_file(str(path))
    tensors.update(new)
    path.unlink()
    save_file(tensors, str(path), metadata=header.get("__metadata__"))


def plant(path: Path, key: str, value: float) -> None:
    """Set the first element of the float tensor ``key`` to ``value`` (NaN or Inf)."""
    header, _ = split(path)
    dtype = header[key]["dtype"]
    t = torch.tensor([value], dtype={"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[dtype])
    word = t.view(torch.uint8).numpy().tobytes()
    edit_bytes(path, key, lambda b: b.__setitem__(slice(0, len(word)), word))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    rewrite(path, json.dumps(data).encode())


# -- the cases ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    fmt: str
    name: str
    damage: object  # callable(checkpoint dir)
    expect: str  # error | harmless | nonfinite | planted | any
    names: tuple[str, ...] = ()  # the error message must contain one of these
    key: str | None = None  # planted: the tensor verify must name


def weights_file(fmt: str) -> str:
    return "model.safetensors" if fmt == "df11" else "ema.safetensors"


def vae_file(fmt: str) -> str:
    return "vae/ae.safetensors" if fmt == "df11" else "ae.safetensors"


def header_cases(fmt: str, rel: str, header: dict, rng: random.Random) -> list[Case]:
    """Structural damage of one safetensors file: lengths, JSON, entries, offsets, dtypes, shapes, metadata."""
    file = Path(rel).name
    keys = sorted(k for k in header if k != "__metadata__")
    cases = []

    def add(name, damage, expect="error"):
        cases.append(Case(fmt, f"{rel}: {name}", damage, expect, (file,)))

    def hdr(change):
        return lambda d: edit_header(d / rel, change)

    def entry(key, field, value):
        return hdr(lambda h: h[key].__setitem__(field, value))

    for frac in (0.0, 0.001, 0.3, 0.7, 0.9999):
        add(f"truncated at {frac:.2%}", lambda d, frac=frac: rewrite(
            d / rel, (d / rel).read_bytes()[: int((d / rel).stat().st_size * frac)]))
    add("one byte appended", lambda d: rewrite(d / rel, (d / rel).read_bytes() + b"\0"))
    for delta in (-1, 1, -8, 8):
        def length(d, delta=delta):
            raw = (d / rel).read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            rewrite(d / rel, struct.pack("<Q", n + delta) + raw[8:])
        add(f"header length {delta:+d}", length)
    for n in (0, 2**63, 2**64 - 1):
        add(f"header length {n}", lambda d, n=n: rewrite(
            d / rel, struct.pack("<Q", n) + (d / rel).read_bytes()[8:]))
    deep = ("[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000)
    for text in ("[]", "5", "null", '"x"', "{", *deep):
        add(f"header {text[:12]!r}", lambda d, text=text: rewrite(d / rel, join(text, split(d / rel)[1])))
    def not_utf8(d):
        raw = bytearray((d / rel).read_bytes())
        raw[9:13] = b"\xff\xfe\xff\xfe"
        rewrite(d / rel, bytes(raw))
    add("header bytes not UTF-8", not_utf8)
    k1, k2, k3 = rng.sample(keys, 3)
    for value in ("ab", [None, None], {"a": 1}, [1], [1, 2, 3], [-1, 0], [0.0, 2.0], [True, False], None):
        add(f"{k1} data_offsets {value!r}", entry(k1, "data_offsets", value))

    def reverse(h, k=k2):
        h[k]["data_offsets"] = h[k]["data_offsets"][::-1]
    add(f"{k2} data_offsets reversed", hdr(reverse))

    def shift(h, k=k2, by=1):
        a, b = h[k]["data_offsets"]
        h[k]["data_offsets"] = [a + by, b + by]
    add(f"{k2} data_offsets shifted by one", hdr(shift))
    add(f"{k2} data_offsets shifted by -1", hdr(lambda h: shift(h, by=-1)))

    # two neighbours of different sizes swap offsets (same-size tensors swapped would be a valid file)
    ordered = sorted(keys, key=lambda k: header[k]["data_offsets"])
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys}
    ka, kb = next((a, b) for a, b in zip(ordered, ordered[1:]) if size[a] != size[b])

    def swap(h):
        h[ka]["data_offsets"], h[kb]["data_offsets"] = h[kb]["data_offsets"], h[ka]["data_offsets"]
    add(f"{ka} and {kb} data_offsets swapped", hdr(swap))
    for value in ("BF17", 5, None, "F64", "I64", "bf16"):
        add(f"{k3} dtype {value!r}", entry(k3, "dtype", value))
    for value in ("x", [-1], [1.5], [2**40, 2**40], [None], [[1]], [1] * 9):
        add(f"{k3} shape {value!r}", entry(k3, "shape", value))
    for value in (5, "x", None, []):
        add(f"{k1} entry {value!r}", hdr(lambda h, v=value: h.__setitem__(k1, v)))
    add(f"{k2} removed", lambda d: replace_tensors_without(d / rel, k2))
    add(f"{k2} renamed", lambda d: rename_tensor(d / rel, k2, k2 + "_x"))
    add("extra tensor", lambda d: replace_tensors(d / rel, {"extra.weight": torch.zeros(2)}))
    for meta in ("str", 5, [1], {"a": 5}, {"a": None}, {"a": {"b": "c"}}):
        add(f"metadata {meta!r}", hdr(lambda h, m=meta: h.__setitem__("__metadata__", m)))
    # provably harmless: an extra metadata entry, and the entries in another order
    cases.append(Case(fmt, f"{rel}: extra metadata entry", hdr(lambda h: h.setdefault("__metadata__", {}).update(
        {"note": "x"})), "harmless"))
    cases.append(Case(fmt, f"{rel}: header entries reordered", hdr(lambda h: _reorder(h, rng.random())),
                      "harmless"))
    return cases


def _reorder(h: dict, r: float) -> None:
    items = list(h.items())
    random.Random(r).shuffle(items)
    h.clear()
    h.update(items)


def replace_tensors_without(path: Path, key: str) -> None:
    header, _ = split(path)
    tensors = load_file(str(path))
    del tensors[key]
    path.unlink()
    save_file(tensors, str(path), metadata=header.get("__metadata__"))


def rename_tensor(path: Path, key: str, new: str) -> None:
    edit_header(path, lambda h: h.__setitem__(new, h.pop(key)))


def config_cases(fmt: str) -> list[Case]:
    """Damaged llm_config.json / vit_config.json values and files."""
    cases = []
    llm = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 4096}
    vit = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
           "patch_size": 14, "image_size": 980, "layer_norm_eps": 1e-6}
    for file, fields in (("llm_config.json", llm), ("vit_config.json", vit)):
        for key, good in fields.items():
            if isinstance(good, int):
                bad = [0, -1, 10**9, "8", None, True, 1.5, good * 2]
            else:
                bad = [0, 1e13, "1", None, float("nan"), float("inf"), -good]
            for value in bad:
                # a different but valid size must still be caught (by the strict key/shape check); a valid
                # context length or ViT head count changes no tensor, and t2i does not use the ViT heads
                expect = "error"
                if value == good * 2 and key == "max_position_embeddings":
                    expect = "harmless"
                elif value == good * 2 and (file, key) == ("vit_config.json", "num_attention_heads"):
                    expect = "harmless"
                names = (file, key, weights_file(fmt), "ae.safetensors")
                def set_value(d, f=file, k=key, v=value):
                    edit_json(d / f, lambda j: j.__setitem__(k, v))
                cases.append(Case(fmt, f"{file}: {key} = {value!r}", set_value, expect, names))
            if key not in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "layer_norm_eps"):
                cases.append(Case(fmt, f"{file}: {key} removed",
                                  lambda d, f=file, k=key: edit_json(d / f, lambda j: j.pop(k)), "error", (file,)))
        cases.append(Case(fmt, f"{file}: not an object", lambda d, f=file: rewrite(d / f, b"[1, 2]"), "error",
                          (file,)))
        cases.append(Case(fmt, f"{file}: nested 100000 deep", lambda d, f=file: rewrite(
            d / f, b"[" * 100_000 + b"]" * 100_000), "error", (file,)))
        cases.append(Case(fmt, f"{file}: binary", lambda d, f=file: rewrite(d / f, bytes(range(256))), "error",
                          (file,)))
        cases.append(Case(fmt, f"{file}: a directory", lambda d, f=file: _replace_with_dir(d / f), "error",
                          (file,)))
        cases.append(Case(fmt, f"{file}: a FIFO", lambda d, f=file: _replace_with_fifo(d / f), "error", (file,)))
        cases.append(Case(fmt, f"{file}: missing", lambda d, f=file: (d / f).unlink(), "error", (file,)))
        cases.append(Case(fmt, f"{file}: extra key", lambda d, f=file: edit_json(
            d / f, lambda j: j.__setitem__("comment", "x")), "harmless"))
    cases.append(Case(fmt, "llm_config.json: model_type llama", lambda d: edit_json(
        d / "llm_config.json", lambda j: j.__setitem__("model_type", "llama")), "error", ("llm_config.json",)))
    cases.append(Case(fmt, "vit_config.json: hidden_act relu", lambda d: edit_json(
        d / "vit_config.json", lambda j: j.__setitem__("hidden_act", "relu")), "error", ("vit_config.json",)))
    return cases


def _replace_with_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _replace_with_fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def file_cases(fmt: str) -> list[Case]:
    """Whole files missing, replaced by a directory / FIFO / dangling link / empty file; the tokenizer."""
    cases = []
    for rel in (weights_file(fmt), vae_file(fmt), "tokenizer.json"):
        name = Path(rel).name
        cases.append(Case(fmt, f"{rel}: a directory", lambda d, r=rel: _replace_with_dir(d / r), "error", (name,)))
        cases.append(Case(fmt, f"{rel}: a FIFO", lambda d, r=rel: _replace_with_fifo(d / r), "error", (name,)))
        cases.append(Case(fmt, f"{rel}: empty", lambda d, r=rel: rewrite(d / r, b""), "error", (name,)))
        cases.append(Case(fmt, f"{rel}: dangling symlink", lambda d, r=rel: _dangling(d / r), "error", (name,)))
    cases.append(Case(fmt, f"{weights_file(fmt)}: missing", lambda d: (d / weights_file(fmt)).unlink(), "error",
                      (weights_file(fmt), "config.json", "safetensors")))
    cases.append(Case(fmt, "tokenizer.json: token ids beyond the embedding", lambda d: edit_json(
        d / "tokenizer.json", _shift_added_ids), "error", ("token id",)))
    cases.append(Case(fmt, "tokenizer.json: nested 100000 deep", lambda d: rewrite(
        d / "tokenizer.json", b"[" * 100_000 + b"]" * 100_000), "error", ("tokenizer.json",)))
    cases.append(Case(fmt, "llm_config.json: vocab_size below the tokenizer's ids", lambda d: edit_json(
        d / "llm_config.json", lambda j: j.__setitem__("vocab_size", 300)), "error", ("token id",)))
    return cases


def _dangling(p: Path) -> None:
    p.unlink()
    p.symlink_to(p.parent / "nowhere")


def _shift_added_ids(tok: dict) -> None:
    """One vocabulary id far beyond the 512 rows of the tiny embedding (the token count stays the same)."""
    vocab = tok["model"]["vocab"]
    vocab[sorted(vocab)[7]] = 100_000


def quant_cases(fmt: str) -> list[Case]:
    """Quantization metadata: the declared format and the NF4 block size."""
    rel = "ema.safetensors"
    cases = []

    def meta(key, value):
        return lambda d: edit_header(d / rel, lambda h: h["__metadata__"].__setitem__(key, value))

    for value in ("nf5", "", "INT8", "fp8x"):
        cases.append(Case(fmt, f"format {value!r}", meta("bagel_rt.format", value), "error", (rel,)))
    if fmt == "bf16":
        for value in ("nf4", "int8"):  # labelled quantized, holding bf16
            cases.append(Case(fmt, f"labelled {value}", meta("bagel_rt.format", value), "error", (rel,)))
    else:
        for value in ("0", "abc", "64.0", "-64", "65", "1" * 40, "4096" * 3):
            cases.append(Case(fmt, f"blocksize {value!r}", meta("bagel_rt.blocksize", value), "error", (rel,)))
        other = "int8" if fmt == "nf4" else "nf4"
        cases.append(Case(fmt, f"labelled {other}", meta("bagel_rt.format", other), "error", (rel,)))
        cases.append(Case(fmt, "labelled bf16", meta("bagel_rt.format", "bf16"), "error", (rel,)))
    return cases


def df11_cases() -> list[Case]:
    """The DFloat11 layout: config.json's dfloat11_config, and the buffers of one compressed unit."""
    fmt, rel, cfg = "df11", "model.safetensors", "config.json"
    unit = "language_model.model.layers.0"
    cases = []

    def conf(change):
        return lambda d: edit_json(d / cfg, lambda j: change(j["dfloat11_config"]))

    for value in ("0.6.0", "0.1.0", 5, None, "0.5.0; rm -rf"):
        cases.append(Case(fmt, f"version {value!r}", conf(lambda c, v=value: c.__setitem__("version", v)),
                          "error", (cfg,)))
    patterns = ["(", "(.*.*)*X", "a|b", ".*", "language_model\\.model\\.layers\\.(\\d+)+", "x" * 300, "", "\\w+"]
    for p in patterns:
        def bad_pattern(c, p=p):
            c["pattern_dict"][p] = ["mlp.fc1"]
        cases.append(Case(fmt, f"pattern {p[:20]!r}", conf(bad_pattern), "error", (cfg,)))
    for value in (None, [], {}, {"a": 5}, "x"):
        cases.append(Case(fmt, f"pattern_dict {value!r}",
                          conf(lambda c, v=value: c.__setitem__("pattern_dict", v)), "error", (cfg,)))
    cases.append(Case(fmt, "threads_per_block 256", conf(lambda c: c.__setitem__("threads_per_block", [256])),
                      "error", (cfg,)))
    cases.append(Case(fmt, "bytes_per_thread '8'", conf(lambda c: c.__setitem__("bytes_per_thread", "8")),
                      "error", (cfg,)))
    cases.append(Case(fmt, "dfloat11_config a list", lambda d: edit_json(
        d / cfg, lambda j: j.__setitem__("dfloat11_config", [])), "error", (cfg,)))
    cases.append(Case(fmt, "config.json a directory", lambda d: _replace_with_dir(d / cfg), "error", (cfg,)))
    cases.append(Case(fmt, "config.json a FIFO", lambda d: _replace_with_fifo(d / cfg), "error", (cfg,)))

    def buf(b, change, expect="error"):
        return Case(fmt, f"{unit}.{b}: {change.__name__}", lambda d: edit_bytes(d / rel, f"{unit}.{b}", change),
                    expect, (rel,))

    def pointer_past_table(x):
        x[0] = 240  # table 16: more than the unit has
    def lengths_zeroed(x):
        x[-256:] = bytes(256)
    def length_40(x):
        x[-256:] = bytes([40 if v else 0 for v in x[-256:]])
    def lengths_off_by_one(x):
        x[-256:] = bytes([v + 1 if v else 0 for v in x[-256:]])
    def root_points_to_itself(x):
        x[5] = 255  # table 1 ... and 1 -> 1 below
        x[256 + 7] = 255
    def last_position_plus_one(x):
        v = struct.unpack("<I", x[-4:])[0]
        x[-4:] = struct.pack("<I", v + 1)
    def position_2_31_plus_7(x):
        x[-4:] = struct.pack("<I", 2**31 + 7)
    def first_position_nonzero(x):
        x[:4] = struct.pack("<I", 3)
    def split_changed(x):
        x[:8] = struct.pack("<q", struct.unpack("<q", x[:8])[0] + 1)

    for change in (pointer_past_table, lengths_zeroed, length_40, lengths_off_by_one):
        cases.append(buf("luts", change))
    cases.append(buf("luts", root_points_to_itself))
    for change in (last_position_plus_one, position_2_31_plus_7, first_position_nonzero):
        cases.append(buf("output_positions", change))
    cases.append(buf("split_positions", split_changed))

    def halve(d, b):
        t = load_file(str(d / rel))[f"{unit}.{b}"]
        replace_tensors(d / rel, {f"{unit}.{b}": t[: t.shape[0] // 2].clone()})
    for b in ("encoded_exponent", "gaps", "output_positions", "luts"):
        cases.append(Case(fmt, f"{unit}.{b}: halved", lambda d, b=b: halve(d, b), "error", (rel,)))
    rng = random.Random(11)
    for i in range(12):  # bit flips in the bitstream: often caught by the hand-over checks, never a crash
        bit = rng.randrange(1 << 20)
        cases.append(Case(fmt, f"{unit}.encoded_exponent: bit flip {i}", lambda d, bit=bit: edit_bytes(
            d / rel, f"{unit}.encoded_exponent", lambda x, bit=bit: _flip(x, bit)), "any"))
    for i in range(4):
        bit = rng.randrange(1 << 20)
        cases.append(Case(fmt, f"{unit}.gaps: bit flip {i}", lambda d, bit=bit: edit_bytes(
            d / rel, f"{unit}.gaps", lambda x, bit=bit: _flip(x, bit)), "any"))
    return cases


def _flip(x: bytearray, bit: int) -> None:
    i = (bit // 8) % len(x)
    x[i] ^= 1 << (bit % 8)


def nonfinite_cases(fmt: str) -> list[Case]:
    """NaN/Inf planted in tensors: where the image depends on them, and elsewhere."""
    w, a = weights_file(fmt), vae_file(fmt)
    sure = [(a, "decoder.conv_out.weight"), (a, "decoder.conv_in.weight"), (w, "llm2vae.bias"),
            (w, "language_model.model.norm_moe_gen.weight")]
    if fmt == "bf16":
        sure.append((w, f"{GEN_LINEAR}.weight"))
    elif fmt == "int8":
        sure.append((w, f"{GEN_LINEAR}.SCB"))
    elif fmt == "nf4":
        sure.append((w, f"{GEN_LINEAR}.weight.absmax"))
    elsewhere = [(w, "vit_pos_embed.pos_embed"), (w, "connector.fc1.bias")]
    cases = []
    for i, (rel, key) in enumerate(sure + elsewhere):  # NaN everywhere, Inf in every other one
        for value in (float("nan"), float("inf"))[: 1 + i % 2]:
            cases.append(Case(fmt, f"{rel}: {key} = {value}", lambda d, r=rel, k=key, v=value: plant(d / r, k, v),
                              "nonfinite" if (rel, key) in sure else "planted", (), key))
    rng = random.Random(fmt)
    key = "language_model.model.layers.0.sign_mantissa" if fmt == "df11" else f"{GEN_LINEAR}.weight"
    for i in range(2):  # bit flips in weight data: no structure to check, but never a crash
        bit = rng.randrange(1 << 20)
        cases.append(Case(fmt, f"{w}: bit flip {i} in {key}", lambda d, bit=bit: edit_bytes(
            d / w, key, lambda x: _flip(x, bit)), "any"))
    return cases


def all_cases(roots: dict[str, Path]) -> list[Case]:
    cases = []
    for fmt in FORMATS:
        rng = random.Random(f"fuzz-{fmt}")
        # int8 and nf4 carry bf16's ae.safetensors unchanged, read by the same code: its damage is tried on bf16
        for rel in (weights_file(fmt), vae_file(fmt)) if fmt in ("bf16", "df11") else (weights_file(fmt),):
            cases += header_cases(fmt, rel, split(roots[fmt] / rel)[0], rng)
        cases += file_cases(fmt) + nonfinite_cases(fmt)
        if fmt != "df11":
            cases += quant_cases(fmt)
    cases += config_cases("bf16")  # the configs are read before (and apart from) the weights, in every format
    cases += df11_cases()
    return cases


# -- running one case -----------------------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def request(pipe):
    return pipe.generate("a red bagel", image_shapes=(16, 16), num_timesteps=2, seed=1)


def run_case(case: Case, root: Path, work: Path) -> tuple[str, str]:
    """(outcome, detail): outcome in error / loaded / nonfinite / traceback / hang."""
    d = work / "ck"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(root, d, copy_function=os.link)
    case.damage(d)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        try:
            checkpoint_info(d)  # bagel-rt info reads the same headers and configs: a clean error or a report
        except BagelError:
            pass
        pipe = bagel_rt.load(d, device="cpu")
        try:
            image = request(pipe).image
        except NonFiniteError as e:
            return "nonfinite", str(e)
        return "loaded", hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
    except _Hang:
        return "hang", f"more than {CASE_SECONDS} s"
    except BagelError as e:
        return "error", str(e)
    except Exception as e:  # noqa: BLE001 - anything else is what this test exists to find
        return "traceback", f"{type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- the test -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz")
    roots = {"bf16": write_tiny_checkpoint(base / "bf16")}
    for fmt in ("int8", "nf4", "df11"):
        roots[fmt] = convert_checkpoint(roots["bf16"], base / fmt, fmt, progress=False)
    return roots


@pytest.fixture
def one_thread():
    """The tiny model's ops are far too small for two threads: on a busy 2-core machine the second thread's
    spinning made each case 10x slower (0.28 s against 3.9 s measured for one load and request)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fuzz_corrupt_checkpoints(roots, tmp_path, one_thread):
    cases = all_cases(roots)
    assert len(cases) >= 300
    pristine = {fmt: run_case(Case(fmt, "pristine", lambda d: None, "harmless"), roots[fmt], tmp_path)
                for fmt in FORMATS}
    assert all(o == "loaded" for o, _ in pristine.values()), pristine
    faulthandler.dump_traceback_later(20 * 60, exit=True)  # a hang the timer cannot interrupt ends the run
    t0 = time.perf_counter()
    outcomes, failures = Counter(), []
    try:
        for case in cases:
            outcome, detail = run_case(case, roots[case.fmt], tmp_path)
            outcomes[(case.fmt, outcome)] += 1
            problem = _judge(case, outcome, detail, pristine[case.fmt][1], tmp_path / "ck")
            if problem:
                failures.append(f"[{case.fmt}] {case.name}: {problem}")
    finally:
        faulthandler.cancel_dump_traceback_later()
    seconds = time.perf_counter() - t0
    summary = {fmt: {o: n for (f, o), n in sorted(outcomes.items()) if f == fmt} for fmt in FORMATS}
    expected = Counter(c.expect for c in cases)
    print(f"\nfuzz: {len(cases)} corruptions in {seconds:.1f} s; outcomes {json.dumps(summary)}; "
          f"expected {json.dumps(dict(expected))}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])


def _judge(case: Case, outcome: str, detail: str, pristine: str, ck: Path) -> str | None:
    """Why the case's outcome is wrong, or None."""
    if outcome in ("traceback", "hang"):
        return f"{outcome}: {detail}"
    if outcome == "error" and "\n" in detail:
        return f"a multi-line error: {detail!r}"
    if case.expect == "any":
        return None
    if case.expect == "error":
        if outcome != "error":
            return f"expected a clean error, got {outcome}"
        if case.names and not any(n in detail for n in case.names):
            return f"the error does not name {' or '.join(case.names)}: {detail}"
        return None
    if case.expect == "harmless":
        return None if (outcome, detail) == ("loaded", pristine) else f"expected the pristine image, got {outcome}"
    found = [p["key"] for p in verify_checkpoint(ck)["problems"]]
    if found != [case.key]:
        return f"info --verify reports {found}, expected [{case.key!r}]"
    if case.expect == "nonfinite" and outcome != "nonfinite":
        return f"expected NonFiniteError, got {outcome}: {detail[:200]}"
    if case.expect == "planted" and outcome not in ("loaded", "nonfinite"):
        return f"expected a load, got {outcome}: {detail[:200]}"
    return None
