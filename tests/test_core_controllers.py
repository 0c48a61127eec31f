"""Prompt-to-Prompt controllers on synthetic attention probabilities."""
from dataclasses import replace

import pytest
import torch

from customedit_core import align
from customedit_core.attention import AttentionHook, Layout, Site
from customedit_core.edit import P2PSettings, build_controllers, cross_alpha
from customedit_core.p2p import AttentionStore, RefineCross, ReplaceCross, ReplaceSelf, Reweight
from customedit_core.tokens import tokenize

L = 77


def site(kind="cross", side=4, latent=16, step=0, steps=10, prompts=2):
    return Site("l", kind, "down", side, side, 2, latent, latent, step, steps, Layout(prompts, True))


def probs(n=16, m=L, prompts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2 * prompts, 2, n, m, generator=g).softmax(-1)


def test_replace_cross_maps_source_onto_target_tokens(backend):
    tok = backend.tokenizer
    a, b = tokenize(tok, "a photo of a cat"), tokenize(tok, "a photo of a teapot")
    alpha = torch.ones(10, 1, L)
    c = ReplaceCross(align.replace_mapper(a, b)[None], alpha)
    p = probs()
    before = p.clone()
    out = c.probs(p.clone(), site())
    assert torch.equal(out[:3], before[:3])                 # uncond rows and the source row untouched
    base = before[2]
    assert torch.allclose(out[3][..., 5], base[..., 5] / 2) and torch.allclose(out[3][..., 6], base[..., 5] / 2)
    assert torch.allclose(out[3][..., :5], base[..., :5])
    # a token with alpha 0 keeps its own attention
    alpha[:, 0, 5] = 0
    out = ReplaceCross(align.replace_mapper(a, b)[None], alpha).probs(before.clone(), site())
    assert torch.equal(out[3][..., 5], before[3][..., 5])


def test_refine_cross_keeps_new_tokens_own_attention(backend):
    tok = backend.tokenizer
    a, b = tokenize(tok, "a photo of a cat"), tokenize(tok, "a photo of a striped cat")
    index, ta = align.refine_mapper(a, b)
    c = RefineCross(index[None], ta[None], torch.ones(10, 1, L))
    p = probs()
    out = c.probs(p.clone(), site())
    assert torch.equal(out[3][..., 5], p[3][..., 5])            # "striped" is new
    assert torch.equal(out[3][..., 6], p[2][..., 5])            # "cat" from the source's "cat"
    assert torch.equal(out[3][..., :5], p[2][..., :5])


def test_replace_self_only_in_small_layers_and_early_steps():
    c = ReplaceSelf(end_step=5, max_side=0.5)
    p = probs(n=16, m=16)
    assert c.needs_probs(site("self", side=4, step=4))
    assert not c.needs_probs(site("self", side=16, step=0))     # full-resolution layer
    assert not c.needs_probs(site("self", side=4, step=5))      # after the window
    assert not c.needs_probs(site("cross", side=4, step=0))
    out = c.probs(p.clone(), site("self", side=4))
    assert torch.equal(out[3], p[2]) and torch.equal(out[1], p[1])


def test_reweight_scales_edit_rows_inside_window():
    eq = torch.ones(1, L)
    eq[0, 3] = -2.0
    c = Reweight(eq, 0, 4)
    p = probs()
    out = c.probs(p.clone(), site())
    assert torch.allclose(out[3][..., 3], -2 * p[3][..., 3]) and torch.equal(out[2], p[2])
    assert not c.needs_probs(site(step=4))


def test_word_schedule(backend):
    tok = backend.tokenizer
    t = tokenize(tok, "a photo of a striped cat")
    alpha = cross_alpha(P2PSettings(cross_replace=0.8, word_cross_replace={"striped": (0.1, 0.3)}), [t], 10)
    assert alpha[:8, 0, 1].eq(1).all() and alpha[8:, 0, 1].eq(0).all()
    assert alpha[:, 0, 5].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_hook_uses_fused_attention_when_no_controller_needs_probs():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 16, 4).unbind(0)
    plain = AttentionHook([])(q, k, v, site("self", prompts=1))
    explicit = (q @ k.transpose(-1, -2) / 2).softmax(-1) @ v
    assert torch.allclose(plain, explicit, atol=1e-6)


def test_build_controllers_order(backend):
    tok = backend.tokenizer
    a, b = tokenize(tok, "a cat"), tokenize(tok, "a striped cat")
    hook, store, blend = build_controllers(P2PSettings(reweight={"striped": 2}, blend_source_words=("cat",)), a, [b], 10)
    names = [type(c).__name__ for c in hook.controllers]
    assert names == ["ReplaceSelf", "RefineCross", "Reweight", "AttentionStore"]     # the store records edits
    assert blend.start == 2 and blend.source_only


@pytest.mark.parametrize("latent, cross_scales, chosen", [
    (64, (1, 2, 4, 8), 4),       # SD1.x at 512 px: the reference's 16x16 maps
    (96, (1, 2, 4, 8), 8),       # SD1.x at 768 px: 12x12 is nearer 16x16 than 24x24 (log scale)
    (8, (1, 2, 4, 8), 1),        # SD1.x at 64 px: its largest maps, 8x8
    (16, (1, 2, 4), 1),          # a 64 px toy model with 16x16 latents: 16x16
    (128, (2, 4), 4),            # SDXL at 1024 px (cross-attention at 64x64 and 32x32): 32x32
    (32, (1, 2, 4, 8), 2),       # SD1.x at 256 px: 16x16
])
def test_maps_level_is_chosen_by_resolution(latent, cross_scales, chosen):
    from customedit_core.p2p import map_scale

    assert map_scale({s: latent / s for s in cross_scales}) == chosen


def test_store_keeps_only_the_maps_level_after_the_first_step():
    store = AttentionStore()
    hook = AttentionHook([store])
    q16, q8, q4 = (torch.randn(1, 2, n, 4) for n in (256, 64, 16))
    k = v = torch.randn(1, 2, 7, 4)
    sites = [Site(f"l{i}", "cross", "down", side, side, 2, 16, 16, layout=Layout(1, False))
             for i, side in enumerate((16, 8, 4))]
    for step in range(2):
        hook.begin(step, 2, Layout(1, False))
        for q, s in zip((q16, q8, q4), sites):
            hook(q, k, v, s)
        hook.end_step()
        if step == 0:
            assert store.level == 1 and set(store.sums) == {"l0"}
    assert not store.needs_probs(replace(sites[1], step=1)) and store.needs_probs(replace(sites[0], step=1))
    assert store.word_maps().shape == (1, 16, 16, 7) and store.steps_seen == 2
