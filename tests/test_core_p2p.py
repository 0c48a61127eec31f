"""Prompt-to-Prompt properties on a tiny SD-shaped model (CPU, fixed seeds)."""
import pytest
import torch

from customedit_core import P2PSettings, attention_maps, invert, p2p_edit
from customedit_core.attention import AttentionHook, Layout
from customedit_core.errors import InputError
from customedit_core.p2p import AttentionStore, LocalBlend

SRC = "a photo of a cat on grass"
NO_INJECTION = dict(cross_replace=0.0, self_replace=0.0)


def err(a, b):
    return (a - b).abs().mean().item()


@pytest.fixture(scope="module")
def inversions(backend, z0):
    return {m: invert(backend, z0, SRC, steps=8, guidance=7.5, method=m, inner_steps=3)
            for m in ("null_text", "direct", "negative_prompt")}


@pytest.mark.parametrize("method", ["null_text", "negative_prompt"])
@pytest.mark.parametrize("mode", ["refine", "replace"])
def test_identical_prompt_reproduces_reconstruction(backend, inversions, method, mode):
    inv = inversions[method]
    r = p2p_edit(backend, inv, SRC, P2PSettings(mode=mode))
    assert (r.edited[0] - r.source[0]).abs().max() < 1e-5
    assert (r.source - inv.reconstruction).abs().max() < 1e-4


def test_source_branch_is_the_reconstruction_whatever_the_edit(backend, inversions):
    inv = inversions["direct"]
    r = p2p_edit(backend, inv, "a photo of a striped dog on grass", P2PSettings(reweight={"striped": 3}))
    assert (r.source - inv.source).abs().max() < 1e-4


def test_direct_inversion_edit_branch_is_uncorrected(backend, inversions):
    """Direct inversion corrects the source branch only (as in the paper): with the same
    prompt the edit branch is the guided DDIM walk with the source's attention injected."""
    inv = inversions["direct"]
    r = p2p_edit(backend, inv, SRC)
    assert (r.source - inv.source).abs().max() < 1e-4
    assert err(r.edited, r.source) > 1e-3


def test_injection_reaches_the_model(backend, inversions):
    inv = inversions["null_text"]
    target = "a photo of a dog on grass"
    free = p2p_edit(backend, inv, target, P2PSettings(mode="replace", **NO_INJECTION)).edited
    steered = p2p_edit(backend, inv, target, P2PSettings(mode="replace", cross_replace=1.0, self_replace=1.0)).edited
    assert err(steered, free) > 1e-4


def test_no_injection_equals_plain_target_sampling(backend, inversions):
    from customedit_core.ddim import Schedule
    from customedit_core.sampling import denoise
    from customedit_core.tokens import tokenize
    inv = inversions["null_text"]
    target = "a photo of a striped cat on grass"
    r = p2p_edit(backend, inv, target, P2PSettings(**NO_INJECTION))
    cond = backend.encode([tokenize(backend.tokenizer, target)])
    plain = denoise(backend, Schedule(backend.alphas_cumprod, inv.steps), inv.noise, cond,
                    lambda i: inv.uncond[i], inv.guidance)
    assert (r.edited - plain).abs().max() < 1e-4


def test_reweight(backend, inversions):
    inv = inversions["direct"]
    tgt = "a photo of a striped cat on grass"
    base = p2p_edit(backend, inv, tgt).edited
    same = p2p_edit(backend, inv, tgt, P2PSettings(reweight={"striped": 1.0})).edited
    up = p2p_edit(backend, inv, tgt, P2PSettings(reweight={"striped": 4.0})).edited
    neg = p2p_edit(backend, inv, tgt, P2PSettings(reweight={"striped": -2.0})).edited
    assert torch.equal(base, same)
    assert err(up, base) > 1e-3 and err(neg, base) > 1e-3 and torch.isfinite(neg).all()
    with pytest.raises(InputError, match="reweight"):
        p2p_edit(backend, inv, tgt, P2PSettings(reweight={"zebra": 2.0}))


def test_local_blend_keeps_outside_of_mask(tiny, z0):
    from customedit_core.backends.diffusers import DiffusersBackend
    from testmodels.tiny import tiny_models
    unet, te, tok = tiny_models(seed=0)
    with torch.no_grad():   # sharper cross-attention, so word maps are localised
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                m.to_q.weight.mul_(8)
    b = DiffusersBackend(unet, te, tok)
    inv = invert(b, z0, SRC, steps=10, guidance=7.5, method="direct")
    r = p2p_edit(b, inv, "a photo of a striped cat on grass",
                 P2PSettings(blend_source_words=("cat",), blend_source_only=True, blend_threshold=0.5))
    m = r.mask
    assert 0.0 < m.mean().item() < 1.0, "mask should cover part of the image"
    assert ((1 - m) * (r.edited - r.source)).abs().max() == 0
    assert (m * (r.edited - r.source)).abs().max() > 1e-2
    assert (r.source - inv.source).abs().max() < 1e-4


def _store_with(maps_src, maps_tgt):
    """An AttentionStore holding one 4x4 cross layer at 1/4 of a 16x16 latent."""
    from customedit_core.attention import Site
    store = AttentionStore()
    site = Site("x", "cross", "down", 4, 4, 1, 16, 16, layout=Layout(2, False))
    p = torch.stack([maps_src, maps_tgt]).reshape(2, 1, 16, 1).expand(2, 1, 16, 77).clone()
    store.probs(p, site)
    return store


def test_local_blend_mask_rules():
    src = torch.zeros(4, 4)
    src[0, 0] = 1.0
    tgt = torch.zeros(4, 4)
    tgt[3, 3] = 1.0
    z = torch.stack([torch.zeros(4, 16, 16), torch.ones(4, 16, 16)])
    only = LocalBlend(_store_with(src, tgt), [[1], [1]], 0.3, source_only=True)
    out = only(0, z)
    # the source word's 1x1 peak grows to 2x2 cells by the 3x3 max-pool -> 8x8 latent pixels
    assert only.mask[0, 0, :8, :8].eq(1).all() and only.mask.sum() == 64
    assert torch.equal(out[1], only.mask[0].expand(4, -1, -1))
    both = LocalBlend(_store_with(src, tgt), [[1], [1]], 0.3)
    both(0, z)
    assert both.mask.sum() == 128 and both.mask[0, 0, 15, 15] == 1
    late = LocalBlend(_store_with(src, tgt), [[1], [1]], 0.3, start_step=5)
    assert torch.equal(late(4, z), z) and late.mask is None


def test_hook_without_controllers_matches_stock_attention(z0):
    from customedit_core.backends.diffusers import DiffusersBackend
    from testmodels.tiny import tiny_models
    unet, te, tok = tiny_models(seed=0)
    ctx = te(torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [tok.eos_token_id] * 75]))[0]
    with torch.no_grad():
        stock = unet(z0, 500, encoder_hidden_states=ctx).sample
        b = DiffusersBackend(unet, te, tok)
        ours = b.predict_eps(z0, 500, ctx, AttentionHook([]))
        b.close()
        again = unet(z0, 500, encoder_hidden_states=ctx).sample
    assert (ours - stock).abs().max() < 1e-5
    assert torch.equal(again, stock)


def test_edit_errors(backend, inversions):
    inv = inversions["direct"]
    with pytest.raises(InputError, match="refine"):
        p2p_edit(backend, inv, "a photo of a striped cat on grass", P2PSettings(mode="replace"))
    with pytest.raises(InputError, match="blend_source_words"):
        p2p_edit(backend, inv, "a photo of a dog", P2PSettings(blend_source_words=("dog",)))
    with pytest.raises(InputError, match="cross_replace"):
        p2p_edit(backend, inv, SRC, P2PSettings(cross_replace=1.5))
    with pytest.raises(InputError, match="target_prompt"):
        p2p_edit(backend, inv, "")
    with pytest.raises(InputError, match="8 steps but 50"):
        p2p_edit(backend, inv, SRC, steps=50)


def test_attention_maps(backend, inversions):
    inv = inversions["null_text"]
    src_maps = attention_maps(backend, inv, label=False)
    assert src_maps.shape == (len(inv.tokens.words), 128, 128, 3)
    assert src_maps.min() >= 0 and src_maps.max() <= 1
    assert torch.allclose(src_maps.amax(dim=(1, 2, 3)), torch.ones(len(src_maps)), atol=0.02)
    # an edit with the same prompt and full injection has the source's maps
    same = attention_maps(backend, inv, SRC, P2PSettings(cross_replace=1.0), label=False)
    assert (same - src_maps).abs().max() < 1e-3
    labelled = attention_maps(backend, inv, "a photo of a striped cat on grass")
    assert labelled.shape[0] == 8


def test_prompt_at_the_token_limit_with_punctuation(backend, z0):
    src = ", ".join(["a cat"] * 24) + ", a cat!"          # 75 tokens: the model's limit
    assert backend.tokenizer.max_length - 2 == len([t for t in src.replace(",", " ,").replace("!", " !").split()])
    inv = invert(backend, z0, src, steps=3, guidance=7.5, method="negative_prompt")
    tgt = src[:-4] + "dog!"
    r = p2p_edit(backend, inv, tgt, P2PSettings(mode="replace", blend_source_words=("cat",),
                                                blend_target_words=("dog",)))
    assert torch.isfinite(r.edited).all() and r.mask is not None
    same = p2p_edit(backend, inv, src, P2PSettings(mode="refine"))
    assert (same.edited - same.source).abs().max() < 1e-5
    with pytest.raises(InputError, match="at most 75"):
        p2p_edit(backend, inv, src + " more")


def test_backends_sharing_a_unet_all_see_their_hooks(tiny, backend, z0):
    from customedit_core.backends.diffusers import DiffusersBackend
    from customedit_core.tokens import tokenize
    other = DiffusersBackend(*tiny)
    ctx = backend.encode([tokenize(backend.tokenizer, SRC)])
    for b in (backend, other):
        store = AttentionStore()
        b.predict_eps(z0, 500, ctx, AttentionHook([store]))
        assert store.sums, "the hook was not called"
    other.close()
    store = AttentionStore()
    backend.predict_eps(z0, 500, ctx, AttentionHook([store]))
    assert store.sums


def test_store_and_local_blend_see_the_attention_after_the_edit(backend, inversions):
    """As in the reference, whose store keeps the tensors the controllers then overwrite in place: with
    a word swap of equal token counts and cross-attention replaced at every step, the edit row's
    recorded maps are the source row's (before the edit they would be the edit's own)."""
    inv = inversions["direct"]
    r = p2p_edit(backend, inv, "a photo of a dog on grass",
                 P2PSettings(mode="replace", cross_replace=1.0, blend_source_words=("cat",), blend_target_words=("dog",)))
    assert r.store.sums
    for name, m in r.store.sums.items():
        assert torch.allclose(m[1], m[0], atol=1e-6), name
    # so the blend mask of the edit is the source word's own region, united with the same region
    free = p2p_edit(backend, inv, "a photo of a dog on grass", P2PSettings(mode="replace", cross_replace=0.0))
    assert any((m[1] - m[0]).abs().max() > 1e-4 for m in free.store.sums.values())   # the edit's own maps
