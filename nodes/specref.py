"""Schemas of the SpecRef nodes (reference K/V bank, reference-guided edit); each calls one core function."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ._checked import CheckedNode
from ._shared import Inversion, CATEGORY, CLIP_TIP, sdxl_size_input, use_sdxl_size, need_prompt, words_in_prompt, renamed, latent_samples, inversion_latent_out, check_inversion
from ..customedit_core.word_lists import parse_words

from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.errors import InputError
from ..customedit_core.masks import image_mask, latent_mask
from ..customedit_core.specref import ReferenceBank, extract_reference, specref_edit
from ..customedit_core.work_size import check_work_size

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


def _check_ranges(level_start=None, level_end=None, step_start=None, step_end=None):
    """The level and step ranges are start <= end (each checked when both are widgets)."""
    if isinstance(level_start, int) and isinstance(level_end, int) and level_end < level_start:
        raise InputError("level_end", f"is {level_end}, below level_start ({level_start}); expected "
                                      "level_start <= level_end")
    if isinstance(step_start, (int, float)) and isinstance(step_end, (int, float)) and step_end < step_start:
        raise InputError("step_end", f"is {step_end}, below step_start ({step_start}); expected "
                                     "step_start <= step_end")


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
                io.Model.Input("model", tooltip="The model the source image is (or will be) inverted with."),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                io.Latent.Input("reference", tooltip="The reference image encoded with this model's VAE, at the "
                                                     "source image's size."),
                io.String.Input("reference_prompt", multiline=True, default="",
                                tooltip="A description of the reference; may be empty (the paper's choice)."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps; the source inversion must use the same."),
                *_levels(),
                io.Mask.Input("mask", optional=True,
                              tooltip="M_s: the reference object (1) to take; unconnected: the whole reference."),
                sdxl_size_input(),
            ],
            outputs=[
                ReferenceKV.Output(display_name="reference_kv",
                                   tooltip="The reference's keys and values, for SpecRef Edit (same model, steps "
                                           "and image size)."),
                io.String.Output(display_name="info", tooltip="What the bank holds and how much memory it takes."),
            ],
        )

    @classmethod
    def check_inputs(cls, level_start=None, level_end=None, step_start=None, step_end=None, **_):
        _check_ranges(level_start, level_end, step_start, step_end)

    @classmethod
    def execute(cls, model, clip, reference, reference_prompt, steps, level_start, level_end, step_start, step_end,
                mask=None, sdxl_size=None) -> io.NodeOutput:
        import comfy.model_management as mm

        backend = ComfyBackend(model, clip)
        use_sdxl_size(backend, sdxl_size)
        samples = latent_samples(backend, reference, "reference")
        check_work_size("specref_extract", samples.shape[2:], steps, input_name="reference",
                        vae_scale=backend.vae_scale)
        with core_context():
            z = backend.to_model_latent(samples)
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
                        "cross-attention after the Prompt-to-Prompt control the edit runs under, re-estimated "
                        "every step, or a given mask) the edit attends to the "
                        "reference's keys and values (under its object mask M_s); outside it the source is kept "
                        "(local blend). Returns the edit and M_t. A given mask replaces M_t: all-zero returns the "
                        f"source unchanged, all-one lets the whole image take the reference. {MASKS}",
            inputs=[
                io.Model.Input("model", tooltip="The model the source image was inverted with."),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                Inversion.Input("inversion", tooltip="The source image inverted (direct inversion suits SpecRef)."),
                ReferenceKV.Input("reference_kv", tooltip="From Extract Reference K/V, with the inversion's model, "
                                                          "steps and image size."),
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
                io.Combo.Input("p2p_mode", options=["auto", "replace", "refine"], default="auto", optional=True,
                               tooltip="The Prompt-to-Prompt control the edit runs under (as the reference code): "
                                       "replace for a word swap, refine for added words; auto picks replace when "
                                       "both prompts have as many words."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of steps whose cross-attention comes from the source (the "
                                       "reference code's 0.8); it keeps the object where it was, so M_t stays on it."),
                io.Float.Input("self_replace", default=0.6, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of steps whose self-attention comes from the source, outside "
                                       "the reference layers (the reference code's 0.6). Both 0: no P2P control."),
            ],
            outputs=[
                io.Latent.Output(display_name="edited", tooltip="The edited image's latent, for VAE Decode."),
                io.Mask.Output(display_name="mask_t", tooltip="M_t at the image's size (white: took the reference), "
                                                              "also shown on the node."),
            ],
        )

    @classmethod
    def check_inputs(cls, target_prompt=None, edited_words=None, source_words=None, level_start=None,
                     level_end=None, step_start=None, step_end=None, inversion=None, **values):
        need_prompt(target_prompt, "target_prompt", "give the source prompt with the edit, e.g. 'a photo of a dog'")
        _check_ranges(level_start, level_end, step_start, step_end)
        if "mask" in values:            # a fixed M_t (linked): the words are not used
            return
        if isinstance(edited_words, str) and not parse_words(edited_words, "edited_words"):
            raise InputError("edited_words", "is empty; name the word(s) of the target prompt whose region takes "
                                             "the reference (or connect a mask)")
        words_in_prompt(edited_words, target_prompt, "edited_words", "the target prompt")
        if getattr(inversion, "prompt", None) is not None:          # at execute: the inverted source prompt
            words_in_prompt(source_words, inversion.prompt, "source_words", "the source prompt")

    @classmethod
    def execute(cls, model, clip, inversion, reference_kv, target_prompt, edited_words, level_start, level_end,
                step_start, step_end, blend_threshold, mask=None, source_words="", blend_start=0.2,
                p2p_mode="auto", cross_replace=0.8, self_replace=0.6) -> io.NodeOutput:
        words = parse_words(edited_words or "", "edited_words")
        sources = parse_words(source_words or "", "source_words")
        backend = ComfyBackend(model, clip)
        check_inversion(inversion)
        if not isinstance(reference_kv, ReferenceBank):
            raise InputError("reference_kv", f"expected the output of Extract Reference K/V, got "
                                             f"{type(reference_kv).__name__}")
        check_work_size("specref", inversion.source.shape[2:], inversion.steps, input_name="inversion",
                        vae_scale=backend.vae_scale)
        try:
            with core_context():
                hw = tuple(inversion.source.shape[2:])
                mt = latent_mask(mask, hw, backend.vae_scale, "mask") if mask is not None else None
                res = specref_edit(backend, inversion, reference_kv, target_prompt, words, level_start=level_start,
                                   level_end=level_end, step_start=step_start, step_end=step_end,
                                   threshold=blend_threshold, mask=mt, source_words=sources,
                                   blend_start=blend_start, mode=p2p_mode, cross_replace=float(cross_replace),
                                   self_replace=float(self_replace))
                edited = backend.from_model_latent(res.edited)
        except InputError as e:
            raise renamed(e, {"threshold": "blend_threshold", "reference": "reference_kv",
                              "mode": "p2p_mode"}) from None
        mask_t = image_mask(res.mask, hw, backend.vae_scale)
        return io.NodeOutput(inversion_latent_out(edited, inversion), mask_t, ui=ui.PreviewMask(mask_t, cls=cls))


NODES = [ReferenceKVExtract, SpecRefEdit]
