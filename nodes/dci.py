"""Schema of the DCI sampling node (Divide, Conquer, then Integrate); it calls one core function."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ._checked import CheckedNode
from ._shared import Inversion, CATEGORY, sdxl_size_input, use_sdxl_size, need_prompt, words_in_prompt, latent_samples, latent_out, inversion_latent_out, check_inversion
from ..customedit_core.word_lists import parse_words

from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.masks import image_mask
from ..customedit_core.backends.comfy_concept import loaded_classes
from ..customedit_core.dci import DCISettings, dci_sample
from ..customedit_core.errors import InputError
from ..customedit_core.work_size import check_work_size

log = logging.getLogger("customedit")


class DCISample(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditDCISample",
            display_name="DCI Sample (customized model)",
            category=f"{CATEGORY}/concept",
            description="Samples a model with a concept loaded (Load Concept) so that the concept keeps its look and "
                        "the rest of the prompt is still followed (DCI, Customized Generation Reimagined). In the "
                        "first steps an auxiliary branch with the plain prompt runs beside it, and every "
                        "cross-attention layer takes the auxiliary branch's output where the context words attend "
                        "and its own where the concept word attends; then it continues alone. Starts from seeded "
                        "noise of latent_image's size (the same noise as KSampler for the same seed) or from an "
                        "inversion. Returns the latent and the concept branch's weight (white = concept).",
            inputs=[
                io.Model.Input("model", tooltip="A model with a concept loaded (Load Concept)."),
                io.Clip.Input("clip", tooltip="The CLIP from the same Load Concept."),
                io.String.Input("prompt", multiline=True, default="a photo of a <new1> dog on the beach",
                                tooltip="The prompt with the concept word."),
                io.String.Input("auxiliary_prompt", multiline=True, default="",
                                tooltip="The plain prompt of the auxiliary branch. Empty: the prompt with the concept "
                                        "word dropped before its class word ('<new1> dog' -> 'dog') or replaced by it."),
                io.String.Input("concept_words", default="",
                                tooltip="Comma-separated concept words the integration follows. Empty: every loaded "
                                        "concept word in the prompt."),
                io.Float.Input("integrate_fraction", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the steps with both branches (0 = plain sampling)."),
                io.Float.Input("balance", display_name="lambda", default=0.0, min=-20.0, max=20.0, step=0.1,
                               tooltip="> 0 favours the concept (fidelity), < 0 the context (prompt); useful -2..2."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (an inversion's own count)."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (an inversion's own scale is used with one)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise (KSampler's noise for the same seed); not used "
                                     "with an inversion."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Size and batch of the result (e.g. Empty Latent Image); its content is "
                                        "not used. Leave unconnected with an inversion."),
                Inversion.Input("inversion", optional=True,
                                tooltip="Edit an inverted image instead (null-text or negative-prompt inversion)."),
                io.String.Input("negative_prompt", multiline=True, default="", optional=True,
                                tooltip="Negative prompt (not with an inversion, which brings its own)."),
                sdxl_size_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="samples", tooltip="The sampled latent(s), for VAE Decode."),
                io.Mask.Output(display_name="concept_weight",
                               tooltip="The concept branch's mean weight w at the image's size (white = concept), "
                                       "also shown on the node; all white when nothing was integrated."),
            ],
        )

    @classmethod
    def check_inputs(cls, prompt=None, concept_words=None, negative_prompt=None, **values):
        need_prompt(prompt, "prompt", "give a prompt with the concept word, e.g. 'a photo of a <new1> dog'")
        words_in_prompt(concept_words, prompt, "concept_words", "the prompt")
        if "latent_image" in values and "inversion" in values:        # both connected (unconnected: absent)
            raise InputError("latent_image", "connect either a latent (for the size, e.g. Empty Latent Image) or an "
                                             "inversion, not both")
        if "inversion" in values and "sdxl_size" in values:
            raise InputError("sdxl_size", "an inversion brings the size it was inverted under; leave sdxl_size "
                                          "unconnected when editing from an inversion (connect it to Invert Image)")
        if "inversion" in values and isinstance(negative_prompt, str) and negative_prompt.strip():
            raise InputError("negative_prompt", "an inversion brings its own unconditional embeddings; leave the "
                                                "negative prompt empty when editing from an inversion")

    @classmethod
    def execute(cls, model, clip, prompt, auxiliary_prompt, concept_words, integrate_fraction, balance, steps,
                guidance, seed, latent_image=None, inversion=None, negative_prompt="", sdxl_size=None) -> io.NodeOutput:
        import comfy.sample

        words = parse_words(concept_words or "", "concept_words")
        concepts = loaded_classes(clip)
        if not concepts:
            log.warning("customedit: DCI Sample: no concept is loaded on this CLIP (use Load Concept); "
                        "DCI then equals plain sampling")
        if (latent_image is None) == (inversion is None):
            raise InputError("latent_image", "connect either a latent (for the size, e.g. Empty Latent Image) or an "
                                             "inversion, not both")
        backend = ComfyBackend(model, clip)
        use_sdxl_size(backend, sdxl_size)
        noise = None
        if inversion is not None:
            check_inversion(inversion)
            guidance = inversion.guidance
            steps = inversion.steps
            hw, batch, size_input = inversion.source.shape[2:], inversion.source.shape[0], "inversion"
        else:
            samples = latent_samples(backend, latent_image, "latent_image")
            hw, batch, size_input = samples.shape[2:], samples.shape[0], "latent_image"
        check_work_size("dci", hw, steps, input_name=size_input, vae_scale=backend.vae_scale, batch=batch,
                        integrate_fraction=float(integrate_fraction))
        if inversion is None:
            samples = comfy.sample.fix_empty_latent_channels(model, samples)
            noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        with core_context():
            res = dci_sample(backend, prompt, concepts, noise=noise, inversion=inversion,
                             auxiliary_prompt=auxiliary_prompt or "", concept_words=words,
                             settings=DCISettings(float(integrate_fraction), float(balance)), steps=steps,
                             guidance=float(guidance), negative_prompt=negative_prompt or "")
            out = backend.from_model_latent(res.latents)
        hw = tuple(res.latents.shape[2:])
        mask = image_mask(res.weights, hw, backend.vae_scale)     # None (nothing integrated): all one
        if res.weights is None:
            mask = mask.expand(out.shape[0], -1, -1)
        log.info("customedit: DCI %d of %d steps integrated, auxiliary prompt %r", res.integrated_steps, steps,
                 res.auxiliary_prompt)
        latent = inversion_latent_out(out, inversion) if inversion is not None else latent_out(out, latent_image)
        return io.NodeOutput(latent, mask, ui=ui.PreviewMask(mask, cls=cls))


NODES = [DCISample]
