"""Tiny SDXL-shaped models built from configs with a fixed seed (tests and benchmarks).

The structure is SDXL's: no attention at the first level, linear transformer projections, more
transformer blocks per level deeper down (1, 2), context = CLIP-L width + CLIP-G width, and the
"text_time" added embedding (CLIP-G's pooled projection + six size/crop numbers of 256-dim sin/cos
features each, as SDXL; here 8-dim to stay tiny). Both text encoders share the tiny vocabulary.
"""
from __future__ import annotations

import torch

from .tiny import tiny_tokenizer

L_WIDTH, G_WIDTH, TIME_DIM = 32, 48, 8
POOLED = G_WIDTH      # the projection is square, as SDXL's CLIP-G (1280 -> 1280) and ComfyUI assume


def tiny_sdxl_tokenizers():
    """(tokenizer, tokenizer_2): the second pads with "!" (id 0), as SDXL's tokenizer_2 does."""
    tok = tiny_tokenizer()
    tok2 = tiny_tokenizer()
    tok2.pad_token = "!"
    return tok, tok2


def tiny_sdxl_models(seed: int = 0, with_vae: bool = False, out_scale: float = 0.1):
    """(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2[, vae]) of SDXL's structure.

    `out_scale` shrinks the random UNet's output layer, as in tiny.tiny_models, so that DDIM
    inversion of the random model is nearly invertible (tests tell good inversions from bad).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, tok2 = tiny_sdxl_tokenizers()
    torch.manual_seed(seed)

    def text_config(width, act, **kw):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                              hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **kw)

    te = CLIPTextModel(text_config(L_WIDTH, "quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(text_config(G_WIDTH, "gelu", projection_dim=POOLED)).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=L_WIDTH + G_WIDTH,
        attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    if not with_vae:
        return unet, te, te2, tok, tok2
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, layers_per_block=1, sample_size=128).eval()
    return unet, te, te2, tok, tok2, vae
