"""Random-weight diffusers modules at the exact shapes of Stable Diffusion 1.5 and 2.x.

    unet, text_encoder, tokenizer, vae = build("sd15")          # 860M UNet, CLIP ViT-L/14 text
    unet, text_encoder, tokenizer, vae = build("sd2")           # 866M UNet, OpenCLIP ViT-H/14 text

The tokenizer is CLIP's real BPE (49,408 tokens, from the vendored merges), padded as the
family pads (SD1.x with <|endoftext|>, SD2.x with '!'). Weights are drawn on the CPU from one
seeded generator (normal with std fan_in^-1/2, norms 1/0), so two builds are bit-identical. The
UNet's output layer is scaled by 0.1: a random UNet otherwise predicts O(1) noise that jumps
between timesteps, which makes inversions diverge in a way no trained model does.

SD2.x here is the 768-v model (v-prediction). Its checkpoint is recognised as v-prediction by the
rule ComfyUI and the pack's single-file loader share (the spread of output block 11's first norm
bias), so that bias is drawn with std 0.2. The text encoder has all 24 OpenCLIP layers, as a
checkpoint holds them; SD2 conditions on the penultimate one (`text_encoder_for_conditioning`).
"""
from __future__ import annotations

import torch

FAMILIES = ("sd15", "sd2")

UNET = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd2": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}
TEXT = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768),
    "sd2": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                hidden_act="gelu", projection_dim=1024),
}
PREDICTION = {"sd15": "epsilon", "sd2": "v_prediction"}
V_MARKER = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"     # LDM output_blocks.11.1...


def unet_config(family: str) -> dict:
    return dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **UNET[_check(family)])


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def tokenizer(family: str):
    from customedit_core.clip_vocab import clip_tokenizer

    return clip_tokenizer("!" if _check(family) == "sd2" else "<|endoftext|>")


def build(family: str, seed: int = 0, with_vae: bool = True):
    """(unet, text_encoder, tokenizer, vae or None), float32, eval, no gradients."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer(family)
    with torch.device("meta"):          # no default init: the seeded fill below is the only one
        unet = UNet2DConditionModel(**unet_config(family))
        te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id, **TEXT[family]))
        vae = AutoencoderKL(**vae_config()) if with_vae else None
    g = torch.Generator().manual_seed(seed)
    for m in (unet, te, vae):
        if m is not None:
            _fill(m, g)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.zero_()
        if family == "sd2":
            unet.get_parameter(V_MARKER).normal_(0, 0.2, generator=g)
    for m in (unet, te, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return unet, te, tok, vae


# SDXL 1.0 base: three levels (no attention at the first), 1/2/10 transformer blocks, heads of 64
SDXL_UNET = dict(in_channels=4, out_channels=4, sample_size=128, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)


def build_sdxl(seed: int = 0, with_vae: bool = True):
    """(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae or None) at SDXL base's
    exact shapes (2.57 B UNet, CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text), float32, eval."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from customedit_core.clip_vocab import clip_tokenizer

    tok, tok2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    ids = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te = CLIPTextModel(CLIPTextConfig(**ids, **TEXT["sd15"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **SDXL_TEXT_G))
        vae = AutoencoderKL(**vae_config(), scaling_factor=0.13025) if with_vae else None
    g = torch.Generator().manual_seed(seed)
    for m in (unet, te, te2, vae):
        if m is not None:
            _fill(m, g)
            m.requires_grad_(False).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.zero_()
    return unet, te, te2, tok, tok2, vae


def text_encoder_for_conditioning(family: str, text_encoder):
    """The encoder a pipeline conditions on: SD2 drops the last of OpenCLIP's 24 layers (a view
    sharing the weights), SD1.5 uses all 12."""
    from transformers import CLIPTextModel

    if family != "sd2":
        return text_encoder
    cfg = text_encoder.config.__class__(**{**text_encoder.config.to_dict(),
                                           "num_hidden_layers": text_encoder.config.num_hidden_layers - 1})
    with torch.device("meta"):
        short = CLIPTextModel(cfg)
    state = {k: v for k, v in text_encoder.state_dict().items()
             if f"layers.{cfg.num_hidden_layers}." not in k}
    short.load_state_dict(state, strict=True, assign=True)
    # buffers outside the state dict (transformers' non-persistent position_ids) would stay on the
    # meta device and feed the model garbage: take them from the full encoder
    full = dict(text_encoder.named_buffers())
    for name, buf in list(short.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            short.get_submodule(owner).register_buffer(leaf, full[name].clone(), persistent=False)
    assert not any(t.is_meta for t in list(short.parameters()) + list(short.buffers()))
    return short.requires_grad_(False).eval()


def write_checkpoint(path: str, family: str, seed: int = 0, dtype=torch.float16) -> dict:
    """Build the family's modules and write them as one LDM-layout .safetensors file (atomically);
    returns a summary (parameter counts, prediction type)."""
    import os

    from .ldm_layout import write_checkpoint as write

    unet, te, _, vae = build(family, seed)
    g = torch.Generator().manual_seed(seed + 1)
    extra = {}
    if family == "sd2":
        extra["cond_stage_model.model.text_projection"] = torch.randn(1024, 1024, generator=g) * 1024 ** -0.5
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        write(tmp, unet, te, vae, "sd1" if family == "sd15" else "sd2", dtype, extra)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    count = lambda m: sum(p.numel() for p in m.parameters())      # noqa: E731
    return {"family": family, "unet_params": count(unet), "text_params": count(te), "vae_params": count(vae),
            "prediction_type": PREDICTION[family], "bytes": os.path.getsize(path)}


def _fill(module, g):
    with torch.no_grad():
        module.to_empty(device="cpu")
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("position_ids"):
                p.copy_(torch.arange(p.shape[-1]).expand_as(p))
            elif p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _check(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    return family


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Write a random-weight checkpoint at SD1.5's or SD2.x's exact shapes.")
    ap.add_argument("--family", choices=FAMILIES, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    a = ap.parse_args(argv)
    print(json.dumps(write_checkpoint(a.out, a.family, a.seed, torch.float16 if a.dtype == "fp16" else torch.float32)))


if __name__ == "__main__":
    main()
