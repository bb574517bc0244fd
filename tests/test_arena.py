"""The denoiser's arena layout (bagel_rt.arena): shared cached prefixes between CFG branches, each branch's keys
one contiguous range, and the packed forward over a shared prefix equal to one over separate copies."""

import pytest
import torch
from conftest import rel_l2
from PIL import Image

import bagel_rt
from bagel_rt import arena
from bagel_rt.arena import ArenaLayout, shared_prefixes
from bagel_rt.sampler import CFGSettings
from bagel_rt.tiny import write_tiny_checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VAE, VIT, TXT, SYS = ("vae", "im"), ("vit", "im"), ("text", (5, 6)), ("text", (1,))


def test_shared_prefixes_pairs_a_prefix_history_with_its_extension():
    # an edit: cond = [VAE, ViT, text], text-uncond = [VAE, ViT], img-uncond = [text]
    assert shared_prefixes([(VAE, VIT, TXT), (VAE, VIT), (TXT,)], [30, 25, 5], [0, 0, 0]) == [None, 0, None]
    # a t2i: the text-unconditional cache is empty (nothing to share); the image-unconditional one is deduped
    assert shared_prefixes([(TXT,), ()], [5, 0], [0, 0]) == [None, None]
    # the same histories in two images of a batch: never across images
    h = [(VAE, VIT, TXT), (VAE, VIT), (VAE, VIT, TXT), (VAE, VIT)]
    assert shared_prefixes(h, [30, 25, 30, 25], [0, 0, 1, 1]) == [None, 0, None, 2]
    assert shared_prefixes(h, [30, 25, 30, 25], [0, 1, 2, 3]) == [None] * 4
    # equal histories (not deduped, e.g. under step caching): the earlier branch is the parent
    assert shared_prefixes([(TXT,), (TXT,)], [5, 5], [0, 0]) == [None, 0]
    # a chain [SYS] < [SYS, TXT] < [SYS, TXT, VAE]: pairs only, the longest shared cache first
    chain = [(SYS, TXT, VAE), (SYS,), (SYS, TXT)]
    assert shared_prefixes(chain, [40, 1, 6], [0, 0, 0]) == [None, None, 0]
    # not a prefix: different first segment
    assert shared_prefixes([(VAE, TXT), (TXT,)], [10, 5], [0, 0]) == [None, None]


@pytest.mark.parametrize("shares", [[None, 0, None], [None, None, None], [None, None, 1]])
def test_layout_gives_each_branch_one_key_range_over_its_cache_and_block(shares):
    lens, rows = [30, 25, 7], 12  # grid 3 x 4
    lay = ArenaLayout(lens, [40, 35, 9], [0, 0, 0], [(3, 4)], shares)
    saved = sum(lens[c] for c, a in enumerate(shares) if a is not None)
    assert lay.total == sum(lens) + 3 * (rows + 2) - saved
    owner = torch.full((lay.total,), -1)  # which branch's cache or block each arena row holds
    for b in range(3):
        block = range(lay.block_start[b], lay.block_start[b] + rows + 2)
        assert (owner[block] == -1).all(), "query blocks overlap nothing"
        owner[block] = b
    for b in lay.copied():
        c0, c1 = lay.cache_range(b)
        assert (owner[c0:c1] == -1).all(), "copied caches overlap nothing"
        owner[c0:c1] = 10 + b
    assert (owner >= 0).all(), "no unused rows"
    for b in range(3):
        k0, k1 = lay.key_range[b]
        c0, c1 = lay.cache_range(b)
        parent = b if shares[b] is None else shares[b]
        # its keys: exactly its block and the first lens[b] rows of its (parent's) cache
        inside = owner[k0:k1]
        assert (inside == b).sum() == rows + 2 and (inside == 10 + parent).sum() == lens[b]
        assert lay.cache_start[b] == lay.cache_start[parent] and k0 <= c0 and c1 <= k1
    # the store: the copied caches one after another, a sharing branch inside its parent's; cache_rows sends
    # each store row to its row of the one-layer arena
    assert lay.store_total == sum(lens) - saved
    stored = torch.full((lay.store_total,), -1)
    for b in lay.copied():
        s0, s1 = lay.store_range(b)
        assert (stored[s0:s1] == -1).all()
        stored[s0:s1] = b
    assert (stored >= 0).all()
    rows_of = lay.cache_rows()
    assert rows_of.shape == (lay.store_total,) and len(set(rows_of.tolist())) == lay.store_total
    for b in range(3):
        parent = b if shares[b] is None else shares[b]
        s0, s1 = lay.store_range(b)
        assert lay.store_start[b] == lay.store_start[parent]
        assert rows_of[s0:s1].tolist() == list(range(*lay.cache_range(b)))
    assert lay.nbytes(3, 28) == 3 * (28 * lay.store_total + 2 * lay.total)
    m = lay.meta((1, 2), 8, 10000.0, torch.device("cpu"), torch.float32)
    assert m["cu_k"][:-1].tolist() == [lay.key_range[b][0] for b in (1, 2)]
    assert m["used_k"].tolist() == [lay.key_range[b][1] - lay.key_range[b][0] for b in (1, 2)]
    assert m["cu_qg"].tolist() == [0, rows, 2 * rows] and m["cu_qu"].tolist() == [0, 2, 4]
    assert m["und_rows"].tolist() == [lay.block_start[1], lay.block_start[1] + 1, lay.block_start[2],
                                      lay.block_start[2] + 1]
    # a denoiser captured for one sharing is not reused for another
    assert (lay.key == ArenaLayout(lens, [40, 35, 9], [0, 0, 0], [(3, 4)]).key) == (shares == [None] * 3)


def test_shared_prefix_forward_matches_separate_copies(tmp_path, monkeypatch):
    """An edit (input image, then the instruction) through the packed denoiser: the text-unconditional branch reads
    the conditional cache's rows (the arena is smaller by exactly its cache) and gives the same latents as with a
    copy of its own (fp32: only the attention's summation order differs)."""
    pipe = bagel_rt.load(write_tiny_checkpoint(tmp_path / "tiny"), device=DEV, dtype=torch.float32,
                         backend="triton")
    img = Image.new("RGB", (64, 48), (200, 30, 90))
    cfg = CFGSettings(4.0, 2.0, (0.0, 1.0), 0.0, "global")

    def edit():
        pipe.fast_cache.clear()
        s = pipe.session(seed=3)
        s.add_image(img)
        s.add_text("make it blue")
        assert s.gen.history[: len(s.cfg_text.history)] == s.cfg_text.history
        res = s.gen_image((48, 64), cfg, num_timesteps=4, record=True)
        return res, pipe.fast_cache["denoiser"], s

    shared, den, s = edit()
    assert den.layout.shares == [None, 0, None]
    monkeypatch.setattr(arena, "shared_prefixes", lambda h, lens, image_of: [None] * len(lens))
    copied, den_c, _ = edit()
    assert den_c.layout.shares == [None, None, None]
    assert den_c.layout.total - den.layout.total == s.cfg_text.length > 0
    assert den_c.layout.store_total - den.layout.store_total == s.cfg_text.length
    # the store holds each copied branch's cache of every layer, the one-layer arena that layer's caches
    L = len(pipe.model.local_layers)
    assert den.k.shape[:2] == (L, den.layout.store_total) and den.arena_k.shape[:2] == (2, den.layout.total)
    for b in den.layout.copied():
        s0, s1 = den.layout.store_range(b)
        c = [s.gen, s.cfg_text, s.cfg_img][b].cache
        assert torch.equal(den.k[:, s0:s1], c.k[:, : s1 - s0]) and torch.equal(den.v[:, s0:s1], c.v[:, : s1 - s0])
    K, V = den.layer_arena(L - 1)
    c0, c1 = den.layout.cache_range(0)
    assert torch.equal(K[c0:c1], s.gen.cache.k[L - 1, : c1 - c0])
    assert torch.equal(V[c0:c1], s.gen.cache.v[L - 1, : c1 - c0])
    assert rel_l2(shared.velocities, copied.velocities) < 1e-5
    assert rel_l2(shared.latents, copied.latents) < 1e-5
