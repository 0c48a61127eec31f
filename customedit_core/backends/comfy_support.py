"""Which ComfyUI models and CLIPs the backend accepts: SD1.x/SD2.x UNets on a 1000-step discrete
eps or v-prediction schedule, with the one CLIP text encoder of such a checkpoint. Every refusal
names the input and ends with SUPPORTED."""
from __future__ import annotations

from ..errors import InputError
from .base import SUPPORTED


def check_supported(model, clip):
    """The model's `model_sampling` when model and clip fit; an InputError naming the input otherwise."""
    import comfy.model_sampling as mst
    import comfy.supported_models as sm

    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if config is None or not hasattr(model, "clone"):
        raise InputError("model", f"expected a MODEL from a checkpoint loader; {SUPPORTED}")
    if type(config) not in (sm.SD15, sm.SD20):      # an allow-list: every other family is refused by name
        raise InputError("model", f"{type(config).__name__} models are not supported; {SUPPORTED}")
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
    name = getattr(tok, "clip", None)
    if clip is None or name is None or not hasattr(tok, name) or not hasattr(clip, "encode_from_tokens"):
        raise InputError("clip", f"expected the CLIP of an SD1.x/SD2.x checkpoint (one CLIP text encoder); {SUPPORTED}")
    width = getattr(getattr(tok, name), "embedding_size", None)
    context = config.unet_config.get("context_dim")
    if width is not None and context is not None and int(width) != int(context):
        raise InputError("clip", f"gives {width}-wide text embeddings but the model takes {context}; use the CLIP "
                                 "loaded with this checkpoint")
    return ms


def layout_error(name: str) -> InputError:
    return InputError("model", f"unexpected UNet layout (transformer block {name!r}); {SUPPORTED}")
