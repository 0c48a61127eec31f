"""Test-only ComfyUI custom node (never shipped): lets ComfyUI's own CheckpointLoaderSimple load the
tiny SDXL checkpoints that tests/make_tiny_sdxl.py writes.

ComfyUI reads a checkpoint's UNet config from its weights and matches it against
comfy.supported_models.models; the SDXL entry matches only SDXL's exact widths (320 channels, context
2048, depths 2/10) and its CLIP target builds full-size CLIP-L + CLIP-G from fixed configs, so no file
of test size is "SDXL" to it. This adds one entry in front: a subclass of ComfyUI's SDXL that matches
the tiny widths and whose CLIP target takes the text encoders' widths and depths from the file
(heads of 64 channels, as SDXL's). The rest is ComfyUI's: the UNet config read from the weights, the
SDXL model class and its encode_adm, SDXL's CLIP state-dict conversion, tokenizers and VAE loading.
Loading it twice (ComfyUI imports custom nodes under a path-derived name) adds the entry once.
"""
NODE_CLASS_MAPPINGS = {}

# the widths make_tiny_sdxl.py writes: UNet 64 channels, CLIP-L 64 + CLIP-G 128 = context 192, and
# y = CLIP-G's pooled 128 + six 256-dim size/crop features (256: ComfyUI's SDXL encode_adm)
TINY_UNET = {"model_channels": 64, "use_linear_in_transformer": True, "context_dim": 192,
             "adm_in_channels": 128 + 6 * 256, "use_temporal_attention": False}
L_PREFIX = "conditioner.embedders.0.transformer.text_model."
G_PREFIX = "conditioner.embedders.1.model."


def text_config(width: int, act: str, layers: int, heads: int, inner: int, projection: int) -> dict:
    """A CLIP text config as ComfyUI's JSON files spell them (full vocabulary, 77 positions)."""
    return {"hidden_act": act, "hidden_size": width, "intermediate_size": inner, "num_attention_heads": heads,
            "num_hidden_layers": layers, "max_position_embeddings": 77, "vocab_size": 49408,
            "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
            "projection_dim": projection, "initializer_factor": 1.0, "initializer_range": 0.02}


def clip_target(config_l: dict, config_g: dict):
    """A ClipTarget of ComfyUI's SDXL CLIP (SDXLClipModel, SDXLTokenizer) at the given text configs."""
    import torch

    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    class TinyClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            # as SDXLClipModel and SDXLClipG: penultimate layer, no final norm, clip_g pads with 0
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=config_l, model_options=model_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=config_g, return_projected_pooled=True,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    class TinyTokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            # `embedding:` files are checked against these widths
            self.clip_l.embedding_size = config_l["hidden_size"]
            self.clip_g.embedding_size = config_g["hidden_size"]

    return ClipTarget(TinyTokenizer, TinyClip)


def _count(sd, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def configs_from_weights(sd: dict) -> tuple[dict, dict]:
    """(CLIP-L, CLIP-G) text configs of an SDXL file's conditioner weights."""
    wl = sd[L_PREFIX + "embeddings.token_embedding.weight"].shape[1]
    wg = sd[G_PREFIX + "token_embedding.weight"].shape[1]
    config_l = text_config(wl, "quick_gelu", _count(sd, L_PREFIX + "encoder.layers."), wl // 64,
                           sd[L_PREFIX + "encoder.layers.0.mlp.fc1.weight"].shape[0], wl)
    config_g = text_config(wg, "gelu", _count(sd, G_PREFIX + "transformer.resblocks."), wg // 64,
                           sd[G_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                           sd[G_PREFIX + "text_projection"].shape[1])
    return config_l, config_g


def register():
    import comfy.supported_models as sm

    if any(m.__name__ == "CustomEditTinySDXL" for m in sm.models):
        return

    class CustomEditTinySDXL(sm.SDXL):
        unet_config = TINY_UNET

        def clip_target(self, state_dict={}):
            return clip_target(*configs_from_weights(state_dict))

    sm.models.insert(0, CustomEditTinySDXL)


try:
    import comfy.supported_models  # noqa: F401
except ImportError:      # imported outside ComfyUI (nothing to register)
    pass
else:
    register()
