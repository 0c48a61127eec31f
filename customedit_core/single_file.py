"""SD1.x / SD2.x single-file checkpoints (original LDM layout, .safetensors) and SDXL base ones (the
SGM layout SDXL 1.0 base ships in) -> diffusers modules, offline.

The configs are inferred from the state dict alone (no original YAML, no hub):
- UNet (`model.diffusion_model.*`): channels and channel_mult from the input blocks' shapes,
  res blocks per level, which levels have attention, transformer depth per level, context dim
  (attn2.to_k), linear or conv projection (proj_in's rank). Heads: SD1.x has 8 heads
  everywhere; SD2.x and SDXL have heads of 64 channels. GroupNorm has 32 groups (fixed in LDM).
  SDXL's `label_emb` takes y = [CLIP-G's pooled projection, 6 embedded size/crop numbers]: its
  input width minus the projection's width, over 6, is the size/crop feature width (256 in SDXL).
- Text encoder: SD1.x has CLIP ViT-L/14 in the transformers layout
  (`cond_stage_model.transformer.*`, last layer); SD2.x has OpenCLIP ViT-H/14
  (`cond_stage_model.model.*`) whose penultimate layer (then ln_final) is the conditioning, so
  the last residual block is dropped. SDXL has CLIP-L in the transformers layout
  (`conditioner.embedders.0.transformer.*`) and OpenCLIP ViT-bigG with its projection
  (`conditioner.embedders.1.model.*`, built as a CLIPTextModelWithProjection); both keep every
  layer, as the backend takes their penultimate hidden states and CLIP-G's final pooled output.
  Widths, depths and vocabulary size come from the shapes.
- VAE (`first_stage_model.*`): the KL autoencoder; widths from the shapes, scale 0.18215
  (SDXL's: 0.13025).
Key renaming uses diffusers' own conversion functions.

What is refused, with a message: pickles (.ckpt/.pt/.bin/.pth), the SDXL refiner (OpenCLIP-G alone
under `conditioner.embedders.0.model.`, aesthetic-score conditioning) and other SGM conditioners,
SD3/Flux and other architectures, inpainting/depth/unCLIP variants, and TAESD-only VAEs.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SGM = "conditioner.embedders."
SDXL_TEXT = SGM + "0.transformer."          # CLIP-L, transformers layout
SDXL_TEXT_2 = SGM + "1.model."              # OpenCLIP ViT-bigG
REFINER_TEXT = SGM + "0.model."             # the refiner's OpenCLIP-G alone
VAE = "first_stage_model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SUPPORTED = "supported: Stable Diffusion 1.x and 2.x checkpoints and SDXL base ones (.safetensors, original " \
            "LDM/SGM layout) or diffusers-format folders of those models"
SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025


@dataclass
class Checkpoint:
    path: str
    family: str                   # "sd1" | "sd2" | "sdxl"
    unet_config: dict
    text_config: dict             # SDXL: CLIP-L's
    vae_config: dict
    prediction_type: str
    prediction_note: str
    state_dict: dict
    metadata: dict
    text_config_2: Optional[dict] = None    # SDXL's CLIP-G (with projection_dim); None otherwise


def refuse_pickle(path: str, input_name: str = "model", hint: str = ""):
    raise InputError(input_name, f"{os.path.basename(path)} is a pickle file, which can run arbitrary code "
                                 "when loaded and is not read here; convert it to .safetensors first (for "
                                 "example: load it once in a trusted environment and save the state dict "
                                 f"with safetensors.torch.save_file{hint})")


def is_pickle(path: str) -> bool:
    """By name or by its first bytes (a pickle's protocol byte, a zip of pickles)."""
    return path.lower().endswith(PICKLE_SUFFIXES) or _sniff(path) == "pickle"


def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its 8-byte little-endian header length may well start with 0x80 (a header
    # of 128 + 256k bytes), which is also a pickle's protocol byte
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read(path: str, input_name: str = "model") -> tuple[dict, dict]:
    """(state dict, metadata) of a .safetensors file; pickles and other files are refused."""
    if not os.path.isfile(path):
        raise InputError(input_name, f"{path!r} does not exist (expected a .safetensors checkpoint or a "
                                     "diffusers-format folder)")
    kind = _sniff(path)
    if is_pickle(path):
        refuse_pickle(path, input_name)
    if kind != "safetensors":
        raise InputError(input_name, f"{os.path.basename(path)} is not a safetensors file; {SUPPORTED}")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
        detect_family(keys, input_name)   # refuse early, before reading gigabytes
        return load_file(path), metadata
    except (SafetensorError, OSError) as e:    # a short header or tensors past the end: a cut-off download
        raise InputError(input_name, f"{path!r} is truncated or corrupt ({e}); expected a complete .safetensors "
                                     "checkpoint (download or copy it again)") from None


def detect_family(keys, input_name: str = "model") -> str:
    """"sd1" | "sd2" | "sdxl" from the key names alone (read() calls it before loading any tensor)."""
    ks = set(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in ks)

    for marker, what in (("joint_blocks.", "SD3"), ("double_blocks.", "Flux"), ("transformer_blocks.", "a DiT")):
        if has(UNET + marker) or has(marker):
            raise InputError(input_name, f"this looks like {what} model, which is not supported; {SUPPORTED}")
    sgm = has(SGM)
    if sgm:
        _check_sgm_conditioner(has, input_name)
    if f"{UNET}input_blocks.0.0.weight" not in ks:
        raise InputError(input_name, "holds no UNet in the original LDM layout (no 'model.diffusion_model."
                                     f"input_blocks.*' keys; a UNet-only or LoRA file?); {SUPPORTED}")
    if sgm:
        family = "sdxl"
        if not has(f"{UNET}label_emb."):   # SDXL's UNet takes the pooled text + size/crop vector y
            raise InputError(input_name, "has SDXL's text encoders but its UNet has no added-conditioning "
                                         f"embedding ('label_emb'); not an SDXL base UNet; {SUPPORTED}")
    elif has(f"{UNET}label_emb."):
        raise InputError(input_name, "has a class/ADM embedding (an unCLIP or upscaler UNet), "
                                     f"which is not supported; {SUPPORTED}")
    elif has(SD1_TEXT):
        family = "sd1"
    elif has(SD2_TEXT):
        family = "sd2"
    else:
        raise InputError(input_name, "has no text encoder ('cond_stage_model.*' or 'conditioner.embedders.*' "
                                     "keys); a checkpoint with its CLIP text encoder(s) is needed")
    if not has(f"{VAE}encoder.conv_in."):
        what = "only a TAESD VAE" if has(f"{VAE}taesd_") else "no VAE"
        raise InputError(input_name, f"has {what} ('first_stage_model.*'); the full KL VAE of the model "
                                     "is needed")
    return family


def _check_sgm_conditioner(has, input_name: str):
    """SGM files name their text encoders by position: SDXL base has CLIP-L (transformers layout) at 0
    and OpenCLIP-G at 1; the refiner has OpenCLIP-G alone at 0. Anything else is another model."""
    if has(REFINER_TEXT) and not has(SGM + "1."):
        raise InputError(input_name, "this is an SDXL refiner checkpoint (OpenCLIP-G alone under "
                                     f"'{REFINER_TEXT}', aesthetic-score conditioning); refiner checkpoints are "
                                     f"not supported (the refiner is an img2img second stage): load the SDXL "
                                     f"base; {SUPPORTED}")
    if not (has(SDXL_TEXT) and has(SDXL_TEXT_2)):
        raise InputError(input_name, f"has an SGM text conditioner ('{SGM}*') that is not SDXL base's "
                                     f"(CLIP-L under '{SDXL_TEXT}' and OpenCLIP-G under '{SDXL_TEXT_2}'); "
                                     f"{SUPPORTED}")


def _indices(sd, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def unet_config(sd: dict, family: str, input_name: str = "model") -> dict:
    w_in = sd[f"{UNET}input_blocks.0.0.weight"]
    in_channels = int(w_in.shape[1])
    if in_channels != 4:
        raise InputError(input_name, f"the UNet takes {in_channels} input channels (an inpainting, depth or "
                                     f"instruct model); only plain 4-channel text-to-image models are supported")
    levels = [[]]
    for i in _indices(sd, f"{UNET}input_blocks.")[1:]:
        b = f"{UNET}input_blocks.{i}."
        if f"{b}0.op.weight" in sd:
            levels.append([])
            continue
        ch = int(sd[f"{b}0.out_layers.3.weight"].shape[0])
        depth = len(_indices(sd, f"{b}1.transformer_blocks."))
        levels[-1].append((ch, depth))
    if any(not lv for lv in levels) or len({len(lv) for lv in levels}) != 1:
        raise InputError(input_name, "the UNet's levels have different numbers of res blocks; not an SD1.x/"
                                     "SD2.x/SDXL layout")
    block_out = [lv[0][0] for lv in levels]
    depths = []
    for lv in levels:
        if len({d for _, d in lv}) != 1 or len({c for c, _ in lv}) != 1:
            raise InputError(input_name, "the UNet's blocks within one level differ; not an SD1.x/SD2.x/SDXL "
                                         "layout")
        depths.append(lv[0][1])
    k_names = [k for k in sd if k.startswith(UNET) and k.endswith("attn2.to_k.weight")]
    if not k_names:
        raise InputError(input_name, "the UNet has no cross-attention layers; not a text-to-image SD model")
    context_dim = int(sd[k_names[0]].shape[1])
    proj = [k for k in sd if k.startswith(UNET) and k.endswith(".proj_in.weight")]
    linear = sd[proj[0]].dim() == 2
    # SDXL's context is CLIP-L + CLIP-G side by side: inspect_checkpoint checks it against both widths
    expected = {"sd1": 768, "sd2": 1024}.get(family)
    if expected and context_dim != expected:
        raise InputError(input_name, f"the UNet's context dimension is {context_dim}, but its text encoder "
                                     f"layout is {family.upper()}'s (context {expected}); {SUPPORTED}")
    # heads are not in the weights (q/k/v are one matrix per layer): SD1.x has 8, SD2.x and SDXL
    # heads of 64 channels (at least one head for toy widths)
    heads = 8 if family == "sd1" else [max(1, c // 64) for c in block_out]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)]
    if f"{UNET}middle_block.1.proj_in.weight" not in sd:
        raise InputError(input_name, "the UNet has no middle-block attention; not an SD1.x/SD2.x/SDXL layout")
    per_level = max(depths) if len(set(d for d in depths if d)) <= 1 else [d or 1 for d in depths]
    # diffusers gives the middle block the last level's depth (SDXL: 10 and 10); blocks beyond it
    # would be dropped silently by the key filter, so a file that differs is refused
    mid = len(_indices(sd, f"{UNET}middle_block.1.transformer_blocks."))
    if mid != (per_level[-1] if isinstance(per_level, list) else max(per_level, 1)):
        raise InputError(input_name, f"the UNet's middle block has {mid} transformer blocks, which its last "
                                     f"level's depth does not match; not an SD1.x/SD2.x/SDXL layout")
    config = {
        "sample_size": 128 if family == "sdxl" else 64, "in_channels": in_channels,
        "out_channels": int(sd[f"{UNET}out.2.weight"].shape[0]),
        "down_block_types": down, "up_block_types": up, "block_out_channels": block_out,
        "layers_per_block": len(levels[0]), "cross_attention_dim": context_dim,
        "attention_head_dim": heads, "use_linear_projection": linear,
        "transformer_layers_per_block": per_level,
        "norm_num_groups": 32,
    }
    if family == "sdxl":
        config.update(_sdxl_added_embedding(sd, input_name))
    return config


def _sdxl_added_embedding(sd: dict, input_name: str) -> dict:
    """SDXL's y = [pooled CLIP-G projection, 6 size/crop numbers of `time_dim` sin/cos features each]
    (2816 = 1280 + 6 x 256); the refiner's 2560 = 1280 + 5 x 256 (aesthetic score instead of the
    target size) gets here only if its layout was renamed, and is refused by the count."""
    names = [f"{UNET}label_emb.0.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    proj = sd.get(f"{SDXL_TEXT_2}text_projection")
    if any(n not in sd for n in names) or proj is None or proj.dim() != 2:
        raise InputError(input_name, "lacks SDXL's added-conditioning weights ('label_emb.0.0'/'label_emb.0.2') "
                                     f"or CLIP-G's text projection ('{SDXL_TEXT_2}text_projection'); {SUPPORTED}")
    adm, pooled = int(sd[names[0]].shape[1]), int(proj.shape[1])
    if adm <= pooled or (adm - pooled) % 6:
        raise InputError(input_name, f"the UNet's added-conditioning input is {adm} wide: not CLIP-G's {pooled}-wide "
                                     "pooled projection plus six size/crop embeddings as SDXL base's (2816 = "
                                     "1280 + 6 x 256; the refiner's 2560 has five, and refiner checkpoints are "
                                     f"not supported); {SUPPORTED}")
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": (adm - pooled) // 6,
            "projection_class_embeddings_input_dim": adm}


def text_config(sd: dict, family: str) -> dict:
    """The (first) text encoder's CLIPTextConfig arguments: SD1.x's CLIP-L, SD2.x's OpenCLIP-H without
    its last layer, SDXL's CLIP-L (every layer)."""
    if family == "sd2":
        return _openclip_config(sd, SD2_TEXT, drop_last=True)
    return _clip_config(sd, SDXL_TEXT if family == "sdxl" else SD1_TEXT)


def text_config_2(sd: dict, family: str) -> Optional[dict]:
    """SDXL's CLIP-G (every layer; projection_dim from the stored [hidden, proj] projection); None else."""
    if family != "sdxl":
        return None
    cfg = _openclip_config(sd, SDXL_TEXT_2, drop_last=False)
    cfg["projection_dim"] = int(sd[f"{SDXL_TEXT_2}text_projection"].shape[1])
    return cfg


def _clip_config(sd: dict, prefix: str) -> dict:
    """CLIP ViT-L in the transformers layout (with or without the "text_model." level)."""
    tm = prefix + ("text_model." if f"{prefix}text_model.embeddings.token_embedding.weight" in sd else "")
    emb = sd[f"{tm}embeddings.token_embedding.weight"]
    pos = sd[f"{tm}embeddings.position_embedding.weight"]
    layers = len(_indices(sd, f"{tm}encoder.layers."))
    inter = sd[f"{tm}encoder.layers.0.mlp.fc1.weight"].shape[0]
    return _config(emb, pos, layers, inter, "quick_gelu")


def _openclip_config(sd: dict, prefix: str, drop_last: bool) -> dict:
    """OpenCLIP text towers (ViT-H, ViT-bigG): GELU; `drop_last` for SD2.x, which conditions on the
    penultimate layer and so never needs the last one."""
    emb = sd[f"{prefix}token_embedding.weight"]
    pos = sd[f"{prefix}positional_embedding"]
    layers = len(_indices(sd, f"{prefix}transformer.resblocks.")) - (1 if drop_last else 0)
    inter = sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return _config(emb, pos, layers, inter, "gelu")


def _config(emb, pos, layers, inter, act) -> dict:
    # heads of 64 channels, as every CLIP text tower SD uses (L: 12, H: 16, bigG: 20)
    hidden = int(emb.shape[1])
    return {"vocab_size": int(emb.shape[0]), "hidden_size": hidden, "intermediate_size": int(inter),
            "num_hidden_layers": int(layers), "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": int(pos.shape[0]), "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": hidden}


def vae_config(sd: dict, family: str = "sd1") -> dict:
    e = f"{VAE}encoder."
    levels = _indices(sd, f"{e}down.")
    block_out = [int(sd[f"{e}down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    return {
        "in_channels": int(sd[f"{e}conv_in.weight"].shape[1]),
        "out_channels": int(sd[f"{VAE}decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": block_out,
        "layers_per_block": len(_indices(sd, f"{e}down.0.block.")),
        "latent_channels": int(sd[f"{e}conv_out.weight"].shape[0]) // 2,
        # SDXL's VAE has SD's layout but was trained anew, with latents of another spread
        "norm_num_groups": 32, "sample_size": 1024 if family == "sdxl" else 512,
        "scaling_factor": SDXL_SCALING_FACTOR if family == "sdxl" else SCALING_FACTOR,
    }


def prediction_type(sd: dict, metadata: dict, family: str, requested: Optional[str] = None) -> tuple[str, str]:
    """(prediction type, how it was decided)."""
    if requested:
        return requested, "as requested"
    if "v_pred" in sd:
        return "v_prediction", "the checkpoint has a 'v_pred' marker key"
    spec = " ".join(str(metadata.get(k, "")) for k in ("modelspec.prediction_type", "modelspec.architecture"))
    if "v_prediction" in spec or re.search(r"-v\b", spec):
        return "v_prediction", "from the file's modelspec metadata"
    if "epsilon" in spec:
        return "epsilon", "from the file's modelspec metadata"
    if family == "sd1":
        return "epsilon", "SD1.x models predict noise"
    if family == "sdxl":   # v-prediction finetunes carry the 'v_pred' key or say it in their metadata
        return "epsilon", "SDXL base predicts noise (set the prediction type to override)"
    # SD2.x: the 768-v models (2.0-v, 2.1) predict v, the 512-base ones noise. Their weights differ
    # visibly in the spread of the last attention block's first norm bias (the heuristic ComfyUI uses).
    names = [k for k in sd if re.match(re.escape(UNET) + r"output_blocks\.\d+\.1\.transformer_blocks\.0\.norm1\.bias$", k)]
    if names:
        last = max(names, key=lambda k: int(k[len(UNET):].split(".")[1]))
        if float(sd[last].float().std(unbiased=False)) > 0.09:
            return "v_prediction", "SD2.x weight statistics suggest a 768-v model (set the prediction type to override)"
    return "epsilon", "SD2.x weight statistics suggest a 512-base model (set the prediction type to override)"


def inspect_checkpoint(path: str, requested_prediction: Optional[str] = None,
                       input_name: str = "model") -> Checkpoint:
    sd, metadata = read(path, input_name)
    family = detect_family(sd.keys(), input_name)
    uc = unet_config(sd, family, input_name)
    tc, tc2 = text_config(sd, family), text_config_2(sd, family)
    width = tc["hidden_size"] + (tc2["hidden_size"] if tc2 else 0)    # SDXL: CLIP-L and CLIP-G side by side
    if width != uc["cross_attention_dim"]:
        what = (f"the text encoders are {tc['hidden_size']} + {tc2['hidden_size']} wide" if tc2 else
                f"the text encoder is {width} wide")
        raise InputError(input_name, f"{what} but the UNet expects {uc['cross_attention_dim']}; the checkpoint "
                                     "is inconsistent")
    vc = vae_config(sd, family)
    if vc["latent_channels"] != uc["in_channels"]:
        raise InputError(input_name, f"the VAE makes {vc['latent_channels']}-channel latents but the UNet takes "
                                     f"{uc['in_channels']}")
    pt, note = prediction_type(sd, metadata, family, requested_prediction)
    return Checkpoint(path, family, uc, tc, vc, pt, note, sd, metadata, tc2)


def _check_fit(own: dict, state: dict, part: str, input_name: str, ignore=()) -> dict:
    """Every weight of the module built from the inferred config must be in the converted state with
    its shape; returns the state without the keys the module does not use (e.g. the
    `text_projection` that ComfyUI's checkpoint savers and many merges write), which are harmless."""
    missing = [k for k in own if k not in state and not any(k.endswith(s) for s in ignore)]
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise InputError(input_name, f"the checkpoint's {part} does not fit the layout inferred from it "
                                     f"(missing {missing[:3]}, wrong shape {bad[:3]}); {SUPPORTED}")
    return {k: v for k, v in state.items() if k in own}


def _load_into(module, state: dict, part: str, input_name: str, ignore=()):
    module.load_state_dict(_check_fit(module.state_dict(), state, part, input_name, ignore), strict=False)
    return module


def build_unet(ck: Checkpoint, input_name: str = "model"):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = convert_ldm_unet_checkpoint(ck.state_dict, dict(ck.unet_config))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ck.unet_config)
    state = _check_fit(unet.state_dict(), state, "UNet", input_name)
    unet.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(unet.parameters()) + list(unet.buffers())):   # a buffer not in the file
        unet = UNet2DConditionModel(**ck.unet_config)
        unet.load_state_dict(state, strict=True)
    return unet.float().eval()


def build_text_encoder(ck: Checkpoint, tokenizer, input_name: str = "model"):
    """The CLIPTextModel: SD1.x's or SDXL's CLIP-L, SD2.x's OpenCLIP-H (without its last layer)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**ck.text_config, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModel(cfg)
    sd = ck.state_dict
    if ck.family in ("sd1", "sdxl"):
        prefix = SDXL_TEXT if ck.family == "sdxl" else SD1_TEXT
        state = {}
        for k, v in sd.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                if not name.startswith("text_model."):
                    name = "text_model." + name
                state[name] = v
    else:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        state = convert_open_clip_checkpoint(model, sd, prefix=SD2_TEXT)
        dropped = f"text_model.encoder.layers.{ck.text_config['num_hidden_layers']}."
        state = {k: v for k, v in state.items() if not k.startswith((dropped, "encoder.layers.{n}.".format(
            n=ck.text_config['num_hidden_layers']))) and k != "text_projection.weight"}
    _load_into(model, _own_names(model, state), "text encoder", input_name, ignore=("position_ids",))
    return model.float().eval()


def build_text_encoder_2(ck: Checkpoint, tokenizer, input_name: str = "model"):
    """SDXL's CLIP-G as a CLIPTextModelWithProjection (every layer; text_projection.weight is the
    transpose of OpenCLIP's stored [hidden, proj] matrix); None for the families with one encoder.
    `tokenizer` is SDXL's second one (it pads with "!")."""
    if ck.family != "sdxl":
        return None
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**ck.text_config_2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModelWithProjection(cfg)
    # splits each in_proj into q/k/v and transposes text_projection; logit_scale is not used
    state = convert_open_clip_checkpoint(model, ck.state_dict, prefix=SDXL_TEXT_2)
    _load_into(model, _own_names(model, state), "second text encoder (CLIP-G)", input_name,
               ignore=("position_ids",))
    return model.float().eval()


def _own_names(model, state: dict) -> dict:
    """`state` under the model's own key names: transformers 5 names a CLIPTextModel's keys without
    "text_model.", earlier versions (and CLIPTextModelWithProjection) with it."""
    own = model.state_dict()
    named = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        named[bare if bare in own else "text_model." + bare] = v
    return named


def build_vae(ck: Checkpoint, input_name: str = "model"):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = convert_ldm_vae_checkpoint(ck.state_dict, dict(ck.vae_config))
    vae = AutoencoderKL(**ck.vae_config)
    _load_into(vae, state, "VAE", input_name)
    return vae.float().eval()


def find_tokenizer_folder(path: str) -> Optional[str]:
    """A tokenizer folder (vocab.json + merges.txt) next to the checkpoint, if there is one."""
    base = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    for cand in (os.path.join(base, stem + ".tokenizer"), os.path.join(base, "tokenizer")):
        if os.path.isfile(os.path.join(cand, "vocab.json")) and os.path.isfile(os.path.join(cand, "merges.txt")):
            return cand
    return None


def load_tokenizer_folder(folder: str, family: Optional[str] = None, input_name: str = "tokenizer"):
    """A CLIP tokenizer from a folder: a saved transformers tokenizer, or bare vocab.json + merges.txt
    (then padded as the family's own tokenizer pads: SD1.x with <|endoftext|>, SD2.x with '!')."""
    from transformers import CLIPTokenizer

    if not os.path.isdir(folder):
        raise InputError(input_name, f"{folder!r} is not a folder (expected a CLIP tokenizer folder)")
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        raise InputError(input_name, f"{folder!r} is not a CLIP tokenizer folder (expected vocab.json and "
                                     "merges.txt, or a saved tokenizer with tokenizer_config.json)")
    pad = "!" if family == "sd2" else "<|endoftext|>"
    return CLIPTokenizer(vocab, merges, pad_token=pad, model_max_length=77)
