"""The ``bagel-rt`` command line, through click's runner, on the tiny checkpoint (random weights).

Every image is small (the tiny model is fast, but 1024x1024 is not) and edits use 2 steps, because an edit
input is resized to at least 512 px on its short side.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bagel_rt.cli.main import cli
from click.testing import CliRunner
from PIL import Image

from bagel_rt.checkpoint import read_header
from bagel_rt.tiny import TINY_PARAMS, TINY_VERSION, write_tiny_checkpoint
from bagel_rt.transforms import VAE_RESIZE, resize_dims

SMALL = ("--height", "64", "--width", "96", "--steps", "3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\nstderr: {result.stderr}\n{result.exception!r}"
    return result


def user_error(result, *mentions: str) -> str:
    """Exit code 2 and exactly one stderr line ``error: ...`` naming every one of ``mentions``."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstderr: {result.stderr}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]


def gen(tiny, out, *extra):
    return run("generate", "a red bagel", "--model", tiny, "--no-progress", *SMALL, "-o", out, *extra)


# -- help ---------------------------------------------------------------------------------------------------
def test_console_script_help():
    exe = shutil.which("bagel-rt") or str(Path(sys.executable).with_name("bagel-rt"))
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("generate", "edit", "understand", "init-tiny", "info"):
        assert cmd in r.stdout


def test_generate_help_states_app_defaults():
    text = " ".join(ok(run("generate", "--help")).stdout.split())
    assert "implicit" in text and "1.5" in text and "costs nothing" in text
    assert "[default: 4.0]" in text and "[default: 0.4, 1.0]" in text and "[default: global]" in text
    edit_help = " ".join(ok(run("edit", "--help")).stdout.split())
    assert "[default: 2.0]" in edit_help and "[default: 0.0, 1.0]" in edit_help
    assert "[default: text_channel]" in edit_help


# -- generate -------------------------------------------------------------------------------------------------
def test_generate_writes_png_and_json(tiny, tmp_path):
    out = tmp_path / "cat.png"
    r = ok(gen(tiny, out, "--seed", "7", "--json"))
    d = json.loads(r.stdout)
    assert d["output"] == str(out) and d["seed"] == 7
    assert d["size"] == {"height": 64, "width": 96}
    assert d["think"] is None
    assert d["settings"]["cfg_img_scale"] == 1.5 and d["settings"]["num_timesteps"] == 3
    assert Image.open(out).size == (96, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # no temporary file left behind


def test_generate_taylorseer_json(tiny, tmp_path):
    """--taylorseer: the request's settings say so and --json prints what ran (7 steps: warm-up of 5 full
    evaluations, then a Taylor one; the image-unconditional branch equals the conditional one: not run)."""
    r = ok(run("generate", "a red bagel", "--model", tiny, "--no-progress", "--height", "64", "--width", "96",
               "--steps", "8", "-o", tmp_path / "ts.png", "--seed", "1", "--taylorseer", "--json"))
    d = json.loads(r.stdout)
    assert d["settings"]["enable_taylorseer"] is True
    sc = d["step_cache"]
    assert sc["method"] == "taylorseer" and sc["schedule"]["cond"] == "FFFFFTT"
    assert sc["full_evaluations"] == 5 + sc["schedule"]["text"].count("F")
    plain = json.loads(ok(gen(tiny, tmp_path / "p.png", "--json")).stdout)
    assert "step_cache" not in plain and plain["settings"]["enable_taylorseer"] is False


def test_generate_batch_numbers_the_outputs(tiny, tmp_path):
    """Two prompts, -n 2: four images, prompt-major, seed + k, out.png -> out-0.png ... out-3.png, one JSON line
    each; image k is the image a single run with seed + k writes."""
    out = tmp_path / "out.png"
    r = ok(run("generate", "a red bagel", "two cats", "-n", "2", "--model", tiny, "--no-progress", *SMALL,
               "-o", out, "--seed", "5", "--json"))
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [d["output"] for d in lines] == [str(tmp_path / f"out-{k}.png") for k in range(4)]
    assert [d["seed"] for d in lines] == [5, 6, 7, 8]
    assert [d["settings"]["prompt"] for d in lines] == ["a red bagel"] * 2 + ["two cats"] * 2
    assert lines[3]["batch"] == {"index": 3, "size": 4, "packed": 4}
    ok(run("generate", "two cats", "--model", tiny, "--no-progress", *SMALL, "-o", tmp_path / "one.png",
           "--seed", "7"))
    assert (tmp_path / "out-2.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    assert not (tmp_path / "out.png").exists()
    (tmp_path / "b-1.png").write_bytes(b"precious")  # any numbered output that exists is refused up front
    user_error(gen(tiny, tmp_path / "b.png", "-n", "2"), "b-1.png", "--overwrite")
    assert not (tmp_path / "b-0.png").exists()
    user_error(gen(tiny, tmp_path / "c.png", "-n", "17"), "17")


def test_same_seed_same_bytes(tiny, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    ok(gen(tiny, a, "--seed", "3"))
    r = ok(gen(tiny, b, "--seed", "3"))
    assert r.stdout.strip() == str(b)
    assert a.read_bytes() == b.read_bytes()


def test_default_output_name_and_random_seed(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ok(run("generate", "x", "--model", tiny, "--no-progress", *SMALL, "--json"))
    d = json.loads(r.stdout)
    assert d["output"] == f"bagel-{d['seed']}.png" and (tmp_path / d["output"]).is_file()


def test_existing_output_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    user_error(gen(tiny, out, "--seed", "1"), str(out), "--overwrite")
    assert out.read_bytes() == b"precious"
    ok(gen(tiny, out, "--seed", "1", "--overwrite"))
    assert Image.open(out).size == (96, 64)


def test_generate_think(tiny, tmp_path):
    out = tmp_path / "think.png"
    d = json.loads(ok(gen(tiny, out, "--seed", "2", "--think", "--max-think-tokens", "4", "--json")).stdout)
    assert isinstance(d["think"], str) and d["settings"]["think"] is True
    assert Image.open(out).size == (96, 64)


def test_progress_bars_on_stderr(tiny, tmp_path):
    r = ok(run("generate", "x", "--model", tiny, *SMALL, "--seed", "0", "-o", tmp_path / "p.png"))
    assert "denoising" in r.stderr
    assert r.stdout.strip() == str(tmp_path / "p.png")


def test_aspect_preset_and_jpeg(tiny, tmp_path):
    # --aspect alone is validated without running 1024-px images: conflicting size options fail early
    user_error(run("generate", "x", "--model", tiny, "--aspect", "16:9", "--height", "64", "--width", "64"),
               "--aspect")
    out = tmp_path / "x.jpg"
    ok(gen(tiny, out, "--seed", "0"))
    assert Image.open(out).format == "JPEG"


# -- edit and understand --------------------------------------------------------------------------------------
def test_edit_small_input(tiny, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(src)
    out = tmp_path / "edited.png"
    d = json.loads(ok(run("edit", src, "make it blue", "--model", tiny, "--no-progress", "--steps", "2",
                          "--seed", "5", "-o", out, "--json")).stdout)
    w, h = resize_dims(40, 30, *VAE_RESIZE)
    assert Image.open(out).size == (w, h) and d["size"] == {"height": h, "width": w}
    assert d["settings"]["cfg_img_scale"] == 2.0 and d["settings"]["cfg_renorm_type"] == "text_channel"


def test_understand_with_and_without_image(tiny, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (0, 128, 0)).save(src)
    ok(run("understand", src, "What colour is it?", "--model", tiny, "--no-progress", "--max-new-tokens", "5"))
    r = ok(run("understand", "Hello?", "--model", tiny, "--no-progress", "--max-new-tokens", "5", "--json"))
    d = json.loads(r.stdout)
    assert isinstance(d["answer"], str) and 1 <= d["tokens"] <= 5 and d["settings"]["image"] is None


# -- init-tiny and info ---------------------------------------------------------------------------------------
def test_init_tiny_twice(tmp_path):
    d = tmp_path / "t"
    r = ok(run("init-tiny", d, "--seed", "4"))
    assert r.stdout.strip() == str(d) and (d / "ema.safetensors").is_file()
    before = (d / "ema.safetensors").read_bytes()
    user_error(run("init-tiny", d), str(d), "--overwrite")
    ok(run("init-tiny", d, "--seed", "4", "--overwrite"))
    assert (d / "ema.safetensors").read_bytes() == before  # deterministic


def test_info_matches_headers(tiny):
    text = ok(run("info", tiny)).stdout
    assert "bf16" in text and "ema.safetensors" in text and "estimate" in text
    d = json.loads(ok(run("info", tiny, "--json")).stdout)
    assert d["format"] == "bf16"
    headers = [read_header(tiny / name) for name in ("ema.safetensors", "ae.safetensors")]
    numel = sum(math.prod(t.shape) for h in headers for t in h.tensors.values())
    params = d["parameters"]
    assert params["total"] == numel
    assert sum(v for k, v in params.items() if k != "total") == numel
    assert params["vae"] == sum(math.prod(t.shape) for t in headers[1].tensors.values())
    assert params["llm_und"] == params["llm_gen"] > 0
    files = {f["name"]: f for f in d["files"]}
    assert files["ema.safetensors"]["tensors"] == len(headers[0].tensors)
    assert files["ema.safetensors"]["bytes"] == (tiny / "ema.safetensors").stat().st_size
    llm = TINY_PARAMS.llm
    m = d["memory_estimate"]
    assert m["kv_bytes_per_token"] == 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * 2
    assert m["weights_bytes"] == (numel - params["vae"]) * 2 + params["vae"] * 4
    assert d["hyper_parameters"]["llm"]["hidden_size"] == llm.hidden_size


def test_info_counts_quantized_weights(tiny, tmp_path):
    """INT8 and NF4 (bitsandbytes layout) weights count as their logical size; scales count as bytes only."""
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(tiny, tmp_path / "q")
    sd = load_file(d / "ema.safetensors")
    base = "language_model.model.layers.0.mlp"
    w = sd[f"{base}.gate_proj.weight"]  # [N, K]
    n, k = w.shape
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [n, k]})
    sd[f"{base}.gate_proj.weight"] = torch.zeros(((n * k + 1) // 2, 1), dtype=torch.uint8)
    sd[f"{base}.gate_proj.weight.absmax"] = torch.ones(n * k // 64)
    sd[f"{base}.gate_proj.weight.quant_map"] = torch.zeros(16)
    sd[f"{base}.gate_proj.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(state.encode()),
                                                                                dtype=torch.uint8)
    sd[f"{base}.up_proj.weight"] = torch.zeros(sd[f"{base}.up_proj.weight"].shape, dtype=torch.int8)
    sd[f"{base}.up_proj.SCB"] = torch.ones(n)
    sd[f"{base}.up_proj.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    save_file(sd, d / "ema.safetensors", metadata={"bagel_rt.format": "nf4"})
    q = json.loads(ok(run("info", d, "--json")).stdout)
    ref = json.loads(ok(run("info", tiny, "--json")).stdout)
    assert q["format"] == "nf4" and q["format_source"] == "ema.safetensors metadata"
    assert q["parameters"] == ref["parameters"]
    assert q["component_bytes"]["llm_und"] != ref["component_bytes"]["llm_und"]


def test_info_df11_layout(tmp_path):
    d = tmp_path / "df11"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"dfloat11_config": {"version": "0.5.0"}}))
    r = json.loads(ok(run("info", d, "--json")).stdout)
    assert r["format"] == "df11" and r["parameters"] is None
    assert [f["name"] for f in r["files"]] == ["config.json"]


# -- errors: one line, exit code 2 ----------------------------------------------------------------------------
def _broken(tiny: Path, tmp: Path, kind: str) -> Path:
    d = tmp / kind
    if kind == "empty":
        d.mkdir()
        return d
    shutil.copytree(tiny, d)
    if kind == "truncated":
        ema = d / "ema.safetensors"
        ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    elif kind == "wrong_hidden":
        cfg = json.loads((d / "llm_config.json").read_text())
        cfg["hidden_size"] = 2 * cfg["hidden_size"]
        (d / "llm_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("kind, mentions", [
    ("missing", ["missing", "not found"]),
    ("empty", ["llm_config.json", "not found"]),
    ("truncated", ["ema.safetensors", "truncated"]),
    ("wrong_hidden", ["ema.safetensors", "wrong shape", "language_model."]),
])
def test_bad_model_dir(tiny, tmp_path, kind, mentions):
    d = tmp_path / "missing" if kind == "missing" else _broken(tiny, tmp_path, kind)
    user_error(run("generate", "x", "--model", d, "--no-progress", *SMALL, "-o", tmp_path / "o.png"), *mentions)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args, mentions", [
    (["--height", "100", "--width", "64"], ["--height", "100"]),
    (["--cfg-renorm-type", "local"], ["--cfg-renorm-type", "local"]),
    (["--cfg-interval", "0.5", "0.2"], ["cfg_interval", "0.5"]),
    (["-o", "out.gif"], ["out.gif", "png", "jpg", "webp"]),
    (["--height", "64"], ["--width"]),
])
def test_bad_generate_options(tiny, args, mentions):
    user_error(run("generate", "x", "--model", tiny, *args), *mentions)


def test_non_image_input(tiny, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    user_error(run("edit", bad, "make it red", "--model", tiny, "-o", tmp_path / "o.png"), str(bad))
    user_error(run("understand", bad, "what is it?", "--model", tiny), str(bad))
    user_error(run("understand", "a", "b", "c", "--model", tiny), "[IMAGE] QUESTION")


# -- the embedded default model -------------------------------------------------------------------------------
def test_default_model_created_in_cache(tmp_path):
    cache = tmp_path / "cache"
    r = ok(run("generate", "x", "--no-progress", *SMALL, "-o", tmp_path / "d.png",
               env={"BAGEL_RT_CACHE": str(cache)}))
    assert "note: no --model given" in r.stderr and "random weights" in r.stderr
    assert str(cache / TINY_VERSION) in r.stderr
    assert (cache / TINY_VERSION / "ema.safetensors").is_file()
    assert Image.open(tmp_path / "d.png").size == (96, 64)
