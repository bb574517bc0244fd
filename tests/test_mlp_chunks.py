"""The denoiser MLP's row chunks under a budget: the fewest whose predicted denoise peak fits
(placement.mlp_chunks), chunk boundaries aligned for cuBLASLt's FP8 row scales (fast.row_chunks), and the
result of a chunked forward equal to the unchunked one (CPU: Triton interpreter, fp32)."""

import pytest
import torch
from conftest import rel_l2

import bagel_rt
from bagel_rt import placement
from bagel_rt.fast import CHUNK_ALIGN, row_chunks
from bagel_rt.memory_plan import denoise_activation_bytes
from bagel_rt.tiny import write_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 5e-3


@pytest.mark.parametrize("rows,n", [(4, 2), (6, 3), (16, 4), (31, 2), (128, 4), (8188, 3), (8188, 4), (12282, 5)])
def test_row_chunks_are_aligned_and_cover_the_rows(rows, n):
    sizes = row_chunks(rows, n)
    assert sum(sizes) == rows and all(s > 0 for s in sizes)
    assert all(s % CHUNK_ALIGN == 0 for s in sizes[:-1])  # each chunk starts at a multiple of CHUNK_ALIGN rows
    assert len(sizes) <= n
    if rows <= CHUNK_ALIGN:
        assert sizes == [rows]  # the marker rows (2 per branch) are never split
    if rows >= 2 * n * CHUNK_ALIGN:
        assert len(sizes) == n


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")
    return bagel_rt.load(d, device=DEV, dtype=torch.float32, backend="triton")


def _with_headroom(monkeypatch, pipe, free: float):
    monkeypatch.setattr(pipe, "offload", True)
    monkeypatch.setattr(placement, "_headroom", lambda bagel, budget_bytes=None: free)


ROWS, ARENA, DECODE = 128, 3 * 2**20, 5 * 2**20  # latent rows, arena bytes, decode bytes


def _keep_room(pipe, n: int) -> int:
    """Headroom with exactly room for the arena, n chunks' forward and the decode beside them."""
    p, b = pipe.model.params, pipe.model.dtype.itemsize
    return (ARENA + denoise_activation_bytes(p, ROWS, n, b) + DECODE
            + placement.VAE_SLACK)


def test_without_room_for_the_decode_the_share_rule(pipe, monkeypatch):
    row = 3 * pipe.model.params.llm.intermediate_size * pipe.model.dtype.itemsize
    _with_headroom(monkeypatch, pipe, 10 * 2**30)  # plenty: the fewest of the share rule
    assert placement.mlp_chunks(pipe, ROWS, ARENA) == placement.MIN_MLP_CHUNKS
    free = ROWS * row / (placement.MLP_SHARE * 6)  # a chunk of a sixth of the rows takes MLP_SHARE of it
    _with_headroom(monkeypatch, pipe, free)
    assert placement.mlp_chunks(pipe, ROWS, ARENA) == 6
    assert placement.mlp_chunks(pipe, ROWS, ARENA, 10 * 2**30) == 6  # nothing fits beside the slack
    _with_headroom(monkeypatch, pipe, None)  # no CUDA budget to read
    assert placement.mlp_chunks(pipe, ROWS, ARENA, DECODE) == placement.MIN_MLP_CHUNKS
    monkeypatch.setattr(pipe, "offload", False)  # no budget at all
    assert placement.mlp_chunks(pipe, ROWS, ARENA, DECODE) == 1


def test_fewest_chunks_that_keep_the_denoiser_through_the_decode(pipe, monkeypatch):
    """With a VAE decode to follow, the fewest chunks (from MIN_KEPT_CHUNKS) whose forward leaves room for it
    beside the arena: the denoiser then stays and the next request replays its graphs (the rule without the decode
    switched off here: no count fits beside its slack)."""
    monkeypatch.setattr(placement, "DENOISE_SLACK", 2**50)
    for n in range(placement.MIN_KEPT_CHUNKS, placement.MIN_MLP_CHUNKS):
        _with_headroom(monkeypatch, pipe, _keep_room(pipe, n))
        assert placement.mlp_chunks(pipe, ROWS, ARENA, DECODE) == n
        _with_headroom(monkeypatch, pipe, _keep_room(pipe, n) - 1)  # a byte less: more chunks
        assert placement.mlp_chunks(pipe, ROWS, ARENA, DECODE) > n
    _with_headroom(monkeypatch, pipe, _keep_room(pipe, 1))  # room for one chunk: still MIN_KEPT_CHUNKS
    assert placement.mlp_chunks(pipe, ROWS, ARENA, DECODE) == placement.MIN_KEPT_CHUNKS


def test_without_room_to_keep_it_the_fewest_whose_forward_fits(pipe, monkeypatch):
    """Where no count lets the denoiser stay through the decode: the fewest (from MIN_KEPT_CHUNKS) whose forward
    fits beside the arena with DENOISE_SLACK to spare (released before the decode), else the share rule."""
    p, b = pipe.model.params, pipe.model.dtype.itemsize
    big = 10 * 2**30  # a decode no count leaves room for
    for n in range(placement.MIN_KEPT_CHUNKS, placement.MIN_MLP_CHUNKS):
        run = ARENA + denoise_activation_bytes(p, ROWS, n, b) + placement.DENOISE_SLACK
        _with_headroom(monkeypatch, pipe, run)
        assert placement.mlp_chunks(pipe, ROWS, ARENA, big) == n
        _with_headroom(monkeypatch, pipe, run - 1)  # a byte less: more chunks
        assert placement.mlp_chunks(pipe, ROWS, ARENA, big) > n
    # the share rule's count (MIN_MLP_CHUNKS here) does not fit, a larger one does: that one
    n = placement.MAX_MLP_CHUNKS - 1
    run = ARENA + denoise_activation_bytes(p, ROWS, n, b) + placement.DENOISE_SLACK
    _with_headroom(monkeypatch, pipe, run)
    assert placement.mlp_chunks(pipe, ROWS, ARENA, big) == n > placement.MIN_MLP_CHUNKS
    _with_headroom(monkeypatch, pipe, placement.DENOISE_SLACK)  # no count fits: the share rule, at least 4
    assert placement.mlp_chunks(pipe, ROWS, ARENA, big) >= placement.MIN_MLP_CHUNKS


def test_a_kept_denoiser_counts_as_free(pipe, monkeypatch):
    """The kept denoiser's arena is allocated while the next request picks its chunks: counted as free, so a
    repeated request gets the count of the first and reuses the captured graphs."""
    free = _keep_room(pipe, 2)
    _with_headroom(monkeypatch, pipe, free)
    first = placement.mlp_chunks(pipe, ROWS, ARENA, DECODE)

    class Kept:
        arena_nbytes = 10**6

    monkeypatch.setitem(pipe.fast_cache, "denoiser", Kept())
    _with_headroom(monkeypatch, pipe, free - Kept.arena_nbytes)  # its arena is allocated now
    assert placement.mlp_chunks(pipe, ROWS, ARENA, DECODE) == first == 2


def test_chunked_denoiser_matches_unchunked(pipe, monkeypatch):
    """Three chunks of a 128-row forward (48 + 48 + 32 rows, aligned) give the unchunked result, and the
    denoiser records the count it was built with."""
    shape = (128, 128)  # 8 x 8 latents: 64 rows per branch, 128 for a t2i's two computed branches
    pipe.fast_cache.clear()
    ref = pipe.generate("A red bagel", image_shapes=shape, num_timesteps=3, seed=5)
    assert pipe.fast_cache["denoiser"].mlp_chunks == 1
    monkeypatch.setattr(pipe, "offload", True)
    asked = []
    monkeypatch.setattr(placement, "mlp_chunks", lambda bagel, *sizes: asked.append(sizes) or 3)
    res = pipe.generate("A red bagel", image_shapes=shape, num_timesteps=3, seed=5)
    den = pipe.fast_cache["denoiser"]
    assert den.mlp_chunks == 3
    assert asked[-1][1] == den.arena_nbytes  # the arena bytes the count was asked for are the arena's
    assert asked[-1][0] == 128  # and the forward's latent rows: two branches of 64
    assert rel_l2(res.latents, ref.latents) < TOL
    pipe.generate("A red bagel", image_shapes=shape, num_timesteps=3, seed=5, cfg_text_scale=1.0)
    assert asked[-1][0] == 64  # without text guidance only the conditional branch runs
