"""Test support: write diffusers modules as a single-file checkpoint in the original LDM layout.

The key names are the inverse of diffusers' LDM -> diffusers conversion, written out from the
layout's rules (no ComfyUI involved), so a test can build a tiny SD1.x/SD2.x/SDXL checkpoint, load
it through the single-file path and compare with the modules it came from. SDXL's file is the SGM
layout of SDXL 1.0 base: the same UNet/VAE names (plus `label_emb`, SDXL's added vector y) and the
two text encoders under `conditioner.embedders.{0,1}.`.
"""
from __future__ import annotations

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _rename(rest: str, pairs) -> str:
    head, _, tail = rest.partition(".")
    for a, b in pairs:
        if head == a:
            return f"{b}.{tail}"
    return rest


def unet_to_ldm(unet) -> dict:
    cfg = unet.config
    L = cfg.layers_per_block
    has_attn_up = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {}
    # add_embedding is SDXL's: y = [pooled CLIP-G, 6 embedded size/crop numbers] -> label_emb (the
    # sin/cos add_time_proj in front of it has no weights); attention blocks keep their inner names,
    # so transformer_blocks.N and linear (2-D) proj_in/proj_out need no rule of their own
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in unet.state_dict().items():
        parts = k.split(".")
        new = None
        for a, b in fixed.items():
            if k.startswith(a + "."):
                new = b + k[len(a):]
        if new is None and parts[0] == "down_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * (L + 1) + j}.0.{_rename(rest, RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * (L + 1) + j}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * (L + 1)}.0.op.{rest.split('.', 1)[1]}"
        elif new is None and parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{_rename(rest, RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif new is None and parts[0] == "up_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{b * (L + 1) + j}.0.{_rename(rest, RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * (L + 1) + j}.1.{rest}"
            elif kind == "upsamplers":
                new = f"output_blocks.{b * (L + 1) + L}.{2 if has_attn_up[b] else 1}.{rest}"
        if new is None:
            raise KeyError(f"no LDM name for {k}")
        out["model.diffusion_model." + new] = v
    return out


VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out", "proj_out"))


def vae_to_ldm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        parts = k.split(".")
        side = parts[0]
        new = None
        if side in ("quant_conv", "post_quant_conv"):
            new = k
        elif parts[1] in ("conv_in", "conv_out"):
            new = k
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            lvl, name = (i, "down") if parts[1] == "down_blocks" else (n - 1 - i, "up")
            kind = parts[3]
            if kind == "resnets":
                new = f"{side}.{name}.{lvl}.block.{parts[4]}.{_rename('.'.join(parts[5:]), VAE_RESNET)}"
            else:
                sampler = "downsample" if name == "down" else "upsample"
                new = f"{side}.{name}.{lvl}.{sampler}.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                rest = ".".join(parts[4:])
                if rest.startswith("to_out.0."):
                    rest = "proj_out." + rest[len("to_out.0."):]
                else:
                    rest = _rename(rest, VAE_ATTN)
                new = f"{side}.mid.attn_1.{rest}"
                if v.dim() == 2:
                    v = v[:, :, None, None]        # LDM's attention uses 1x1 convolutions
        if new is None:
            raise KeyError(f"no LDM name for {k}")
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(text_encoder, prefix: str = "cond_stage_model.transformer.") -> dict:
    """SD1.x (and SDXL's CLIP-L under conditioner.embedders.0.transformer.): the transformers
    CLIPTextModel's own names under `prefix` + "text_model."."""
    return {prefix + "text_model." + k: v for k, v in _text_state(text_encoder).items()
            if not k.endswith("position_ids")}


def _text_state(text_encoder) -> dict:
    """State dict without the "text_model." prefix (transformers 5 drops it, earlier versions have it)."""
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v
            for k, v in text_encoder.state_dict().items()}


def openclip_to_ldm(text_encoder, proj_dim: int = 16, prefix: str = "cond_stage_model.model.",
                    text_projection=None) -> dict:
    """OpenCLIP layout (`prefix` + token_embedding, transformer.resblocks.i.*, ln_final, ...) of a
    CLIPTextModel; every layer is written. SD2.x (the default prefix): the single-file loader keeps
    all layers but the last (SD2 conditions on the penultimate layer), and the projection is unused,
    so a random [hidden, proj_dim] one is written. SDXL's CLIP-G (prefix conditioner.embedders.1.model.)
    passes its real projection: OpenCLIP stores it as [hidden, proj], `x @ text_projection`, the
    transpose of transformers' text_projection.weight."""
    sd = _text_state(text_encoder)
    p = prefix
    if text_projection is None:
        text_projection = torch.randn(text_encoder.config.hidden_size, proj_dim)
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"],
           p + "ln_final.bias": sd["final_layer_norm.bias"],
           p + "text_projection": text_projection,
           p + "logit_scale": torch.tensor(4.6)}
    for i in range(text_encoder.config.num_hidden_layers):
        a = f"encoder.layers.{i}."
        b = f"{p}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[f"{b}ln_1.{w}"] = sd[f"{a}layer_norm1.{w}"]
            out[f"{b}ln_2.{w}"] = sd[f"{a}layer_norm2.{w}"]
            out[f"{b}attn.in_proj_{w}"] = torch.cat([sd[f"{a}self_attn.{x}_proj.{w}"] for x in "qkv"])
            out[f"{b}attn.out_proj.{w}"] = sd[f"{a}self_attn.out_proj.{w}"]
            out[f"{b}mlp.c_fc.{w}"] = sd[f"{a}mlp.fc1.{w}"]
            out[f"{b}mlp.c_proj.{w}"] = sd[f"{a}mlp.fc2.{w}"]
    return out


def sdxl_text_to_sgm(text_encoder, text_encoder_2) -> dict:
    """SDXL's two encoders as SDXL 1.0 base's file holds them: CLIP-L in the transformers layout
    (embedders.0), CLIP-G (a CLIPTextModelWithProjection) in the OpenCLIP layout (embedders.1)."""
    out = clip_to_ldm(text_encoder, "conditioner.embedders.0.transformer.")
    proj = text_encoder_2.text_projection.weight.detach().T
    out.update(openclip_to_ldm(text_encoder_2, prefix="conditioner.embedders.1.model.", text_projection=proj))
    return out


def tiny_ldm_models(family: str = "sd1", vocab_size: int = 600, seed: int = 0, text_layers: int = 1):
    """(unet, text_encoder, vae) shaped so the single-file loader's rules recognise them:
    GroupNorm of 32, SD1.x: 8 heads, context 768, conv projections; SD2.x: heads of 64 channels,
    context 1024, linear projections, and one more text layer (the one SD2 skips)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if family == "sd1":
        width, act, layers = 768, "quick_gelu", text_layers
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    else:
        width, act, layers = 1024, "gelu", text_layers + 1
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            cross_attention_dim=1024, attention_head_dim=[1, 2], use_linear_projection=True, norm_num_groups=32)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                      pad_token_id=vocab_size - 1, hidden_size=width, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=width // 64,
                                      max_position_embeddings=77, hidden_act=act, projection_dim=width))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=64)
    with torch.no_grad():   # keep the random UNet's noise field smooth and its outputs O(0.1)
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet.eval(), te.eval(), vae.eval()


def tiny_sdxl_ldm_models(tokenizer, tokenizer_2, seed: int = 0, time_dim: int = 8):
    """(unet, text_encoder, text_encoder_2, vae) of SDXL's structure, shaped so the single-file
    loader's rules rebuild them exactly. tiny_sdxl.tiny_sdxl_models is not used for this: its
    GroupNorm of 8 and heads of 32/16 channels are not in the weights, and a file cannot say them
    (the loader assumes LDM's 32 groups and SDXL's heads of 64 channels). Here: GroupNorm of 32,
    widths 64/64/128 with heads of 64 channels, no attention at the first level, 1 and 2 transformer
    blocks below it, linear projections, CLIP-L 64 wide (1 head) + CLIP-G 128 wide (2 heads) = context
    192, a square CLIP-G projection (as SDXL's 1280 -> 1280) and `time_dim`-dim size/crop features
    (SDXL: 256, which ComfyUI's SDXL model class assumes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)

    def text_config(tok, width, act, **kw):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=3, num_attention_heads=width // 64, max_position_embeddings=77,
                              hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **kw)

    te = CLIPTextModel(text_config(tokenizer, 64, "quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 128, "gelu", projection_dim=128)).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 64, 128),
        norm_num_groups=32, cross_attention_dim=64 + 128, attention_head_dim=(1, 1, 2),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=128 + 6 * time_dim,
    ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=64).eval()
    with torch.no_grad():   # as tiny_ldm_models: a smooth noise field, outputs O(0.1)
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet, te, te2, vae


def write_checkpoint(path: str, unet, text_encoder, vae, family: str = "sd1", dtype=torch.float32,
                     extra: dict | None = None, text_encoder_2=None) -> str:
    """`family` "sd1" | "sd2" | "sdxl" (then `text_encoder_2` is CLIP-G, a CLIPTextModelWithProjection);
    `vae` None leaves the VAE to `extra` (a ComfyUI test file holds a TAESD there)."""
    from safetensors.torch import save_file

    sd = unet_to_ldm(unet)
    if vae is not None:
        sd.update(vae_to_ldm(vae))
    if family == "sdxl":
        if text_encoder_2 is None:
            raise ValueError("an SDXL checkpoint needs text_encoder_2 (CLIP-G)")
        sd.update(sdxl_text_to_sgm(text_encoder, text_encoder_2))
    else:
        sd.update(clip_to_ldm(text_encoder) if family == "sd1" else openclip_to_ldm(text_encoder))
    sd.update(extra or {})
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, path)
    return path


def tiny_checkpoint(folder: str, family: str = "sd1", dtype=torch.float32, with_tokenizer: bool = True,
                    name: str = "tiny.safetensors", extra: dict | None = None):
    """Write a tiny single-file checkpoint (and a tokenizer folder next to it); returns
    (path, (unet, text_encoder, tokenizer, vae)) with the modules it was made from."""
    import os

    from .tiny import WORDS, tiny_tokenizer
    from .word_bpe import write_tokenizer

    tok = tiny_tokenizer()
    unet, te, vae = tiny_ldm_models(family, vocab_size=len(tok))
    path = write_checkpoint(os.path.join(folder, name), unet, te, vae, family, dtype, extra)
    if with_tokenizer:
        write_tokenizer(os.path.join(folder, "tokenizer"), WORDS, whole_words=False)
    return path, (unet, te, tok, vae)


def tiny_sdxl_checkpoint(folder: str, dtype=torch.float32, with_tokenizer: bool = True,
                         name: str = "tiny_sdxl.safetensors", extra: dict | None = None, seed: int = 0):
    """Write a tiny SDXL single-file checkpoint (SGM layout; the modules of tiny_sdxl_ldm_models) and
    a tokenizer folder next to it; returns (path, (unet, text_encoder, text_encoder_2, tokenizer,
    tokenizer_2, vae)). Both tokenizers share the tiny vocabulary; tokenizer_2 pads with "!", as
    SDXL's does (the file holds one tokenizer folder, as SDXL's two share vocab and merges)."""
    import os

    from .tiny import WORDS
    from .tiny_sdxl import tiny_sdxl_tokenizers
    from .word_bpe import write_tokenizer

    tok, tok2 = tiny_sdxl_tokenizers()
    unet, te, te2, vae = tiny_sdxl_ldm_models(tok, tok2, seed)
    path = write_checkpoint(os.path.join(folder, name), unet, te, vae, "sdxl", dtype, extra, text_encoder_2=te2)
    if with_tokenizer:
        write_tokenizer(os.path.join(folder, "tokenizer"), WORDS, whole_words=False)
    return path, (unet, te, te2, tok, tok2, vae)


def save_diffusers_folder(folder: str, unet, text_encoder, tokenizer, vae, prediction_type="epsilon") -> str:
    """A diffusers-format folder (safetensors weights) of the given modules, as save_pretrained writes it."""
    import json
    import os

    from diffusers import DDIMScheduler

    unet.save_pretrained(os.path.join(folder, "unet"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, prediction_type=prediction_type).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder
