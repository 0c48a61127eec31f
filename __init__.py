"""customedit: ComfyUI custom-node pack for reference-guided, text-driven image editing (inversions,
Prompt-to-Prompt, SpecRef, DiffEdit, Custom Diffusion concepts, DCI; nodes in nodes/).

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. Outside ComfyUI
(no `comfy_api` importable) importing the folder does nothing, so tools that happen to
import it as a package (test runners) are not broken; the engine is `customedit_core`.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import CustomEditExtension, comfy_entrypoint  # noqa: F401

    __all__ = ["CustomEditExtension", "comfy_entrypoint"]
