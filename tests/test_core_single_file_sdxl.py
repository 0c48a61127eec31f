"""SDXL base single-file checkpoints (SGM layout) through customedit_core/single_file.py: a tiny
SDXL written by testmodels.ldm_layout is rebuilt exactly; the refiner and other models are refused."""
import pytest
import torch
from safetensors.torch import save_file

from customedit_core import single_file as sf
from customedit_core.errors import InputError
from testmodels.ldm_layout import tiny_sdxl_checkpoint, write_checkpoint


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(Checkpoint, the source modules (unet, te, te2, tok, tok2, vae), the rebuilt (unet, te, te2, vae))."""
    path, mods = tiny_sdxl_checkpoint(str(tmp_path_factory.mktemp("xl")))
    unet, te, te2, tok, tok2, vae = mods
    ck = sf.inspect_checkpoint(path)
    built = (sf.build_unet(ck), sf.build_text_encoder(ck, tok), sf.build_text_encoder_2(ck, tok2), sf.build_vae(ck))
    return ck, mods, built


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    bad = [k for k in sb if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


def test_sdxl_checkpoint_is_recognised_and_its_configs_inferred(xl):
    ck, (unet, te, te2, *_), _ = xl
    assert ck.family == "sdxl"
    assert (ck.prediction_type, ck.prediction_note.split(" (")[0]) == ("epsilon", "SDXL base predicts noise")
    uc = ck.unet_config
    assert uc["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert uc["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert uc["transformer_layers_per_block"] == [1, 1, 2] and uc["use_linear_projection"]
    assert uc["attention_head_dim"] == [1, 1, 2] and uc["cross_attention_dim"] == 64 + 128
    assert (uc["addition_embed_type"], uc["addition_time_embed_dim"],
            uc["projection_class_embeddings_input_dim"]) == ("text_time", 8, 128 + 6 * 8)
    # every layer of both encoders (SDXL conditions on the penultimate ones, the backend picks them)
    assert ck.text_config["num_hidden_layers"] == te.config.num_hidden_layers == 3
    assert ck.text_config["hidden_act"] == "quick_gelu"
    tc2 = ck.text_config_2
    assert (tc2["num_hidden_layers"], tc2["hidden_act"], tc2["projection_dim"]) == (3, "gelu", 128)
    assert ck.vae_config["scaling_factor"] == sf.SDXL_SCALING_FACTOR


def test_rebuilt_modules_equal_their_sources(xl):
    _, (unet, te, te2, _, _, vae), (u, t, t2, v) = xl
    for got, ref in ((u, unet), (t, te), (t2, te2), (v, vae)):
        same_state(got, ref)
    assert type(t2).__name__ == "CLIPTextModelWithProjection"


def test_rebuilt_modules_compute_what_their_sources_do(xl):
    _, (unet, te, te2, tok, tok2, _), (u, t, t2, _) = xl
    ids = torch.tensor([tok("a red circle", padding="max_length", max_length=77).input_ids])
    ids2 = torch.tensor([tok2("a red circle", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        for got, ref, x in ((t, te, ids), (t2, te2, ids2)):
            a, b = got(x, output_hidden_states=True), ref(x, output_hidden_states=True)
            assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])
        pooled, pooled_ref = t2(ids2).text_embeds, te2(ids2).text_embeds
        assert pooled.shape == (1, 128) and torch.equal(pooled, pooled_ref)
        ctx = torch.randn(2, 77, 192)
        z = torch.randn(2, 4, 16, 16)
        added = {"text_embeds": torch.randn(2, 128), "time_ids": torch.tensor([[1024., 1024, 0, 0, 1024, 1024]] * 2)}
        ref = unet(z, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        got = u(z, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    assert torch.equal(got, ref)
    # the added vector matters: another size gives another prediction
    added["time_ids"] = torch.tensor([[512., 512, 0, 0, 512, 512]] * 2)
    with torch.no_grad():
        assert not torch.allclose(u(z, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample, got)


def test_fp16_file_gives_the_rounded_modules(tmp_path):
    path, (unet, te, te2, tok, tok2, vae) = tiny_sdxl_checkpoint(str(tmp_path), dtype=torch.float16)
    ck = sf.inspect_checkpoint(path)
    for got, ref in ((sf.build_unet(ck), unet), (sf.build_text_encoder(ck, tok), te),
                     (sf.build_text_encoder_2(ck, tok2), te2), (sf.build_vae(ck), vae)):
        same_state(got, ref.half().float())


def test_prediction_type_rules_apply_to_sdxl(tmp_path):
    path, _ = tiny_sdxl_checkpoint(str(tmp_path), extra={"v_pred": torch.tensor([])})
    assert sf.inspect_checkpoint(path).prediction_type == "v_prediction"
    assert sf.inspect_checkpoint(path, "epsilon").prediction_type == "epsilon"


def test_second_encoder_is_none_for_one_encoder_families(tmp_path):
    from testmodels.ldm_layout import tiny_checkpoint
    path, (_, _, tok, _) = tiny_checkpoint(str(tmp_path), "sd1")
    ck = sf.inspect_checkpoint(path)
    assert ck.text_config_2 is None and sf.build_text_encoder_2(ck, tok) is None


def test_writer_handles_tiny_sdxl_models_too(tmp_path):
    """testmodels.tiny_sdxl's models (GroupNorm of 8, heads of 32 channels: not inferable) still
    round-trip key for key through the SGM layout (weights only; the VAE's 8 channels do not suit
    LDM's 32 groups, so it is not rebuilt)."""
    from testmodels.tiny_sdxl import tiny_sdxl_models
    unet, te, te2, tok, tok2, vae = tiny_sdxl_models(seed=1, with_vae=True)
    path = write_checkpoint(str(tmp_path / "xl.safetensors"), unet, te, vae, "sdxl", text_encoder_2=te2)
    ck = sf.inspect_checkpoint(path)
    assert ck.unet_config["addition_time_embed_dim"] == 8
    for got, ref in ((sf.build_unet(ck), unet), (sf.build_text_encoder(ck, tok), te),
                     (sf.build_text_encoder_2(ck, tok2), te2)):
        same_state(got, ref)


# --- refusals --------------------------------------------------------------------------------------
def keys_file(path, keys):
    save_file({k: torch.zeros(4, 4) for k in keys}, str(path))
    return str(path)


REFINER = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
           "conditioner.embedders.0.model.token_embedding.weight",
           "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
           "conditioner.embedders.0.model.text_projection", "first_stage_model.encoder.conv_in.weight"]
SD3 = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.x_embedder.proj.weight",
       "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight",
       "first_stage_model.encoder.conv_in.weight"]


def test_refiner_is_refused_naming_the_input(tmp_path):
    with pytest.raises(InputError, match="^ckpt: this is an SDXL refiner.*refiner checkpoints are not supported"):
        sf.detect_family(REFINER, "ckpt")
    path = keys_file(tmp_path / "refiner.safetensors", REFINER)
    with pytest.raises(InputError, match="^model: .*refiner") as e:
        sf.inspect_checkpoint(path)
    assert e.value.input_name == "model"


def test_refiner_sized_added_embedding_is_refused(tmp_path):
    """SDXL base's names but y of 5 size numbers (the refiner's 2560 = 1280 + 5 x 256): refused."""
    path, _ = tiny_sdxl_checkpoint(str(tmp_path), extra={"model.diffusion_model.label_emb.0.0.weight":
                                                         torch.zeros(256, 128 + 5 * 8)})
    with pytest.raises(InputError, match="^model: .*168 wide.*refiner checkpoints are not supported"):
        sf.inspect_checkpoint(path)


def test_other_architectures_and_partial_sdxl_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="^ckpt: this looks like SD3"):
        sf.detect_family(SD3, "ckpt")
    with pytest.raises(InputError, match="^model: this looks like SD3"):
        sf.read(keys_file(tmp_path / "sd3.safetensors", SD3))
    base = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.token_embedding.weight", "first_stage_model.encoder.conv_in.weight"]
    assert sf.detect_family(base, "ckpt") == "sdxl"
    with pytest.raises(InputError, match="^ckpt: has an SGM text conditioner.*not SDXL base's"):
        sf.detect_family(base[:3] + base[4:], "ckpt")            # CLIP-L alone
    with pytest.raises(InputError, match="^ckpt: .*no added-conditioning"):
        sf.detect_family(base[:1] + base[2:], "ckpt")            # no label_emb
    with pytest.raises(InputError, match="^ckpt: has no VAE"):
        sf.detect_family(base[:4], "ckpt")
