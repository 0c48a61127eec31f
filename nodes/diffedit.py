"""Schemas of the DiffEdit nodes (mask from noise differences, masked encode/decode)."""
from __future__ import annotations

from comfy_api.latest import io

from ._checked import CheckedNode

from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.diffedit import diffedit_mask, diffedit_sample
from ..customedit_core.masks import image_mask, latent_mask
from .edit import CATEGORY, _samples


class DiffEditMask(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditDiffEditMask",
            display_name="DiffEdit Mask",
            category=f"{CATEGORY}/diffedit",
            description="Finds where the target prompt would change the image: the image is noised several times "
                        "(seeded) and the model's noise estimates under the two prompts are compared; the mask is "
                        "where they differ most (above 1.5x the mean at threshold 0.5). Equal prompts give an "
                        "all-zero mask. The MASK is at the image's size.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
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
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, model, clip, latent, source_prompt, target_prompt, samples, strength, threshold,
                seed) -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        with core_context():
            z = backend.to_model_latent(_samples(latent))
            res = diffedit_mask(backend, z, source_prompt, target_prompt, samples=samples, strength=strength,
                                threshold=threshold, seed=seed)
        return io.NodeOutput(image_mask(res.mask, z.shape[2:], backend.vae_scale))


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
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Latent.Input("latent", tooltip="One image encoded with this model's VAE."),
                io.Mask.Input("mask", tooltip="The region to edit (1), e.g. from DiffEdit Mask."),
                io.String.Input("target_prompt", multiline=True, default=""),
                io.Float.Input("encoding_ratio", default=0.8, min=0.01, max=1.0, step=0.01,
                               tooltip="How far to encode: the fraction of the steps walked up and back down."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps of the whole schedule."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01),
            ],
            outputs=[io.Latent.Output(display_name="edited")],
        )

    @classmethod
    def execute(cls, model, clip, latent, mask, target_prompt, encoding_ratio, steps, guidance) -> io.NodeOutput:
        backend = ComfyBackend(model, clip)
        with core_context():
            z = backend.to_model_latent(_samples(latent))
            m = latent_mask(mask, z.shape[2:], backend.vae_scale, "mask")
            res = diffedit_sample(backend, z, m, target_prompt, encoding_ratio=encoding_ratio, steps=steps,
                                  guidance=guidance)
            edited = backend.from_model_latent(res.edited)
        return io.NodeOutput({"samples": edited})


NODES = [DiffEditMask, DiffEditSample]
