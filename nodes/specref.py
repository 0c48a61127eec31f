"""Schemas of the SpecRef nodes (reference K/V bank, reference-guided edit); each calls one core function."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ._checked import CheckedNode

from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.errors import InputError
from ..customedit_core.masks import image_mask, latent_mask
from ..customedit_core.specref import ReferenceBank, extract_reference, specref_edit
from .edit import CATEGORY, Inversion, _check_inversion, _renamed, _samples, parse_words

ReferenceKV = io.Custom("CE_REFERENCE_KV")

MASKS = ("MASK inputs are at the image's size (another size with the image's aspect ratio is resized to the "
         "latent grid; another shape is an error unless the mask is uniform).")


def _levels():
    return [
        io.Int.Input("level_start", default=0, min=0, max=7,
                     tooltip="Decoder self-attention layers by resolution: 0 = the finest (the latent's size), "
                             "1 = half of it, ... First level used."),
        io.Int.Input("level_end", default=1, min=0, max=7,
                     tooltip="Last level used (inclusive). 0-1 = the two finest, the paper's layers 10-16 on SD1.5."),
        io.Float.Input("step_start", default=0.08, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps after which the reference is used (0.08 = step 4 of 50)."),
        io.Float.Input("step_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps up to which the reference is used."),
    ]


class ReferenceKVExtract(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditReferenceKVExtract",
            display_name="Extract Reference K/V (SpecRef)",
            category=f"{CATEGORY}/specref",
            description="Inverts a reference image (DDIM, guidance 1) and keeps the self-attention keys and values "
                        "of the chosen decoder layers and steps on the offload device, for SpecRef Edit; `info` "
                        "(also in the log) says how much memory they take. The optional mask M_s marks the "
                        f"reference object: an all-zero mask is an error, an all-one mask is the same as none. {MASKS}",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Latent.Input("reference", tooltip="The reference image encoded with this model's VAE, at the "
                                                     "source image's size."),
                io.String.Input("reference_prompt", multiline=True, default="",
                                tooltip="A description of the reference; may be empty (the paper's choice)."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps; the source inversion must use the same."),
                *_levels(),
                io.Mask.Input("mask", optional=True,
                              tooltip="M_s: the reference object (1) to take; unconnected: the whole reference."),
            ],
            outputs=[
                ReferenceKV.Output(display_name="reference_kv"),
                io.String.Output(display_name="info"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, reference, reference_prompt, steps, level_start, level_end, step_start, step_end,
                mask=None) -> io.NodeOutput:
        import comfy.model_management as mm

        backend = ComfyBackend(model, clip)
        with core_context():
            z = backend.to_model_latent(_samples(reference, "reference"))
            ms = latent_mask(mask, z.shape[2:], backend.vae_scale, "mask") if mask is not None else None
            bank = extract_reference(backend, z, reference_prompt, steps=steps, mask=ms, level_start=level_start,
                                     level_end=level_end, step_start=step_start, step_end=step_end,
                                     store_device=mm.unet_offload_device())
        info = bank.describe()
        logging.info("customedit: %s", info)
        return io.NodeOutput(bank, info)


class SpecRefEdit(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditSpecRefSample",
            display_name="SpecRef Edit",
            category=f"{CATEGORY}/specref",
            description="Edits an inverted image after a reference: in the edited words' region M_t (their "
                        "cross-attention, re-estimated every step, or a given mask) the edit attends to the "
                        "reference's keys and values (under its object mask M_s); outside it the source is kept "
                        "(local blend). Returns the edit and M_t. A given mask replaces M_t: all-zero returns the "
                        f"source unchanged, all-one lets the whole image take the reference. {MASKS}",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                Inversion.Input("inversion", tooltip="The source image inverted (direct inversion suits SpecRef)."),
                ReferenceKV.Input("reference_kv"),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The source prompt with the edit, e.g. 'a dog sitting next to a mirror'."),
                io.String.Input("edited_words", default="",
                                tooltip="Comma-separated target words whose region takes the reference (M_t)."),
                *_levels(),
                io.Float.Input("blend_threshold", default=0.3, min=0.01, max=0.99, step=0.01,
                               tooltip="Threshold of M_t: 0.3 when words are added, 0.5 for a swapped word."),
                io.Mask.Input("mask", optional=True, tooltip="A fixed M_t (e.g. from DiffEdit Mask) instead of the "
                                                             "edited words' attention."),
                io.String.Input("source_words", default="", optional=True,
                                tooltip="Source words whose region joins the blend mask (e.g. the replaced object)."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of steps after which the outside is kept as the source."),
            ],
            outputs=[
                io.Latent.Output(display_name="edited"),
                io.Mask.Output(display_name="mask_t"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, inversion, reference_kv, target_prompt, edited_words, level_start, level_end,
                step_start, step_end, blend_threshold, mask=None, source_words="", blend_start=0.2) -> io.NodeOutput:
        words = parse_words(edited_words or "", "edited_words")
        sources = parse_words(source_words or "", "source_words")
        backend = ComfyBackend(model, clip)
        _check_inversion(inversion)
        if not isinstance(reference_kv, ReferenceBank):
            raise InputError("reference_kv", f"expected the output of Extract Reference K/V, got "
                                             f"{type(reference_kv).__name__}")
        try:
            with core_context():
                hw = tuple(inversion.source.shape[2:])
                mt = latent_mask(mask, hw, backend.vae_scale, "mask") if mask is not None else None
                res = specref_edit(backend, inversion, reference_kv, target_prompt, words, level_start=level_start,
                                   level_end=level_end, step_start=step_start, step_end=step_end,
                                   threshold=blend_threshold, mask=mt, source_words=sources,
                                   blend_start=blend_start)
                edited = backend.from_model_latent(res.edited)
        except InputError as e:
            raise _renamed(e, {"threshold": "blend_threshold", "reference": "reference_kv"}) from None
        return io.NodeOutput({"samples": edited}, image_mask(res.mask, hw, backend.vae_scale))


NODES = [ReferenceKVExtract, SpecRefEdit]
