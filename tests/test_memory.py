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
    assert den.arena_nbytes == arena_bytes(p, "edit", H, W, text, 4, output=(32, 48))
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


def _record_head(pipe, monkeypatch):
    """Record lm_head's moves and each decode (torch step / graph-decoder request) of ``pipe`` in order."""
    from contextlib import contextmanager

    from bagel_rt import placement
    from bagel_rt.fast_decode import GraphDecoder

    events = []
    head = pipe.model.language_model.lm_head
    real_visit, real_step, real_gen = placement.visiting, pipe.model.decode_step, GraphDecoder.generate

    @contextmanager
    def visiting(module, device, enabled):
        with real_visit(module, device, enabled) as m:
            if module is head and enabled:
                events.append("visit")
            try:
                yield m
            finally:
                if module is head and enabled:
                    events.append("home")

    monkeypatch.setattr(placement, "visiting", visiting)
    monkeypatch.setattr(pipe.model, "decode_step", lambda *a: events.append("decode") or real_step(*a))
    monkeypatch.setattr(GraphDecoder, "generate", lambda *a, **k: events.append("decode") or real_gen(*a, **k))
    return events


def _collapse(events):
    """Runs of decode steps as one."""
    return [e for i, e in enumerate(events) if not (e == "decode" and i and events[i - 1] == "decode")]


@requires_interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_budget_brings_lm_head_for_text_only(tiny, monkeypatch, backend):
    """Under a budget lm_head (idle while denoising; resident, it made INT8 / FP8 edits and the FP8-gen/NF4-und
    t2i run out of memory on an H200 by 74-112 MiB) is asked to come to the model's device (this CPU) before
    each text phase and to go back to the CPU after it, never for an image; the graph decoder drops the
    compressed head it built (no stale device buffers) and rebuilds it; the texts and logits are the same."""
    from bagel_rt.quant import Int8Linear

    def run(offload: bool):
        pipe = bagel_rt.load(tiny, device="cpu", dtype=torch.float32, backend=backend)
        lm = pipe.model.language_model
        lm.lm_head = Int8Linear.from_linear(lm.lm_head)  # compressed: the graph decoder builds a DecodeWeight
        pipe.offload = offload
        events = _record_head(pipe, monkeypatch)
        s = pipe.session(think=True, seed=0)
        s.add_text("a cat")
        think = s.think(max_length=6, record=True)
        if backend == "triton" and offload:
            assert pipe._decoder.head is None and not pipe._decoder.graphs  # released with the move
        think_events = list(events)
        events.clear()
        s.gen_image((32, 32), num_timesteps=2)
        assert events == []  # generation never moves (or uses) it
        u = pipe.session(understanding_only=True, seed=0)
        u.add_text("What is a bagel?")
        answers = [u.reply(max_length=5, record=True), u.reply(max_length=5, record=True)]  # rebuilt each time
        if backend == "triton" and offload:
            assert pipe._decoder.head is None
        return [think, *answers], think_events, events

    ref, ref_think, ref_und = run(False)
    assert "visit" not in ref_think + ref_und
    res, think_events, und_events = run(True)
    assert _collapse(think_events) == ["visit", "decode", "home"]  # to the model's device, decode, back
    assert _collapse(und_events) == ["visit", "decode", "home"] * 2
    for a, b in zip(res, ref):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert torch.equal(a.logits, b.logits)


def test_compressed_linears_move_every_tensor():
    """INT8 / FP8 / NF4 Linears keep their weights in buffers: ``.to()`` moves all of them (a plain tensor
    attribute would stay behind on the GPU when lm_head goes to the CPU)."""
    from bagel_rt.quant import FP8Linear, Int8Linear, NF4Linear
    from torch import nn

    lin = nn.Linear(64, 32, bias=False)
    for cls in (Int8Linear, FP8Linear, NF4Linear):
        m = cls.from_linear(lin).to("meta")
        assert [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)] == [], cls.__name__
        assert {t.device.type for t in m.buffers()} == {"meta"}, cls.__name__
        assert m.weight.device.type == "meta"


def test_visiting_moves_and_points_back_without_copying(monkeypatch):
    """A visit gives every parameter and buffer (tied ones once) its device copy; leaving points the same
    Parameter objects back at their home tensors (the very storage: nothing copied back), and a visit that fails
    inside leaves the module at home too. Off CUDA the "device copy" is a CPU clone here (no pinning)."""
    from bagel_rt import placement

    made = []
    monkeypatch.setattr(placement, "_device_copy", lambda t, device, nb: made.append(t.clone()) or made[-1])
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    net[2].weight = net[0].weight  # tied
    net.register_buffer("table", torch.arange(5.0))
    homes = {n: (p, p.data_ptr()) for n, p in net.named_parameters(remove_duplicate=False)}
    before = {n: t.clone() for n, t in net.state_dict().items()}
    with placement.visiting(net, torch.device("cpu"), True):
        assert len(made) == 6  # the tied weight once, two biases, LayerNorm's two, the buffer
        visiting = {n: p.data_ptr() for n, p in net.named_parameters(remove_duplicate=False)}
        assert all(visiting[n] != ptr for n, (_, ptr) in homes.items())
        assert visiting["0.weight"] == visiting["2.weight"]  # the tie holds on the device
        assert net.table.data_ptr() in {t.data_ptr() for t in made}
    assert {n: (p, p.data_ptr()) for n, p in net.named_parameters(remove_duplicate=False)} == homes
    assert all(torch.equal(t, before[n]) for n, t in net.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), placement.visiting(net, torch.device("cpu"), True):
        raise RuntimeError("inside")
    assert {n: (p, p.data_ptr()) for n, p in net.named_parameters(remove_duplicate=False)} == homes
    made.clear()
    with placement.visiting(net, torch.device("cpu"), False):  # not offloaded: untouched
        assert not made
