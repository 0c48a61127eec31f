"""Which ComfyUI models and CLIPs the backend accepts: SD1.x/SD2.x UNets and SDXL base UNets (and
ComfyUI's SDXL-family distillations: SSD-1B, Vega, KOALA) on a 1000-step discrete eps or
v-prediction schedule, with the CLIP of such a checkpoint (SDXL: CLIP-L + CLIP-G). Every refusal
names the input and ends with SUPPORTED."""
from __future__ import annotations

from ..errors import InputError
from .base import SUPPORTED
from .comfy_tokens import tokenizer_name


def check_supported(model, clip):
    """The model's `model_sampling` when model and clip fit; an InputError naming the input otherwise."""
    import comfy.model_sampling as mst
    import comfy.supported_models as sm

    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if config is None or not hasattr(model, "clone"):
        raise InputError("model", f"expected a MODEL from a checkpoint loader; {SUPPORTED}")
    if isinstance(config, sm.SDXLRefiner):
        raise InputError("model", "is an SDXL refiner, which is not supported: the refiner is a second "
                                  "img2img stage (CLIP-G only, its own added vector); load the SDXL base "
                                  f"checkpoint; {SUPPORTED}")
    sdxl = isinstance(config, sm.SDXL)
    if not (sdxl or type(config) in (sm.SD15, sm.SD20)):   # an allow-list: other families are refused by name
        raise InputError("model", f"{type(config).__name__} models are not supported; {SUPPORTED}")
    channels = config.unet_config.get("in_channels", 4)
    if channels != 4:
        raise InputError("model", f"its UNet takes {channels} input channels (an inpainting or instruct "
                                  f"model); only plain 4-channel text-to-image models are supported; {SUPPORTED}")
    ms = model.get_model_object("model_sampling")
    discrete = (isinstance(ms, mst.ModelSamplingDiscrete)
                and int(ms.sigmas.shape[0]) == int(getattr(ms, "num_timesteps", -1))      # not distilled (LCM)
                and type(ms).sigma is mst.ModelSamplingDiscrete.sigma)
    prediction = (getattr(type(ms), "calculate_input", None) is mst.EPS.calculate_input
                  and type(ms).calculate_denoised in (mst.EPS.calculate_denoised, mst.V_PREDICTION.calculate_denoised))
    if not (discrete and prediction):
        kinds = "/".join(c.__name__ for c in type(ms).__mro__[1:3])
        raise InputError("model", f"its sampling ({kinds}) is not a 1000-step discrete eps or v-prediction "
                                  f"schedule (e.g. a ModelSamplingDiscrete lcm/x0 patch); {SUPPORTED}")
    tok = getattr(clip, "tokenizer", None)
    name = tokenizer_name(tok)
    if clip is None or name is None or not hasattr(tok, name) or not hasattr(clip, "encode_from_tokens"):
        raise InputError("clip", f"expected the CLIP of an SD1.x/SD2.x checkpoint (one CLIP text encoder) or "
                                 f"of an SDXL checkpoint (CLIP-L + CLIP-G); {SUPPORTED}")
    if sdxl != (name == "clip_l" and hasattr(tok, "clip_g")):
        have, want = ("an SD1.x/SD2.x CLIP", "SDXL (CLIP-L + CLIP-G)") if sdxl else ("an SDXL CLIP", "SD1.x/SD2.x")
        raise InputError("clip", f"is {have} but the model is {want}; use the CLIP loaded with this checkpoint")
    width = sum(int(getattr(getattr(tok, n), "embedding_size", 0)) for n in ((name, "clip_g") if sdxl else (name,)))
    context = config.unet_config.get("context_dim")
    if width and context is not None and int(width) != int(context):
        raise InputError("clip", f"gives {width}-wide text embeddings but the model takes {context}; use the CLIP "
                                 "loaded with this checkpoint")
    return ms, sdxl


def layout_error(name: str) -> InputError:
    return InputError("model", f"unexpected UNet layout (transformer block {name!r}); {SUPPORTED}")
