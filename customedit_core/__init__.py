"""customedit core: host-agnostic torch algorithms (inversion, Prompt-to-Prompt, maps).

Backends adapt a model library (diffusers, ComfyUI) to `backends.base.Backend`.
"""
from .edit import EditResult, P2PSettings, p2p_edit
from .errors import InputError
from .inversion import METHODS, Inversion, invert, reconstruct
from .maps import attention_maps

__all__ = ["EditResult", "InputError", "Inversion", "METHODS", "P2PSettings", "attention_maps",
           "invert", "p2p_edit", "reconstruct"]
