"""SpecRef and DiffEdit nodes inside a real ComfyUI, in-process: outputs against the core, the region
outside the mask kept, masks at image resolution, the bank on the offload device, the user's model
untouched, and errors naming the input. Needs COMFYUI_DIR; skips otherwise.

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_specref_diffedit.py
"""
import comfy_support as S

S.skip_unless_comfy()

from comfy_support import expect_input_error, run_node as run  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

STEPS = 6
SOURCE = "a photo of a cat sitting on the grass"
TARGET = "a photo of a dog sitting on the grass"
PX = S.IMAGE_SIZE


@pytest.fixture(scope="module")
def models(comfy):
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]


@pytest.fixture(scope="module")
def latents(comfy, models):
    image = torch.from_numpy(S.image_array())[None]
    with torch.inference_mode():
        source = comfy.VAEEncode().encode(models[2], image)[0]
        reference = comfy.VAEEncode().encode(models[2], image.flip(2))[0]
    return source, reference


def left_half(size=PX):
    m = torch.zeros(1, size, size)
    m[:, :, : size // 2] = 1
    return m


LEVELS = dict(level_start=0, level_end=1, step_start=0.0, step_end=1.0)


@pytest.fixture(scope="module")
def source_inversion(comfy, models, latents):
    model, clip, _ = models
    inv, _ = run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latents[0], source_prompt=SOURCE,
                 steps=STEPS, guidance=7.5, method="direct", inner_steps=1)
    return inv


@pytest.fixture(scope="module")
def bank(comfy, models, latents):
    model, clip, _ = models
    return run(comfy, "CustomEditReferenceKVExtract", model=model, clip=clip, reference=latents[1],
               reference_prompt="", steps=STEPS, **LEVELS)


def test_nodes_are_registered_with_their_types(comfy):
    info = {n: comfy.NODE_CLASS_MAPPINGS[n].GET_NODE_INFO_V1() for n in (
        "CustomEditReferenceKVExtract", "CustomEditSpecRefSample", "CustomEditDiffEditMask", "CustomEditDiffEditSample")}
    assert info["CustomEditReferenceKVExtract"]["output"] == ["CE_REFERENCE_KV", "STRING"]
    assert info["CustomEditSpecRefSample"]["output"] == ["LATENT", "MASK"]
    assert info["CustomEditSpecRefSample"]["input"]["required"]["reference_kv"][0] == "CE_REFERENCE_KV"
    assert info["CustomEditSpecRefSample"]["input"]["optional"]["mask"][0] == "MASK"
    assert info["CustomEditDiffEditMask"]["output"] == ["MASK"]
    assert info["CustomEditDiffEditSample"]["output"] == ["LATENT"]
    assert info["CustomEditDiffEditSample"]["input"]["required"]["mask"][0] == "MASK"


def test_bank_lives_on_the_offload_device_and_reports_its_size(comfy, bank):
    import comfy.model_management as mm

    kv, text = bank
    assert kv.nbytes > 0 and f"{kv.nbytes / 2 ** 20:.1f} MiB" in text
    assert all(k.device == mm.unet_offload_device() for k, _ in kv.kv.values())
    # the tiny checkpoint's decoder has self-attention at the latent's size and half of it
    assert kv.model_levels == 2 and set(kv.sites.values()) == {0, 1}
    assert {s for _, s in kv.kv} == set(range(STEPS))


def test_specref_keeps_the_source_outside_the_mask(comfy, models, source_inversion, bank):
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    specref = S.pack_module(comfy, "customedit_core.specref")
    masks = S.pack_module(comfy, "customedit_core.masks")
    model, clip, _ = models
    inv = source_inversion
    before = [t.clone() for t in inv.latents]
    args = dict(model=model, clip=clip, inversion=inv, reference_kv=bank[0], target_prompt=TARGET, edited_words="dog",
                blend_threshold=0.5, **LEVELS)
    edited, mask_t = run(comfy, "CustomEditSpecRefSample", mask=left_half(), blend_start=0.0, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, inv.latents))         # the inversion is not changed
    assert torch.equal(mask_t, left_half())
    with torch.inference_mode():
        b = cb.ComfyBackend(model, clip)
        with cb.core_context():
            res = specref.specref_edit(b, inv, bank[0], TARGET, ("dog",), threshold=0.5, blend_start=0.0,
                                       mask=masks.latent_mask(left_half(), inv.source.shape[2:], 8), **LEVELS)
            host = b.from_model_latent(res.edited)
    assert torch.equal(edited["samples"], host)
    assert torch.equal(res.edited[..., 4:], inv.source[..., 4:])                 # right half: the source itself
    assert not torch.equal(res.edited[..., :4], inv.source[..., :4])
    # an all-zero mask gives the source back; the words' own M_t is an image-size binary mask
    none, empty = run(comfy, "CustomEditSpecRefSample", mask=torch.zeros(1, PX, PX), **args)
    assert torch.allclose(none["samples"], b.from_model_latent(inv.source), atol=1e-6) and empty.sum() == 0
    words, mt = run(comfy, "CustomEditSpecRefSample", source_words="cat", **args)
    assert mt.shape == (1, PX, PX) and set(mt.unique().tolist()) <= {0.0, 1.0}


def test_diffedit_mask_and_sample(comfy, models, latents):
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    model, clip, _ = models
    latent = latents[0]
    mask_args = dict(model=model, clip=clip, latent=latent, source_prompt=SOURCE, samples=2, strength=0.5,
                     threshold=0.5, seed=0)
    # equal prompts (an all-zero mask, test_core_diffedit) are refused before any model work
    msg = expect_input_error("target_prompt", run, comfy, "CustomEditDiffEditMask",
                             target_prompt=" " + SOURCE.upper(), **mask_args)
    assert "same as source_prompt" in msg
    (mask,) = run(comfy, "CustomEditDiffEditMask", target_prompt=TARGET, **mask_args)
    (again,) = run(comfy, "CustomEditDiffEditMask", target_prompt=TARGET, **mask_args)
    assert torch.equal(mask, again) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1
    sample = dict(model=model, clip=clip, latent=latent, target_prompt=TARGET, encoding_ratio=0.8, steps=STEPS,
                  guidance=7.5)
    (edited,) = run(comfy, "CustomEditDiffEditSample", mask=mask, **sample)
    b = cb.ComfyBackend(model, clip)
    with torch.inference_mode(), cb.core_context():
        z, e = b.to_model_latent(latent["samples"]), b.to_model_latent(edited["samples"])
    cells = torch.nn.functional.adaptive_avg_pool2d(mask[None], z.shape[2:])[0]
    outside = (cells == 0).expand_as(z[0])[None]
    assert torch.allclose(e[outside], z[outside], atol=1e-5)
    assert (e - z)[~outside].abs().mean() > 1e-3
    (nothing,) = run(comfy, "CustomEditDiffEditSample", mask=torch.zeros(1, PX, PX), **sample)
    assert torch.allclose(nothing["samples"], latent["samples"], atol=1e-6)


def test_users_model_is_untouched(comfy, models, latents, source_inversion, bank):
    model, clip, _ = models
    state = (dict(model.patches), dict(model.object_patches), model.patches_uuid,
             str(model.model_options.get("transformer_options", {}).keys()))

    def ksample():
        with torch.inference_mode():
            pos = comfy.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
            neg = comfy.CLIPTextEncode().encode(clip, "")[0]
            return comfy.KSampler().sample(model, 3, 2, 7.5, "euler", "normal", pos, neg, latents[0], denoise=0.7)[0]

    before = ksample()["samples"]
    run(comfy, "CustomEditSpecRefSample", model=model, clip=clip, inversion=source_inversion, reference_kv=bank[0],
        target_prompt=TARGET, edited_words="dog", blend_threshold=0.5, **LEVELS)
    run(comfy, "CustomEditDiffEditSample", model=model, clip=clip, latent=latents[0], mask=left_half(),
        target_prompt=TARGET, encoding_ratio=0.5, steps=2, guidance=7.5)
    assert torch.equal(before, ksample()["samples"])
    assert state == (dict(model.patches), dict(model.object_patches), model.patches_uuid,
                     str(model.model_options.get("transformer_options", {}).keys()))


def test_bad_inputs_name_the_input(comfy, models, latents, source_inversion, bank):
    model, clip, _ = models
    extract = dict(model=model, clip=clip, reference=latents[1], reference_prompt="", steps=STEPS, **LEVELS)
    node = "CustomEditReferenceKVExtract"
    msg = expect_input_error("level_end", run, comfy, node, **{**extract, "level_end": 2})
    assert "levels 0-1" in msg
    expect_input_error("mask", run, comfy, node, **extract, mask=torch.zeros(1, PX, PX))
    expect_input_error("mask", run, comfy, node, **extract, mask=left_half()[:, : PX // 2])
    expect_input_error("reference", run, comfy, node, **{**extract, "reference": {"x": 1}})

    edit = dict(model=model, clip=clip, inversion=source_inversion, reference_kv=bank[0], target_prompt=TARGET,
                edited_words="dog", blend_threshold=0.5, **LEVELS)
    node = "CustomEditSpecRefSample"
    expect_input_error("edited_words", run, comfy, node, **{**edit, "edited_words": "horse"})
    expect_input_error("edited_words", run, comfy, node, **{**edit, "edited_words": " , "})
    expect_input_error("source_words", run, comfy, node, **edit, source_words="dog")
    expect_input_error("reference_kv", run, comfy, node, **{**edit, "reference_kv": "bank"})
    few = run(comfy, "CustomEditReferenceKVExtract", **{**extract, "steps": 3})[0]
    msg = expect_input_error("reference_kv", run, comfy, node, **{**edit, "reference_kv": few})
    assert "3 steps" in msg
    narrow = run(comfy, "CustomEditReferenceKVExtract", **{**extract, "level_end": 0})[0]
    expect_input_error("level_end", run, comfy, node, **{**edit, "reference_kv": narrow})

    sample = dict(model=model, clip=clip, latent=latents[0], mask=left_half(), target_prompt=TARGET,
                  encoding_ratio=0.8, steps=STEPS, guidance=7.5)
    expect_input_error("mask", run, comfy, "CustomEditDiffEditSample", **{**sample, "mask": torch.ones(2, PX, PX)})
    expect_input_error("encoding_ratio", run, comfy, "CustomEditDiffEditSample",
                       **{**sample, "encoding_ratio": 0.01})
    expect_input_error("target_prompt", run, comfy, "CustomEditDiffEditMask", model=model, clip=clip,
                       latent=latents[0], source_prompt=SOURCE, target_prompt="", samples=1, strength=0.5,
                       threshold=0.5, seed=0)
