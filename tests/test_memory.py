"""Memory under a budget, checked on the CPU with the tiny checkpoint: the prefill MLP's row chunks give the
same bits, an image's cache grows once, and the predicted KV-cache / arena bytes (bagel_rt.memory_plan) are
what a request allocates."""

import pytest
import torch
from conftest import requires_interpreter
from PIL import Image

import bagel_rt
from bagel_rt.cache import _round_up
from bagel_rt.fast import PackedDenoiser
from bagel_rt.memory_plan import (
    TEXT_ROOM,
    arena_bytes,
    cache_rows,
    context_rows,
    kv_row_bytes,
    request_transients,
    vae_rows,
    vit_rows,
)

IMAGE = Image.new("RGB", (64, 64), (120, 30, 200))  # VAE-resized to 512x512: 1026 VAE rows, 1371 ViT rows


def _edit_contexts(pipe, text: str = "make it blue"):
    s = pipe.session(seed=0)
    s.add_image(IMAGE)
    s.add_text(text)
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_mlp_row_chunks_are_bit_identical(tiny, dtype):
    """Row chunks of the prefill MLPs (what a budget sets) compute the same bits as whole blocks (torch
    backend, CPU, one thread: with several, MKL splits a GEMM's rows between threads at row-count-dependent
    points, see bagel_rt.llm.MLP): every cached key and value of an edit's contexts is equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_chunked_prefill(tiny, dtype)
    finally:
        torch.set_num_threads(threads)


def _check_chunked_prefill(tiny, dtype):
    pipe = bagel_rt.load(tiny, device="cpu", dtype=dtype, backend="torch")
    whole = _edit_contexts(pipe)
    layers = pipe.model.language_model.model.layers
    for layer in layers:
        layer.mlp.max_rows = layer.mlp_moe_gen.max_rows = 256  # 1024 and 1371 rows: 4 and 5 chunks
    chunked = _edit_contexts(pipe)
    for a, b in ((whole.gen, chunked.gen), (whole.cfg_text, chunked.cfg_text)):
        n = a.length
        assert n == b.length and n > 2390
        assert torch.equal(a.cache.k[:, :n], b.cache.k[:, :n]) and torch.equal(a.cache.v[:, :n], b.cache.v[:, :n])


def test_image_cache_grows_once_and_the_plan_counts_it(tiny):
    """The conditional cache is reserved once for both image blocks; context rows, cache bytes and the
    denoiser's arena are what bagel_rt.memory_plan predicts (exact terms of the prediction)."""
    pipe = bagel_rt.load(tiny, device="cpu", dtype=torch.float32, backend="torch")
    p = pipe.model.params
    s = pipe.session(seed=0)
    s.add_image(IMAGE)
    H, W = s.image_shapes
    assert (H, W) == (512, 512)
    image_rows = vae_rows(p, H, W) + vit_rows(p, H, W)
    assert s.gen.length == image_rows == 1026 + 1371
    assert s.gen.cache.capacity == _round_up(image_rows + TEXT_ROOM)  # one reservation, room for the text
    s.add_text("make it blue")
    text = s.cfg_img.length
    want = context_rows(p, "edit", H, W, text)
    assert {"cond": s.gen.length, "text": s.cfg_text.length, "img": s.cfg_img.length} == want
    kv = kv_row_bytes(p, 4)
    assert s.gen.cache.nbytes() == cache_rows(p, "edit", H, W, text) * kv  # the text fit: no growth
    # the packed denoiser of a small output over all three branches (edit defaults: interval (0, 1))
    den = PackedDenoiser(pipe.model, [s.gen, s.cfg_text, s.cfg_img], 2, 3, use_graphs=False)
    assert den.k.nbytes + den.v.nbytes == arena_bytes(p, "edit", H, W, text, 4, output=(32, 48))
    plan = request_transients(p, "edit", H, W, itemsize=4, text_tokens=text)
    assert plan["peak"] == max(v for k, v in plan.items() if k != "peak")
    assert plan["denoise"] > arena_bytes(p, "edit", H, W, text, 4) and plan["prefill"] > s.gen.cache.nbytes()


@requires_interpreter
def test_budget_sends_the_caches_to_the_cpu_and_back(tiny, monkeypatch):
    """Under a budget the contexts' caches leave the GPU while the denoiser runs (here: the CPU device, where
    the move is a no-op; what is checked is that every context is asked to move, and that a later turn brings
    its cache back to the model's device)."""
    from bagel_rt.cache import KVCache

    pipe = bagel_rt.load(tiny, device="cpu", dtype=torch.float32, backend="triton")
    pipe.offload = True
    moves = []
    real = KVCache.to
    monkeypatch.setattr(KVCache, "to", lambda self, d: moves.append((id(self), str(d))) or real(self, d))
    s = pipe.session(seed=0)
    s.add_text("a cat")
    s.gen_image((32, 32), num_timesteps=2)
    assert {(id(c.cache), "cpu") for c in (s.gen, s.cfg_text, s.cfg_img)} <= set(moves)
    moves.clear()
    s.add_text("now blue")
    assert (id(s.gen.cache), "cpu") in moves  # the model's device (this CPU): the next prefill moves it there
