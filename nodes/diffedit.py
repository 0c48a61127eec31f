"""Schemas of the DiffEdit nodes (mask from noise differences, masked encode/decode)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ._checked import CheckedNode
from ._shared import CATEGORY, MODEL_TIP, CLIP_TIP, sdxl_size_input, use_sdxl_size, need_prompt, latent_samples, latent_out

from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.diffedit import diffedit_mask, diffedit_sample
from ..customedit_core.errors import InputError
from ..customedit_core.masks import image_mask, latent_mask
from ..customedit_core.tokens import split_words
from ..customedit_core.work_size import check_work_size


class DiffEditMask(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditDiffEditMask",
            display_name="DiffEdit Mask",
            category=f"{CATEGORY}/diffedit",
            description="Finds where the target prompt would change the image: the image is noised several times "
                        "(seeded) and the model's noise estimates under the two prompts are compared; the mask is "
                        "where they differ most (above 1.5x the mean at threshold 0.5). The two prompts must "
                        "differ (equal ones would give an all-zero mask). The MASK is at the image's size and is "
                        "shown on the node.",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TIP),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                io.Latent.Input("latent", tooltip="One image encoded with this model's VAE."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="The query: what is in the image now, e.g. 'a bowl of fruits'."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="What it should become, e.g. 'a basket of fruits'."),
                io.Int.Input("samples", default=10, min=1, max=100, tooltip="Noise samples averaged."),
                io.Float.Input("strength", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Noise level of the samples (fraction of the schedule)."),
                io.Float.Input("threshold", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="On the difference clamped at 3x its mean and divided by that."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 63 - 1, tooltip="Seed of the noise samples."),
                sdxl_size_input(),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="Where the edit should happen (white), at the "
                                                                 "image's size; for DiffEdit Sample or SpecRef Edit.")],
        )

    @classmethod
    def check_inputs(cls, source_prompt=None, target_prompt=None, **_):
        need_prompt(source_prompt, "source_prompt", "describe what is in the image now, e.g. 'a bowl of fruits'")
        need_prompt(target_prompt, "target_prompt", "describe what it should become, e.g. 'a basket of fruits'")
        if isinstance(source_prompt, str) and isinstance(target_prompt, str) \
                and split_words(source_prompt) == split_words(target_prompt):
            raise InputError("target_prompt", "is the same as source_prompt; the mask is where the two differ, so "
                                              "give the prompt of the edited image, e.g. 'a basket of fruits'")

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, target_prompt, samples, strength, threshold,
                seed, sdxl_size=None) -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        use_sdxl_size(backend, sdxl_size)
        z_in = latent_samples(backend, latent)
        check_work_size("diffedit_mask", z_in.shape[2:], 1, vae_scale=backend.vae_scale, samples=samples)
        with core_context():
            z = backend.to_model_latent(z_in)
            res = diffedit_mask(backend, z, source_prompt, target_prompt, samples=samples, strength=strength,
                                threshold=threshold, seed=seed)
        mask = image_mask(res.mask, z.shape[2:], backend.vae_scale)
        return io.NodeOutput(mask, ui=ui.PreviewMask(mask, cls=cls))


class DiffEditSample(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditDiffEditSample",
            display_name="DiffEdit Sample",
            category=f"{CATEGORY}/diffedit",
            description="DDIM-encodes the image to the encoding ratio (unconditionally, guidance 1), then decodes "
                        "with the target prompt; outside the mask every step takes the encoded latent of the same "
                        "timestep, so the outside comes back unchanged. An all-zero mask returns the input latent "
                        "itself; an all-one mask is a plain encode-decode. The MASK is at the image's size (another "
                        "size with the image's aspect ratio is resized to the latent grid; another shape is an error "
                        "unless the mask is uniform).",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TIP),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                io.Latent.Input("latent", tooltip="One image encoded with this model's VAE."),
                io.Mask.Input("mask", tooltip="The region to edit (1), e.g. from DiffEdit Mask."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="What the masked region should become, as a description of the whole "
                                        "edited image, e.g. 'a basket of fruits'."),
                io.Float.Input("encoding_ratio", default=0.8, min=0.01, max=1.0, step=0.01,
                               tooltip="How far to encode: the fraction of the steps walked up and back down."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps of the whole schedule."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the decoding with the target prompt."),
                sdxl_size_input(),
            ],
            outputs=[io.Latent.Output(display_name="edited", tooltip="The edited image's latent (outside the mask: "
                                                                     "the input), for VAE Decode.")],
        )

    @classmethod
    def check_inputs(cls, target_prompt=None, **_):
        need_prompt(target_prompt, "target_prompt", "describe the edited image, e.g. 'a basket of fruits'")

    @classmethod
    def execute(cls, model, clip, latent, mask, target_prompt, encoding_ratio, steps, guidance,
                sdxl_size=None) -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        use_sdxl_size(backend, sdxl_size)
        z_in = latent_samples(backend, latent)
        check_work_size("diffedit_sample", z_in.shape[2:], steps, vae_scale=backend.vae_scale,
                        encoding_ratio=encoding_ratio)
        with core_context():
            z = backend.to_model_latent(z_in)
            m = latent_mask(mask, z.shape[2:], backend.vae_scale, "mask")
            res = diffedit_sample(backend, z, m, target_prompt, encoding_ratio=encoding_ratio, steps=steps,
                                  guidance=guidance)
            edited = backend.from_model_latent(res.edited)
        return io.NodeOutput(latent_out(edited, latent))


NODES = [DiffEditMask, DiffEditSample]
