"""DCI Sample inside a real ComfyUI, in-process, on the tiny SD1.x checkpoint with a concept (random K/V
deltas and token vector) loaded through Load Concept: the branches' extremes, KSampler's noise for the
same seed, editing from an inversion, the host untouched, errors.

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_dci.py
"""
import comfy_support as S

S.skip_unless_comfy()

from comfy_support import expect_input_error, run_node as run  # noqa: E402

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

PROMPT = "a photo of a <new1> dog on the grass"
STEPS = 4


@pytest.fixture(scope="module")
def models(comfy):
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]


@pytest.fixture(scope="module")
def customized(comfy, models):
    """(model, clip) with a concept '<new1>' (class 'dog') loaded by the Load Concept node."""
    model, clip, _ = models
    C = S.pack_module(comfy, "customedit_core.concept")
    backend = S.pack_module(comfy, "customedit_core.backends.comfy").ComfyBackend(model, clip)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        kv = backend.kv_weights()
        width = backend.token_embedding_table().shape[1]
        probe = C.probe(backend)
        concept = C.Concept(("<new1>",), ("dog",), torch.randn(1, width, generator=g) * 0.3,
                            {k: torch.randn(w.shape, generator=g) * 0.02 for k, w in kv.items()}, probe,
                            C.fingerprint_of(probe), {}, "dci-test")
    return run(comfy, "CustomEditLoadConcept", model=model, clip=clip, concept_name="(none)", strength=1.0,
               concept=concept)


def dci(comfy, model, clip, **kw):
    args = dict(model=model, clip=clip, prompt=PROMPT, auxiliary_prompt="", concept_words="", integrate_fraction=0.3,
                balance=0.0, steps=STEPS, guidance=7.5, seed=5, latent_image={"samples": torch.zeros(1, 4, 8, 8)})
    args.update(kw)
    return run(comfy, "CustomEditDCISample", **args)


def test_extremes_and_fraction_zero(comfy, customized):
    model, clip = customized
    plain, ones = dci(comfy, model, clip, integrate_fraction=0.0)
    assert plain["samples"].shape == (1, 4, 8, 8) and torch.equal(ones, torch.ones(1, 64, 64))
    hi, w_hi = dci(comfy, model, clip, integrate_fraction=1.0, balance=20.0)
    assert torch.allclose(hi["samples"], plain["samples"], atol=1e-3), (hi["samples"] - plain["samples"]).abs().max()
    assert w_hi.min() > 0.99
    mid, w = dci(comfy, model, clip)
    assert (mid["samples"] - plain["samples"]).abs().max() > 1e-3
    assert w.shape == (1, 64, 64) and 0.0 < float(w.min()) < float(w.max()) < 1.0
    lo, w_lo = dci(comfy, model, clip, integrate_fraction=1.0, balance=-20.0)
    assert w_lo.max() < 0.01 and (lo["samples"] - plain["samples"]).abs().max() > 1e-3


def test_uses_ksamplers_noise_for_the_seed(comfy, customized):
    """Same seed, same starting noise: with DDIM at few steps the plain result lands near KSampler's."""
    model, clip = customized
    plain = dci(comfy, model, clip, integrate_fraction=0.0, steps=10)[0]["samples"]
    other_seed = dci(comfy, model, clip, integrate_fraction=0.0, steps=10, seed=6)[0]["samples"]
    with torch.inference_mode():
        pos = comfy.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = comfy.CLIPTextEncode().encode(clip, "")[0]
        ks = comfy.KSampler().sample(model, 5, 10, 7.5, "ddim", "ddim_uniform", pos, neg,
                                     {"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)[0]["samples"]
    assert (plain - ks).norm() < 0.5 * (other_seed - ks).norm()


def test_edit_from_an_inversion(comfy, customized):
    model, clip = customized
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    inv, recon = run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent,
                     source_prompt="a photo of a dog on the grass", steps=STEPS, guidance=7.5, method="negative_prompt",
                     inner_steps=1)
    lo, _ = dci(comfy, model, clip, latent_image=None, inversion=inv, integrate_fraction=1.0, balance=-20.0)
    assert torch.allclose(lo["samples"], recon["samples"], atol=1e-3)
    edit, _ = dci(comfy, model, clip, latent_image=None, inversion=inv)
    assert (edit["samples"] - recon["samples"]).abs().max() > 1e-3


def test_the_host_model_is_untouched(comfy, customized):
    model, clip = customized

    def ks():
        with torch.inference_mode():
            pos = comfy.CLIPTextEncode().encode(clip, PROMPT)[0]
            neg = comfy.CLIPTextEncode().encode(clip, "")[0]
            return comfy.KSampler().sample(model, 3, 2, 7.5, "euler", "normal", pos, neg,
                                           {"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)[0]["samples"]

    before, patches = ks(), dict(model.patches)
    dci(comfy, model, clip)
    assert torch.equal(before, ks()) and dict(model.patches) == patches
    assert not model.model_options.get("transformer_options", {}).get("patches_replace")


def test_no_concept_warns_and_samples_plainly(comfy, models, caplog):
    model, clip, _ = models
    with caplog.at_level(logging.WARNING, logger="customedit"):
        out, w = dci(comfy, model, clip, prompt="a photo of a dog on the grass")
    assert "no concept is loaded" in caplog.text and torch.equal(w, torch.ones(1, 64, 64))
    assert torch.isfinite(out["samples"]).all()


def test_bad_input_names_the_input(comfy, customized):
    model, clip = customized
    expect_input_error("prompt", dci, comfy, model, clip, prompt="a photo of a dog on the grass")
    expect_input_error("concept_words", dci, comfy, model, clip, concept_words="<new2>")
    expect_input_error("auxiliary_prompt", dci, comfy, model, clip, auxiliary_prompt="a photo of a cat in the snow")
    expect_input_error("latent_image", dci, comfy, model, clip, latent_image=None)
