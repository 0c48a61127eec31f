"""SpecRef on a tiny SD-shaped model (CPU, fixed seeds) and its controllers on synthetic tensors."""
import pytest
import torch

from customedit_core import invert
from customedit_core.attention import AttentionHook, Controller, Layout, Site
from customedit_core.ddim import Schedule
from customedit_core.errors import InputError
from customedit_core.inversion import ddim_trajectory
from customedit_core.p2p import AttentionStore, ReplaceSelf
from customedit_core.specref import (ReferenceBank, ReferenceKV, SelfOutsideReference, TargetRegion,
                                     extract_reference, specref_edit)
from customedit_core.tokens import tokenize

SRC = "a photo of a cat on grass"
TGT = "a photo of a tiger on grass"
STEPS = 16


def err(a, b):
    return (a - b).abs().mean().item()


@pytest.fixture(scope="module")
def other_latent():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def inv(backend, z0):
    # guidance 1 (as SpecRef inverts): an edit row with the source prompt then walks back to the source
    return invert(backend, z0, SRC, steps=STEPS, guidance=1.0, method="ddim")


@pytest.fixture(scope="module")
def banks(backend, z0, other_latent):
    kw = dict(steps=STEPS, level_start=0, level_end=1, step_start=0.0, step_end=1.0)
    return {"same": extract_reference(backend, z0, SRC, **kw),
            "other": extract_reference(backend, other_latent, "", **kw)}


def half_mask(hw=(16, 16)):
    m = torch.zeros(1, 1, *hw)
    m[..., :, : hw[1] // 2] = 1
    return m


# ---- the bank ------------------------------------------------------------------------------------

def test_bank_keeps_the_chosen_decoder_levels_and_steps_on_the_cpu(backend, other_latent):
    bank = extract_reference(backend, other_latent, "", steps=10, level_start=0, level_end=0,
                             step_start=0.3, step_end=0.8)
    # the tiny UNet's decoder has self-attention at 16x16, 8x8 and 4x4 (levels 0, 1, 2)
    assert bank.model_levels == 3 and bank.step_range == (3, 8)
    assert set(bank.sites.values()) == {0} and len(bank.sites) == 2
    assert all(n.startswith("up_blocks") and n.endswith("attn1") for n in bank.sites)
    assert set(bank.kv) == {(n, s) for n in bank.sites for s in range(3, 8)}
    k, v = bank.kv[next(iter(bank.kv))]
    assert k.device.type == "cpu" and k.shape == v.shape and k.shape[0] == 1 and k.shape[2] == 16 * 16
    assert bank.nbytes == len(bank.kv) * 2 * k.numel() * k.element_size()
    assert "MiB on cpu" in bank.describe() and "levels 0-0 of 0-2" in bank.describe()


def test_bank_holds_the_keys_and_values_of_the_inverse_step_at_each_timestep(backend, other_latent):
    """Bank step i = the inverse step at the denoising timestep of step i (the reference code's pairing)."""
    steps = 6
    bank = extract_reference(backend, other_latent, "", steps=steps, level_start=0, level_end=0, step_start=0.0)
    name = sorted(bank.sites)[0]
    seen = {}

    class Spy(Controller):
        def kv(self, k, v, site):
            if site.name == name:
                seen[site.step] = k.clone()
            return k, v

    cond = backend.encode([tokenize(backend.tokenizer, "", allow_empty=True)])
    sch = Schedule(backend.alphas_cumprod, steps)
    ddim_trajectory(backend, other_latent, cond, sch, hook=AttentionHook([Spy()]))
    assert sorted(seen) == list(range(steps))
    for i in range(steps):
        assert torch.equal(bank.kv[(name, i)][0], seen[i])
    # and the first inverse step (timestep 0) is the last denoising step
    assert not torch.equal(bank.kv[(name, 0)][0], bank.kv[(name, steps - 1)][0])


# ---- the controllers, on synthetic tensors ------------------------------------------------------

def test_reference_attention_follows_equations_2_and_3():
    g = torch.Generator().manual_seed(0)
    H, n, d = 2, 16, 8
    q = torch.randn(4, H, n, d, generator=g)            # [uncond src, uncond edit, cond src, cond edit]
    o = torch.randn(4, H, n, d, generator=g)
    k_ref, v_ref = torch.randn(2, 1, H, n, d, generator=g).unbind(0)
    object_mask = torch.zeros(1, 1, 4, 4)
    object_mask[..., :2, :] = 1                         # M_s: the top half of the reference
    bank = ReferenceBank("fp", 1, (4, 4), 8, "", (0, 0), 1, (0, 1), {"l": 0}, {("l", 0): (k_ref, v_ref)},
                         object_mask)
    region = TargetRegion(AttentionStore(), [], [], 0.5, fixed=half_mask((4, 4)))     # M_t: the left half
    site = Site("l", "self", "up", 4, 4, H, 4, 4, 0, 1, Layout(2, True))
    out = ReferenceKV(bank, ["l"], range(0, 1), region).attend(q, o.clone(), site)
    sim = q[3] @ k_ref[0].transpose(-1, -2) / d ** 0.5
    sim[..., object_mask.flatten() == 0] = float("-inf")           # M_s^inf
    o_ref = sim.softmax(-1) @ v_ref[0]
    mt = half_mask((4, 4)).flatten()[None, :, None]
    assert torch.allclose(out[3], mt * o_ref + (1 - mt) * o[3], atol=1e-5)
    assert torch.equal(out[:3], o[:3])                  # the source branch and the uncond half untouched
    # outside the chosen layers and steps nothing changes
    for other in (Site("x", "self", "up", 4, 4, H, 4, 4, 0, 1, Layout(2, True)),
                  Site("l", "self", "up", 4, 4, H, 4, 4, 1, 2, Layout(2, True)),
                  Site("l", "cross", "up", 4, 4, H, 4, 4, 0, 1, Layout(2, True))):
        assert torch.equal(ReferenceKV(bank, ["l"], range(0, 1), region).attend(q, o.clone(), other), o)


def test_p2p_self_replacement_stays_out_of_the_reference_layers_and_steps():
    base = ReplaceSelf(6, 1.0, 0)
    ctl = SelfOutsideReference(base, {"l"}, range(2, 4))
    at = lambda name, step: Site(name, "self", "up", 4, 4, 1, 4, 4, step, 8, Layout(2, True))   # noqa: E731
    assert ctl.needs_probs(at("l", 1)) and ctl.needs_probs(at("l", 4)) and ctl.needs_probs(at("x", 3))
    assert not ctl.needs_probs(at("l", 2)) and not ctl.needs_probs(at("l", 3))      # SR-attention's
    assert not ctl.needs_probs(at("x", 6))                                           # P2P's own window


def test_target_region_is_the_min_max_normalised_word_map():
    store = AttentionStore()
    site = Site("x", "cross", "down", 4, 4, 1, 16, 16, layout=Layout(2, False))
    maps = torch.zeros(2, 1, 16, 77)
    word = torch.linspace(0.0, 1.0, 16) * 0.02 + 0.01      # a ramp over the 4x4 cells, never 0
    maps[1, 0, :, 5] = word
    maps[0, 0, :, 3] = torch.eye(4).flatten()              # the source word: the diagonal
    store.probs(maps, site)
    store.end_step(0)
    region = TargetRegion(store, [5], [3], 0.5)
    assert region.at(4, 4) is None                         # nothing before the first step's maps
    region.end_step(0)
    m = region.at(4, 4)[0].flatten()
    assert torch.equal(m, (torch.linspace(0, 1, 16) >= 0.5).float())
    blend = region.blend_mask(4, 4, "cpu")[0, 0]
    assert torch.equal(blend, torch.maximum(m.reshape(4, 4), torch.eye(4)))
    assert region.at(16, 16).shape == (1, 16, 16)


# ---- the edit ------------------------------------------------------------------------------------

def test_empty_target_region_reproduces_the_source(backend, inv, banks, z0):
    seen = []
    res = specref_edit(backend, inv, banks["other"], TGT, mask=torch.zeros(1, 1, 16, 16), blend_start=0.0,
                       callback=lambda i, z: seen.append((i, z.clone())))
    assert torch.equal(res.edited, res.source)
    assert torch.equal(res.source, inv.source)          # the source branch follows the inverted latents
    assert res.mask.sum() == 0
    for i, z in seen:
        assert torch.equal(z[0], inv.latents[STEPS - i - 1][0])


def test_empty_step_range_gives_the_reconstruction(backend, inv, banks, z0):
    recon = err(inv.reconstruction, z0)
    none = specref_edit(backend, inv, banks["other"], SRC, ("cat",), step_start=0.5, step_end=0.5)
    assert err(none.edited, z0) <= recon + 1e-6           # the reconstruction, or the source where blended
    assert none.mask.sum() > 0                            # M_t was there, the reference was not used
    used = specref_edit(backend, inv, banks["other"], SRC, ("cat",), step_start=0.0)
    assert err(used.edited, none.edited) > 1e-3


def test_outside_the_region_the_edit_is_the_source_branch(backend, inv, banks):
    m = half_mask()
    seen = []
    res = specref_edit(backend, inv, banks["other"], TGT, mask=m, blend_start=0.25, step_start=0.0,
                       callback=lambda i, z: seen.append((i, z.clone())))
    for i, z in seen:
        assert torch.equal(z[0], inv.latents[STEPS - i - 1][0])
        if i >= 5:
            assert torch.equal(z[1][:, :, 8:], z[0][:, :, 8:]), i
    assert not torch.equal(seen[2][1][1][:, :, 8:], seen[2][1][0][:, :, 8:])   # free before the blend starts
    assert torch.equal(res.edited[..., 8:], inv.source[..., 8:])
    assert err(res.edited[..., :8], inv.source[..., :8]) > 1e-3
    assert torch.equal(res.mask, m)
    # with M_t from the edited word, the output mask is where the edit may differ
    res = specref_edit(backend, inv, banks["other"], TGT, ("tiger",), source_words=("cat",), step_start=0.0)
    assert 0 < res.mask.mean() < 1
    assert torch.equal(res.edited * (1 - res.mask), res.source * (1 - res.mask))


def test_the_edit_runs_under_the_reference_codes_p2p_control(backend, inv, banks):
    """The reference code's controller by default (replace for a word swap, cross 0.8, self 0.6);
    M_t reads the maps after the P2P edit: with cross-attention replaced at every step, the target
    word's map is the swapped source word's."""
    import inspect

    d = {k: v.default for k, v in inspect.signature(specref_edit).parameters.items()}
    assert (d["mode"], d["cross_replace"], d["self_replace"]) == ("auto", 0.8, 0.6)
    kw = dict(source_words=("cat",), step_start=0.0)
    res = specref_edit(backend, inv, banks["other"], TGT, ("tiger",), **kw)
    same = specref_edit(backend, inv, banks["other"], TGT, ("tiger",), mode="replace", cross_replace=0.8,
                        self_replace=0.6, **kw)
    assert torch.equal(res.edited, same.edited)
    free = specref_edit(backend, inv, banks["other"], TGT, ("tiger",), cross_replace=0.0, self_replace=0.0, **kw)
    assert err(free.edited, res.edited) > 1e-3
    tiger = tokenize(backend.tokenizer, TGT).positions("tiger", "w")[0]
    cat = inv.tokens.positions("cat", "w")[0]
    full = specref_edit(backend, inv, banks["other"], TGT, ("tiger",), cross_replace=1.0, **kw)
    maps = full.store.word_maps()
    assert torch.allclose(maps[1][..., tiger], maps[0][..., cat], atol=1e-6)
    maps = free.store.word_maps()
    assert not torch.allclose(maps[1][..., tiger], maps[0][..., cat], atol=1e-3)
    # "auto" takes refine when the prompts differ in length; replace then names the input
    added = "a photo of a striped cat on grass"
    auto = specref_edit(backend, inv, banks["other"], added, ("striped",), **kw)
    refine = specref_edit(backend, inv, banks["other"], added, ("striped",), mode="refine", **kw)
    assert torch.equal(auto.edited, refine.edited)
    with pytest.raises(InputError, match="^target_prompt: a replace edit needs the same number of words"):
        specref_edit(backend, inv, banks["other"], added, ("striped",), mode="replace")
    with pytest.raises(InputError, match="^mode"):
        specref_edit(backend, inv, banks["other"], TGT, ("tiger",), mode="swap")


def test_reference_equal_to_the_source_stays_close_to_the_reconstruction(backend, inv, banks, other_latent):
    kw = dict(mask=half_mask(), step_start=0.0)
    plain = specref_edit(backend, inv, banks["other"], SRC, step_start=0.5, step_end=0.5, mask=half_mask())
    same = specref_edit(backend, inv, banks["same"], SRC, **kw)
    other = specref_edit(backend, inv, banks["other"], SRC, **kw)
    d_same, d_other = err(same.edited, plain.edited), err(other.edited, plain.edited)
    assert d_same < 0.5 * d_other, (d_same, d_other)
    # the reference object mask matters: only the reference's left half (M_s)
    masked = extract_reference(backend, other_latent, "", steps=STEPS, mask=half_mask(), step_start=0.0)
    part = specref_edit(backend, inv, masked, SRC, **kw)
    assert err(part.edited, other.edited) > 1e-4


def test_bad_inputs(backend, tiny, inv, banks, z0):
    from customedit_core.backends.diffusers import DiffusersBackend
    from testmodels.tiny import tiny_models

    bank = banks["other"]
    with pytest.raises(InputError, match="^edited_words: 'zebra' does not occur"):
        specref_edit(backend, inv, bank, TGT, ("zebra",))
    with pytest.raises(InputError, match="^edited_words: name the word"):
        specref_edit(backend, inv, bank, TGT)
    with pytest.raises(InputError, match="^source_words"):
        specref_edit(backend, inv, bank, TGT, ("tiger",), source_words=("dog",))
    with pytest.raises(InputError, match="^level_end: level 3 is outside .* 0-2"):
        extract_reference(backend, z0, "", steps=2, level_end=3)
    with pytest.raises(InputError, match="^level_end: level 2 is outside .* holds decoder levels 0-1"):
        specref_edit(backend, inv, bank, TGT, ("tiger",), level_end=2)
    with pytest.raises(InputError, match="^level_start"):
        specref_edit(backend, inv, bank, TGT, ("tiger",), level_start=-1)
    with pytest.raises(InputError, match="^step_end"):
        extract_reference(backend, z0, "", steps=4, step_start=0.5, step_end=1.5)
    with pytest.raises(InputError, match="^step_end: .* holds no step"):
        extract_reference(backend, z0, "", steps=4, step_start=0.5, step_end=0.6)
    late = extract_reference(backend, z0, "", steps=STEPS, step_start=0.5)
    with pytest.raises(InputError, match="^step_start: steps 0..15 are not all in the reference bank"):
        specref_edit(backend, inv, late, TGT, ("tiger",), step_start=0.0)
    with pytest.raises(InputError, match="^mask: is empty"):
        extract_reference(backend, z0, "", steps=2, mask=torch.zeros(1, 1, 16, 16))
    with pytest.raises(InputError, match="^mask: expected a \\[1, 1, 16, 16\\]"):
        specref_edit(backend, inv, bank, TGT, mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(InputError, match="^threshold"):
        specref_edit(backend, inv, bank, TGT, ("tiger",), threshold=1.0)
    # a bank made with another step count, image size or model
    few = extract_reference(backend, z0, "", steps=4)
    with pytest.raises(InputError, match="^reference: was extracted with 4 steps but the source inversion has 16"):
        specref_edit(backend, inv, few, TGT, ("tiger",))
    small = extract_reference(backend, z0[..., :8, :8], "", steps=STEPS)
    with pytest.raises(InputError, match="^reference: was extracted from a 64x64 px image but the source is 128x128"):
        specref_edit(backend, inv, small, TGT, ("tiger",))
    other_model = DiffusersBackend(*tiny_models(seed=1))
    foreign = extract_reference(other_model, z0, "", steps=STEPS)
    other_model.close()
    with pytest.raises(InputError, match="^reference: was extracted with a different model"):
        specref_edit(backend, inv, foreign, TGT, ("tiger",))
