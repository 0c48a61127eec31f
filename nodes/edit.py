"""Schemas of the inversion / Prompt-to-Prompt nodes; each calls one core function."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ._checked import CheckedNode

from ..customedit_core.backends.comfy import ComfyBackend, core_context, local_blend_mask_image
from ..customedit_core.edit import P2PSettings, p2p_edit
from ..customedit_core.errors import InputError
from ..customedit_core.inversion import METHODS, invert
from ..customedit_core.maps import attention_maps

Inversion = io.Custom("CE_INVERSION")
CATEGORY = "customedit"


def parse_words(text: str, input_name: str) -> tuple:
    """'teapot, red car' -> ('teapot', 'red car'); empty -> ()."""
    if not isinstance(text, str):
        raise InputError(input_name, f"expected comma-separated words, got {type(text).__name__}")
    words = (" ".join(w.split()) for w in text.split(","))
    return tuple(w for w in words if w)          # stray commas are forgiven


def parse_reweight(text: str, input_name: str = "reweight") -> dict:
    """'dog:2, grass:-1' -> {'dog': 2.0, 'grass': -1.0}; empty -> {}."""
    out = {}
    for entry in parse_words(text, input_name):
        word, sep, value = entry.rpartition(":")
        word = word.strip()
        if not sep or not word:
            raise InputError(input_name, f"entry {entry!r} is not 'word:weight'; expected e.g. 'dog:2, grass:-1'")
        try:
            out[word] = float(value)
        except ValueError:
            raise InputError(input_name, f"weight {value.strip()!r} of {word!r} is not a number; "
                                         "expected e.g. 'dog:2, grass:-1'") from None
        if out[word] != out[word] or abs(out[word]) > 100:
            raise InputError(input_name, f"weight of {word!r} must be a finite number in [-100, 100], got {value.strip()}")
    return out


def _need_prompt(text, input_name: str, hint: str) -> None:
    """A constant prompt widget must say something (None: it comes through a link)."""
    if isinstance(text, str) and not text.strip():
        raise InputError(input_name, f"is empty; {hint}")


def _renamed(err: InputError, names: dict) -> InputError:
    """The same error naming this node's input instead of the core's parameter."""
    if err.input_name not in names:
        return err
    problem = str(err)[len(err.input_name) + 2:]
    return InputError(names[err.input_name], problem)


class NullTextInvert(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditNullTextInvert",
            display_name="Invert Image (Null-text / fast)",
            category=f"{CATEGORY}/inversion",
            description="Inverts an image's latent along a deterministic DDIM trajectory so that it can be "
                        "edited with Prompt-to-Prompt. Also returns the reconstruction, to check the inversion.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Latent.Input("latent", tooltip="One image encoded with this model's VAE."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="A description of the image as it is."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps; editing uses the same."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale the edit will use."),
                io.Combo.Input("method", options=list(METHODS), default="null_text",
                               tooltip="null_text: optimised null embeddings (best, slowest); negative_prompt: "
                                       "source prompt as negative; direct: exact source branch; ddim: plain."),
                io.Int.Input("inner_steps", default=10, min=1, max=100,
                             tooltip="Null-text optimisation steps per timestep."),
            ],
            outputs=[
                Inversion.Output(display_name="inversion"),
                io.Latent.Output(display_name="reconstruction"),
            ],
        )

    @classmethod
    def check_inputs(cls, source_prompt=None, **_):
        _need_prompt(source_prompt, "source_prompt", "describe the image as it is, e.g. 'a photo of a cat'")

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, steps, guidance, method, inner_steps) -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        with core_context():
            z = backend.to_model_latent(_samples(latent))
            inv = invert(backend, z, source_prompt, steps=steps, guidance=guidance, method=method,
                         inner_steps=inner_steps)
            recon = backend.from_model_latent(inv.reconstruction)
        return io.NodeOutput(inv, {"samples": recon})


class P2PEdit(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditP2PEdit",
            display_name="Prompt-to-Prompt Edit",
            category=f"{CATEGORY}/edit",
            description="Edits an inverted image by changing its prompt, keeping the layout through the source's "
                        "attention maps (Prompt-to-Prompt), optionally only inside a local-blend mask.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                Inversion.Input("inversion"),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The source prompt with the edit, e.g. a word swapped or added."),
                io.Combo.Input("mode", options=["refine", "replace"], default="refine",
                               tooltip="refine: words added/changed freely; replace: same word count, words swapped."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of steps in which the edit takes the source's cross-attention."),
                io.Float.Input("self_replace", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of steps in which the edit takes the source's self-attention."),
                io.String.Input("reweight", default="", optional=True,
                                tooltip="Scale attention to target words, e.g. 'dog:2, grass:-1'. Empty: none."),
                io.String.Input("blend_words", default="", optional=True,
                                tooltip="Comma-separated source words whose region may change (local blend). "
                                        "Empty: the whole image may change."),
                io.String.Input("blend_target_words", default="", optional=True,
                                tooltip="Target words whose region is added to the mask (unless source only)."),
                io.Boolean.Input("blend_source_only", default=True, optional=True,
                                 tooltip="Mask from the source words alone (Custom-Edit's recipe)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.01, max=0.99, step=0.01, optional=True),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of steps after which the local blend starts."),
            ],
            outputs=[
                io.Latent.Output(display_name="edited"),
                io.Mask.Output(display_name="blend_mask"),
            ],
        )

    @classmethod
    def check_inputs(cls, target_prompt=None, reweight=None, blend_words=None, blend_target_words=None, **_):
        _need_prompt(target_prompt, "target_prompt", "give the source prompt with the edit")
        if isinstance(reweight, str):
            parse_reweight(reweight)
        if isinstance(blend_target_words, str) and parse_words(blend_target_words, "blend_target_words") \
                and isinstance(blend_words, str) and not parse_words(blend_words, "blend_words"):
            raise InputError("blend_words", "is empty but blend_target_words is set; a local blend needs at "
                                            "least one source word (the region to edit)")

    @classmethod
    def execute(cls, model, clip, inversion, target_prompt, mode, cross_replace, self_replace, reweight="",
                blend_words="", blend_target_words="", blend_source_only=True, blend_threshold=0.3,
                blend_start=0.2) -> io.NodeOutput:
        source_words = parse_words(blend_words or "", "blend_words")
        target_words = parse_words(blend_target_words or "", "blend_target_words")
        settings = P2PSettings(mode=mode, cross_replace=float(cross_replace), self_replace=float(self_replace),
                               reweight=parse_reweight(reweight or ""), blend_source_words=source_words,
                               blend_target_words=target_words, blend_source_only=bool(blend_source_only),
                               blend_threshold=float(blend_threshold), blend_start=float(blend_start))
        backend = ComfyBackend(model, clip)
        _check_inversion(inversion)
        try:
            with core_context():
                res = p2p_edit(backend, inversion, target_prompt, settings)
                edited = backend.from_model_latent(res.edited)
                mask = local_blend_mask_image(res.mask, res.edited.shape[2:], backend.vae_scale)
        except InputError as e:
            raise _renamed(e, {"blend_source_words": "blend_words"}) from None
        return io.NodeOutput({"samples": edited}, mask)


class AttentionMaps(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditAttentionMaps",
            display_name="Attention Maps",
            category=f"{CATEGORY}/inspect",
            description="Per-word cross-attention maps of the inverted image's source prompt, or of a target "
                        "prompt in a Prompt-to-Prompt edit; one image per word.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                Inversion.Input("inversion"),
                io.String.Input("target_prompt", multiline=True, default="", optional=True,
                                tooltip="Empty: maps of the source prompt's words."),
            ],
            outputs=[io.Image.Output(display_name="maps")],
        )

    @classmethod
    def execute(cls, model, clip, inversion, target_prompt="") -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        _check_inversion(inversion)
        with core_context():
            images = attention_maps(backend, inversion, (target_prompt or "").strip() or None)
        return io.NodeOutput(images.float().cpu().contiguous())


NODES = [NullTextInvert, P2PEdit, AttentionMaps]


def _samples(latent, input_name: str = "latent") -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise InputError(input_name, "expected a LATENT (a dict with 'samples'), e.g. from VAE Encode")
    return latent["samples"]


def _check_inversion(inv):
    from ..customedit_core.inversion import Inversion as Record

    if not isinstance(inv, Record):
        raise InputError("inversion", f"expected the output of Invert Image, got {type(inv).__name__}")
