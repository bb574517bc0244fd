"""Unit checks of the details the reference doc (section 6) warns reimplementations get wrong."""

import math

import pytest
import torch
from conftest import GOLDEN
from PIL import Image
from safetensors import safe_open

import bagel_rt
from bagel_rt.embeddings import rope_cos_sin, sincos_1d, sincos_2d_table, timestep_sinusoid
from bagel_rt.llm import RMSNorm, apply_rope
from bagel_rt.sampler import CFGSettings, combine_cfg, schedule
from bagel_rt.session import SYSTEM_PROMPT_GEN, SYSTEM_PROMPT_VLM


@pytest.fixture(scope="module")
def pipe():
    return bagel_rt.load(GOLDEN / "tiny-a", device="cpu")


def test_sincos_table_layout_x_first_sin_first():
    import numpy as np

    d, g = 16, 5
    tab = sincos_2d_table(d, g)
    r, c = 3, 1
    row = tab[r * g + c]
    torch.testing.assert_close(row[: d // 2], torch.from_numpy(sincos_1d(d // 2, np.array([c]))[0]).float())
    torch.testing.assert_close(row[d // 2:], torch.from_numpy(sincos_1d(d // 2, np.array([r]))[0]).float())
    # sin first, then cos; omega_k = 10000^(-k/(D/4))
    k, pos = 1, 2.0
    row = sincos_1d(8, np.array([pos]))[0]
    assert math.isclose(float(row[k]), math.sin(pos * 10000 ** (-k / 4)), rel_tol=1e-9)
    assert math.isclose(float(row[4 + k]), math.cos(pos * 10000 ** (-k / 4)), rel_tol=1e-9)


def test_checkpoint_tables_are_the_reference_sincos():
    """The official tiny checkpoint's stored tables equal our formula (so the layout is right)."""
    with safe_open(str(GOLDEN / "tiny-a" / "ema.safetensors"), "pt") as f:
        lat = f.get_tensor("latent_pos_embed.pos_embed").float()
        vit = f.get_tensor("vit_pos_embed.pos_embed").float()
    torch.testing.assert_close(lat, sincos_2d_table(64, 64), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(vit, sincos_2d_table(64, 70), atol=1e-2, rtol=1e-2)


def test_timestep_embedding_raw_t_cos_first():
    e = timestep_sinusoid(torch.tensor([0.0, 0.5]))
    assert e.shape == (2, 256)
    assert torch.all(e[0, :128] == 1) and torch.all(e[0, 128:] == 0)  # cos first
    assert math.isclose(float(e[1, 0]), math.cos(0.5), rel_tol=1e-6)  # t used raw, not x1000
    f1 = math.exp(-math.log(10000) / 128)
    assert math.isclose(float(e[1, 128 + 1]), math.sin(0.5 * f1), rel_tol=1e-5)


def test_schedule_values_and_interval():
    ts = schedule(50, 3.0)
    expect = {0: 1.0, 1: 0.99310, 2: 0.98601, 3: 0.97872, 46: 0.16364, 47: 0.11321, 48: 0.05882, 49: 0.0}
    for i, v in expect.items():
        assert abs(float(ts[i]) - v) < 1e-5, (i, float(ts[i]))
    cfg = CFGSettings(cfg_interval=(0.4, 1.0))
    active = [cfg.scales_at(float(t))[0] > 1 for t in ts[:-1]]
    assert sum(active) == 41  # 41 of 49 evaluations guided (doc 4.5)
    assert all(CFGSettings(cfg_interval=(0.0, 1.0)).scales_at(float(t))[0] > 1 for t in ts[:-1])
    # lo < t <= hi: the upper bound is included, the lower excluded
    c = CFGSettings(cfg_interval=(0.5, 0.9))
    assert c.scales_at(0.9)[0] == 4.0 and c.scales_at(0.5)[0] == 1.0


def test_cfg_formulas():
    g = torch.Generator().manual_seed(0)
    vc, vt, vi = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    st, si = 4.0, 1.5
    # no guidance unless text scale > 1, even with image scale > 1
    assert combine_cfg(vc, vt, vi, 1.0, 2.0, "global", 0.0) is vc
    # global: text then image, one Frobenius norm over everything
    u = vi + si * (vt + st * (vc - vt) - vi)
    want = u * (vc.norm() / (u.norm() + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(combine_cfg(vc, vt, vi, st, si, "global", 0.0), want)
    # channel: per-token norms
    want = u * (vc.norm(dim=-1, keepdim=True) / (u.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.3, 1.0)
    torch.testing.assert_close(combine_cfg(vc, vt, vi, st, si, "channel", 0.3), want)
    # text_channel: renorm after the text step only, then the image step
    ut = vt + st * (vc - vt)
    ut = ut * (vc.norm(dim=-1, keepdim=True) / (ut.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(combine_cfg(vc, vt, vi, st, si, "text_channel", 0.0), vi + si * (ut - vi))
    # renorm_min = 1 disables renorm
    torch.testing.assert_close(combine_cfg(vc, vt, vi, st, si, "global", 1.0), u)
    # the app's implicit image scale with v_i == v_c: effective text scale 1 + 1.5 (s_t - 1) = 5.5
    torch.testing.assert_close(combine_cfg(vc, vt, vc, st, si, "global", 1.0), vt + 5.5 * (vc - vt))
    with pytest.raises(bagel_rt.InputError, match="local"):
        CFGSettings(cfg_renorm_type="local")


def test_rmsnorm_casts_before_weight():
    n = RMSNorm(8, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        n.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    xf = x.float()
    want = n.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(n(x), want)


def test_rope_rotate_half_theta():
    d, theta = 16, 1e6
    cos, sin = rope_cos_sin(torch.tensor([3]), d, theta, torch.float64)
    x = torch.randn(1, 1, d, dtype=torch.float64)
    out = apply_rope(x, cos, sin)[0, 0]
    for j in range(d // 2):  # pairs (j, j + d/2) rotate by angle pos * theta^(-2j/d)
        a = 3 * theta ** (-2 * j / d)
        x1, x2 = float(x[0, 0, j]), float(x[0, 0, j + d // 2])
        assert math.isclose(float(out[j]), x1 * math.cos(a) - x2 * math.sin(a), abs_tol=1e-5)
        assert math.isclose(float(out[j + d // 2]), x2 * math.cos(a) + x1 * math.sin(a), abs_tol=1e-5)


def test_text_framing_and_system_prompts(pipe):
    tok = pipe.tokenizer
    ids = tok.frame("A red bagel.")
    assert ids[0] == tok.special.bos == 476 and ids[-1] == tok.special.eos == 477
    assert ids[1:-1] == tok.encode("A red bagel.")  # no roles, no automatic BOS
    assert (tok.special.start_of_image, tok.special.end_of_image) == (478, 479)
    assert " \nThe planning" in SYSTEM_PROMPT_GEN and " \nThe reasoning" in SYSTEM_PROMPT_VLM


def test_position_ids_and_cache_growth(pipe):
    """Text: one position per token; an image block: one position (rope += 1), markers included."""
    s = pipe.session(seed=0)
    s.add_text("A red bagel.")
    n = len(pipe.tokenizer.frame("A red bagel."))
    assert s.gen.rope == n and s.gen.length == n
    img = Image.new("RGB", (300, 200), (200, 30, 30))
    resized = s.add_image(img)  # 300x200 -> 768x512 (VAE) -> 770x518 (ViT)
    assert resized.size == (768, 512)
    lat = (768 // 16) * (512 // 16)
    vit = (770 // 14) * (518 // 14)
    assert s.gen.rope == n + 2  # VAE block and ViT block: +1 each
    assert s.gen.length == n + (lat + 2) + (vit + 2)
    assert s.cfg_text.length == s.gen.length and s.cfg_img.length == n  # images never enter cfg_img
    before = s.gen.length
    s.model.velocity(s.gen, torch.randn(lat, 64), 1.0, 32, 48)
    assert s.gen.length == before  # noised latents are never cached


def test_markers_use_und_expert(pipe):
    """In a VAE block only latent tokens see the gen expert: perturbing it leaves marker outputs alone."""
    import copy

    m = copy.deepcopy(pipe.model)
    ctx = m.new_context()
    x = m.latent_block(torch.randn(12, 64), 0.5, 3, 4)
    pos = torch.zeros(14, dtype=torch.long)
    a = m.language_model(x, 2, pos, ctx.cache.__class__(2, 2, 16, "cpu", m.dtype, 64), 0, False, True)
    with torch.no_grad():
        m.language_model.model.layers[-1].mlp_moe_gen.down_proj.weight.mul_(3.0)
        m.language_model.model.norm_moe_gen.weight.mul_(2.0)
    b = m.language_model(x, 2, pos, ctx.cache.__class__(2, 2, 16, "cpu", m.dtype, 64), 0, False, True)
    assert torch.equal(a[:2], b[:2]) and not torch.equal(a[2:], b[2:])


def test_t2i_image_branch_dedup_is_exact(pipe):
    """With cfg_img_scale 1.5 the text-to-image image-unconditional context equals the conditional one:
    reusing v_c is bit-identical to computing that branch, and saves one forward per guided step."""
    calls = []
    orig = pipe.model.velocity

    def counting(ctx, *a, **k):
        calls.append(ctx)
        return orig(ctx, *a, **k)

    pipe.model.velocity = counting
    try:
        s = pipe.session(seed=3)
        s.add_text("A red bagel.")
        fast = s.gen_image(cfg=CFGSettings(4.0, 1.5, (0.4, 1.0)), num_timesteps=6, image_shapes=(64, 64))
        n_fast = len(calls)
        calls.clear()
        s2 = pipe.session(seed=3)
        s2.add_text("A red bagel.")
        s2.cfg_img.history += (("distinct",),)  # same cache, but no longer provably equal: computed
        slow = s2.gen_image(cfg=CFGSettings(4.0, 1.5, (0.4, 1.0)), num_timesteps=6, image_shapes=(64, 64))
        n_slow = len(calls)
    finally:
        pipe.model.velocity = orig
    guided = sum(CFGSettings(4.0, 1.5, (0.4, 1.0)).scales_at(float(t))[0] > 1 for t in schedule(6, 3.0)[:-1])
    assert n_fast == 5 + guided and n_slow == 5 + 2 * guided
    assert torch.equal(fast.latents, slow.latents)


def test_skips_branches_with_scale_at_most_one(pipe):
    calls = []
    orig = pipe.model.velocity
    pipe.model.velocity = lambda ctx, *a, **k: (calls.append(ctx), orig(ctx, *a, **k))[1]
    try:
        pipe.generate("x", image_shapes=(32, 32), num_timesteps=5, cfg_text_scale=1.0, cfg_img_scale=2.0, seed=0)
        assert len(calls) == 4  # image-only guidance does nothing in the reference: only v_c is computed
    finally:
        pipe.model.velocity = orig


def test_session_turns_equal_one_shot_interleave(pipe):
    img = Image.new("RGB", (64, 48), (10, 120, 200))
    one = pipe.interleave([img, "make it red"], seed=7, num_timesteps=3, cfg_text_scale=4.0, cfg_img_scale=2.0,
                          cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
    s = pipe.session(seed=7)
    s.add(img)
    s.add("make it red")
    two = s.gen_image(None, CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel"), num_timesteps=3)
    assert torch.equal(one.latents, two.latents)
    # a further turn extends the cached context: nothing prefilled before is recomputed
    before = s.gen.length
    s.add("now blue")
    assert s.gen.length == before + len(pipe.tokenizer.frame("now blue"))


def test_seed_stream_order(pipe):
    """One CPU generator: VAE posterior noise of each input image first, then the initial latent noise."""
    img = Image.new("RGB", (32, 32), (0, 0, 0))  # -> 512x512 (VAE)
    res = pipe.interleave([img, "x"], seed=11, num_timesteps=2, cfg_text_scale=1.0, record=True)
    g = torch.Generator().manual_seed(11)
    torch.randn((1, 16, 64, 64), generator=g)  # posterior noise of the image
    noise = torch.randn((32 * 32, 64), generator=g)
    res2 = pipe.interleave([img, "x"], seed=11, num_timesteps=2, cfg_text_scale=1.0, noise=noise, record=True)
    assert torch.equal(res.latents, res2.latents)


def test_temperature_sampling_is_seeded_and_follows_softmax(pipe):
    """do_sample draws from softmax(logits / T) with the session's seeded generator (no top-k/top-p)."""
    a = pipe.understand(None, "Describe the scene in detail.", max_think_token_n=12, do_sample=True,
                        text_temperature=0.8, seed=3, record=True)
    b = pipe.understand(None, "Describe the scene in detail.", max_think_token_n=12, do_sample=True,
                        text_temperature=0.8, seed=3)
    assert a.token_ids == b.token_ids  # same seed, same text
    # replay the draws: the same generator state gives the same tokens from the recorded logits
    g = torch.Generator().manual_seed(3)
    replay = [int(torch.multinomial(torch.softmax(lg.float() / 0.8, dim=-1), 1, generator=g)) for lg in a.logits]
    assert replay == a.token_ids
    greedy = pipe.understand(None, "Describe the scene in detail.", max_think_token_n=12)
    c = pipe.understand(None, "Describe the scene in detail.", max_think_token_n=12, do_sample=True,
                        text_temperature=1e-4, seed=5)
    assert c.token_ids == greedy.token_ids  # T -> 0 is greedy


def test_multi_turn_reply_then_edit_extends_the_context(pipe):
    """Understand, reply (the answer joins the conversation), then generate — no turn is prefilled twice."""
    img = Image.new("RGB", (64, 48), (200, 120, 30))
    s = pipe.session(seed=1)
    s.add(img)
    s.add("What breed is this cat?")
    before = s.gen.length
    ans = s.reply(max_length=6)
    framed = pipe.tokenizer.frame(ans.text)
    assert s.gen.length == before + len(framed)  # only the answer was prefilled
    assert s.cfg_text.length == before  # text-unconditional = the context before the last text
    s.add("Now make it a ragdoll in autumn leaves.")
    out = s.gen_image(cfg=CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "text_channel"), num_timesteps=2)
    assert out.image.size == (688, 512)  # the input image's size after the VAE resize (64x48 -> 688x512)
    # the same conversation given in one interleaved call (answer passed as text) gives the same image
    one = pipe.interleave([img, "What breed is this cat?", ans.text, "Now make it a ragdoll in autumn leaves."],
                          seed=1, num_timesteps=2, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                          cfg_renorm_type="text_channel")
    assert torch.equal(one.latents, out.latents)


def test_text_prefill_is_causal_with_the_cache_in_front():
    """Query i of a block of Lq tokens after a cache of Lk - Lq rows sees keys j <= Lk - Lq + i (doc 3.4)."""
    from bagel_rt.llm import attention

    g = torch.Generator().manual_seed(0)
    lq, lk, hq, hk, d = 3, 7, 4, 2, 8
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64) for n, h in ((lq, hq), (lk, hk), (lk, hk)))
    out = attention(q, k, v, causal=True)
    for i in range(lq):
        for head in range(hq):
            kv = head // (hq // hk)
            vis = lk - lq + i + 1
            w = torch.softmax(q[i, head] @ k[:vis, kv].T / d**0.5, dim=-1)
            torch.testing.assert_close(out[i, head], w @ v[:vis, kv])
    full = attention(q, k, v, causal=False)  # image blocks: bidirectional over cache + block
    w = torch.softmax(q[0, 0] @ k[:, 0].T / d**0.5, dim=-1)
    torch.testing.assert_close(full[0, 0], w @ v[:, 0])
