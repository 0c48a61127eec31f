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
    from comfy_tiny_sdxl_node import text_config

    return text_config(width, act, layers, heads=2, inner=2 * width, projection=POOLED)


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
    import comfy.supported_models as sm

    from comfy_tiny_sdxl_node import clip_target       # the CLIP the test-only node gives the tiny SDXL file

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
    target = clip_target(_text_config(L_WIDTH, "quick_gelu"), _text_config(G_WIDTH, "gelu"))
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    _randomise(clip.cond_stage_model, seed + 1)
    return patcher, clip
