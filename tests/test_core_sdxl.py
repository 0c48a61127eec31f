"""Every method on a tiny SDXL-shaped diffusers model (two text encoders, pooled vector, time ids):
the properties the SD1.x tests assert, plus what only SDXL has (packed pooled row, size conditioning,
two-encoder concept vectors and their exports)."""
import pytest
import torch

from customedit_core import P2PSettings, invert, p2p_edit
from customedit_core import concept as C
from customedit_core.backends.diffusers import DiffusersBackend
from customedit_core.backends.sdxl_cond import SizeConditioning, unpack
from customedit_core.customize import TrainSettings, train_concept
from customedit_core.dci import DCISettings, dci_sample
from customedit_core.ddim import Schedule
from customedit_core.diffedit import diffedit_sample
from customedit_core.errors import InputError
from customedit_core.sampling import denoise
from customedit_core.specref import extract_reference, specref_edit
from customedit_core.tokens import tokenize
from testmodels.tiny_sdxl import G_WIDTH, L_WIDTH, POOLED, tiny_sdxl_models

SRC = "a photo of a cat on grass"
STEPS = 8


@pytest.fixture(scope="module")
def models():
    return tiny_sdxl_models(seed=0, with_vae=True)


@pytest.fixture(scope="module")
def xl(models):
    unet, te, te2, tok, tok2, _ = models
    b = DiffusersBackend(unet, te, tok, text_encoder_2=te2, tokenizer_2=tok2)
    yield b
    b.close()


@pytest.fixture(scope="module")
def inversions(xl, z0):
    return {m: invert(xl, z0, SRC, steps=STEPS, guidance=7.5, method=m, inner_steps=3)
            for m in ("ddim", "null_text", "direct", "negative_prompt")}


def test_context_carries_both_encoders_and_the_pooled_vector(xl, models):
    _, te, te2, tok, tok2, _ = models
    ctx = xl.encode([tokenize(xl.tokenizer, SRC)])
    assert ctx.shape == (1, 78, L_WIDTH + G_WIDTH)
    tokens, pooled = unpack(ctx, POOLED)
    ids = torch.tensor([tok(SRC, padding="max_length", max_length=77).input_ids])
    ids2 = torch.tensor([tok2(SRC, padding="max_length", max_length=77).input_ids])
    assert ids2[0, -1] == 0 and ids[0, -1] == tok.eos_token_id          # the second stream pads with "!"
    with torch.no_grad():
        h1 = te(ids, output_hidden_states=True).hidden_states[-2]        # penultimate layers, as SDXL
        o2 = te2(ids2, output_hidden_states=True)
    assert torch.allclose(tokens, torch.cat([h1, o2.hidden_states[-2]], -1), atol=1e-6)
    assert torch.allclose(pooled, o2.text_embeds, atol=1e-6)
    assert torch.equal(ctx[0, -1, POOLED:], torch.zeros(L_WIDTH + G_WIDTH - POOLED))


def test_size_conditioning_reaches_the_model(xl, z0):
    ctx = xl.encode([tokenize(xl.tokenizer, SRC)])
    assert SizeConditioning().time_ids(128, 96) == (128, 96, 0, 0, 128, 96)   # default: the image's size
    assert SizeConditioning((1024, 1024), (0, 0), None).time_ids(128, 128) == (1024, 1024, 0, 0, 1024, 1024)
    with torch.no_grad():
        plain = xl.predict_eps(z0, 500, ctx)
        try:
            xl.size = SizeConditioning(original=(1024, 1024), crop=(16, 0))
            sized = xl.predict_eps(z0, 500, ctx)
        finally:
            xl.size = SizeConditioning()
        again = xl.predict_eps(z0, 500, ctx)
    assert (plain - sized).abs().max() > 1e-5 and torch.equal(plain, again)


def test_edits_walk_at_the_size_the_image_was_inverted_under(xl, z0):
    """An inversion keeps the backend's size conditioning; an edit of it runs at that size whatever the
    backend's is now (a null-text walk at another y leaves the inverted path), then restores the backend's."""
    sized = SizeConditioning(original=(1024, 768), crop=(8, 0))
    try:
        xl.size = sized
        inv = invert(xl, z0, SRC, steps=4, guidance=7.5, method="null_text", inner_steps=3)
    finally:
        xl.size = SizeConditioning()
    assert inv.size == sized
    same = p2p_edit(xl, inv, SRC)
    assert xl.size == SizeConditioning()
    assert (same.edited[0] - inv.reconstruction[0]).abs().max() < 1e-5      # walked at the inversion's size
    inv.size = SizeConditioning()                                           # (what ignoring it would do)
    assert (p2p_edit(xl, inv, SRC).edited[0] - inv.reconstruction[0]).abs().max() > 1e-4


def test_pooled_vector_reaches_the_model(xl, z0):
    ctx = xl.encode([tokenize(xl.tokenizer, SRC)])
    other = ctx.clone()
    other[0, -1, :POOLED] += 1.0
    with torch.no_grad():
        assert (xl.predict_eps(z0, 500, ctx) - xl.predict_eps(z0, 500, other)).abs().max() > 1e-5


def test_inversions_reconstruct(inversions, z0):
    err = {m: (inv.reconstruction - z0).abs().mean().item() for m, inv in inversions.items()}
    assert err["direct"] < 1e-5
    assert err["null_text"] < err["ddim"] and err["negative_prompt"] < err["ddim"]


def test_null_text_optimises_the_pooled_unconditional_vector_too(xl, inversions):
    null = xl.encode([tokenize(xl.tokenizer, "", allow_empty=True)])
    inv = inversions["null_text"]
    moved = [(u[0, -1, :POOLED] - null[0, -1, :POOLED]).abs().max().item() for u in inv.uncond]
    assert max(moved) > 1e-4
    assert all(torch.equal(u[0, -1, POOLED:], null[0, -1, POOLED:]) for u in inv.uncond)   # padding stays zero


@pytest.mark.parametrize("method", ["null_text", "negative_prompt"])
def test_identical_prompt_reproduces_reconstruction(xl, inversions, method):
    inv = inversions[method]
    r = p2p_edit(xl, inv, SRC, P2PSettings(mode="refine"))
    assert (r.edited[0] - r.source[0]).abs().max() < 1e-5
    assert (r.source - inv.reconstruction).abs().max() < 1e-4


def test_edits_change_the_edit_row_only(xl, inversions):
    inv = inversions["direct"]
    for s in (P2PSettings(mode="replace"), P2PSettings(mode="refine"), P2PSettings(reweight={"cat": 3.0})):
        target = "a photo of a dog on grass" if s.mode == "replace" else "a photo of a striped cat on grass"
        if s.reweight:
            target = SRC
        r = p2p_edit(xl, inv, target, s)
        assert (r.source - inv.source).abs().max() < 1e-4
        assert (r.edited - r.source).abs().mean() > 1e-3


def test_local_blend_keeps_outside_of_mask(models, z0):
    unet, te, te2, tok, tok2 = tiny_sdxl_models(seed=0)
    with torch.no_grad():       # sharper cross-attention, so word maps are localised
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                m.to_q.weight.mul_(8)
    b = DiffusersBackend(unet, te, tok, text_encoder_2=te2, tokenizer_2=tok2)
    try:
        inv = invert(b, z0, SRC, steps=10, guidance=7.5, method="direct")
        r = p2p_edit(b, inv, "a photo of a striped cat on grass",
                     P2PSettings(blend_source_words=("cat",), blend_source_only=True, blend_threshold=0.5))
    finally:
        b.close()
    m = r.mask
    assert 0.0 < m.mean().item() < 1.0
    assert ((1 - m) * (r.edited - r.source)).abs().max() == 0
    assert (m * (r.edited - r.source)).abs().max() > 1e-2


def test_specref_with_an_empty_target_region_reproduces_the_source(xl, z0):
    inv = invert(xl, z0, SRC, steps=STEPS, guidance=1.0, method="ddim")
    other = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    bank = extract_reference(xl, other, "", steps=STEPS, level_start=0, level_end=1)
    assert bank.nbytes > 0
    res = specref_edit(xl, inv, bank, "a photo of a tiger on grass", mask=torch.zeros(1, 1, 16, 16), blend_start=0.0)
    assert torch.equal(res.edited, res.source) and torch.equal(res.source, inv.source)
    full = specref_edit(xl, inv, bank, "a photo of a tiger on grass", mask=torch.ones(1, 1, 16, 16))
    assert (full.edited - full.source).abs().mean() > 1e-4


def test_diffedit_with_an_all_zero_mask_returns_the_input(xl, z0):
    none = diffedit_sample(xl, z0, torch.zeros(1, 1, 16, 16), "a photo of a dog on grass", steps=6)
    assert torch.equal(none.edited, z0)


def test_dci_fraction_zero_is_plain_sampling(xl):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    prompt = "a photo of a dog on grass"
    res = dci_sample(xl, prompt, {}, noise=noise, settings=DCISettings(0.0, 0.0), steps=6)
    null = xl.encode([tokenize(xl.tokenizer, "", allow_empty=True)])
    cond = xl.encode([tokenize(xl.tokenizer, prompt)])
    plain = denoise(xl, Schedule(xl.alphas_cumprod, 6), noise.clone(), cond, lambda i: null, 7.5).cpu()
    assert torch.equal(res.latents, plain)


# ---- concepts: K/V deltas and one vector per text encoder -------------------------------------

def _encoder(vae):
    def encode(px):
        return vae.encode(px.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * 0.13025
    return encode


@pytest.fixture(scope="module")
def trained(models):
    unet, te, te2, tok, tok2, vae = models
    b = DiffusersBackend(unet, te, tok, text_encoder_2=te2, tokenizer_2=tok2)
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(2, 64, 64, 3, generator=g) * 0.3
    refs[:, 16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    before = {k: v.clone() for m in (unet, te, te2) for k, v in m.state_dict().items()}
    s = TrainSettings(class_word="dog", steps=6, learning_rate=1e-2, batch_size=2, prior_weight=0.0, seed=0)
    try:
        res = train_concept(b, refs, _encoder(vae), s)
    finally:
        b.close()
    return res, before


def test_training_changes_only_kv_and_both_token_vectors(models, trained):
    unet, te, te2 = models[:3]
    res, before = trained
    after = {k: v for m in (unet, te, te2) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    c = res.concept
    kv = {k for k in unet.state_dict() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert len(c.deltas) == len(kv) and c.text_widths == (L_WIDTH, G_WIDTH)
    moved = (c.embeddings[0] - res.initial_vector).abs()
    assert moved[:L_WIDTH].max() > 0 and moved[L_WIDTH:].max() > 0       # both encoders' vectors learn


def test_concept_round_trip_and_sdxl_embedding_export(trained, tmp_path):
    from safetensors.torch import load_file
    c = trained[0].concept
    back = C.load(C.save(c, str(tmp_path / "c.safetensors")))
    assert back.text_widths == c.text_widths and torch.equal(back.embeddings, c.embeddings)
    assert all(torch.equal(back.deltas[k], c.deltas[k]) for k in c.deltas)
    emb = load_file(C.export_embedding(c, str(tmp_path / "e.safetensors")))
    assert set(emb) == {"clip_l", "clip_g"}                           # never an SD1.x "emb_params" file
    assert torch.equal(torch.cat([emb["clip_l"], emb["clip_g"]], 1), c.embeddings)
    lora = load_file(C.export_lora(c, str(tmp_path / "l.safetensors")))
    assert {k[len("diffusion_model."):-len(".diff")] for k in lora} == set(c.deltas)


def test_concepts_stay_with_their_family(xl, backend, trained, models):
    c = trained[0].concept
    with pytest.raises(InputError, match="concept.*SDXL"):
        C.apply(backend, c)                                            # SDXL concept on an SD1.x model
    sd1 = C.Concept(("<new1>",), ("dog",), torch.zeros(1, 32), {}, C.probe(backend), "x", {}, "sd1")
    with pytest.raises(InputError, match="concept.*SD1.x/SD2.x"):
        C.apply(xl, sd1)


def test_sdxl_unet_without_its_second_encoder_is_refused(models):
    unet, te, _, tok, _, _ = models
    with pytest.raises(InputError, match="second text encoder"):
        DiffusersBackend(unet, te, tok)
