"""Shared test set-up.

Triton kernels run in the interpreter on machines without CUDA: ``TRITON_INTERPRET=1`` must be set
before any module that defines ``@triton.jit`` kernels is imported, so it is set here, at conftest import.
On a CUDA machine the variable is left alone and the kernels compile for the GPU.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN = Path(__file__).parent / "golden"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: tests that run the triton backend on the CPU (the Triton interpreter), e.g. on a CUDA machine's CPU device
requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="runs Triton kernels on the CPU: needs TRITON_INTERPRET=1")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def same_prefix_rel_l2(run, ref, near_tie: float = 0.08) -> float:
    """Relative L2 between two greedy runs' logits ((ids, [n, vocab] logits) each) over the steps that saw the
    same tokens: all of them, or up to and including the first step whose ids differ — a flip that must be a
    near-tie of ``ref``'s logits there (top-2 gap under ``near_tie`` of their std). After a flip the prefixes
    differ and so would every later logit, however close the two decoders' arithmetic: the packed bf16 products
    (~2.5e-3 per GEMV) flip near-ties of the tiny random checkpoint now and then."""
    (ids, logits), (ref_ids, ref_logits) = run, ref
    n = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), None)
    if n is not None:
        top2 = ref_logits[n].double().topk(2).values
        assert top2[0] - top2[1] < near_tie * ref_logits[n].double().std(), f"greedy ids diverge at step {n}"
        logits, ref_logits = logits[: n + 1], ref_logits[: n + 1]
    return rel_l2(logits, ref_logits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny checkpoint, written once per test module (modules may define their own)."""
    from bagel_rt.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
