"""The request side: every CLI option and API argument out of range is refused with one line, before any model
work (for the CLI: before the model is loaded; for the API: before anything is prefilled)."""

import math
from pathlib import Path

import pytest
import torch
from bagel_rt.cli.main import cli
from click.testing import CliRunner
from PIL import Image

import bagel_rt
from bagel_rt import validate
from bagel_rt.batch import MAX_BATCH_IMAGES
from bagel_rt.errors import InputError
from bagel_rt.step_cache import StepCacheSettings


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model is a failure of these tests: the refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bagel_rt, "load", refuse)


def one_line_error(result) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.stderr}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


GENERATE_BAD = [
    ("--cfg-text-scale", "nan"), ("--cfg-text-scale", "inf"), ("--cfg-text-scale", "-1"),
    ("--cfg-text-scale", "1e9"), ("--cfg-img-scale", "nan"), ("--cfg-img-scale", "-inf"),
    ("--timestep-shift", "nan"), ("--timestep-shift", "inf"),
    ("--timestep-shift", "0"), ("--timestep-shift", "-2"), ("--cfg-renorm-min", "nan"), ("--cfg-renorm-min", "2"),
    ("--steps", "1"), ("--steps", "100000"), ("--seed", "-1"), ("--seed", str(2**64)), ("--seed", "1.5"),
    ("--device", "mps"), ("--device", "meta"), ("--device", "xla"), ("--device", "banana"),
    ("--max-think-tokens", "0"), ("--max-think-tokens", str(10**9)), ("--temperature", "0"),
    ("--temperature", "nan"), ("--height", "17"), ("--width", "2048"), ("--max-gpu-memory", "nan"),
    ("--max-gpu-memory", "inf"), ("--max-gpu-memory", "0"), ("--cfg-renorm-type", "none"), ("--dtype", "int4"),
]


@pytest.mark.parametrize("option,value", GENERATE_BAD)
def test_generate_option_out_of_range(option, value, tmp_path, no_load):
    extra = ["--height", "16"] if option == "--width" else ["--width", "16"] if option == "--height" else []
    r = CliRunner().invoke(cli, ["generate", "x", "-o", str(tmp_path / "a.png"), option, value, *extra])
    one_line_error(r)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("interval", [("nan", "1"), ("0.5", "0.2"), ("-0.1", "1"), ("0", "inf")])
def test_cfg_interval_out_of_range(interval, tmp_path, no_load):
    one_line_error(CliRunner().invoke(cli, ["edit", "in.png", "x", "--cfg-interval", *interval]))


def test_devices_this_build_cannot_use(no_load):
    bad = ["mps", "meta"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for dev in bad:
        line = one_line_error(CliRunner().invoke(cli, ["understand", "hi", "--device", dev]))
        assert dev.split(":")[0] in line
        with pytest.raises(InputError):
            validate.device(dev)


def test_output_paths_refused_up_front(tmp_path, no_load):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing" / "x.png")
    for out, words in ((tmp_path / "somedir", "directory"), (tmp_path / "dangling.png", "symbolic link"),
                       (tmp_path / "a.txt", "extension"), (tmp_path / "nodir" / "a.png", "directory not found")):
        line = one_line_error(CliRunner().invoke(cli, ["generate", "x", "-o", str(out)]))
        assert words in line, line


def test_understand_with_the_question_forgotten(tmp_path, no_load):
    img = tmp_path / "photo.png"
    img.write_bytes(b"")
    for arg in (str(img), "photo.png", "~/cat.JPG"):
        line = one_line_error(CliRunner().invoke(cli, ["understand", arg]))
        assert "question" in line
    line = one_line_error(CliRunner().invoke(cli, ["understand", "what is in photo.png?", "--device", "mps"]))
    assert "question" not in line and "mps" in line  # a question that mentions a file is a question


def test_token_limit_beyond_the_context(tiny, no_load):
    line = one_line_error(CliRunner().invoke(cli, ["understand", "hi", "--model", str(tiny),
                                                   "--max-new-tokens", "100000"]))
    assert "4096" in line and "context" in line


@pytest.mark.parametrize("args", [["init-tiny", "d", "--seed", "-1"], ["init-tiny", "d", "--seed", str(2**64)],
                                  ["bench", "--steps", "1"], ["bench", "--runs", "0"], ["bench", "--tokens", "0"],
                                  ["bench", "--device", "mps"], ["bench", "--size", "20"],
                                  ["quantize", "a", "b", "--format", "int4"]])
def test_other_commands_out_of_range(args, no_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(CliRunner().invoke(cli, args))
    assert not (tmp_path / "d").exists()


# -- the API ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny):
    return bagel_rt.load(tiny, device="cpu")


@pytest.fixture
def no_model_work(pipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    for name in ("prefill_text", "prefill_vit", "prefill_vae", "decode_step", "velocity"):
        monkeypatch.setattr(pipe.model, name, refuse)
    return pipe


API_BAD = [
    dict(cfg_text_scale=math.nan), dict(cfg_text_scale=math.inf), dict(cfg_text_scale=-1.0),
    dict(cfg_text_scale="4"), dict(cfg_img_scale=math.nan), dict(cfg_img_scale=True),
    dict(cfg_interval=(math.nan, 1.0)), dict(cfg_interval=(0.6, 0.2)), dict(cfg_interval="ab"),
    dict(cfg_interval=(0.1,)), dict(cfg_renorm_min=math.nan), dict(cfg_renorm_type="x"),
    dict(timestep_shift=0.0), dict(timestep_shift=math.nan), dict(timestep_shift=math.inf),
    dict(num_timesteps=1), dict(num_timesteps=10**6), dict(num_timesteps=2.5), dict(num_timesteps=True),
    dict(image_shapes=(17, 16)), dict(image_shapes=(0, 0)), dict(image_shapes=(2048, 2048)),
    dict(image_shapes="x"), dict(seed=-1), dict(seed=2**64), dict(seed=1.5), dict(seed="1"),
    dict(max_think_token_n=0), dict(max_think_token_n=10**7), dict(max_think_token_n=4096),
    dict(max_think_token_n=2.0), dict(text_temperature=0.0), dict(text_temperature=math.nan),
    dict(noise="x"),
]


@pytest.mark.parametrize("kwargs", API_BAD, ids=[str(k) for k in API_BAD])
def test_generate_argument_out_of_range(no_model_work, kwargs):
    with pytest.raises(InputError):
        no_model_work.generate("a cat", **{"image_shapes": (16, 16), **kwargs})


@pytest.mark.parametrize("kwargs", [dict(max_think_token_n=0), dict(max_think_token_n=10**6), dict(seed=2**70),
                                    dict(text_temperature=-1.0), dict(do_sample=True, text_temperature=math.inf)])
def test_understand_argument_out_of_range(no_model_work, kwargs):
    with pytest.raises(InputError):
        no_model_work.understand(None, "hi", **kwargs)
    with pytest.raises(InputError):
        no_model_work.understand(None, Path("photo.png"))


def test_token_limit_counts_the_prompt(pipe):
    """A limit that fits the context alone but not after the prompt is refused when decoding would start."""
    with pytest.raises(InputError, match="context"):
        pipe.understand(None, "hi", max_think_token_n=4095)


def test_largest_seed_works(pipe):
    a = pipe.generate("a cat", image_shapes=(16, 16), num_timesteps=2, seed=2**64 - 1)
    assert a.seed == 2**64 - 1


# -- batched requests (bagel_rt.batch): refused before any model work ---------------------------------
BATCH_BAD = [
    (dict(prompt=[]), "empty"), (dict(prompt=("a", 3)), r"prompt\[1\] must be a string"),
    (dict(prompt=5), "prompt must be a string"), (dict(prompt="a", n=0), "n must be"),
    (dict(prompt="a", n=MAX_BATCH_IMAGES + 1), "n must be"), (dict(prompt="a", n=2.0), "n must be an integer"),
    (dict(prompt="a", n=True), "n must be an integer"),
    (dict(prompt=["a"] * 9, n=2), f"at most {MAX_BATCH_IMAGES}"),
    (dict(prompt=["a", "b"], seed=[1]), "one per image"), (dict(prompt=["a", "b"], seed=[1, -1]), "seed"),
    (dict(prompt="a", n=2, seed=2**64 - 1), "largest seed"), (dict(prompt="a", seed=[1, 2]), "one per image"),
    (dict(prompt=["a", "b"], noise=torch.zeros(6, 64)), "noise"),
    (dict(prompt=["a", "b"], num_timesteps=1), "num_timesteps"),
    (dict(prompt=["a", "b"], cfg_interval=(0.9, 0.1)), "cfg_interval"),
    (dict(prompt=["a", "b"], taylorseer_settings=StepCacheSettings()), "enable_taylorseer"),
]


@pytest.mark.parametrize("kwargs,match", BATCH_BAD, ids=[m for _, m in BATCH_BAD])
def test_batch_refused_before_model_work(no_model_work, kwargs, match):
    with pytest.raises(InputError, match=match):
        no_model_work.generate(**{"image_shapes": (16, 16), **kwargs})


def test_edit_batch_refused_before_model_work(no_model_work, tmp_path):
    img = Image.new("RGB", (16, 16))
    for args, match in [(([img, img], ["a", "b", "c"]), "equal length"), (([], "a"), "empty"),
                        ((img, []), "empty"), (([img, 3], "a"), r"image\[1\]"), ((img, ["a", None]), r"instr"),
                        (([img, tmp_path / "missing.png"], "a"), "not found")]:
        with pytest.raises(InputError, match=match):
            no_model_work.edit(*args, num_timesteps=2)
    with pytest.raises(InputError, match="n must be"):
        no_model_work.edit(img, "a", n=0)
