"""Running out of GPU memory under a budget is a clear InputError on every entry point (CPU: the budget is set
by hand and the allocation failure raised where the model work runs)."""

import pytest
import torch

import bagel_rt
import bagel_rt.fast as fast
import bagel_rt.session as session
from bagel_rt.sampler import CFGSettings
from bagel_rt.tiny import write_tiny_checkpoint

OOM = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 130.00 MiB.")


def _raise(*args, **kwargs):
    raise OOM


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_session_requests_under_a_budget_raise_input_errors(tmp_path, monkeypatch, backend):
    pipe = bagel_rt.load(write_tiny_checkpoint(tmp_path / "tiny"), device="cpu", dtype=torch.float32,
                         backend=backend)
    s = pipe.session(seed=1)
    s.add_text("a red cube")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 3 * 2**30)
    monkeypatch.setattr(fast, "denoise_batch", _raise)
    monkeypatch.setattr(session, "_denoise_lockstep", _raise)
    monkeypatch.setattr(session.Session, "_decode_loop", _raise)
    monkeypatch.setattr("bagel_rt.fast_decode.fast_gen_text", _raise)
    cfg = CFGSettings(4.0, 1.0, (0.0, 1.0), 0.0, "global")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # without a budget: the error itself
        s.gen_image((32, 32), cfg, num_timesteps=3)
    pipe.gpu_budget_gib = 12.0
    with pytest.raises(bagel_rt.InputError, match=r"budget of 12 GiB \(3.00 GiB allocated"):
        s.gen_image((32, 32), cfg, num_timesteps=3)
    with pytest.raises(bagel_rt.InputError, match="larger --max-gpu-memory"):
        s.gen_text(max_length=4)
