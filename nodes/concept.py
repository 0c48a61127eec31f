"""Schemas of the concept nodes: train (Custom Diffusion / ICO), save, load."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io, ui

from ._checked import CheckedNode
from ._shared import CLIP_TIP

from ..customedit_core import concept as concepts
from ..customedit_core import file_set
from ..customedit_core.backends.comfy import ComfyBackend, core_context
from ..customedit_core.backends.comfy_concept import apply_concept
from ..customedit_core.customize import PRECISIONS, TrainSettings, train_concept
from ..customedit_core.errors import InputError
from ..customedit_core.plot import loss_curve
from ..customedit_core.tokens import check_token_text, split_words
from ..customedit_core.work_size import check_work_size

ConceptType = io.Custom("CE_CONCEPT")
CATEGORY = "customedit/concept"
FOLDER = "concepts"
NONE = "(none)"
log = logging.getLogger("customedit")


def _register_folder():
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})
    else:           # already named by an extra_model_paths.yaml: keep its paths first, add ours and the extension
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        exts.add(".safetensors")


_register_folder()


def _target(folder: str, name: str, input_name: str) -> str:
    """models/<folder>/<name>.safetensors, refusing names that would leave the folder."""
    import folder_paths

    return file_set.target(folder_paths.get_folder_paths(folder)[0], name, input_name, f"models/{folder}/")


DEFAULT_TEMPLATE = "photo of a"
MAX_PROMPT_TOKENS = 75          # CLIP's 77 less the start and end tokens (SD1.x and SD2.x)


def _check_prompt_length(n_template: int, n_class: int, n_default: int, limit: int, qualifier: str = "") -> None:
    """The training prompt '<template> <token> <class word>' fits the text encoder; when it does not, the
    template is blamed unless the class word would not fit even with the default template."""
    n = n_template + 1 + n_class
    if n <= limit:
        return
    if n_default + 1 + n_class > limit:
        raise InputError("class_word", f"is {qualifier}{n_class} tokens long; with the template and token the training "
                                       f"prompt would have {qualifier}{n} of at most {limit} (use one or two words)")
    raise InputError("template", f"is {qualifier}{n_template} tokens long; with the token and class word the training "
                                 f"prompt would have {qualifier}{n} of at most {limit} (shorten the template)")


class TrainConcept(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditTrainConcept",
            display_name="Train Concept (Custom Diffusion)",
            category=CATEGORY,
            description="Teaches the model a new word for the thing in the reference images by training only the "
                        "cross-attention keys/values and the word's vector (Custom Diffusion), with prior "
                        "preservation on class images. The input MODEL and CLIP are not changed; load the result "
                        "with Load Concept or save it.",
            inputs=[
                io.Model.Input("model", tooltip="The base model to customize (SD1.x/2.x); it is not changed."),
                io.Clip.Input("clip", tooltip="Its text encoder, which learns the new word; it is not changed."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the reference (and class) images."),
                io.Image.Input("images", tooltip="3-5 reference images of the concept, one size (e.g. 512x512)."),
                io.String.Input("token", default="<new1>", tooltip="The new word, not in the vocabulary, e.g. <new1>."),
                io.String.Input("class_word", default="", tooltip="What it is: dog, teapot, dress..."),
                io.Int.Input("steps", default=250, min=1, max=100000,
                             tooltip="Training steps (the paper: 250 for one concept)."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-7, max=1.0, step=1e-6, round=1e-7,
                               tooltip="Scaled by batch size (x2 with prior preservation), as Custom Diffusion does."),
                io.Int.Input("batch_size", default=2, min=1, max=64,
                             tooltip="Reference views per step (as many class images besides with prior "
                                     "preservation); more: steadier, slower, more memory."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the class-image loss; 0 trains without prior preservation."),
                io.Int.Input("class_images_count", default=16, min=0, max=10000,
                             tooltip="Class images generated by the model when none are connected."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the augmented views, generated class images, noise and timesteps."),
                io.Boolean.Input("ico", default=False,
                                 tooltip="Image-specific context optimisation: learned per-image contexts "
                                         "instead of the fixed template."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp32",
                               tooltip="Autocast precision of the model during training (the trained values stay "
                                       "fp32); fp16 needs a CUDA device."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, ~30% slower."),
                io.String.Input("template", default=DEFAULT_TEMPLATE, optional=True,
                                tooltip="The training prompt's words before the token: '<template> <token> "
                                        "<class word>'; with ICO, the words that become learned contexts."),
                io.Mask.Input("mask", optional=True, tooltip="Optional object mask(s): the loss counts only inside."),
                io.Image.Input("class_images", optional=True, tooltip="Your own class images (prior preservation)."),
            ],
            outputs=[ConceptType.Output(display_name="concept",
                                        tooltip="The learned word and K/V deltas, for Load Concept or Save Concept."),
                     io.Image.Output(display_name="loss_plot", tooltip="The training loss per step, as a picture.")],
        )

    @classmethod
    def check_inputs(cls, token=None, class_word=None, template=None, ico=None, **_):
        if isinstance(class_word, str) or isinstance(token, str):
            TrainSettings(token=token if isinstance(token, str) else "<new1>",
                          class_word=class_word if isinstance(class_word, str) else "x",
                          template=template if isinstance(template, str) else DEFAULT_TEMPLATE,
                          ico=bool(ico)).check()
        if isinstance(token, str):
            check_token_text(token, "token")
        if isinstance(template, str):
            # every word is at least one token, so this many words cannot fit whatever the tokenizer
            _check_prompt_length(len(split_words(template)),
                                 len(split_words(class_word)) if isinstance(class_word, str) else 1,
                                 len(split_words(DEFAULT_TEMPLATE)), MAX_PROMPT_TOKENS, "at least ")

    @classmethod
    def execute(cls, model, clip, vae, images, token, class_word, steps, learning_rate, batch_size, prior_weight,
                class_images_count, seed, ico, precision, gradient_checkpointing, template=DEFAULT_TEMPLATE, mask=None,
                class_images=None) -> io.NodeOutput:
        if vae is None or not callable(getattr(vae, "encode", None)):
            raise InputError("vae", f"expected a VAE (e.g. Load Checkpoint's third output), got "
                                    f"{'nothing' if vae is None else type(vae).__name__}; this checkpoint may hold "
                                    "none: load one with Load VAE")
        settings = TrainSettings(token=token, class_word=class_word, steps=int(steps), learning_rate=float(learning_rate),
                                 batch_size=int(batch_size), prior_weight=float(prior_weight),
                                 num_class_images=int(class_images_count), seed=int(seed), ico=bool(ico),
                                 precision=precision, gradient_checkpointing=bool(gradient_checkpointing),
                                 template=template if template is not None else DEFAULT_TEMPLATE)
        backend = ComfyBackend(model, clip)
        settings.check()
        tok = backend.tokenizer
        _check_prompt_length(len(tok.text_ids(settings.template)) if settings.template.strip() else 0,
                             len(tok.text_ids(" ".join(settings.class_word.split()))),
                             len(tok.text_ids(DEFAULT_TEMPLATE)), tok.max_length - 2)
        if hasattr(images, "shape") and len(images.shape) == 4:
            prior = settings.prior_weight > 0 and (class_images is not None or settings.num_class_images > 0)
            check_work_size("train", (images.shape[1] // backend.vae_scale, images.shape[2] // backend.vae_scale),
                            settings.steps, input_name="images", vae_scale=backend.vae_scale,
                            batch=settings.batch_size, prior=prior,
                            class_images=settings.num_class_images if class_images is None else 0,
                            class_steps=settings.class_steps)

        def encode(pixels):
            return backend.to_model_latent(vae.encode(pixels[..., :3]))

        with core_context():
            result = train_concept(backend, images.float().clone(), encode, settings,
                                   masks=None if mask is None else mask.float().clone(),
                                   class_images=None if class_images is None else class_images.float().clone())
            plot = loss_curve(result.losses, title=f"{result.concept.tokens[0]} loss")
        return io.NodeOutput(result.concept, plot)


class SaveConcept(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustomEditSaveConcept",
            display_name="Save Concept",
            category=CATEGORY,
            description="Writes the concept to models/concepts/<name>.safetensors and, for stock ComfyUI, a LoRA "
                        "(models/loras/<name>.safetensors, for LoraLoader) and an embedding "
                        "(models/embeddings/<name>.safetensors: write embedding:<name> where the token was).",
            inputs=[
                ConceptType.Input("concept", tooltip="From Train Concept."),
                io.String.Input("name", default="my_concept",
                                tooltip="File name without extension; sub-folders allowed, never outside the folder."),
                io.Boolean.Input("export_lora", default=True,
                                 tooltip="Also write models/loras/<name>.safetensors (LoraLoader: strength_model 1, "
                                         "strength_clip 0)."),
                io.Boolean.Input("export_embedding", default=True,
                                 tooltip="Also write models/embeddings/<name>.safetensors (write embedding:<name> "
                                         "where the token was)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace existing files of that name; off: an existing file is an error."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The concept file written (all files written are "
                                                                   "shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def check_inputs(cls, name=None, export_lora=True, export_embedding=True, overwrite=False, **_):
        if not isinstance(name, str):
            return
        for folder in ["concepts"] + ["loras"] * bool(export_lora) + ["embeddings"] * bool(export_embedding):
            path = _target(folder, name, "name")
            if os.path.lexists(path) and not overwrite:
                raise InputError("name", f"{path} exists; choose another name or enable overwrite")

    @classmethod
    def execute(cls, concept, name, export_lora, export_embedding, overwrite) -> io.NodeOutput:
        if not isinstance(concept, concepts.Concept):
            raise InputError("concept", "expected a CE_CONCEPT from Train Concept")
        targets = [("concepts", concepts.save)]
        if export_lora:
            targets.append(("loras", concepts.export_lora))
        if export_embedding:
            targets.append(("embeddings", concepts.export_embedding))
        paths = [(_target(folder, name, "name"), fn) for folder, fn in targets]
        stem = os.path.splitext(os.path.basename(paths[0][0]))[0]
        named = concepts.Concept(**{**concept.__dict__, "name": stem})
        written = file_set.write_all([(path, lambda tmp, fn=fn: fn(named, tmp)) for path, fn in paths],
                                     bool(overwrite), "name")
        return io.NodeOutput(written[0], ui=ui.PreviewText("\n".join(written)))


class LoadConcept(CheckedNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        files = folder_paths.get_filename_list(FOLDER)
        return io.Schema(
            node_id="CustomEditLoadConcept",
            display_name="Load Concept",
            category=CATEGORY,
            description="Returns clones of MODEL and CLIP that know the concept's word (write it in any prompt, "
                        "e.g. 'a <new1> dog') and carry its key/value deltas times strength. Chain several. "
                        "A connected concept input is used instead of the file.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the concept was trained on (or one of its shapes)."),
                io.Clip.Input("clip", tooltip=CLIP_TIP),
                io.Combo.Input("concept_name", options=list(files) + [NONE],
                               tooltip="A concept file of models/concepts/ (not used when a concept is connected)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scales the key/value deltas (the word's vector is used as it is)."),
                ConceptType.Input("concept", optional=True,
                                  tooltip="A concept from Train Concept, used instead of the file."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A clone of the model with the K/V deltas."),
                     io.Clip.Output(display_name="clip", tooltip="A clone of the CLIP that knows the concept's word.")],
        )

    @classmethod
    def check_inputs(cls, concept_name=None, **values):
        if "concept" not in values and concept_name == NONE:       # nothing connected, no file chosen
            raise InputError("concept_name", "no concept chosen; pick a file from models/concepts/ or connect one")

    @classmethod
    def execute(cls, model, clip, concept_name, strength, concept=None) -> io.NodeOutput:
        import folder_paths

        if concept is None:
            if not concept_name or concept_name == NONE:
                raise InputError("concept_name", "no concept chosen; pick a file from models/concepts/ or connect one")
            path = folder_paths.get_full_path(FOLDER, concept_name)
            if path is None:
                raise InputError("concept_name", f"{concept_name!r} is not in models/concepts/")
            concept = concepts.load(path, "concept_name")
        elif not isinstance(concept, concepts.Concept):
            raise InputError("concept", "expected a CE_CONCEPT from Train Concept")
        with core_context():
            m, c, warnings = apply_concept(model, clip, concept, float(strength))
        for w in warnings:
            log.warning("customedit: %s", w)
        return io.NodeOutput(m, c)


NODES = [TrainConcept, SaveConcept, LoadConcept]
