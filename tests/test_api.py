"""Python API: the tiny models' pipeline, loading offline from a diffusers folder and single-file SD1.x/SD2.x
checkpoints (tiny ones written here in the original LDM layout), refusals, and the CLIP vocabulary."""
import os

import pytest
import torch
from safetensors.torch import save_file

from customedit_core import api
from customedit_core.backends.diffusers import DiffusersBackend
from customedit_core.errors import InputError
from customedit_core.tokens import tokenize
from testmodels.ldm_layout import save_diffusers_folder, tiny_checkpoint
from testmodels.tiny import tiny_models, tiny_pipeline

PROMPT = "a photo of a cat on grass"


def quiet(_msg):
    pass


def same_predictions(pipe, unet, te, tok, tol=1e-5, size=8):
    """The loaded model's text embeddings and noise predictions equal the source modules'."""
    ref = DiffusersBackend(unet, te, tok)
    try:
        toks = [tokenize(ref.tokenizer, PROMPT), tokenize(ref.tokenizer, "", allow_empty=True)]
        assert [t.ids for t in toks] == [tokenize(pipe.backend.tokenizer, PROMPT).ids,
                                         tokenize(pipe.backend.tokenizer, "", allow_empty=True).ids]
        c_ref, c_got = ref.encode(toks), pipe.backend.encode(toks)
        assert (c_ref - c_got).abs().max() < tol
        z = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            e_ref, e_got = ref.predict_eps(z, 500, c_ref), pipe.backend.predict_eps(z, 500, c_got)
        assert e_ref.abs().mean() > 1e-3
        assert (e_ref - e_got).abs().max() < tol * max(1.0, float(e_ref.abs().max()))
    finally:
        ref.close()


# --- the tiny models' pipeline ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe():
    msgs = []
    pipe = tiny_pipeline(device="cpu", log=msgs.append)
    pipe.messages = msgs
    return pipe


def test_tiny_pipeline_says_it_is_a_toy(tiny_pipe):
    assert tiny_pipe.family == "tiny" and tiny_pipe.default_size == 128
    assert any("untrained" in m and "random" in m for m in tiny_pipe.messages)


def test_the_backend_takes_the_vaes_scale_and_refuses_a_bad_one():
    unet, te, tok = tiny_models()[:3]
    b = DiffusersBackend(unet, te, tok, vae_scale=4)
    try:
        assert b.vae_scale == 4
    finally:
        b.close()
    for bad in (0, 2.0):
        with pytest.raises(InputError, match="^vae_scale: expected a positive whole number"):
            DiffusersBackend(unet, te, tok, vae_scale=bad)


def test_encode_resizes_to_the_pixel_multiple_and_says_so(tiny_pipe):
    m = tiny_pipe.pixel_multiple
    assert m == tiny_pipe.backend.latent_multiple * tiny_pipe.backend.vae_scale == 32
    msgs = []
    tiny_pipe.log = msgs.append
    try:
        z = tiny_pipe.encode_image(api.demo_scene(70))
    finally:
        tiny_pipe.log = quiet
    assert z.shape == (1, 4, 64 // 8, 64 // 8)
    assert any("resized from 70x70 to 64x64" in s for s in msgs)
    img = tiny_pipe.decode(z)[0]
    assert img.size == (64, 64)
    x = tiny_pipe.decode(z, output="tensor")
    assert x.shape == (1, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_image_inputs_of_every_kind(tiny_pipe):
    import numpy as np
    pil = api.demo_scene(32)
    arr = np.asarray(pil)
    t_chw = torch.tensor(arr).permute(2, 0, 1).float() / 255
    ref = tiny_pipe.encode_image(pil)
    for x in (arr, t_chw, t_chw[None], t_chw.permute(1, 2, 0)[None]):
        assert (tiny_pipe.encode_image(x) - ref).abs().max() < 1e-5
    with pytest.raises(InputError, match="image"):
        tiny_pipe.encode_image(torch.zeros(2, 3, 32, 32))


def test_invert_and_edit_wrappers(tiny_pipe):
    inv = tiny_pipe.invert(api.demo_scene(32), "a red circle on green grass", steps=4, method="direct")
    assert (inv.reconstruction - inv.source).abs().max() < 1e-5
    res = tiny_pipe.edit(inv, "a yellow circle on green grass", blend_source_words=("circle",))
    assert res.edited.shape == inv.source.shape and res.mask is not None
    assert (res.source - inv.source).abs().max() < 1e-4
    maps = tiny_pipe.attention_maps(inv)
    assert maps.shape == (6, 32, 32, 3)


def test_bad_model_paths_and_device(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        api.load(str(tmp_path / "nope.safetensors"), log=quiet)
    with pytest.raises(InputError, match="unet/"):
        api.load(str(tmp_path), log=quiet)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device"):
            api.load(str(tmp_path), device="cuda", log=quiet)


def test_no_model_without_the_toy_world_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "TOYWORLD_FOLDER", str(tmp_path / "missing"))
    with pytest.raises(InputError) as e:
        api.load(None, log=quiet)
    assert e.value.input_name == "model" and "toy-world model" in str(e.value)


# --- diffusers folder ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    unet, te, tok, vae = tiny_models(seed=3, with_vae=True)
    path = save_diffusers_folder(str(tmp_path_factory.mktemp("diffusers")), unet, te, tok, vae)
    return path, (unet, te, tok, vae)


def test_diffusers_folder_loads_offline_and_matches(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, (unet, te, tok, vae) = folder
    pipe = api.load(path, device="cpu", log=quiet)
    assert pipe.family == "diffusers" and pipe.prediction_type == "epsilon"
    from customedit_core.ddim import sd_alphas_cumprod
    assert torch.allclose(pipe.backend.alphas_cumprod, sd_alphas_cumprod())
    same_predictions(pipe, unet, te, tok)
    x = api.pil_to_tensor(api.demo_scene(32)) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert (pipe.encode_image(api.demo_scene(32)) - ref).abs().max() < 1e-5
    pipe.close()


def test_diffusers_folder_with_pickled_weights_is_refused(folder, tmp_path):
    import shutil
    path, _ = folder
    copy = tmp_path / "pickled"
    shutil.copytree(path, copy)
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    w.unlink()
    torch.save({}, copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="pickle.*safetensors"):
        api.load(str(copy), log=quiet)


def test_diffusers_sdxl_folder_loads_and_a_refiner_is_refused(tmp_path):
    import json
    import shutil

    from testmodels.tiny_sdxl import tiny_sdxl_models
    unet, te, te2, tok, tok2, vae = tiny_sdxl_models(with_vae=True)
    path = tmp_path / "xl"
    for name, m in (("unet", unet), ("text_encoder", te), ("text_encoder_2", te2), ("tokenizer", tok),
                    ("tokenizer_2", tok2), ("vae", vae)):
        m.save_pretrained(str(path / name))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    pipe = api.load(str(path), log=quiet)
    b = pipe.backend
    assert b.sdxl and b.pad_2 == 0 and b.text_widths == (te.config.hidden_size, te2.config.hidden_size)
    inv = pipe.invert(api.demo_scene(64), "a photo of a cat", steps=2, method="ddim")
    assert inv.latents[0].shape == (1, 4, 8, 8)
    shutil.rmtree(path / "text_encoder")
    with pytest.raises(InputError, match="SDXL refiner"):
        api.load(str(path), log=quiet)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLInpaintPipeline"}))
    with pytest.raises(InputError, match="StableDiffusionXLInpaintPipeline.*not supported"):
        api.load(str(path), log=quiet)


# --- single-file checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_file_sd1_matches_its_source_modules(tmp_path, dtype):
    path, (unet, te, tok, vae) = tiny_checkpoint(str(tmp_path), "sd1", dtype=dtype)
    pipe = api.load(path, device="cpu", log=quiet)
    assert pipe.family == "sd1" and pipe.prediction_type == "epsilon"
    assert any("tokenizer from" in n for n in pipe.notes)
    assert pipe.backend.unet.config.attention_head_dim == 8
    if dtype == torch.float16:   # the file rounds the weights; compare with the rounded modules
        for m in (unet, te, vae):
            m.half().float()
    same_predictions(pipe, unet, te, tok, tol=1e-5)
    img = api.demo_scene(16)
    x = api.pil_to_tensor(img) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.18215
    assert (pipe.encode_image(img) - ref).abs().max() < 1e-5
    inv = pipe.invert(img, "a red circle on green grass", steps=3, method="direct")
    assert (inv.reconstruction - inv.source).abs().max() < 1e-5
    pipe.close()


def test_single_file_sd2_uses_the_penultimate_text_layer(tmp_path):
    path, (unet, te, tok, vae) = tiny_checkpoint(str(tmp_path), "sd2")
    pipe = api.load(path, device="cpu", log=quiet)
    assert pipe.family == "sd2"
    assert pipe.backend.text_encoder.config.num_hidden_layers == te.config.num_hidden_layers - 1
    assert pipe.prediction_type == "epsilon"     # random weights: the 512-base statistics
    ids = torch.tensor([tokenize(pipe.backend.tokenizer, PROMPT).ids])
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
        ref = norm(hidden)
        got = pipe.backend.text_encoder(ids)[0]
    assert (ref - got).abs().max() < 1e-5
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        e_ref = unet(z, 500, encoder_hidden_states=ref).sample
    assert (pipe.backend.predict_eps(z, 500, got) - e_ref).abs().max() < 1e-5
    pipe.close()


def test_single_file_ignores_keys_the_model_does_not_use(tmp_path):
    """ComfyUI's checkpoint savers and many merges write the text projection; it is not used."""
    extra = {"cond_stage_model.transformer.text_model.text_projection.weight": torch.randn(768, 768),
             "model_ema.decay": torch.tensor(0.999)}
    path, (unet, te, tok, vae) = tiny_checkpoint(str(tmp_path), "sd1", extra=extra)
    pipe = api.load(path, device="cpu", log=quiet)
    same_predictions(pipe, unet, te, tok, tol=1e-5)
    pipe.close()
    # what is missing or mis-shaped is still refused, naming the part
    from customedit_core.errors import InputError
    bad = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(5)}
    path, _ = tiny_checkpoint(str(tmp_path), "sd1", extra=bad, name="bad.safetensors")
    with pytest.raises(InputError, match="text encoder does not fit.*wrong shape"):
        api.load(path, device="cpu", log=quiet)


def test_single_file_prediction_type(tmp_path):
    path, _ = tiny_checkpoint(str(tmp_path), "sd2", extra={"v_pred": torch.tensor([])})
    assert api.load(path, device="cpu", log=quiet).prediction_type == "v_prediction"
    assert api.load(path, device="cpu", log=quiet, prediction_type="epsilon").prediction_type == "epsilon"


def test_single_file_without_tokenizer_uses_clip_vocab(tmp_path):
    path, _ = tiny_checkpoint(str(tmp_path), "sd1", with_tokenizer=False)
    # the tiny text encoder has the tiny vocabulary, not CLIP's 49408 tokens: say so
    with pytest.raises(InputError, match="49408 tokens.*--tokenizer"):
        api.load(path, device="cpu", log=quiet)


def test_pickles_are_refused(tmp_path):
    for name in ("model.ckpt", "model.pt", "model.bin"):
        p = tmp_path / name
        torch.save({"state_dict": {}}, p)
        with pytest.raises(InputError, match="pickle.*convert it to .safetensors"):
            api.load(str(p), log=quiet)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"a": torch.zeros(1)}, disguised)
    with pytest.raises(InputError, match="pickle"):
        api.load(str(disguised), log=quiet)


def _keys_file(path, keys, shape=(4, 4)):
    save_file({k: torch.zeros(*shape) for k in keys}, str(path))
    return str(path)


def test_sdxl_single_file_loads(tmp_path):
    from testmodels.ldm_layout import tiny_sdxl_checkpoint
    path, (unet, te, te2, tok, tok2, vae) = tiny_sdxl_checkpoint(str(tmp_path))
    pipe = api.load(path, log=quiet)
    b = pipe.backend
    assert b.sdxl and b.pad_2 == 0 and pipe.default_size == 1024
    assert torch.equal(b.text_encoder_2.text_projection.weight, te2.text_projection.weight)
    inv = pipe.invert(api.demo_scene(64), "a photo of a cat", steps=2, method="ddim")
    assert inv.latents[0].shape[:2] == (1, 4) and torch.isfinite(inv.reconstruction).all()


def test_sdxl_refiner_and_other_architectures_are_refused(tmp_path):
    refiner = _keys_file(tmp_path / "refiner.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.model.token_embedding.weight", "first_stage_model.encoder.conv_in.weight"])
    with pytest.raises(InputError, match="refiner"):
        api.load(refiner, log=quiet)
    flux = _keys_file(tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.norm.key_norm.scale"])
    with pytest.raises(InputError, match="Flux.*Stable Diffusion 1.x and 2.x"):
        api.load(flux, log=quiet)
    lora = _keys_file(tmp_path / "lora.safetensors", ["lora_unet_down_blocks_0_attentions_0.alpha"])
    with pytest.raises(InputError, match="no UNet"):
        api.load(lora, log=quiet)
    notext = _keys_file(tmp_path / "notext.safetensors", ["model.diffusion_model.input_blocks.0.0.weight",
                                                          "first_stage_model.encoder.conv_in.weight"])
    with pytest.raises(InputError, match="no text encoder"):
        api.load(notext, log=quiet)


def test_inpainting_checkpoint_is_refused(tmp_path):
    from customedit_core.single_file import inspect_checkpoint
    path, _ = tiny_checkpoint(str(tmp_path), "sd1",
                              extra={"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)})
    with pytest.raises(InputError, match="9 input channels"):
        inspect_checkpoint(path)


# --- CLIP vocabulary from the vendored BPE merges ------------------------------------------------
@pytest.fixture(scope="module")
def clip_tok():
    from customedit_core.clip_vocab import clip_tokenizer
    return clip_tokenizer()


def test_clip_vocab_gives_clips_token_ids(clip_tok):
    from customedit_core.clip_vocab import BPE_FILE, VOCAB_SIZE
    assert os.path.getsize(BPE_FILE) == 1356917
    assert len(clip_tok) == VOCAB_SIZE == 49408
    assert clip_tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tok("a photo of a cat, a photo!").input_ids[1:-1] == [320, 1125, 539, 320, 2368, 267, 320, 1125, 256]
    assert clip_tok.pad_token_id == 49407


def test_clip_vocab_with_the_core_tokenizer(clip_tok):
    from customedit_core.backends.diffusers import HFTokenizer
    from customedit_core.clip_vocab import clip_tokenizer
    tok = HFTokenizer(clip_tok)
    pt = tokenize(tok, "a photo of a teapot")
    assert pt.ids[:7] == (49406, 320, 1125, 539, 320, 40749, 49407) and len(pt.ids) == 77
    assert pt.ids[7] == 49407                       # SD1.x pads with <|endoftext|>
    sd2 = HFTokenizer(clip_tokenizer("!"))
    assert tokenize(sd2, "a photo of a teapot").ids[7] == 0     # SD2.x pads with "!"
