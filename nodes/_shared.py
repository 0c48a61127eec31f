"""What the node modules share: the pack's custom types, category and tooltips, queue-time prompt
checks, and the LATENT in/out rules (samples checked before model work; noise_mask/batch_index kept)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..customedit_core.errors import InputError
from ..customedit_core.tokens import split_words
from ..customedit_core.word_lists import parse_words

Inversion = io.Custom("CE_INVERSION")
CATEGORY = "customedit"
MODEL_TIP = "A Stable Diffusion 1.x/2.x or SDXL base model (e.g. from Load Checkpoint); it is not changed."
CLIP_TIP = "The text encoder of the same checkpoint."
# what of an input LATENT besides its samples an output of the same images keeps (KSampler does too)
HOST_KEYS = ("noise_mask", "batch_index")


SDXL_SIZE_TIP = ("SDXL only, optional: a CLIP Text Encode (SDXL) output whose width/height, crop and target "
                 "size the model is conditioned on (only those: the prompts are this node's). Unconnected: the "
                 "image's own size, as KSampler gives with CLIP Text Encode.")
SDXL_SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def sdxl_size_input():
    return io.Conditioning.Input("sdxl_size", optional=True, tooltip=SDXL_SIZE_TIP)


def sdxl_size_of(conditioning, input_name: str = "sdxl_size"):
    """The SizeConditioning that CLIPTextEncodeSDXL put into a CONDITIONING ([[tensor, {...}], ...]);
    every entry that has sizes must have the same ones (which would the model get otherwise?)."""
    from ..customedit_core.backends.sdxl_cond import SizeConditioning

    if not isinstance(conditioning, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[1], dict) for c in conditioning):
        raise InputError(input_name, "expected a CONDITIONING, e.g. from CLIP Text Encode (SDXL)")
    found = set()
    for _, extra in conditioning:
        if "width" in extra or "height" in extra:
            found.add(tuple(extra.get(k) for k in SDXL_SIZE_KEYS))
    if not found:
        raise InputError(input_name, "has no SDXL size (width/height); connect the output of CLIP Text Encode "
                                     "(SDXL), or leave it unconnected for the image's own size")
    if len(found) > 1:
        raise InputError(input_name, f"holds {len(found)} different SDXL sizes; connect one CLIP Text Encode (SDXL)")
    w, h, cw, ch, tw, th = found.pop()
    values = {"width": w, "height": h, "crop_w": cw or 0, "crop_h": ch or 0,
              "target_width": w if tw is None else tw, "target_height": h if th is None else th}
    for k, v in values.items():
        low = 0 if k.startswith("crop") else 1
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not low <= v <= 16384 or v != int(v):
            raise InputError(input_name, f"has {k} = {v!r}; expected a whole number of pixels in {low}..16384")
    return SizeConditioning(original=(int(values["height"]), int(values["width"])),
                            crop=(int(values["crop_h"]), int(values["crop_w"])),
                            target=(int(values["target_height"]), int(values["target_width"])))


def use_sdxl_size(backend, conditioning, input_name: str = "sdxl_size") -> None:
    """Condition the backend's SDXL calls on the connected size (nothing when unconnected)."""
    if conditioning is None:
        return
    if not getattr(backend, "sdxl", False):
        raise InputError(input_name, "is for SDXL models only (size conditioning); this model is SD1.x/SD2.x, "
                                     "leave it unconnected")
    backend.size = sdxl_size_of(conditioning, input_name)


def need_prompt(text, input_name: str, hint: str) -> None:
    """A constant prompt widget must say something (None: it comes through a link)."""
    if isinstance(text, str) and not text.strip():
        raise InputError(input_name, f"is empty; {hint}")


def words_in_prompt(words, prompt, input_name: str, prompt_name: str, parse=None) -> None:
    """Every comma-separated word (or phrase) of `words` occurs in `prompt`, matched as the core matches
    them (whole words, any case); skipped while either comes through a link (None)."""
    if not isinstance(words, str) or not isinstance(prompt, str):
        return
    have = split_words(prompt)
    for w in (parse or parse_words)(words, input_name):
        q = split_words(w)
        if q and not any(have[i:i + len(q)] == q for i in range(len(have) - len(q) + 1)):
            raise InputError(input_name, f"{w!r} does not occur in {prompt_name} {prompt!r}; "
                                         f"expected words of {prompt_name}")


def renamed(err: InputError, names: dict) -> InputError:
    """The same error naming this node's input instead of the core's parameter."""
    if err.input_name not in names:
        return err
    problem = str(err)[len(err.input_name) + 2:]
    return InputError(names[err.input_name], problem)


def latent_samples_of(latent, input_name: str = "latent") -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise InputError(input_name, "expected a LATENT (a dict with 'samples'), e.g. from VAE Encode")
    return latent["samples"]


def latent_samples(backend, latent, input_name: str = "latent") -> torch.Tensor:
    """The LATENT's samples, refused before any model work unless [B, C, H, W] with sides that are
    non-zero multiples of what the UNet needs (an empty or odd-sized latent fails deep in a conv)."""
    s = latent_samples_of(latent, input_name)
    f, m = backend.vae_scale, backend.latent_multiple
    if s.dim() != 4:
        raise InputError(input_name, f"has samples of shape {tuple(s.shape)}; expected an image latent [B, C, H, W] "
                                     "(e.g. from VAE Encode)")
    if s.shape[0] < 1:
        raise InputError(input_name, "holds no image (batch of 0)")
    h, w = s.shape[2:]
    if h < m or w < m or h % m or w % m:
        raise InputError(input_name, f"is {w * f}x{h * f} px ({w}x{h} latent); this model needs a width and height "
                                     f"that are non-zero multiples of {m * f} px (resize or crop the image)")
    return s


def host_keys(latent) -> dict:
    """The input LATENT's noise_mask / batch_index (an output of the same images keeps them)."""
    return {k: latent[k] for k in HOST_KEYS if k in latent} if isinstance(latent, dict) else {}


def latent_out(samples: torch.Tensor, like=None, keys=None, batch=None) -> dict:
    """A LATENT of `samples` keeping the noise_mask / batch_index of the input LATENT `like` (or `keys` of
    a `batch`-image input) when it holds as many images, i.e. is those images edited; a latent of another
    batch size gets neither (they would not fit it)."""
    if like is not None:
        keys, batch = host_keys(like), latent_samples_of(like).shape[0]
    out = {"samples": samples}
    if keys and batch == samples.shape[0]:
        out.update(keys)
    return out


def inversion_latent_out(samples: torch.Tensor, inv) -> dict:
    """latent_out for an edit of an inverted image: the keys of the LATENT that was inverted."""
    return latent_out(samples, keys=getattr(inv, "host_latent", None), batch=inv.source.shape[0])


def check_inversion(inv):
    from ..customedit_core.inversion import Inversion as Record

    if not isinstance(inv, Record):
        raise InputError("inversion", f"expected the output of Invert Image, got {type(inv).__name__}")
