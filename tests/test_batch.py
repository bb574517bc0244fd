"""Batched requests (``generate``/``edit`` with lists and ``n``): image k of a batch is the image the same
request makes alone with its seed — bit for bit on the torch backend (lockstep), within float noise on the
triton backend (one packed forward per step over every image's branches; CPU: Triton interpreter, fp32)."""

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2
from PIL import Image

import bagel_rt
from bagel_rt.sampler import CFGSettings
from bagel_rt.session import gen_images
from bagel_rt.step_cache import StepCacheSettings

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 5e-3
#: prompts of different token counts (different context lengths in one arena)
PROMPTS = ["A red bagel", "Two dogs play in the park at noon, in watercolor", "A cat"]
#: 4 timesteps: CFG at the first two steps only, so the last step packs the conditional branches alone
#: (every other arena section then gets no queries)
KW = dict(image_shapes=(16, 32), num_timesteps=4, cfg_interval=(0.7, 1.0))


@pytest.fixture(scope="module")
def pipes(tiny):
    return (bagel_rt.load(tiny, device=DEV, dtype=torch.float32, backend="torch"),
            bagel_rt.load(tiny, device=DEV, dtype=torch.float32, backend="triton"))


def test_generate_batch_is_one_by_one_torch(pipes):
    torch_pipe = pipes[0]
    batch = torch_pipe.generate(PROMPTS, n=2, seed=10, **KW)
    assert isinstance(batch, list) and len(batch) == 6
    for k, res in enumerate(batch):  # prompt-major, seed + k
        alone = torch_pipe.generate(PROMPTS[k // 2], seed=10 + k, **KW)
        assert res.seed == 10 + k
        assert torch.equal(res.latents, alone.latents), k
        assert res.image.tobytes() == alone.image.tobytes()
        assert res.info["batch"] == {"index": k, "size": 6, "packed": 6}
    assert not torch.equal(batch[0].latents, batch[1].latents)  # the seeds reach the images
    # a list of one is a list; a single prompt with n == 1 is a Result, as before
    assert isinstance(torch_pipe.generate(["A cat"], seed=1, **KW), list)
    assert isinstance(torch_pipe.generate("A cat", seed=[1], **KW), bagel_rt.Result)


def test_think_and_budget_batches_torch(pipes, monkeypatch):
    """think=True: each image's plan is decoded (one after another) and the image is the one it is alone. Under
    a GPU memory budget the images run one at a time: the same images, on_step counting each image's steps."""
    torch_pipe = pipes[0]
    kw = dict(KW, think=True, max_think_token_n=4, do_sample=True)  # sampled: each seed its own plan
    batch = torch_pipe.generate(PROMPTS[:2], seed=40, **kw)
    for k, res in enumerate(batch):
        alone = torch_pipe.generate(PROMPTS[k], seed=40 + k, **kw)
        assert res.text == alone.text and res.token_ids == alone.token_ids
        assert torch.equal(res.latents, alone.latents)
    monkeypatch.setattr(torch_pipe, "gpu_budget_gib", 12.0)  # what limit_gpu_memory sets (CUDA only)
    steps = []
    budget = torch_pipe.generate(PROMPTS[:2], seed=40, on_step=lambda i, n: steps.append(i), **kw)
    assert steps == [0, 1, 2, 0, 1, 2]
    assert [r.info["batch"] for r in budget] == [{"index": k, "size": 2, "packed": 1} for k in range(2)]
    assert all(torch.equal(a.latents, b.latents) and a.text == b.text for a, b in zip(budget, batch))


def test_generate_batch_packs_every_image_triton(pipes):
    torch_pipe, fast_pipe = pipes
    seeds = [3, 7, 11, 5]
    batch = fast_pipe.generate(PROMPTS[:2], n=2, seed=seeds, **KW)
    den = fast_pipe.fast_cache["denoiser"]
    assert den.B == 8  # 4 images x (cond, text-uncond); the image-uncond branch equals cond (t2i)
    # CFG steps: all 8 branches in one forward; the last step: the 4 conditional branches, one forward
    assert set(den._checked) == {("full", tuple(range(8))), ("full", (0, 2, 4, 6))}
    for k, res in enumerate(batch):
        alone = torch_pipe.generate(PROMPTS[k // 2], seed=seeds[k], **KW)
        assert res.seed == seeds[k]
        assert rel_l2(res.latents, alone.latents) < TOL, k
    again = fast_pipe.generate(PROMPTS[:2], n=2, seed=seeds, **KW)
    assert fast_pipe.fast_cache["denoiser"] is den  # the same layout: the denoiser is refilled, not rebuilt
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(again, batch))


def _three_branch_session(pipe, prompt, seed):
    """Edit-like contexts (three distinct branches) without an input image: cond = [sys, prompt, plan],
    text-uncond = [sys], img-uncond = [sys, prompt] (an image input is too slow for the interpreter)."""
    s = pipe.session(think=True, seed=seed)
    s.add_text(prompt)
    s._prefill_text(s.gen, "a plan")
    return s


def test_images_of_different_sizes_pack_triton(pipes):
    """Two images of different grids and context lengths, three branches each, in one arena: each as alone."""
    cfg = CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel")
    shapes = [(16, 48), (32, 16)]
    out = {}
    for pipe in pipes:
        sessions = [_three_branch_session(pipe, p, 20 + k) for k, p in enumerate(PROMPTS[:2])]
        out[pipe.backend] = gen_images(sessions, shapes, cfg, num_timesteps=3)
    den = pipes[1].fast_cache["denoiser"]
    assert den.layout.grids == [(1, 3), (2, 1)] and den.B == 6 and den.N is None
    for k, p in enumerate(PROMPTS[:2]):
        alone = _three_branch_session(pipes[0], p, 20 + k).gen_image(shapes[k], cfg, num_timesteps=3)
        assert torch.equal(out["torch"][k].latents, alone.latents)
        assert rel_l2(out["triton"][k].latents, alone.latents) < TOL
        assert out["triton"][k].image.size == shapes[k][::-1]


@pytest.fixture
def cheap_vae(pipes, monkeypatch):
    """The torch pipeline with a stand-in VAE (an edit's input is resized to >= 512 pixels a side, and the
    tiny VAE takes ~20 s per encode or decode of that on a CI core). The stand-in draws the posterior noise
    from the session's generator exactly as the real encoder does (shape [1, 16, H/8, W/8], fp32, CPU), so
    each image's seed stream, context and initial noise are what they are with the real VAE."""
    pipe = pipes[0]

    def encode(x, generator):
        mean = F.avg_pool2d(x.float(), 8).repeat(1, 6, 1, 1)[:, :16]
        return mean + 0.1 * torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)

    monkeypatch.setattr(pipe.vae, "encode", encode)
    monkeypatch.setattr(pipe.vae, "decode", lambda z: F.interpolate(z[:, :3], scale_factor=8))
    return pipe


def test_edit_batch_of_two_sizes_is_one_by_one_torch(cheap_vae, tmp_path):
    pipe = cheap_vae
    wide = Image.new("RGB", (40, 30), (200, 30, 30))
    tall = tmp_path / "tall.png"
    Image.new("RGB", (30, 60), (20, 90, 200)).save(tall)
    texts = ["make it blue", "add a moon to the sky"]
    batch = pipe.edit([wide, str(tall)], texts, num_timesteps=2, seed=[4, 9])
    assert batch[0].image.size != batch[1].image.size
    for res, img, text, seed in zip(batch, [wide, str(tall)], texts, [4, 9]):
        alone = pipe.edit(img, text, num_timesteps=2, seed=seed)
        assert torch.equal(res.latents, alone.latents) and res.image.tobytes() == alone.image.tobytes()
    # one image, two instructions: the image goes with each (image k: seed + k)
    two = pipe.edit(wide, texts, num_timesteps=2, seed=4)
    assert [r.seed for r in two] == [4, 5]
    assert torch.equal(two[0].latents, batch[0].latents) and not torch.equal(two[1].latents, batch[1].latents)


def test_step_caching_composes_with_batches(pipes):
    """TaylorSeer on a batch: every image's branches on a full evaluation in one forward, the others in one
    Taylor graph; each image's result and schedule report are the ones it has alone."""
    settings = StepCacheSettings(fresh_threshold=3, max_order=2, first_enhance=1)
    kw = dict(image_shapes=(16, 32), num_timesteps=7, cfg_interval=(0.0, 0.9), enable_taylorseer=True,
              taylorseer_settings=settings)
    torch_pipe, fast_pipe = pipes
    batch = {pipe.backend: pipe.generate(PROMPTS[:2], seed=30, **kw) for pipe in pipes}
    ran = set(fast_pipe.fast_cache["denoiser"]._checked)
    # 2 images x 3 branches (the img-uncond branch is needed only from step 2 on: not deduplicated under caching)
    assert {("full", (0, 3)), ("full", (1, 2, 4, 5)), ("taylor", (0, 3)), ("taylor", (1, 2, 4, 5))} <= ran
    for k, p in enumerate(PROMPTS[:2]):
        alone = torch_pipe.generate(p, seed=30 + k, **kw)
        assert torch.equal(batch["torch"][k].latents, alone.latents)
        assert rel_l2(batch["triton"][k].latents, alone.latents) < TOL
        assert batch["triton"][k].info["step_cache"] == alone.info["step_cache"]
        assert "T" in alone.info["step_cache"]["schedule"]["cond"]


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_step_and_cancellation(pipes, backend):
    """``on_step(i, num_steps)`` after every step of the batch (and of single requests); an exception raised
    in it stops the request and propagates, and the pipeline serves the next request as if nothing happened."""
    pipe = dict(zip(("torch", "triton"), pipes))[backend]
    calls = []
    before = pipe.generate(PROMPTS[:2], seed=2, on_step=lambda i, n: calls.append((i, n)), **KW)
    assert calls == [(0, 3), (1, 3), (2, 3)]  # 4 timesteps: 3 denoising steps, once per batch step
    calls.clear()
    pipe.interleave(["A cat"], image_shapes=(16, 16), num_timesteps=3, seed=0,
                    on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 2), (1, 2)]

    def cancel(i, n):
        if i == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate(PROMPTS[:2], seed=2, on_step=cancel, **KW)
    with pytest.raises(Cancelled):
        pipe.generate(PROMPTS[0], seed=2, on_step=cancel, **KW)
    got = []  # the lock was released: another thread gets it at once
    t = threading.Thread(target=lambda: got.append(pipe.lock.acquire(timeout=5) and pipe.lock.release() is None))
    t.start()
    t.join()
    assert got == [True]
    after = pipe.generate(PROMPTS[:2], seed=2, **KW)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(after, before))
