"""Memory placement under a GPU budget (CUDA only: skipped without a GPU)."""

import pytest
import torch
from conftest import requires_cuda

import bagel_rt
from bagel_rt.tiny import write_tiny_checkpoint


@requires_cuda
def test_budget_offloads_and_keeps_results(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny")
    from PIL import Image

    img = Image.new("RGB", (64, 48), (30, 60, 90))
    ref_pipe = bagel_rt.load(d, device="cuda")
    ref = ref_pipe.edit(img, "make it red", num_timesteps=3, seed=0)
    ref_text = ref_pipe.understand(img, "What is this?", max_think_token_n=8, record=True)
    pipe = bagel_rt.load(d, device="cuda")
    pipe.understand(img, "What is this?", max_think_token_n=8)  # a graph decoder built before the budget
    info = pipe.limit_gpu_memory(40.0)
    try:
        assert "vae" in info["offloaded"] and "lm_head" in info["offloaded"]
        assert next(pipe.vae.parameters()).device.type == "cpu"
        assert pipe.model.language_model.lm_head.weight.device.type == "cpu"
        res = pipe.edit(img, "make it red", num_timesteps=3, seed=0)
        assert torch.equal(res.latents, ref.latents)  # placement moves data, never changes results
        assert next(pipe.vae.parameters()).device.type == "cpu"  # back after its phase
        assert all(p.is_pinned() for p in pipe.vae.parameters())  # its home copies, pinned at the first visit
        res = pipe.edit(img, "make it red", num_timesteps=3, seed=0)  # the visits from the pinned homes
        assert torch.equal(res.latents, ref.latents)
        for _ in range(2):  # lm_head visits for each answer (the graph decoder rebuilt around it)
            text = pipe.understand(img, "What is this?", max_think_token_n=8, record=True)
            assert text.token_ids == ref_text.token_ids and torch.equal(text.logits, ref_text.logits)
            assert pipe.model.language_model.lm_head.weight.device.type == "cpu"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@requires_cuda
def test_budget_too_small_is_a_clear_error(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cuda")
    with pytest.raises(bagel_rt.InputError, match="max_gpu_memory budget"):
        pipe.limit_gpu_memory(1e-6)
    torch.cuda.set_per_process_memory_fraction(1.0)


def test_budget_needs_cuda(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cpu")
    with pytest.raises(bagel_rt.InputError, match="CUDA"):
        pipe.limit_gpu_memory(12)


def test_cli_options_fail_cleanly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only messages")
    from bagel_rt.cli.main import cli
    from click.testing import CliRunner

    d = write_tiny_checkpoint(tmp_path / "tiny")
    cases = ((["--max-gpu-memory", "4"], "CUDA devices only"), (["--compute", "int8"], "needs INT8 weights"))
    for extra, msg in cases:
        r = CliRunner().invoke(cli, ["generate", "x", "--model", str(d), "--height", "32", "--width", "32",
                                     "--steps", "2", "--no-progress", "-o", str(tmp_path / "o.png"), *extra])
        assert r.exit_code == 2 and msg in r.output and r.output.count("\n") <= 2, r.output


def test_reallocate_copies_each_storage_once_and_keeps_views():
    """``reallocate`` (what :func:`bagel_rt.placement.compact` does to the resident model): new memory for every
    tensor on the device, the Parameters the same objects, tensors sharing a storage still sharing one (a view
    stays a view, so the resident bytes do not double), values unchanged."""
    from bagel_rt.placement import reallocate

    lin = torch.nn.Linear(6, 4)
    lin.register_buffer("row", lin.weight.data[1])  # a view of the weight's storage
    lin.register_buffer("own", torch.arange(5.0))
    before = {n: (t.untyped_storage().data_ptr(), t.clone()) for n, t in [*lin.named_parameters(),
                                                                          *lin.named_buffers()]}
    weight = lin.weight
    reallocate(lin, torch.device("cpu"))
    assert lin.weight is weight
    for n, t in [*lin.named_parameters(), *lin.named_buffers()]:
        assert t.untyped_storage().data_ptr() != before[n][0], n
        assert torch.equal(t, before[n][1]), n
    assert lin.row.untyped_storage().data_ptr() == lin.weight.untyped_storage().data_ptr()
    lin.weight.data[1, 0] = 7.0
    assert lin.row[0] == 7.0


@requires_cuda
def test_compact_keeps_results(tmp_path, monkeypatch):
    """With compaction forced (any held memory counts as stranded), the placement moves the resident model into
    new memory without growing it, and a request gives the same latents as before."""
    import bagel_rt.placement as placement

    d = write_tiny_checkpoint(tmp_path / "tiny")
    pipe = bagel_rt.load(d, device="cuda")
    ref = pipe.generate("a red square", num_timesteps=3, seed=0, image_shapes=(64, 64))
    monkeypatch.setattr(placement, "STRANDED_BYTES", -1)
    w = pipe.model.language_model.model.layers[0].mlp.gate_proj.weight
    ptr = w.data_ptr()
    try:
        info = pipe.limit_gpu_memory(40.0)
        assert info["expandable_segments"] is False or ("compacted_mib" in info and w.data_ptr() != ptr)
        res = pipe.generate("a red square", num_timesteps=3, seed=0, image_shapes=(64, 64))
        assert torch.equal(res.latents, ref.latents)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
