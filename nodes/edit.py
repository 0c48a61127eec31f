"""Schemas of the inversion / Prompt-to-Prompt nodes; each calls one core function."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ._checked import CheckedNode
from ._shared import Inversion, CATEGORY, MODEL_TIP, CLIP_TIP, sdxl_size_input, use_sdxl_size, need_prompt, words_in_prompt, renamed, latent_samples, host_keys, latent_out, inversion_latent_out, check_inversion
from ..customedit_core.word_lists import parse_words, parse_reweight

from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.masks import image_mask
from ..customedit_core.edit import P2PSettings, p2p_edit
from ..customedit_core.errors import InputError
from ..customedit_core.inversion import METHODS, invert
from ..customedit_core.maps import attention_maps
from ..customedit_core.work_size import check_work_size

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
                io.Model.Input("model", tooltip=MODEL_TIP),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
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
                sdxl_size_input(),
            ],
            outputs=[
                Inversion.Output(display_name="inversion",
                                 tooltip="The inverted trajectory, for Prompt-to-Prompt Edit, SpecRef Edit, "
                                         "Attention Maps or DCI Sample (with this model and step count)."),
                io.Latent.Output(display_name="reconstruction",
                                 tooltip="The image walked back down with the source prompt (for VAE Decode): "
                                         "how faithful an edit's unchanged parts can be."),
            ],
        )

    @classmethod
    def check_inputs(cls, source_prompt=None, **_):
        need_prompt(source_prompt, "source_prompt", "describe the image as it is, e.g. 'a photo of a cat'")

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, steps, guidance, method, inner_steps,
                sdxl_size=None) -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        use_sdxl_size(backend, sdxl_size)           # the inversion keeps it for the edits of this image
        samples = latent_samples(backend, latent)
        check_work_size(f"invert_{method}", samples.shape[2:], steps, vae_scale=backend.vae_scale,
                        inner_steps=inner_steps)
        with core_context():
            z = backend.to_model_latent(samples)
            inv = invert(backend, z, source_prompt, steps=steps, guidance=guidance, method=method,
                         inner_steps=inner_steps)
            recon = backend.from_model_latent(inv.reconstruction)
        inv.host_latent = host_keys(latent)         # edits of this image return them (latent_out)
        return io.NodeOutput(inv, latent_out(recon, latent))


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
                io.Model.Input("model", tooltip="The model the image was inverted with."),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                Inversion.Input("inversion", tooltip="The image inverted by Invert Image (same model, its steps)."),
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
                io.Float.Input("blend_threshold", default=0.3, min=0.01, max=0.99, step=0.01, optional=True,
                               tooltip="The blend words' attention (scaled to a maximum of 1) above this is in "
                                       "the mask; lower: a larger region changes."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of steps after which the local blend starts."),
            ],
            outputs=[
                io.Latent.Output(display_name="edited", tooltip="The edited image's latent, for VAE Decode."),
                io.Mask.Output(display_name="blend_mask",
                               tooltip="The local blend mask at the image's size (white: allowed to change); "
                                       "all white without blend words."),
            ],
        )

    @classmethod
    def check_inputs(cls, target_prompt=None, reweight=None, blend_words=None, blend_target_words=None,
                     blend_source_only=True, **_):
        need_prompt(target_prompt, "target_prompt", "give the source prompt with the edit")
        if isinstance(reweight, str):
            parse_reweight(reweight)
            words_in_prompt(reweight, target_prompt, "reweight", "the target prompt",
                             lambda text, name: tuple(parse_reweight(text, name)))
        if isinstance(blend_target_words, str) and parse_words(blend_target_words, "blend_target_words") \
                and isinstance(blend_words, str) and not parse_words(blend_words, "blend_words"):
            raise InputError("blend_words", "is empty but blend_target_words is set; a local blend needs at "
                                            "least one source word (the region to edit)")
        if blend_source_only is False:              # the target words are used only then
            words_in_prompt(blend_target_words, target_prompt, "blend_target_words", "the target prompt")

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
        check_inversion(inversion)
        check_work_size("p2p", inversion.source.shape[2:], inversion.steps, input_name="inversion",
                        vae_scale=backend.vae_scale)
        try:
            with core_context():
                res = p2p_edit(backend, inversion, target_prompt, settings)
                edited = backend.from_model_latent(res.edited)
                mask = image_mask(res.mask, res.edited.shape[2:], backend.vae_scale)
        except InputError as e:
            raise renamed(e, {"blend_source_words": "blend_words"}) from None
        return io.NodeOutput(inversion_latent_out(edited, inversion), mask, ui=ui.PreviewMask(mask, cls=cls))


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
                io.Model.Input("model", tooltip="The model the image was inverted with."),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                Inversion.Input("inversion", tooltip="The image inverted by Invert Image (same model, its steps)."),
                io.String.Input("target_prompt", multiline=True, default="", optional=True,
                                tooltip="Empty: maps of the source prompt's words."),
            ],
            outputs=[io.Image.Output(display_name="maps",
                                     tooltip="One image per word (white: where it attends), also shown on the "
                                             "node.")],
        )

    @classmethod
    def execute(cls, model, clip, inversion, target_prompt="") -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        check_inversion(inversion)
        target = (target_prompt or "").strip() or None
        check_work_size("attention_maps", inversion.source.shape[2:], inversion.steps, input_name="inversion",
                        vae_scale=backend.vae_scale, prompts=1 if target is None else 2)
        with core_context():
            images = attention_maps(backend, inversion, target)
        images = images.float().cpu().contiguous()
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))


NODES = [NullTextInvert, P2PEdit, AttentionMaps]
