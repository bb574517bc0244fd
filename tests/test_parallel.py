"""Multi-process inference (bagel_rt.parallel) on CPUs: gloo processes on the tiny model give the single-process
results for the same seeds, every rank the same ones.

Each test spawns 2 (tensor parallelism also 4) processes with torch.multiprocessing on a free port of
127.0.0.1, runs the same requests in every rank and compares each rank's outputs with the requests run in this
process without parallelism. fp32 on the CPU: CFG-parallel and the layer split compute the same operations
(equal up to the last bit); tensor parallelism sums partial products in another order (float noise).
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import rel_l2
from PIL import Image

import bagel_rt
from bagel_rt.errors import InputError
from bagel_rt.sampler import CFGSettings
from bagel_rt.step_cache import StepCacheSettings
from bagel_rt.tiny import TINY_TP4_PARAMS, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_tp4(tmp_path_factory):
    """A tiny model whose heads (8 query, 4 key/value) and layers (4) split over 4 processes."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny4", params=TINY_TP4_PARAMS)


def _image() -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy())


def _edit_session(pipe):
    """An edit's contexts without the VAE at 512² (13 s on one CPU thread): a VAE block of random clean latents
    and a ViT block of a small image in ``gen``, as ``Session.add_image`` builds them, then the instruction."""
    from bagel_rt.transforms import image_to_tensor

    s = pipe.session(seed=5)
    h, w = 2, 3
    latents = torch.randn(h * w, pipe.model.params.patch_latent_dim, generator=torch.Generator().manual_seed(5))
    pipe.model.prefill_vae(s.gen, latents, h, w)
    s.gen.history += (("vae", 1),)
    pipe.model.prefill_vit(s.gen, image_to_tensor(_image().resize((28, 42))))
    s.gen.history += (("vit", 1),)
    s.cfg_text = s.gen.fork()
    s.add_text("Make it blue.")
    return s


def run_tasks(pipe, tasks: list[str]) -> dict:
    """The requests of a test, as tensors and lists (what every rank and the single process must agree on).
    Smaller images on the triton backend (the Triton interpreter runs each kernel instance in Python)."""
    out = {}
    shape, steps = ((32, 48), 4) if pipe.backend == "torch" else ((16, 32), 3)
    if "t2i" in tasks:
        # the last step outside the CFG interval: one branch (shared by the ranks on the triton backend)
        r = pipe.generate("A red bagel", image_shapes=shape, num_timesteps=steps, seed=1, record=True,
                          cfg_interval=(0.8, 1.0))
        out["t2i"] = (r.latents, r.velocities)
    if "edit" in tasks:  # three distinct CFG branches over an image context
        r = _edit_session(pipe).gen_image(shape, CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel"),
                                          num_timesteps=steps, record=True)
        out["edit"] = (r.latents, r.velocities)
    if "think" in tasks:
        r = pipe.generate("Two dogs", image_shapes=(16, 32), num_timesteps=3, seed=2, think=True,
                          max_think_token_n=6, record=True)
        out["think"] = (r.latents, r.logits, r.token_ids)
    if "understand" in tasks:
        r = pipe.understand(_image(), "What is it?", max_think_token_n=6, seed=3, record=True)
        out["understand"] = (r.logits, r.token_ids)
    if "taylorseer" in tasks:
        settings = StepCacheSettings(fresh_threshold=2, max_order=1, first_enhance=1)
        r = _edit_session(pipe).gen_image((32, 32), CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel"),
                                          num_timesteps=8, enable_taylorseer=True, taylorseer_settings=settings)
        out["taylorseer"] = (r.latents, r.info["step_cache"])
    return out


TASKS = {("cfg", "torch"): ["t2i", "edit", "think", "understand", "taylorseer"],
         ("layers", "torch"): ["t2i", "edit", "think", "understand"],
         ("tp", "torch"): ["t2i", "edit", "think", "understand"],
         # the Triton interpreter takes a minute per decoded text: the packed denoiser only
         ("cfg", "triton"): ["t2i", "edit"], ("layers", "triton"): ["t2i"], ("tp", "triton"): ["t2i"]}


def _worker(rank, world, port, ckpt, runs, out_dir):
    """One rank: load the model once per (mode, backend) of ``runs`` in one process group, run its tasks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TRITON_INTERPRET="1")
    torch.set_num_threads(1)  # the CI machine has 2 cores for up to 4 processes
    group = None
    for mode, backend in runs:
        pipe = bagel_rt.load(ckpt, device="cpu", dtype=torch.float32, backend=backend, parallel=mode)
        group = group or pipe.model.parallel  # the first load joined the run; later ones share its group
        out = run_tasks(pipe, TASKS[mode, backend])
        out["held"] = _held_layers(pipe)
        torch.save(out, os.path.join(out_dir, f"{mode}-{backend}-rank{rank}.pt"))
    group.close()


def _held_layers(pipe) -> dict:
    """(first layer, layers) of what a rank allocates for a context's KV cache and the packed denoiser's arena."""
    cache = pipe.model.new_context(4).cache
    assert cache.k.shape[0] == cache.num_layers
    held = {"context": (cache.first, cache.num_layers)}
    den = pipe.fast_cache.get("denoiser")
    if den is not None:
        held["arena"] = (den.first, den.k.shape[0])
    return held


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_parallel(ckpt, world: int, runs: list[tuple[str, str]], out_dir) -> dict:
    """{(mode, backend): every rank's outputs} of a ``world``-process run."""
    mp.spawn(_worker, args=(world, _free_port(), str(ckpt), runs, str(out_dir)), nprocs=world)
    return {(m, b): [torch.load(out_dir / f"{m}-{b}-rank{r}.pt") for r in range(world)] for m, b in runs}


def _single(ckpt, backend: str) -> dict:
    """The requests in this process, without parallelism, on one thread like every rank (so that equal
    operations give equal bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tasks = set().union(*(t for (_, b), t in TASKS.items() if b == backend))
        return run_tasks(bagel_rt.load(ckpt, device="cpu", dtype=torch.float32, backend=backend), sorted(tasks))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_tp4) -> dict:
    return _single(tiny_tp4, "torch")


@pytest.fixture(scope="module")
def reference_triton(tiny) -> dict:
    return _single(tiny, "triton")


@pytest.fixture(scope="module")
def two_ranks(tiny_tp4, tmp_path_factory) -> dict:
    return run_parallel(tiny_tp4, 2, [("cfg", "torch"), ("layers", "torch"), ("tp", "torch")],
                        tmp_path_factory.mktemp("ranks2"))


def assert_same(ranks: list[dict], ref: dict, tol: float) -> None:
    """Every rank's every output equals the single-process one: tensors within ``tol`` relative L2 (0: equal),
    token ids and reports exactly."""
    for r, out in enumerate(ranks):
        for task, values in out.items():
            if task == "held":  # what the rank allocated: see the tests
                continue
            for a, b in zip(values, ref[task]):
                where = f"rank {r}, {task}"
                if isinstance(b, torch.Tensor):
                    assert a.shape == b.shape, where
                    if tol == 0:
                        assert torch.equal(a, b), f"{where}: rel. L2 {rel_l2(a, b):.2e}"
                    else:
                        assert rel_l2(a, b) < tol, f"{where}: rel. L2 {rel_l2(a, b):.2e}"
                else:
                    assert a == b, where


def test_cfg_parallel_matches_single_process(two_ranks, reference):
    """Two ranks: t2i (cond | text), an edit's three branches (cond + img | text), think, understanding and
    step caching — bit for bit, since each branch runs the same operations on its rank."""
    assert_same(two_ranks["cfg", "torch"], reference, 0)


def test_layer_split_matches_single_process(two_ranks, reference):
    """Bit for bit, and each rank's KV caches hold its own layers only (half of the model's each)."""
    assert_same(two_ranks["layers", "torch"], reference, 0)
    assert [out["held"]["context"] for out in two_ranks["layers", "torch"]] == [(0, 2), (2, 2)]
    assert [out["held"]["context"] for out in two_ranks["cfg", "torch"]] == [(0, 4), (0, 4)]


def test_tensor_parallel_matches_single_process(two_ranks, reference):
    """Partial products summed across ranks: float noise, greedy tokens identical."""
    assert_same(two_ranks["tp", "torch"], reference, 1e-5)


def test_four_ranks_match_single_process(tiny_tp4, reference, tmp_path):
    """Four ranks: one key/value head and one layer per rank."""
    out = run_parallel(tiny_tp4, 4, [("tp", "torch"), ("layers", "torch")], tmp_path)
    assert_same(out["tp", "torch"], reference, 1e-5)
    assert_same(out["layers", "torch"], reference, 0)
    assert [o["held"]["context"] for o in out["layers", "torch"]] == [(r, 1) for r in range(4)]


def test_parallel_needs_a_launched_run(tiny, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InputError, match="torchrun"):
        bagel_rt.load(tiny, device="cpu", parallel="cfg")
    with pytest.raises(InputError, match="parallel must be one of"):
        bagel_rt.load(tiny, device="cpu", parallel="pipeline")


def test_packed_denoiser_in_every_mode(tiny, reference_triton, tmp_path):
    """The triton backend's packed denoiser (Triton interpreter; the 2-layer tiny model with 4 query and 2
    key/value heads): CFG-parallel gives each rank a denoiser over its whole branches (fewer rows per GEMM: float
    noise) and runs the leftover branch of uneven steps (t2i's last step, an edit's third branch)
    tensor-parallel over both; tensor parallelism splits the heads, the layer split the layers."""
    runs = [("cfg", "triton"), ("tp", "triton"), ("layers", "triton")]
    out = run_parallel(tiny, 2, runs, tmp_path)
    assert_same(out["cfg", "triton"], reference_triton, 1e-5)
    assert_same(out["layers", "triton"], reference_triton, 0)
    assert [o["held"]["arena"] for o in out["layers", "triton"]] == [(0, 1), (1, 1)]  # its layer's rows only
    assert [o["held"]["arena"] for o in out["tp", "triton"]] == [(0, 2), (0, 2)]
    assert_same(out["tp", "triton"], reference_triton, 1e-5)


def _cli(*args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "bagel_rt.cli.entry", *args], capture_output=True, text=True,
                           env={**os.environ, **(env or {})}, timeout=300)


def test_cli_gpus_starts_the_ranks(tiny):
    """``--gpus 2`` starts two processes itself; rank 0 prints the answer, the same as one process's."""
    args = ["understand", "What is it?", "--model", str(tiny), "--device", "cpu", "--dtype", "fp32",
            "--max-new-tokens", "6", "--json", "--no-progress", "--seed", "0"]
    one = _cli(*args)
    two = _cli(*args, "--gpus", "2", "--parallel", "tp")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = (json.loads(r.stdout) for r in (one, two))  # one JSON object: only rank 0 printed
    assert b["answer"] == a["answer"] and b["tokens"] == a["tokens"]
    assert b["settings"]["parallel"] == "tp" and b["settings"]["gpus"] == 2


def test_cli_gpus_reports_a_misfit_in_one_line(tiny):
    """Three ranks cannot split 2 key/value heads: every rank fails at load, the launcher exits 2 with the
    error line of rank 0."""
    r = _cli("understand", "hi", "--model", str(tiny), "--device", "cpu", "--gpus", "3", "--parallel", "tp")
    assert r.returncode == 2
    assert "error: tensor parallelism over 3 processes needs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("fmt", ["bf16", "int8", "nf4", "fp8"])
@pytest.mark.parametrize("world", [2, 4])
def test_shard_linear_is_exact_in_every_format(fmt, world):
    """Rows (column-parallel) concatenate, columns (row-parallel) add up to the whole module's output: the
    scales follow their rows (INT8, FP8) and blocks (NF4), the bias counts once."""
    from bagel_rt.quant.fp8 import FP8Linear
    from bagel_rt.quant.int8 import Int8Linear
    from bagel_rt.quant.nf4 import NF4Linear

    from bagel_rt.parallel.tensor_parallel import shard_linear

    g = torch.Generator().manual_seed(world)
    lin = torch.nn.Linear(512, 96, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 512, generator=g) / 20)
    mod = {"bf16": lambda m: m, "int8": Int8Linear.from_linear, "nf4": NF4Linear.from_linear,
           "fp8": FP8Linear.from_linear}[fmt](lin)
    x = torch.randn(5, 512, generator=g).to(torch.bfloat16)
    full = mod(x).float()
    rows = torch.cat([shard_linear(mod, 0, r, world)(x) for r in range(world)], dim=-1).float()
    assert type(shard_linear(mod, 0, 0, world)) is type(mod)
    assert torch.equal(rows, full)
    k = 512 // world
    cols = sum(shard_linear(mod, 1, r, world)(x[:, r * k:(r + 1) * k]).float() for r in range(world))
    assert rel_l2(cols, full) < 1e-2  # bf16 partial sums rounded before the sum
