"""``bagel-rt bench`` on the tiny random model (CPU): one JSON line per result with the recorded fields."""

import json

from bagel_rt.cli.main import cli
from click.testing import CliRunner

FIELDS = {"task", "backend", "weights", "height", "width", "num_timesteps", "seconds", "peak_gib", "tokens_per_s",
          "tflops", "gpu", "torch", "commit", "date"}


def _bench(*args):
    return CliRunner().invoke(cli, ["bench", "--random-weights", "tiny", "--backend", "torch", "--size", "64",
                                    "--steps", "3", "--runs", "1", "--warmup", "1", "--tokens", "4", *args])


def test_bench_rows(tmp_path):
    out = tmp_path / "r.jsonl"
    r = _bench("--tasks", "t2i,edit,decode", "--out", str(out))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["task"] for x in rows] == ["t2i", "edit", "decode"]
    for x in rows:
        assert FIELDS <= set(x), FIELDS - set(x)
        assert x["seconds"] > 0 and x["weights"] == "bf16" and x["backend"] == "torch"
    t2i, edit, decode = rows
    assert (t2i["height"], t2i["width"]) == (64, 64) and t2i["seconds_per_step"] > 0 and t2i["tflops"] >= 0
    assert (edit["height"], edit["width"]) == (512, 512)  # the 64x64 input after the official resize
    assert decode["tokens"] <= 4 and decode["tokens_per_s"] > 0


def test_bench_taylorseer_rows():
    """--taylorseer: image rows carry what step caching ran and fewer full forwards than without it."""
    rows = {}
    for flag in ((), ("--taylorseer",)):
        r = _bench("--tasks", "t2i", "--steps", "12", *flag)
        assert r.exit_code == 0, r.output
        rows[bool(flag)] = json.loads(r.stdout.strip().splitlines()[-1])
    on, off = rows[True], rows[False]
    sched = on["step_cache"]["schedule"]
    assert on["step_cache"]["method"] == "taylorseer" and sched["cond"] == "FFFFFTTFTTF"
    # without the cache every evaluation of cond and text is a full forward (img equals cond: never run)
    assert off["step_cache"] is None and off["full_evaluations"] == len(sched["cond"]) + len(sched["text"])
    assert on["full_evaluations"] == 7 + sched["text"].count("F") < off["full_evaluations"]


def test_bench_weights_label_and_errors():
    r = _bench("--tasks", "t2i", "--weights", "int8")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["weights"] == "int8"
    r = _bench("--tasks", "t2i,paint")
    assert r.exit_code == 2 and "unknown task(s) paint" in r.output


def test_bench_decode_gemv():
    """--decode-gemv picks the text decoder's GEMVs and the decode row records it (INT8 weights through the
    tensor-core GEMVs, in the Triton interpreter here); its choices are the decoder's."""
    from bagel_rt.fast_decode import GEMVS

    r = CliRunner().invoke(cli, ["bench", "--random-weights", "tiny", "--backend", "triton", "--tasks", "decode",
                                 "--tokens", "4", "--runs", "1", "--warmup", "1", "--weights", "int8",
                                 "--decode-gemv", "triton-mma"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["decode_gemv"] == "triton-mma" and row["weights"] == "int8" and row["tokens_per_s"] > 0
    option = next(p for p in cli.commands["bench"].params if p.name == "decode_gemv")
    assert set(option.type.choices) == set(GEMVS)
