"""The toy-world model's architecture: Stable Diffusion's family at toy width.

VAE (AutoencoderKL, 4 latent channels, 4x downsampling: 64 px images -> 16x16 latents), a CLIP
text encoder (77 positions, the SD tokenizer conventions) over a BPE vocabulary generated from the
world's words, and a cross-attention UNet with cross-attention at every level (16x16, 8x8 and 4x4
queries), trained for epsilon prediction on SD's scaled-linear schedule (1000 steps, 0.00085 to
0.012), so every method of the pack runs on it unchanged.
"""
from __future__ import annotations

import os

IMAGE_SIZE = 64
# v1's words, then the words of Custom Diffusion's view prefixes (v2; --init maps vectors by spelling)
EXTRA_WORDS = ("photo", "of", "picture", "big", "small", "v*", "sks", "far", "away", "very", "zoomed", "in",
               "close", "up")
FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

# Widths (the 2-core CPU, 2 threads, batch 32 at 16x16 latents, forward + backward with the attention
# supervision): v1 2.9 M UNet 0.91 s/step; wide 11.2 M (the shipped v3) 1.91 s/step in one session and
# 0.69 s/step over the whole 7,000-step v3 run in another (the machine's speed varies between sessions);
# test: a few K parameters, for the tests.
ARCHS = {
    "v1": dict(unet=dict(block_out_channels=(32, 64, 96), layers_per_block=1, attention_head_dim=2),
               text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)),
    "wide": dict(unet=dict(block_out_channels=(64, 128, 192), layers_per_block=1, attention_head_dim=4),
                 text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)),
    "test": dict(unet=dict(block_out_channels=(8, 8, 16), layers_per_block=1, attention_head_dim=2),
                 text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
}

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def words() -> tuple:
    from .world import vocabulary
    return tuple(vocabulary()) + EXTRA_WORDS


def build_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    from testmodels.word_bpe import write_tokenizer

    write_tokenizer(folder, words())
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def build_vae(size: int = IMAGE_SIZE):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         norm_num_groups=8, layers_per_block=1, sample_size=size)


def build_text_encoder(tok, arch: str = "v1"):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), **ARCHS[arch]["text"], max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def build_unet(arch: str = "v1", size: int = IMAGE_SIZE):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size // 4, in_channels=4, out_channels=4, **ARCHS[arch]["unet"], norm_num_groups=8,
        cross_attention_dim=ARCHS[arch]["text"]["hidden_size"],
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
