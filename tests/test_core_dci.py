"""DCI sampling on the tiny diffusers model with a concept (random K/V deltas and token) applied."""
import pytest
import torch

from customedit_core import concept as C
from customedit_core.backends.diffusers import DiffusersBackend
from customedit_core.dci import DCISettings, dci_sample, default_auxiliary
from customedit_core.errors import InputError
from customedit_core.inversion import invert
from customedit_core.sampling import denoise
from customedit_core.ddim import Schedule
from customedit_core.tokens import tokenize

PROMPT = "a photo of a <new1> dog on grass"
PLAIN = "a photo of a dog on grass"
CONCEPTS = {"<new1>": "dog"}
STEPS = 6


@pytest.fixture(scope="module")
def b(tiny):
    unet, te, tok = tiny
    be = DiffusersBackend(unet, te, tok)
    g = torch.Generator().manual_seed(3)
    kv = be.kv_weights()
    concept = C.Concept(("<new1>",), ("dog",), torch.randn(1, be.token_embedding_table().shape[1], generator=g) * 0.5,
                        {k: torch.randn(w.shape, generator=g) * 0.05 for k, w in kv.items()}, C.probe(be),
                        C.fingerprint_of(C.probe(be)), {}, "test")
    assert C.apply(be, concept) == []
    yield be
    be.close()


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))


def plain(b, noise, prompt, guidance=7.5):
    null = b.encode([tokenize(b.tokenizer, "", allow_empty=True)])
    cond = b.encode([tokenize(b.tokenizer, prompt)]).expand(noise.shape[0], -1, -1)
    return denoise(b, Schedule(b.alphas_cumprod, STEPS), noise.clone(), cond,
                   lambda i: null.expand(noise.shape[0], -1, -1), guidance).cpu()


def dci(b, noise=None, **kw):
    s = DCISettings(kw.pop("fraction", 0.3), kw.pop("balance", 0.0))
    return dci_sample(b, kw.pop("prompt", PROMPT), CONCEPTS, noise=noise, settings=s, steps=STEPS, **kw)


def test_fraction_zero_is_plain_sampling_exactly(b, noise):
    res = dci(b, noise, fraction=0.0)
    assert res.integrated_steps == 0 and res.weights is None
    assert torch.equal(res.latents, plain(b, noise, PROMPT))


def test_lambda_extremes_follow_either_branch(b, noise):
    custom, aux = plain(b, noise, PROMPT), plain(b, noise, PLAIN)
    assert (custom - aux).abs().max() > 1e-2            # the two branches do differ
    hi = dci(b, noise, fraction=1.0, balance=50.0)
    lo = dci(b, noise, fraction=1.0, balance=-50.0)
    assert torch.allclose(hi.latents, custom, atol=1e-4), (hi.latents - custom).abs().max()
    assert torch.allclose(lo.latents, aux, atol=1e-4), (lo.latents - aux).abs().max()
    assert hi.weights.min() > 0.999 and lo.weights.max() < 1e-3
    mid = dci(b, noise, fraction=1.0, balance=0.0)
    assert (mid.latents - custom).abs().max() > 1e-3 and (mid.latents - aux).abs().max() > 1e-3
    assert 0.0 < float(mid.weights.min()) < float(mid.weights.max()) < 1.0
    assert mid.weights.shape == (1, 1, 16, 16) and mid.auxiliary_prompt == PLAIN


def test_lambda_moves_the_result_between_the_branches(b, noise):
    custom = plain(b, noise, PROMPT)
    dist = [float((dci(b, noise, fraction=1.0, balance=lam).latents - custom).norm()) for lam in (4.0, 0.0, -4.0)]
    assert dist[0] < dist[1] < dist[2], dist


def test_the_auxiliary_branch_costs_only_its_steps(b, noise, monkeypatch):
    rows = []
    real = b.predict_eps

    def counting(z, *a, **kw):
        rows.append(z.shape[0])
        return real(z, *a, **kw)

    monkeypatch.setattr(b, "predict_eps", counting)
    two = torch.cat([noise, -noise])
    for fraction, guidance in ((0.5, 7.5), (0.0, 7.5), (1.0, 7.5), (0.5, 1.0)):
        rows.clear()
        res = dci(b, two, fraction=fraction, guidance=guidance)
        cfg = 1 if guidance == 1.0 else 2
        until = int(round(fraction * STEPS))
        assert res.integrated_steps == until
        assert len(rows) == STEPS and sum(rows) == cfg * 2 * (STEPS + until), (fraction, rows)


def test_a_batch_samples_each_noise_independently(b, noise):
    two = torch.cat([noise, torch.randn(noise.shape, generator=torch.Generator().manual_seed(8))])
    both = dci(b, two, fraction=0.5).latents
    one = dci(b, two[1:], fraction=0.5).latents
    assert torch.allclose(both[1:], one, atol=1e-4)


def test_editing_from_an_inversion_at_the_context_extreme_reconstructs(b, noise):
    src = plain(b, noise, PLAIN)
    inv = invert(b, src, PLAIN, steps=STEPS, guidance=7.5, method="negative_prompt")
    lo = dci(b, inversion=inv, fraction=1.0, balance=-50.0)
    assert torch.allclose(lo.latents, inv.reconstruction, atol=1e-4)
    zero = dci(b, inversion=inv, fraction=0.0)
    assert (zero.latents - inv.reconstruction).abs().max() > 1e-3      # the concept prompt does edit


def test_default_auxiliary_prompt():
    assert default_auxiliary(PROMPT, CONCEPTS, ["<new1>"]) == PLAIN
    assert default_auxiliary("a <new1> on grass", CONCEPTS, ["<new1>"]) == "a dog on grass"
    with pytest.raises(InputError, match="auxiliary_prompt: the class word of '<new1>' is unknown"):
        default_auxiliary(PROMPT, {"<new1>": ""}, ["<new1>"])


@pytest.mark.parametrize("kw, message", [
    (dict(prompt="a photo of a dog on grass"), "prompt: contains none of the loaded concept words"),
    (dict(concept_words=["<new2>"]), "concept_words: '<new2>' is not a concept word"),
    (dict(auxiliary_prompt="a photo of a cat on sand"), "auxiliary_prompt: cannot be aligned"),
    (dict(auxiliary_prompt="a <new1> dog on grass"), "auxiliary_prompt: contains the concept token"),
    (dict(prompt="<new1> dog"), "prompt: has no words besides the concept"),
    (dict(fraction=1.5), "integrate_fraction: expected a fraction"),
    (dict(guidance=0.5), "guidance: expected a value between 1 and 30"),
])
def test_bad_input_is_named(b, noise, kw, message):
    with pytest.raises(InputError, match=message):
        dci(b, noise, **kw)


def test_noise_and_inversion_together_are_refused(b, noise):
    inv = invert(b, noise, PLAIN, steps=STEPS, method="ddim", with_reconstruction=False)
    with pytest.raises(InputError, match="latent_image: give either"):
        dci_sample(b, PROMPT, CONCEPTS, noise=noise, inversion=inv, steps=STEPS)
    with pytest.raises(InputError, match="negative_prompt: an inversion brings"):
        dci_sample(b, PROMPT, CONCEPTS, inversion=inv, steps=STEPS, negative_prompt="blurry")


def test_a_model_without_concept_samples_plainly(tiny, noise):
    unet, te, tok = tiny
    be = DiffusersBackend(unet, te, tok)
    try:
        res = dci_sample(be, PLAIN, {}, noise=noise, steps=STEPS)
        assert res.integrated_steps == 0 and torch.equal(res.latents, plain(be, noise, PLAIN))
    finally:
        be.close()
