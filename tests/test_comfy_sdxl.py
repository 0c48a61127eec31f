"""The ComfyUI backend on SDXL: a tiny SDXL built from ComfyUI's own classes (comfy_sdxl_support.py).

What it pins: our context is what stock CLIPTextEncode gives (CLIP-L + CLIP-G hidden states, the pooled
vector), the y vector is the model's own encode_adm at the latent's size (as ComfyUI's samplers fill it
in), the methods' properties hold, the family checks name the input, and a concept loaded on an SDXL
CLIP reaches stock CLIPTextEncode with both encoders' shares of its vector.

  COMFYUI_DIR=/tmp/ComfyUI OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_sdxl.py
"""
import comfy_support as S

S.skip_unless_comfy()

import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from comfy_sdxl_support import G_WIDTH, L_WIDTH, POOLED, tiny_sdxl  # noqa: E402

SOURCE = "a photo of a cat on grass"


@pytest.fixture(scope="module")
def xl(comfy):
    with torch.inference_mode():
        return tiny_sdxl()


@pytest.fixture(scope="module")
def mods(comfy):
    return types.SimpleNamespace(cb=S.pack_module(comfy, "customedit_core.backends.comfy"),
                                 core=S.pack_module(comfy, "customedit_core"),
                                 tokens=S.pack_module(comfy, "customedit_core.tokens"),
                                 errors=S.pack_module(comfy, "customedit_core.errors"),
                                 concept=S.pack_module(comfy, "customedit_core.concept"),
                                 cc=S.pack_module(comfy, "customedit_core.backends.comfy_concept"))


@pytest.fixture(scope="module")
def z0():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))


def test_context_is_what_stock_clip_text_encode_gives(comfy, xl, mods):
    model, clip = xl
    with torch.inference_mode():
        b = mods.cb.ComfyBackend(model, clip)
        ctx = b.encode([mods.tokens.tokenize(b.tokenizer, SOURCE)])
        (cond, extra), = comfy.CLIPTextEncode().encode(clip, SOURCE)[0]
    assert b.sdxl and b.text_widths == (L_WIDTH, G_WIDTH) and b.pooled_dim == POOLED
    assert ctx.shape == (1, 78, L_WIDTH + G_WIDTH)
    assert torch.allclose(ctx[:, :77], cond.float(), atol=1e-5)
    assert torch.allclose(ctx[0, -1, :POOLED], extra["pooled_output"][0].float(), atol=1e-5)


def test_y_is_the_models_encode_adm_at_the_latent_size(xl, mods, z0):
    model, clip = xl
    seen = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda f, a: seen.append(a["c"]["y"]) or f(a["input"], a["timestep"], **a["c"]))
    with torch.inference_mode():
        b = mods.cb.ComfyBackend(m, clip)
        ctx = b.encode([mods.tokens.tokenize(b.tokenizer, SOURCE)])
        with mods.cb.core_context():
            b.predict_eps(z0, 500, ctx)
            b.size = type(b.size)(original=(1024, 1024), crop=(0, 32))
            b.predict_eps(z0, 500, ctx)
        want = model.model.encode_adm(pooled_output=ctx[:, -1, :POOLED], width=128, height=128)
        sized = model.model.encode_adm(pooled_output=ctx[:, -1, :POOLED], width=1024, height=1024, crop_w=32)
    assert torch.allclose(seen[0].float(), want.float()) and torch.allclose(seen[1].float(), sized.float())


@pytest.mark.parametrize("method", ["ddim", "null_text", "direct", "negative_prompt"])
def test_inversion_and_identical_prompt_edit(xl, mods, z0, method):
    model, clip = xl
    with torch.inference_mode():
        b = mods.cb.ComfyBackend(model, clip)
        with mods.cb.core_context():
            inv = mods.core.invert(b, z0, SOURCE, steps=6, method=method, inner_steps=2)
            same = mods.core.p2p_edit(b, inv, SOURCE)
            other = mods.core.p2p_edit(b, inv, "a photo of a dog on grass")
    assert (inv.reconstruction - z0).abs().mean() < 1e-2
    if method != "direct":          # direct corrects the source row only
        assert (same.edited[0] - same.source[0]).abs().max() < 1e-5
    assert (other.edited - other.source).abs().max() > 1e-5         # the target prompt did reach the model


def test_family_checks_name_the_input(comfy, xl, mods):
    import comfy.supported_models as sm

    model, clip = xl
    sd1_clip = types.SimpleNamespace(tokenizer=types.SimpleNamespace(clip="clip_l", clip_l=clip.tokenizer.clip_l),
                                     encode_from_tokens=None)
    with pytest.raises(mods.errors.InputError, match="clip.*SD1.x/SD2.x CLIP but the model is SDXL"):
        mods.cb.ComfyBackend(model, sd1_clip)
    refiner = types.SimpleNamespace(model=types.SimpleNamespace(model_config=object.__new__(sm.SDXLRefiner)), clone=None)
    with pytest.raises(mods.errors.InputError, match="model.*SDXL refiner"):
        mods.cb.ComfyBackend(refiner, clip)


def test_concept_reaches_stock_clip_text_encode_with_both_shares(comfy, xl, mods):
    model, clip = xl
    C = mods.concept
    with torch.inference_mode():
        b = mods.cb.ComfyBackend(model, clip)
        g = torch.Generator().manual_seed(3)
        kv = b.kv_weights()
        concept = C.Concept(("<new1>",), ("cat",), torch.randn(1, L_WIDTH + G_WIDTH, generator=g),
                            {k: torch.randn(w.shape, generator=g) * 0.05 for k, w in kv.items()}, C.probe(b),
                            C.fingerprint_of(C.probe(b)), {}, "xl", (L_WIDTH, G_WIDTH))
        m2, c2, _ = mods.cc.apply_concept(model, clip, concept)
        b2 = mods.cb.ComfyBackend(m2, c2)
        ours = b2.encode([mods.tokens.tokenize(b2.tokenizer, "a photo of a <new1> cat")])
        (cond, extra), = comfy.CLIPTextEncode().encode(c2, "a photo of a <new1> cat")[0]
        plain = b.encode([mods.tokens.tokenize(b.tokenizer, "a photo of a cat")])
    assert torch.allclose(ours[:, :77], cond.float(), atol=1e-5)
    assert torch.allclose(ours[0, -1, :POOLED], extra["pooled_output"][0].float(), atol=1e-5)
    assert (ours[:, :77] - plain[:, :77]).abs().max() > 1e-3       # the word's vector did go in
    sd1 = C.Concept(("<new2>",), ("cat",), torch.zeros(1, 768), {}, C.probe(b), "x", {}, "sd1")
    with pytest.raises(mods.errors.InputError, match="concept.*SD1.x/SD2.x model"):
        mods.cc.apply_concept(model, clip, sd1)


def test_nodes_invert_and_edit_an_sdxl_latent(comfy, xl):
    model, clip = xl
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))}
    inv, recon = S.run_node(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent,
                            source_prompt=SOURCE, steps=4, guidance=7.5, method="null_text", inner_steps=2)
    edited, mask = S.run_node(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv,
                              target_prompt=SOURCE, mode="refine", cross_replace=0.8, self_replace=0.5)
    assert edited["samples"].shape == (1, 4, 16, 16)
    assert (edited["samples"] - recon["samples"]).abs().max() < 1e-5     # identical prompt: the reconstruction
    # SDXL's latent scale (0.13025) is applied on the way in and out
    assert (recon["samples"] - latent["samples"]).abs().mean() < 1e-2


def test_concept_exports_reproduce_it_with_stock_lora_and_embedding(comfy, mods, tmp_path, z0):
    """The LoRA (.diff K/V deltas) through ComfyUI's own LoRA loading, and the SDXL embedding file
    (clip_l + clip_g) through `embedding:` in stock CLIPTextEncode, give our concept's numbers."""
    from comfy.sd import load_lora_for_models
    from comfy.utils import load_torch_file

    C = mods.concept
    pack = S.pack_module(comfy, "customedit_core.backends.sdxl_cond").pack
    with torch.inference_mode():
        model, clip = tiny_sdxl(embedding_directory=[str(tmp_path)])
        b = mods.cb.ComfyBackend(model, clip)
        g = torch.Generator().manual_seed(4)
        concept = C.Concept(("<new1>",), ("cat",), torch.randn(1, L_WIDTH + G_WIDTH, generator=g),
                            {k: torch.randn(w.shape, generator=g) * 0.05 for k, w in b.kv_weights().items()},
                            C.probe(b), C.fingerprint_of(C.probe(b)), {}, "xl", (L_WIDTH, G_WIDTH))
        C.export_embedding(concept, str(tmp_path / "xl_cat.safetensors"))
        lora = load_torch_file(C.export_lora(concept, str(tmp_path / "xl_cat_lora.safetensors")))
        m3, c3 = load_lora_for_models(model, clip, lora, 1.0, 0.0)
        (cond, extra), = comfy.CLIPTextEncode().encode(c3, "a photo of a embedding:xl_cat cat")[0]
        m2, c2, _ = mods.cc.apply_concept(model, clip, concept)
        ours_b = mods.cb.ComfyBackend(m2, c2)
        ours = ours_b.encode([mods.tokens.tokenize(ours_b.tokenizer, "a photo of a <new1> cat")])
        stock_b = mods.cb.ComfyBackend(m3, clip)
        with mods.cb.core_context():
            eps_ours = ours_b.predict_eps(z0, 500, ours)
            stock_ctx = pack(cond.float(), extra["pooled_output"].float())
            eps_stock = stock_b.predict_eps(z0, 500, stock_ctx)
    assert torch.allclose(ours[:, :77], cond.float(), atol=1e-5)
    assert torch.allclose(ours[0, -1, :POOLED], extra["pooled_output"][0].float(), atol=1e-5)
    assert torch.allclose(eps_ours, eps_stock, atol=1e-5)


SIZES = dict(width=1024, height=768, crop_w=16, crop_h=32, target_width=896, target_height=1152)


def _recording(model):
    """A clone of the model that records the y of every call."""
    seen = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda f, a: seen.append(a["c"]["y"]) or f(a["input"], a["timestep"], **a["c"]))
    return m, seen


def test_clip_text_encode_sdxl_sizes_reach_the_inversion_and_its_edit(comfy, xl, mods):
    """Invert Image's sdxl_size (CLIPTextEncodeSDXL's output): every call of the inversion and of the
    edit made from it (which has no such input) gets y at those sizes; unconnected: the latent's."""
    model, clip = xl
    m, seen = _recording(model)
    cond = S.run_node(comfy, "CLIPTextEncodeSDXL", clip=clip, text_g="ignored", text_l="ignored", **SIZES)[0]
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))}
    run = dict(model=m, clip=clip, latent=latent, source_prompt=SOURCE, steps=3, guidance=7.5, method="ddim",
               inner_steps=1)
    inv, _ = S.run_node(comfy, "CustomEditNullTextInvert", sdxl_size=cond, **run)
    n_inv = len(seen)
    S.run_node(comfy, "CustomEditP2PEdit", model=m, clip=clip, inversion=inv, target_prompt=SOURCE + " today",
               mode="refine", cross_replace=0.8, self_replace=0.5)
    with torch.inference_mode():
        b = mods.cb.ComfyBackend(model, clip)
        pooled = b.encode([mods.tokens.tokenize(b.tokenizer, SOURCE)])[:, -1, :POOLED]
        want = model.model.encode_adm(pooled_output=pooled, **SIZES)
        plain = model.model.encode_adm(pooled_output=pooled, width=128, height=128)
    assert n_inv and len(seen) > n_inv
    for y in seen:       # the size/crop part of y (after the pooled vector) is the same for every prompt row
        assert torch.allclose(y[:, POOLED:].float(), want[:, POOLED:].float().expand(y.shape[0], -1))
    assert not torch.allclose(want[:, POOLED:], plain[:, POOLED:])
    seen.clear()
    S.run_node(comfy, "CustomEditNullTextInvert", **run)
    assert all(torch.allclose(y[:, POOLED:].float(), plain[:, POOLED:].float().expand(y.shape[0], -1)) for y in seen)


def test_sdxl_size_is_parsed_as_clip_text_encode_sdxl_writes_it(comfy, xl):
    model, clip = xl
    shared = S.pack_module(comfy, "nodes._shared")
    cond = S.run_node(comfy, "CLIPTextEncodeSDXL", clip=clip, text_g="a", text_l="a", **SIZES)[0]
    size = shared.sdxl_size_of(cond)
    assert size.time_ids(64, 64) == (768, 1024, 32, 16, 1152, 896)
    plain = comfy.CLIPTextEncode().encode(clip, "a cat")[0]
    S.expect_input_error("sdxl_size", shared.sdxl_size_of, plain)
    S.expect_input_error("sdxl_size", shared.sdxl_size_of, "1024x1024")
    two = cond + [[cond[0][0], {**cond[0][1], "width": 512}]]
    S.expect_input_error("sdxl_size", shared.sdxl_size_of, two)
    bad = [[cond[0][0], {**cond[0][1], "crop_w": float("nan")}]]
    S.expect_input_error("sdxl_size", shared.sdxl_size_of, bad)


def test_sdxl_size_on_an_sd1_model_and_with_an_inversion_is_refused(comfy, xl):
    model, clip = xl
    cond = S.run_node(comfy, "CLIPTextEncodeSDXL", clip=clip, text_g="a", text_l="a", **SIZES)[0]
    sd1_model, sd1_clip, _ = comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    msg = S.expect_input_error("sdxl_size", S.run_node, comfy, "CustomEditDiffEditMask", model=sd1_model,
                               clip=sd1_clip, latent=latent, source_prompt="a cat", target_prompt="a dog", samples=1,
                               strength=0.5, threshold=0.5, seed=0, sdxl_size=cond)
    assert "SDXL models only" in msg
    dci = comfy.NODE_CLASS_MAPPINGS["CustomEditDCISample"]
    assert "sdxl_size" in dci.validate_inputs(prompt="a photo of a cat", inversion=None, sdxl_size=None)
