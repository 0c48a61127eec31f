"""The core methods through the diffusers backend at Stable Diffusion 1.5's and 2.x's exact shapes
(random weights from testmodels/real_shapes.py: 860M-parameter UNets with four levels, CLIP ViT-L/14
or OpenCLIP ViT-H/14 text encoders with CLIP's real tokenizer, SD2.x in v-prediction).

Real-shapes tier (opt-in): `CUSTOMEDIT_REAL_SHAPES=1 python -m pytest -m realshapes tests/test_real_shapes.py`
(64 px images, 4 steps; a few minutes per family on 2 CPU cores, about 5 GB of memory).
The same properties as the tiny-model tests, where the tiny model hides what only real sizes show:
layer names and counts, heads of 64 channels, attention at 8/4/2 px sides, 38 M-element token tables.
"""
import hashlib

import pytest
import torch

from customedit_core import P2PSettings, attention_maps, invert, p2p_edit
from customedit_core import concept as C
from customedit_core.attention import AttentionHook, Controller
from customedit_core.backends.diffusers import DiffusersBackend
from customedit_core.customize import TrainSettings, train_concept
from customedit_core.dci import DCISettings, dci_sample
from customedit_core.ddim import Schedule
from customedit_core.diffedit import diffedit_mask, diffedit_sample
from customedit_core.sampling import denoise
from customedit_core.specref import extract_reference, specref_edit
from customedit_core.tokens import tokenize

pytestmark = pytest.mark.realshapes

STEPS = 4
SOURCE = "a photo of a cat sitting on the grass"
TARGET = "a photo of a striped cat sitting on the grass"
# SD1.5 and SD2.x share the UNet's levels: 16 transformer blocks (6 down, 1 middle, 9 up)
BLOCKS = 16


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def model(request):
    from testmodels import real_shapes

    family = request.param
    unet, te, tok, vae = real_shapes.build(family)
    te = real_shapes.text_encoder_for_conditioning(family, te)
    b = DiffusersBackend(unet, te, tok, prediction_type=real_shapes.PREDICTION[family])
    yield family, b, vae
    b.close()


@pytest.fixture(scope="module")
def z0():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.8    # 64 px


@pytest.fixture(scope="module")
def inversions(model, z0):
    _, b, _ = model
    return {m: invert(b, z0, SOURCE, steps=STEPS, guidance=7.5, method=m, inner_steps=2)
            for m in ("ddim", "negative_prompt", "direct", "null_text")}


def rel(a, b):
    return float((a - b).double().pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-12))


def test_layout_text_widths_and_attention_sites(model, z0):
    family, b, _ = model
    width = 768 if family == "sd15" else 1024
    kv = b.kv_weights()
    assert len(kv) == 2 * BLOCKS
    assert {tuple(w.shape) for k, w in kv.items() if k.startswith("input_blocks.1.")} == {(320, width)}
    assert b.token_embedding_table().shape == (49408, width)
    modules = (b.unet, b.text_encoder)
    assert not any(t.is_meta for m in modules for t in list(m.parameters()) + list(m.buffers()))
    ctx = b.encode([tokenize(b.tokenizer, SOURCE)])
    assert ctx.shape == (1, 77, width) and torch.isfinite(ctx).all()
    assert torch.equal(ctx, b.encode([tokenize(b.tokenizer, SOURCE)]))       # no uninitialised memory read
    sites = {}

    class Record(Controller):
        def out(self, o, site):
            sites[site.name] = site
            return o

    with torch.no_grad():
        eps = b.predict_eps(z0, 501, ctx, AttentionHook([Record()]))
    assert eps.shape == z0.shape and torch.isfinite(eps).all()
    assert len(sites) == 2 * BLOCKS
    assert {s.height for s in sites.values()} == {8, 4, 2, 1}
    heads = {s.heads for s in sites.values()}
    assert heads == ({8} if family == "sd15" else {5, 10, 20})     # SD2.x: heads of 64 channels


def test_fingerprint_is_stable_and_sees_a_changed_weight(model):
    _, b, _ = model
    fp = b.fingerprint()
    assert fp == b.fingerprint()
    w = b.text_encoder.get_input_embeddings().weight          # 38 M / 51 M elements
    keep = w[-1, -1].clone()
    with torch.no_grad():
        w[-1, -1] += 1.0
    try:
        assert b.fingerprint() != fp
    finally:
        with torch.no_grad():
            w[-1, -1] = keep
    assert b.fingerprint() == fp


def test_inversions_walk_and_reconstruct(model, inversions, z0):
    _, b, _ = model
    for method, inv in inversions.items():
        assert len(inv.latents) == STEPS + 1 and all(torch.isfinite(x).all() for x in inv.latents), method
    assert torch.equal(inversions["direct"].reconstruction, z0)
    assert len(inversions["null_text"].inner_steps_used) == STEPS
    # null-text optimisation brings the guided walk back closer than plain DDIM with the empty prompt
    assert rel(inversions["null_text"].reconstruction, z0) < rel(inversions["ddim"].reconstruction, z0)


@pytest.mark.parametrize("method", ["null_text", "negative_prompt"])
def test_identical_prompt_p2p_reproduces_the_reconstruction(model, inversions, method):
    _, b, _ = model
    inv = inversions[method]
    r = p2p_edit(b, inv, SOURCE, P2PSettings(mode="refine"))
    assert rel(r.edited[0], r.source[0]) < 1e-5
    assert rel(r.source, inv.reconstruction) < 1e-4


def test_refine_with_local_blend_reweight_and_maps(model, inversions):
    _, b, _ = model
    inv = inversions["direct"]
    r = p2p_edit(b, inv, TARGET, P2PSettings(mode="refine", blend_source_words=("cat",), reweight={"striped": 2.0}))
    assert r.mask.shape == (1, 1, 8, 8) and rel(r.edited, r.source) > 1e-3
    assert rel(r.source, inv.source) < 1e-4                  # direct inversion: the source branch is exact
    replace = p2p_edit(b, inv, "a photo of a dog sitting on the grass", P2PSettings(mode="replace"))
    assert torch.isfinite(replace.edited).all()
    maps = attention_maps(b, inv)
    assert maps.shape[0] == len(SOURCE.split()) and maps.shape[1:3] == (64, 64)


def test_specref_with_an_empty_target_region_is_the_source(model, inversions, z0):
    _, b, _ = model
    ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    bank = extract_reference(b, ref, "", steps=STEPS)
    inv = invert(b, z0, SOURCE, steps=STEPS, guidance=1.0, method="ddim")
    res = specref_edit(b, inv, bank, TARGET, mask=torch.zeros(1, 1, 8, 8), blend_start=0.0)
    assert torch.equal(res.edited, res.source)
    full = specref_edit(b, inv, bank, TARGET, ("striped",))
    assert torch.isfinite(full.edited).all()


def test_diffedit_mask_and_sample(model, z0):
    _, b, _ = model
    m = diffedit_mask(b, z0, SOURCE, "a photo of a dog sitting on the grass", samples=2)
    assert m.mask.shape == (1, 1, 8, 8) and m.heat.min() >= 0 and m.heat.max() <= 1
    assert torch.equal(diffedit_sample(b, z0, torch.zeros(1, 1, 8, 8), TARGET, steps=STEPS).edited, z0)
    edited = diffedit_sample(b, z0, torch.ones(1, 1, 8, 8), TARGET, steps=STEPS).edited
    assert rel(edited, z0) > 1e-3


def test_concept_training_covers_every_cross_attention_layer(model):
    family, b, vae = model
    width = b.token_embedding_table().shape[1]
    before = hashlib.sha1(b.fingerprint().encode()).hexdigest()
    imgs = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def encode(px):
        with torch.no_grad():
            return vae.encode(px.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * 0.18215

    s = TrainSettings(class_word="cat", steps=2, learning_rate=1e-3, batch_size=1, num_class_images=0,
                      views_per_image=1, seed=0)
    res = train_concept(b, imgs, encode, s)
    assert len(res.concept.deltas) == 2 * BLOCKS
    assert set(res.concept.deltas) == set(b.kv_weights())
    assert res.concept.embeddings.shape == (1, width) and all(torch.isfinite(torch.tensor(res.losses)))
    assert any(d.abs().max() > 0 for d in res.concept.deltas.values())
    assert hashlib.sha1(b.fingerprint().encode()).hexdigest() == before      # the backend is left as it was
    # DCI with that concept: fraction 0 is plain sampling of the customized model, bit for bit
    be = DiffusersBackend(b.unet, b.text_encoder, b.tokenizer.tok, prediction_type=b.prediction_type)
    try:
        assert C.apply(be, res.concept) == []
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        prompt = "a photo of a <new1> cat on the grass"
        out = dci_sample(be, prompt, {"<new1>": "cat"}, noise=noise, settings=DCISettings(0.0), steps=STEPS)
        null = be.encode([tokenize(be.tokenizer, "", allow_empty=True)])
        cond = be.encode([tokenize(be.tokenizer, prompt)])
        plain = denoise(be, Schedule(be.alphas_cumprod, STEPS), noise.clone(), cond, lambda i: null, 7.5).cpu()
        assert torch.equal(out.latents, plain)
        mixed = dci_sample(be, prompt, {"<new1>": "cat"}, noise=noise, settings=DCISettings(0.5), steps=STEPS)
        assert mixed.weights is not None and torch.isfinite(mixed.latents).all()
    finally:
        be.close()
