"""A tiny SDXL ModelPatcher + CLIP built in-process from ComfyUI's own classes (model_base.SDXL with
a small UNet config, SDXLClipModel's two SDClipModels at small widths), random weights, fixed seed.

ComfyUI's checkpoint loader only detects SDXL from SDXL's exact widths (320 channels, context
2048, CLIP-G of 32 layers x 1280), which is gigabytes; this gives the same classes, code paths and
conditioning (encode_adm, the "l"/"g" token streams, clip_g's 0 padding) at test size.
"""
from __future__ import annotations

import torch

L_WIDTH, G_WIDTH = 32, 48
POOLED = G_WIDTH      # ComfyUI's CLIP-G projection is square (hidden -> hidden), as SDXL's 1280 -> 1280


def _text_config(width, act, layers=3):
    return {"hidden_act": act, "hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": layers, "max_position_embeddings": 77, "vocab_size": 49408,
            "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
            "projection_dim": POOLED, "initializer_factor": 1.0, "initializer_range": 0.02}


def _randomise(module, seed, out_scale=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name or "ln_" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 * (8 if "embedding" in name else 1))


def tiny_sdxl(seed: int = 0, embedding_directory=None):
    """(ModelPatcher, CLIP) of a tiny SDXL, both on the CPU; `embedding:` files from embedding_directory."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm

    class TinyClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=_text_config(L_WIDTH, "quick_gelu"), model_options=model_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=_text_config(G_WIDTH, "gelu"), return_projected_pooled=True,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    class TinyTokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            self.clip_l.embedding_size, self.clip_g.embedding_size = L_WIDTH, G_WIDTH

    class Target:
        clip, tokenizer, params = TinyClip, TinyTokenizer, {}

    unet_config = {
        "model_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [0, 1, 2],
        "transformer_depth_output": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
        "context_dim": L_WIDTH + G_WIDTH, "adm_in_channels": POOLED + 6 * 256, "num_classes": "sequential",
        "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 2],
        "use_spatial_transformer": True, "image_size": 32, "legacy": False,
        "use_temporal_attention": False, "use_temporal_resblock": False, "num_heads": -1,
    }
    config = sm.SDXL(unet_config)
    model = config.get_model({})
    _randomise(model.diffusion_model, seed)
    with torch.no_grad():       # a smooth noise field, as testmodels.tiny does for the diffusers models
        out = model.diffusion_model.out[-1]
        out.weight.mul_(0.1)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    clip = comfy.sd.CLIP(target=Target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    _randomise(clip.cond_stage_model, seed + 1)
    return patcher, clip
