"""Outputs, signals, threads and checkpoint scans: what the hardening issue (14) promises beyond the loaders.

* a full disk or a SIGTERM while an image is written leaves no file (and no temporary file) behind;
* Ctrl-C while the CLI starts prints one line; Ctrl-C while text is decoded keeps the text shown so far;
* the decoded text streams: what was printed before an interruption is the start of the full answer;
* requests from several threads on one pipeline run one at a time, each with the result it has alone;
* ``info --verify`` names the tensor holding NaN/Inf; NaN weights never give an image (``NonFiniteError``);
* unreadable files and directories give a :class:`CheckpointError` naming them.
"""

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from bagel_rt.cli import entry
from bagel_rt.cli import options as cli_options
from bagel_rt.cli.main import cli
from click.testing import CliRunner
from PIL import Image

import bagel_rt
from bagel_rt.errors import CheckpointError, NonFiniteError, OutputError
from bagel_rt.verify import verify_checkpoint


@pytest.fixture(scope="module")
def pipe(tiny):
    return bagel_rt.load(tiny, device="cpu")


# -- writing images -----------------------------------------------------------------------------------------
def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    def full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OutputError, match="No space left on device"):
        cli_options._save_image(Image.new("RGB", (4, 4)), tmp_path / "out.png", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_through_the_cli(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    r = CliRunner().invoke(cli, ["generate", "x", "--model", str(tiny), "--height", "16", "--width", "16",
                                 "--steps", "2", "--no-progress", "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: ") and "No space left" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    """A real SIGTERM, delivered while the PNG is being written, under the console script's handler."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from PIL import Image
        from bagel_rt.cli import entry, options
        signal.signal(signal.SIGTERM, entry._terminated)
        real = Image.Image.save
        def save(self, fp, *a, **k):
            fp.write(b"half an image")
            os.kill(os.getpid(), signal.SIGTERM)
            real(self, fp, *a, **k)
        Image.Image.save = save
        options._save_image(Image.new("RGB", (8, 8)), Path({str(tmp_path / 'out.png')!r}), overwrite=False)
        print("not reached")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + 15, r.stderr
    assert "not reached" not in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: terminated (SIGTERM); no output was left half-written"]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    """Ctrl-C during the slow imports (torch) of the console script: one line and exit code 130."""

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "bagel_rt.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "bagel_rt.cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted (Ctrl-C) while starting"]


def test_console_script_is_the_signal_aware_entry():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bagel-rt"] == "bagel_rt.cli.entry:main"


def test_import_does_not_load_torch():
    """What lets the entry catch a Ctrl-C during start-up: importing the package and the entry module is cheap."""
    code = "import sys, bagel_rt.cli.entry; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


# -- streaming and Ctrl-C while decoding ---------------------------------------------------------------------
def _answer(tiny, *extra):
    return CliRunner().invoke(cli, ["understand", "describe a bagel", "--model", str(tiny), "--no-progress",
                                    "--max-new-tokens", "40", *extra])


def test_streamed_text_is_kept_on_ctrl_c(tiny, monkeypatch):
    full = _answer(tiny)
    assert full.exit_code == 0 and len(full.stdout.strip()) > 10
    real = cli_options.TextStream.__call__

    def interrupt_after_20(self, token):
        real(self, token)
        if len(self.ids) == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_options.TextStream, "__call__", interrupt_after_20)
    cut = _answer(tiny)
    assert cut.exit_code == 130
    assert cut.stderr.strip().splitlines() == ["error: interrupted (Ctrl-C)"]
    shown = cut.stdout.rstrip("\n")
    assert shown and full.stdout.startswith(shown) and len(shown) < len(full.stdout.rstrip("\n"))

    as_json = _answer(tiny, "--json")
    partial = json.loads(as_json.stdout)
    assert as_json.exit_code == 130 and partial["interrupted"] and partial["tokens"] == 20
    assert full.stdout.startswith(partial["answer"])


def test_text_stream_holds_back_partial_characters():
    class Tok:  # ids are bytes; a character may span two ids
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = []
    s = cli_options.TextStream(Tok(), echo=False)
    for b in "é!".encode() + b"\0":  # the last id is never shown (the reference drops it)
        s(b)
        out.append(s.text)
    assert out == ["", "", "é", "é!"]


# -- threads ------------------------------------------------------------------------------------------------
def test_threads_share_one_pipeline_in_turn(pipe, monkeypatch):
    """Three threads generate at once: the model never runs two requests together, and each thread gets the
    image it gets alone. (Without the pipeline's lock the sleep below lets the threads' forwards overlap.)"""
    alone = {s: pipe.generate("a cat", image_shapes=(16, 16), num_timesteps=3, seed=s).latents for s in (1, 2, 3)}
    inside, most = [0], [0]
    real = pipe.model.velocity

    def velocity(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        try:
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(pipe.model, "velocity", velocity)
    got, errors = {}, []

    def work(seed):
        try:
            got[seed] = pipe.generate("a cat", image_shapes=(16, 16), num_timesteps=3, seed=seed).latents
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and most[0] == 1
    assert all(torch.equal(got[s], alone[s]) for s in alone)


# -- NaN / Inf ----------------------------------------------------------------------------------------------
def _plant_nan(ck: Path, file: str, key: str) -> None:
    from safetensors.torch import load_file, save_file

    from bagel_rt.checkpoint import read_header

    meta = read_header(ck / file).metadata
    tensors = load_file(str(ck / file))
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, str(ck / file), metadata=meta or None)


def test_nan_weights_never_give_an_image(tiny, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny, ck)
    _plant_nan(ck, "ae.safetensors", "decoder.up.0.block.0.conv1.weight")
    p = bagel_rt.load(ck, device="cpu")
    with pytest.raises(NonFiniteError, match="decoded image"):
        p.generate("a cat", image_shapes=(16, 16), num_timesteps=2, seed=0)
    r = CliRunner().invoke(cli, ["generate", "x", "--model", str(ck), "--height", "16", "--width", "16",
                                 "--steps", "2", "--no-progress", "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 2 and "NaN/Inf" in r.stderr and not (tmp_path / "a.png").exists()
    report = verify_checkpoint(ck)
    assert [(p["file"], p["key"]) for p in report["problems"]] == [("ae.safetensors",
                                                                   "decoder.up.0.block.0.conv1.weight")]
    r = CliRunner().invoke(cli, ["info", str(ck), "--verify"])
    assert r.exit_code == 2 and "decoder.up.0.block.0.conv1.weight" in r.stdout + r.stderr
    ok = CliRunner().invoke(cli, ["info", str(tiny), "--verify"])
    assert ok.exit_code == 0 and "no NaN/Inf values" in ok.stdout


def test_nan_latents_are_reported_before_decoding(pipe, monkeypatch):
    real = pipe.model.velocity
    monkeypatch.setattr(pipe.model, "velocity", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(NonFiniteError, match="final latents"):
        pipe.generate("a cat", image_shapes=(16, 16), num_timesteps=2, seed=0)


# -- permissions --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["", "ema.safetensors", "ae.safetensors", "llm_config.json",
                                    "vit_config.json", "tokenizer.json"])
def test_unreadable_paths_are_named(tiny, monkeypatch, target):
    """Files or the directory without read permission (simulated: the tests may run as root, who reads
    everything)."""
    denied = (tiny / target) if target else tiny
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == denied else real(p, mode, **k))
    with pytest.raises(CheckpointError, match="permission denied") as e:
        bagel_rt.load(tiny, device="cpu")
    assert str(denied) in str(e.value)


def test_open_failing_with_permission_error_is_named(tiny, monkeypatch):
    import builtins

    real = builtins.open

    def deny(p, *a, **k):
        if str(p).endswith("ema.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(p, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(CheckpointError, match="ema.safetensors.*Permission denied"):
        bagel_rt.load(tiny, device="cpu")
