"""Command line, fully offline:
`python -m customedit_core edit|maps|diffedit|specref|train-concept|dci|import-concept|info ...`

    python -m customedit_core edit --model sd15.safetensors --image cat.png \\
        --source "a photo of a cat" --target "a photo of a striped cat" --blend-words cat --out out.png

Each image command writes one PNG, a row of panels (edit: source | reconstruction | edit (| mask)),
composed by panels.py: every panel scaled up by a whole factor to at least 256 px, its name in a
white strip above it. The model works at its own size; only the picture is scaled. Without --model
the shipped toy-world model is used (trained on procedural scenes, 64 px); without --image the
model folder's demo scene is used when it ships one (demo.png + demo.json, as the toy-world model
does), else a drawn scene of a red circle on grass. Every command checks its inputs and output
paths before loading the model, and logs one line of what it used.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from .errors import InputError
from .word_lists import parse_reweight
from .inversion import METHODS

SCENE_PROMPT = "a red circle on green grass"
SCENE_TARGET = "a yellow circle on green grass"
DEMO_FILES = ("demo.json", "demo.png")     # a model folder's own demo: {"source", "target"} and its image
NATIVE = ("the model's native size: 64 px for the toy-world model, the UNet's sample size times the VAE "
          "factor for a diffusers folder, 512 px for a single .safetensors file")
NO_IMAGE = "the model folder's demo.png when it ships one with demo.json, else a drawn red circle on grass"


# --- the demo scene --------------------------------------------------------------------------
def _demo_files(pipe):
    """(demo.json, demo.png) paths when the loaded model folder ships both, else None."""
    paths = tuple(os.path.join(pipe.source, f) for f in DEMO_FILES)
    return paths if os.path.isdir(pipe.source) and all(map(os.path.isfile, paths)) else None


def _scene_prompts(pipe):
    """(source, target) of the demo scene for this model."""
    files = _demo_files(pipe)
    if files:
        with open(files[0], encoding="utf-8") as f:
            demo = json.load(f)
        return demo["source"], demo["target"]
    return SCENE_PROMPT, SCENE_TARGET


def _scene_image(pipe, side):
    """The demo scene, longer side `side` px: the model folder's demo.png (resized if needed), else drawn."""
    from . import api

    files = _demo_files(pipe)
    if files:
        return pipe.prepare_image(api.open_image(files[1], "model"), side, "demo.png")
    return api.demo_scene(side)


# --- argument types ---------------------------------------------------------------------------
def _window(text: str):
    parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.8 or a start,end pair like 0.1,0.8; got {text!r}")
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return tuple(vals)
    raise argparse.ArgumentTypeError(f"expected one or two fractions, got {text!r}")


def _reweight(items) -> dict:
    """--reweight values (repeatable, each comma-separated) -> {word: weight}, by the nodes' rules."""
    return parse_reweight(",".join(items or ()), "reweight")


# --- the parser -------------------------------------------------------------------------------
class _Help(argparse.HelpFormatter):
    """States each option's real default once: appended from the parser unless the help already
    describes it (a default of None, False or '' means 'decided at run time' and is described in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if not action.option_strings or "default" in text or d is None or d is False or d == argparse.SUPPRESS:
            return text
        return f"{text} (default: {'empty' if d == '' else '%(default)s'})"


def _model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", help="diffusers-format folder or .safetensors checkpoint (SD1.x, SD2.x or SDXL "
                                   "base) (default: the shipped toy-world model)")
    g.add_argument("--tokenizer", help="CLIP tokenizer folder (default: a diffusers folder's own tokenizer/; for a "
                                       "single file a 'tokenizer' folder next to it, else CLIP's vocabulary built in)")
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (default: a folder's scheduler config, else epsilon; inferred "
                        "from a single file's weights)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="UNet/text encoder precision (default: fp16 on cuda, fp32 on cpu; the VAE runs in fp32)")
    g.add_argument("--concept", action="append", metavar="FILE",
                   help="load a concept (.safetensors from train-concept or ComfyUI's Save Concept) so its word "
                        "works in the prompts; repeatable")


def _image_args(g, image_help=f"input image (default: {NO_IMAGE})", source_help=None,
                size_help="longer side of the image in px, sides rounded to the model's pixel multiple "
                          f"(default: {NATIVE})"):
    g.add_argument("--image", help=image_help)
    g.add_argument("--size", type=int, help=size_help)
    g.add_argument("--allow-large", action="store_true",
                   help="run images over 2048 px too (refused without it: hours on a CPU)")
    g.add_argument("--source", help=source_help or "prompt describing the input image; needed with --image "
                                                   "(default without it: the demo's source prompt from demo.json, "
                                                   f"else {SCENE_PROMPT!r})")


def _target_help(what):
    return (f"{what}; needed with --image (default without it: the demo's target prompt from demo.json, "
            f"else {SCENE_TARGET!r})")


def _sampling_args(g):
    g.add_argument("--steps", type=int, default=50, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance")


def _inversion_args(g, method="null_text"):
    g.add_argument("--method", default=method, choices=METHODS,
                   help="inversion method: null_text optimises per-step unconditional embeddings (most faithful, "
                        "slowest); negative_prompt and direct need no optimisation; ddim is plain DDIM inversion")
    g.add_argument("--inner-steps", type=int, default=10, help="null-text optimisation steps per timestep, "
                                                               "null_text only")


def _picture_args(p, panels):
    p.add_argument("--no-labels", action="store_true", help="leave out the white strip with the panel names")
    p.add_argument("--out", required=True, help=f"output PNG: {panels}, each panel scaled up (nearest "
                                                "neighbour, a whole factor) to at least 256 px")


def _edit_args(p, title="Prompt-to-Prompt edit"):
    g = p.add_argument_group(title)
    g.add_argument("--mode", default="refine", choices=["refine", "replace"],
                   help="refine: words added/changed (global token alignment); replace: word swap with the "
                        "same number of words")
    g.add_argument("--cross-replace", type=_window, default=0.8, metavar="F|START,END",
                   help="fraction of steps with injected cross-attention")
    g.add_argument("--self-replace", type=_window, default=0.5, metavar="F|START,END",
                   help="fraction of steps with injected self-attention")
    g.add_argument("--self-max-side", type=float, metavar="F",
                   help="inject self-attention in layers up to this fraction of the latent side, 1: all "
                        "(default: the model folder's customedit.json, else 0.5, the reference's)")
    g.add_argument("--edit-uncond", choices=["inversion", "empty"],
                   help="the edit rows' unconditional embedding: the inversion's (the reference) or the empty "
                        "prompt's (default: the model folder's customedit.json, else inversion)")
    g.add_argument("--blend-words", nargs="+", metavar="WORD",
                   help="local blend: source word(s) whose attention masks the edit region; alone they give "
                        "Custom-Edit's source-only mask")
    g.add_argument("--blend-target-words", nargs="+", metavar="WORD",
                   help="target word(s) whose mask is united with the source words' mask")
    g.add_argument("--blend-both", action="store_true",
                   help="unite the source mask with the same words' mask in the target (P2P's recipe; "
                        "--blend-target-words, when given, names the target's words instead)")
    g.add_argument("--blend-threshold", type=float, default=0.3, help="mask threshold")
    g.add_argument("--blend-start", type=float, default=0.2, help="fraction of steps after which blending starts")
    g.add_argument("--reweight", action="append", metavar="WORD:W",
                   help="scale the edit's attention to a target word, e.g. striped:2, weights in [-100, 100] "
                        "(repeatable, or comma-separated)")
    return g


def _inverting_parser(sub, name: str, help: str, **inversion):
    """A subcommand that inverts one image: model, image, inversion and sampling options."""
    p = sub.add_parser(name, help=help, formatter_class=_Help)
    _model_args(p)
    g = p.add_argument_group("image and inversion")
    _image_args(g)
    _inversion_args(g, **inversion)
    _sampling_args(g)
    return p


def _edit_parser(sub):
    p = _inverting_parser(sub, "edit", "invert an image and edit it; writes source | reconstruction | edit(s)")
    _edit_args(p).add_argument("--target", action="append", metavar="PROMPT",
                               help=_target_help("edited prompt, repeat for several edits in one batch"))
    p.add_argument("--show-mask", action="store_true", help="append the local-blend mask(s) as panels")
    _picture_args(p, "source | reconstruction | edit(s) (| mask(s))")


def _maps_parser(sub):
    p = _inverting_parser(sub, "maps", "per-word cross-attention maps of the source (or of an edit) as a PNG grid")
    _edit_args(p, "Prompt-to-Prompt edit (with --target)").add_argument(
        "--target", action="append", metavar="PROMPT",
        help="draw the maps of this edited prompt's words (give it once; default: the source prompt's words, no edit)")
    p.add_argument("--columns", type=int, default=0, help="grid columns; 0 puts up to 8 panels in a row")
    _picture_args(p, "the image, then one map per word")


def _diffedit_parser(sub):
    p = sub.add_parser("diffedit", help="DiffEdit: find the region a target prompt changes, edit only there; "
                                        "writes source | mask | edit", formatter_class=_Help)
    _model_args(p)
    g = p.add_argument_group("image and prompts")
    _image_args(g, source_help="query prompt, what is in the image; needed with --image (default without it: "
                               f"the demo's source prompt from demo.json, else {SCENE_PROMPT!r})")
    g.add_argument("--target", help=_target_help("target prompt"))
    g = p.add_argument_group("mask")
    g.add_argument("--mask", help="a mask image (white = edit) instead of finding one")
    g.add_argument("--samples", type=int, default=10, help="noise samples for the mask")
    g.add_argument("--strength", type=float, default=0.5, help="noise strength of the samples")
    g.add_argument("--threshold", type=float, default=0.5, help="mask threshold, 0.5 keeps cells above 1.5x the mean")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise samples")
    g = p.add_argument_group("sampling")
    g.add_argument("--encoding-ratio", type=float, default=0.8, help="fraction of the steps encoded and decoded")
    _sampling_args(g)
    _picture_args(p, "source | mask | edit")


def _specref_parser(sub):
    p = _inverting_parser(sub, "specref", "SpecRef: edit a region after a reference image; writes source | "
                                          "reference | edit | M_t", method="direct")
    g = p.add_argument_group("reference and edit")
    g.add_argument("--reference", help="reference image, resized to the source's size (default: the source image "
                                       "mirrored left to right)")
    g.add_argument("--reference-prompt", default="", help="prompt of the reference")
    g.add_argument("--reference-mask", help="mask image of the reference object M_s (white = object; default: "
                                            "the whole reference)")
    g.add_argument("--target", help=_target_help("edited prompt"))
    g.add_argument("--edited-words", nargs="+", metavar="WORD",
                   help="target word(s) whose region takes the reference; needed with --image unless --mask "
                        "is given (default without both: circle)")
    g.add_argument("--source-words", nargs="+", metavar="WORD", help="source word(s) whose region joins the blend")
    g.add_argument("--mask", help="a mask image (white = edit) as M_t instead of the words' attention")
    g.add_argument("--threshold", type=float, default=0.3, help="M_t threshold: 0.3 for added words, 0.5 for a "
                                                                "swapped word")
    g.add_argument("--level-start", type=int, default=0, help="first decoder level (0 = finest resolution)")
    g.add_argument("--level-end", type=int, default=1, help="last decoder level (inclusive)")
    g.add_argument("--step-start", type=float, default=0.08, help="fraction of steps where the reference starts")
    g.add_argument("--step-end", type=float, default=1.0, help="fraction of steps where the reference ends")
    g.add_argument("--blend-start", type=float, default=0.2, help="fraction of steps after which the outside "
                                                                  "is kept")
    g.add_argument("--p2p-mode", choices=("auto", "replace", "refine"), default="auto",
                   help="the Prompt-to-Prompt control of the edit, as the reference code (auto: replace when both "
                        "prompts have as many words, else refine)")
    g.add_argument("--cross-replace", type=float, default=0.8, help="fraction of steps with the source's "
                                                                    "cross-attention")
    g.add_argument("--self-replace", type=float, default=0.6, help="fraction of steps with the source's "
                                                                   "self-attention (outside the reference layers)")
    _picture_args(p, "source | reference | edit | M_t")


def _train_parser(sub):
    p = sub.add_parser("train-concept", help="teach the model a new word from 3-5 reference images (Custom "
                                             "Diffusion); writes a concept file", formatter_class=_Help)
    _model_args(p)
    g = p.add_argument_group("concept")
    g.add_argument("--images", nargs="+", required=True, help="reference images of one thing, of one size")
    g.add_argument("--masks", nargs="+", help="object masks, one per image (white = object)")
    g.add_argument("--class-word", required=True, help="what it is: dog, teapot, dress...")
    g.add_argument("--token", default="<new1>", help="the new word")
    g.add_argument("--class-images", nargs="+", help="your class images for the prior loss (default: "
                                                     "--num-class-images generated by the model)")
    g.add_argument("--size", type=int, help=f"longer side of the images in px (default: {NATIVE})")
    g.add_argument("--steps", type=int, default=250, help="training steps")
    g.add_argument("--lr", type=float, default=1e-5, help="learning rate, multiplied by the batch size (and by "
                                                          "2 with the prior loss) as the reference does")
    g.add_argument("--batch-size", type=int, default=2, help="reference views per step")
    g.add_argument("--prior-weight", type=float, default=1.0, help="weight of the class images' prior loss")
    g.add_argument("--num-class-images", type=int, default=16, help="class images generated when --class-images "
                                                                    "is not given (0: no prior loss)")
    g.add_argument("--seed", type=int, default=0, help="seed of the augmentations and the class images")
    g.add_argument("--ico", action="store_true", help="image-specific context optimisation")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="training precision")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--export", action="store_true", help="also write <out>.lora.safetensors (LoraLoader) and "
                                                         "<out>.embedding.safetensors (embedding:) for ComfyUI")
    g.add_argument("--loss-plot", help="write the loss curve to this PNG")
    p.add_argument("--out", required=True, help="concept file (.safetensors)")


def _dci_parser(sub):
    p = sub.add_parser("dci", help="DCI: sample a loaded concept with its context kept (Divide, Conquer, then "
                                   "Integrate); writes plain | DCI | concept weight", formatter_class=_Help)
    _model_args(p)
    g = p.add_argument_group("DCI")
    g.add_argument("--prompt", required=True, help="prompt with the concept word, e.g. 'a photo of a <new1> dog on "
                                                   "the beach'")
    g.add_argument("--auxiliary-prompt", default="", help="the plain prompt of the auxiliary branch (default: the "
                                                          "concept word dropped before, or replaced by, its class word)")
    g.add_argument("--concept-words", nargs="+", metavar="WORD", help="which concept words (default: every loaded "
                                                                      "one in the prompt)")
    g.add_argument("--fraction", type=float, default=0.3, help="share of the steps with both branches")
    g.add_argument("--balance", type=float, default=0.0, help="lambda: > 0 favours the concept, < 0 the context")
    g.add_argument("--negative", default="", help="negative prompt (not with --image)")
    g.add_argument("--seed", type=int, default=0, help="seed of the starting noise (without --image)")
    _sampling_args(g)
    g = p.add_argument_group("start from an image instead of noise")
    _image_args(g, image_help="edit this image from its inversion instead of sampling from noise",
                source_help="prompt describing --image; needed with it",
                size_help=f"side of the sampled square in px, with --image the image's longer side (default: {NATIVE})")
    _inversion_args(g)
    _picture_args(p, "(source |) plain | DCI (| concept weight)")


def _import_parser(sub):
    p = sub.add_parser("import-concept", help="convert diffusers' Custom Diffusion output (safetensors) into a "
                                              "concept file; needs the base model", formatter_class=_Help)
    _model_args(p)
    p.add_argument("--weights", required=True, help="pytorch_custom_diffusion_weights.safetensors")
    p.add_argument("--embedding", action="append", required=True, metavar="TOKEN=FILE",
                   help="<token>.safetensors of each modifier token, e.g. '<new1>=out/<new1>.safetensors'")
    p.add_argument("--class-word", action="append", required=True, metavar="TOKEN=WORD",
                   help="class word of each token, e.g. '<new1>=dog'")
    p.add_argument("--out", required=True, help="concept file (.safetensors)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m customedit_core", formatter_class=_Help,
                                 description="Text-driven image editing (inversion + Prompt-to-Prompt), offline.")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_edit_parser, _maps_parser, _diffedit_parser, _specref_parser, _train_parser, _dci_parser,
                _import_parser):
        add(sub)
    _model_args(sub.add_parser("info", help="load a model and print what was detected", formatter_class=_Help))
    return ap


# --- checks before any work -------------------------------------------------------------------
def _check_out(path, input_name="out", suffix=".png"):
    """An output path that can be written: the right suffix, not a folder, its folder made if missing."""
    if not path.lower().endswith(suffix):
        raise InputError(input_name, f"expected a {suffix} file name, got {path!r}")
    if os.path.isdir(path):
        raise InputError(input_name, f"{path!r} is a folder; expected a {suffix} file name")
    d = os.path.dirname(os.path.abspath(path))
    up = d
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise InputError(input_name, f"cannot write {path!r}: {up!r} is a file, not a folder")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise InputError(input_name, f"cannot create the folder {d!r}: {e.strerror}") from None
    if not os.access(d, os.W_OK):
        raise InputError(input_name, f"cannot write into the folder {d!r}")


def _outputs(a):
    """(path, input name, suffix) of every file the command writes."""
    if a.command == "info":
        return []
    if a.command not in ("train-concept", "import-concept"):
        return [(a.out, "out", ".png")]
    out = [(a.out, "out", ".safetensors")]
    if a.command == "train-concept":
        stem = a.out[: -len(".safetensors")] if a.out.lower().endswith(".safetensors") else a.out
        if a.export:
            out += [(stem + ".lora.safetensors", "out", ".safetensors"),
                    (stem + ".embedding.safetensors", "out", ".safetensors")]
        if a.loss_plot:
            out.append((a.loss_plot, "loss_plot", ".png"))
    return out


def _inputs(a):
    """(path, input name) of every file the command reads, besides the model."""
    files = [(p, "concept") for p in getattr(a, "concept", None) or ()]
    for name in ("image", "mask", "reference", "reference_mask", "weights"):
        if getattr(a, name, None):
            files.append((getattr(a, name), name))
    for name in ("images", "masks", "class_images"):
        files += [(p, name) for p in getattr(a, name, None) or ()]
    return files


def _check_args(a):
    """What can be judged from the command line alone, so a mistake costs no model load or inversion."""
    for name in ("size", "steps"):
        v = getattr(a, name, None)
        if v is not None and v <= 0:
            raise InputError(name, f"expected a positive number, got {v}")
    for path, name, suffix in _outputs(a):
        _check_out(path, name, suffix)
    for path, name in _inputs(a):
        if not os.path.isfile(path):
            raise InputError(name, f"{path!r} does not exist")
    if a.command in ("edit", "maps", "diffedit", "specref", "dci") and a.image and not a.source:
        raise InputError("source", "describe --image with --source (the inversion needs its prompt)")
    if a.command in ("edit", "diffedit", "specref") and a.image and not a.target:
        raise InputError("target", "give the target prompt with --target")
    for name in ("cross_replace", "self_replace"):
        v = getattr(a, name, None) if a.command == "specref" else None
        if v is not None and not 0.0 <= v <= 1.0:          # NaN fails too
            raise InputError(name, f"expected a fraction of the steps in [0, 1], got {v}")
    if a.command == "maps" and a.target and len(a.target) > 1:
        raise InputError("target", "maps are drawn for one target prompt; give --target once")
    if a.command == "dci" and a.image and a.negative:
        raise InputError("negative", "an inversion brings its own unconditional embeddings; leave --negative "
                                     "out with --image")


# --- model and inputs -------------------------------------------------------------------------
@contextlib.contextmanager
def _loaded(a, log):
    """The pipeline with --concept files loaded, closed however the command ends."""
    import torch

    from . import api
    from . import concept as concepts

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[a.dtype]
    t = time.time()
    pipe = api.load(a.model, device=a.device, dtype=dtype, tokenizer=a.tokenizer,
                    prediction_type=a.prediction_type, log=log)
    try:
        log(f"loaded {pipe.source} ({pipe.family}, {pipe.prediction_type}, {pipe.device}) in {time.time() - t:.1f} s")
        for path in a.concept or ():
            c = concepts.load(path, "concept")
            pipe.load_concept(c)
            log(f"loaded {c.describe()}")
        yield pipe
    finally:
        pipe.close()


def _image_and_source(a, pipe, log):
    """(image at the asked or native size, source prompt); without --image the demo scene and its prompt."""
    from . import api

    size = a.size or pipe.default_size
    if a.image:
        image = pipe.prepare_image(api.open_image(a.image), size, "image")
        _check_work(a, pipe, image)
        return image, a.source
    m = pipe.pixel_multiple
    side = max(m, round(size / m) * m)
    if side != size:
        log(f"note: the drawn scene is {side} px (a multiple of {m} px, as this model needs)")
    scene = _scene_prompts(pipe)[0]
    source = a.source or scene
    log(f"no --image: using the drawn scene ({scene}), source prompt {source!r}")
    return _scene_image(pipe, side), source


def _check_work(a, pipe, image):
    """Refuse a very large image before any model call, warn about a long run (see work_size)."""
    from .work_size import check_work_size

    f = pipe.backend.vae_scale
    method = f"invert_{a.method}" if getattr(a, "method", None) else "diffedit_mask"
    check_work_size(method, (image.size[1] // f, image.size[0] // f), a.steps, input_name="image", vae_scale=f,
                    allow=True if a.allow_large else None, allow_hint="pass --allow-large")


def _scene_target(pipe, log):
    """The demo scene's target prompt (--target is required with --image, see _check_args)."""
    target = _scene_prompts(pipe)[1]
    log(f"no --target: editing the drawn scene to {target!r}")
    return target


def _used(log, command, pipe, size, **items):
    """One line of what the command runs with, every default resolved; size: (w, h) px or a phrase."""
    parts = [f"model {pipe.source} ({pipe.family})", f"{size[0]}x{size[1]} px" if isinstance(size, tuple) else size]
    parts += [f"{k.replace('_', ' ')} {v!r}" if isinstance(v, str) else f"{k.replace('_', ' ')} {v}"
              for k, v in items.items() if v is not None]
    log(f"{command}: " + ", ".join(parts))


def _precheck(pipe, source, targets, settings, steps):
    """Check prompts and word choices before a possibly long inversion."""
    from .edit import build_controllers
    from .tokens import tokenize

    tok = pipe.backend.tokenizer
    src = tokenize(tok, source, "source_prompt")
    tgts = [tokenize(tok, t, "target_prompt") for t in targets]
    build_controllers(settings, src, tgts, steps)


def _invert(a, pipe, image, source, log):
    t = time.time()
    inv = pipe.invert(image, source, steps=a.steps, guidance=a.guidance, method=a.method,
                      inner_steps=a.inner_steps)
    log(f"inverted with {a.method} ({a.steps} steps) in {time.time() - t:.1f} s")
    return inv


def _settings(a, model_defaults=None):
    """The edit's P2PSettings: the command line's values over the model's own defaults."""
    from .edit import P2PSettings

    target_words = tuple(a.blend_target_words or ())
    if a.blend_both:
        if not a.blend_words:
            raise InputError("blend_both", "needs --blend-words")
        target_words = target_words or tuple(a.blend_words)
    if target_words and not a.blend_words:
        raise InputError("blend_target_words", "local blend needs at least one source word (--blend-words)")
    given = {k: getattr(a, k) for k in ("self_max_side", "edit_uncond") if getattr(a, k, None) is not None}
    return P2PSettings(**{**(model_defaults or {}), **given, **dict(
        mode=a.mode, cross_replace=a.cross_replace, self_replace=a.self_replace, reweight=_reweight(a.reweight),
        blend_source_words=tuple(a.blend_words or ()), blend_target_words=target_words,
        blend_threshold=a.blend_threshold, blend_start=a.blend_start)})


def _save(img, path):
    """Atomic: a finished PNG or nothing (write beside it, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        img.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write(a, log, images, labels, columns=0):
    from . import panels

    out = panels.grid(images, None if a.no_labels else labels, columns)
    _save(out, a.out)
    log(f"wrote {a.out} ({out.size[0]}x{out.size[1]}: {' | '.join(labels)}, panels of "
        f"{images[0].size[0]}x{images[0].size[1]} px shown x{panels.scale_factor(images[0].size)})")


# --- the commands -----------------------------------------------------------------------------
def cmd_edit(a, log):
    import torch

    from .panels import mask_panel

    _settings(a)                       # its errors before the model loads
    with _loaded(a, log) as pipe:
        settings = _settings(a, pipe.edit_defaults)
        image, source = _image_and_source(a, pipe, log)
        targets = a.target or [_scene_target(pipe, log)]
        _used(log, "edit", pipe, image.size, method=a.method, steps=a.steps, guidance=a.guidance, source=source,
              **({"target": targets[0]} if len(targets) == 1 else {"targets": targets}), mode=settings.mode)
        _precheck(pipe, source, targets, settings, a.steps)
        inv = _invert(a, pipe, image, source, log)
        t = time.time()
        res = pipe.edit(inv, targets, settings)
        log(f"edited in {time.time() - t:.1f} s")
        images = [image] + pipe.decode(torch.cat([res.source, res.edited]))
        one = len(targets) == 1
        labels = ["source", "reconstruction"] + ["edit" if one else f"edit {k + 1}" for k in range(len(targets))]
        if a.show_mask and res.mask is None:
            log("note: no mask to show (local blend is off; give --blend-words)")
        elif a.show_mask:
            images += [mask_panel(m, image.size) for m in res.mask]
            labels += ["mask" if one else f"mask {k + 1}" for k in range(len(res.mask))]
        _write(a, log, images, labels)


def cmd_maps(a, log):
    from PIL import Image

    from .tokens import tokenize

    settings = _settings(a) if a.target else None
    with _loaded(a, log) as pipe:
        image, source = _image_and_source(a, pipe, log)
        target = a.target[0] if a.target else None
        _used(log, "maps", pipe, image.size, method=a.method, steps=a.steps, guidance=a.guidance, source=source,
              target=target)
        if target:
            _precheck(pipe, source, [target], settings, a.steps)
        inv = _invert(a, pipe, image, source, log)
        maps = pipe.attention_maps(inv, target, settings, label=False)
        words = (tokenize(pipe.backend.tokenizer, target, "target_prompt") if target else inv.tokens).words
        tiles = [Image.fromarray((m.numpy() * 255).round().astype("uint8")).resize(image.size) for m in maps]
        _write(a, log, [image] + tiles, ["image"] + list(words), a.columns if a.columns > 0 else 8)


def cmd_diffedit(a, log):
    from . import api
    from .panels import mask_panel

    with _loaded(a, log) as pipe:
        image, source = _image_and_source(a, pipe, log)
        target = a.target or _scene_target(pipe, log)
        _used(log, "diffedit", pipe, image.size, steps=a.steps, guidance=a.guidance,
              encoding_ratio=a.encoding_ratio, source=source, target=target,
              mask=a.mask or f"from {a.samples} noise samples")
        z = pipe.latent(image)
        t = time.time()
        if a.mask:
            mask = pipe.mask(api.open_image(a.mask, "mask").convert("L"), z)
        else:
            mask = pipe.diffedit_mask(z, source, target, samples=a.samples, strength=a.strength,
                                      threshold=a.threshold, seed=a.seed).mask
            log(f"mask from {a.samples} noise samples in {time.time() - t:.1f} s: "
                f"{100 * mask.mean():.0f}% of the image")
        t = time.time()
        res = pipe.diffedit(z, mask, target, encoding_ratio=a.encoding_ratio, steps=a.steps, guidance=a.guidance)
        log(f"edited in {time.time() - t:.1f} s")
        _write(a, log, [image, mask_panel(mask, image.size), pipe.decode(res.edited)[0]], ["source", "mask", "edit"])


def _specref_inputs(a, image, log):
    """(reference, its mask or None), both at the source image's size."""
    from PIL import Image

    from . import api

    reference = api.open_image(a.reference, "reference") if a.reference else image.transpose(Image.FLIP_LEFT_RIGHT)
    ref_mask = api.open_image(a.reference_mask, "reference_mask").convert("L") if a.reference_mask else None
    if reference.size != image.size:
        log(f"note: reference resized from {reference.size[0]}x{reference.size[1]} to "
            f"{image.size[0]}x{image.size[1]}")
        reference = reference.resize(image.size, Image.LANCZOS)
    if ref_mask is not None and ref_mask.size != image.size:
        ref_mask = ref_mask.resize(image.size)
    return reference, ref_mask


def cmd_specref(a, log):
    from . import api
    from .panels import mask_panel
    from .tokens import tokenize

    if a.image and not (a.edited_words or a.mask):
        raise InputError("edited_words", "name the target word(s) whose region takes the reference (or give --mask)")
    with _loaded(a, log) as pipe:
        image, source = _image_and_source(a, pipe, log)
        target = a.target or _scene_target(pipe, log)
        words = tuple(a.edited_words or (() if a.image or a.mask else ("circle",)))
        reference, ref_mask = _specref_inputs(a, image, log)
        _used(log, "specref", pipe, image.size, method=a.method, steps=a.steps, guidance=a.guidance, source=source,
              target=target, edited_words=" ".join(words) or None, reference=a.reference or "the source mirrored")
        tgt = tokenize(pipe.backend.tokenizer, target, "target_prompt")      # before a possibly long inversion
        for w in words:
            tgt.positions(w, "edited_words")
        for w in a.source_words or ():
            tokenize(pipe.backend.tokenizer, source, "source_prompt").positions(w, "source_words")
        inv = _invert(a, pipe, image, source, log)
        t = time.time()
        bank = pipe.extract_reference(reference, a.reference_prompt, steps=a.steps, mask=ref_mask,
                                      level_start=a.level_start, level_end=a.level_end, step_start=a.step_start,
                                      step_end=a.step_end)
        log(f"{bank.describe()} in {time.time() - t:.1f} s")
        t = time.time()
        mask = pipe.mask(api.open_image(a.mask, "mask").convert("L"), inv.source) if a.mask else None
        res = pipe.specref(inv, bank, target, words, mask=mask, source_words=tuple(a.source_words or ()),
                           threshold=a.threshold, level_start=a.level_start, level_end=a.level_end,
                           step_start=a.step_start, step_end=a.step_end, blend_start=a.blend_start,
                           mode=a.p2p_mode, cross_replace=a.cross_replace, self_replace=a.self_replace)
        log(f"edited in {time.time() - t:.1f} s")
        _write(a, log, [image, reference, pipe.decode(res.edited)[0], mask_panel(res.mask, image.size)],
               ["source", "reference", "edit", "M_t"])


def cmd_dci(a, log):
    from . import api
    from .dci import DCISettings
    from .panels import mask_panel

    dci = DCISettings(a.fraction, a.balance)
    dci.check()
    with _loaded(a, log) as pipe:
        kw = dict(auxiliary_prompt=a.auxiliary_prompt, concept_words=tuple(a.concept_words or ()), steps=a.steps,
                  guidance=a.guidance)
        if a.image:
            image = pipe.prepare_image(api.open_image(a.image), a.size or pipe.default_size)
            _used(log, "dci", pipe, image.size, method=a.method, steps=a.steps, guidance=a.guidance,
                  source=a.source, prompt=a.prompt, fraction=a.fraction, balance=a.balance)
            start = dict(inversion=_invert(a, pipe, image, a.source, log))
            images, labels = [image], ["source"]
        else:
            size = a.size or pipe.default_size
            _used(log, "dci", pipe, (size, size), steps=a.steps, guidance=a.guidance, seed=a.seed, prompt=a.prompt,
                  negative=a.negative or None, fraction=a.fraction, balance=a.balance)
            start = dict(seed=a.seed, size=size, negative_prompt=a.negative)
            images, labels = [], []
        if not pipe.concepts:
            # DCI without a concept is plain sampling: one run (pipe.dci states it once)
            plain = pipe.dci(a.prompt, settings=DCISettings(0.0), **start, **kw)
            _write(a, log, images + [pipe.decode(plain.latents)[0]], labels + ["plain"])
            return
        t = time.time()
        plain = pipe.dci(a.prompt, settings=DCISettings(0.0), **start, **kw)
        log(f"plain sampling in {time.time() - t:.1f} s")
        t = time.time()
        res = pipe.dci(a.prompt, settings=dci, **start, **kw)
        log(f"DCI ({res.integrated_steps} of {a.steps} steps integrated, auxiliary prompt "
            f"{res.auxiliary_prompt!r}) in {time.time() - t:.1f} s")
        out_plain, out_dci = pipe.decode(plain.latents)[0], pipe.decode(res.latents)[0]
        images += [out_plain, out_dci]
        labels += ["plain", "DCI"]
        if res.weights is not None:
            images.append(mask_panel(res.weights, out_dci.size))
            labels.append("concept weight")
        _write(a, log, images, labels)


def cmd_train_concept(a, log):
    from . import api
    from . import concept as concepts
    from .plot import loss_curve

    with _loaded(a, log) as pipe:
        size = a.size or pipe.default_size
        refs = [api.open_image(p, "images") for p in a.images]
        masks = [api.open_image(p, "masks") for p in a.masks] if a.masks else None
        cls = [api.open_image(p, "class_images") for p in a.class_images] if a.class_images else None
        _used(log, "train-concept", pipe, f"longer side {size} px", steps=a.steps,
              token=a.token, class_word=a.class_word, images=len(refs), precision=a.precision)
        last = [time.time()]

        def progress(step, loss):                # a line every 10 s, and the last step
            if time.time() - last[0] > 10 or step + 1 == a.steps:
                last[0] = time.time()
                log(f"step {step + 1}/{a.steps} loss {loss:.4f}")

        res = pipe.train_concept(refs, a.class_word, token=a.token, masks=masks, class_images=cls, size=size,
                                 on_step=progress, steps=a.steps, learning_rate=a.lr, batch_size=a.batch_size,
                                 prior_weight=a.prior_weight, num_class_images=a.num_class_images, seed=a.seed,
                                 ico=a.ico, precision=a.precision, gradient_checkpointing=a.gradient_checkpointing,
                                 name=os.path.splitext(os.path.basename(a.out))[0])
    concepts.save(res.concept, a.out)
    loss = f"; loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}" if res.losses else ""
    log(f"trained {res.concept.describe()} in {res.seconds:.1f} s{loss}; wrote {a.out}")
    stem = a.out[: -len(".safetensors")]
    if a.export:
        log(f"wrote {concepts.export_lora(res.concept, stem + '.lora.safetensors')} and "
            f"{concepts.export_embedding(res.concept, stem + '.embedding.safetensors')}")
    if a.loss_plot:
        _save(api.tensor_to_pil(loss_curve(res.losses)[0].permute(2, 0, 1)), a.loss_plot)
        log(f"wrote {a.loss_plot}")


def _pairs(values, name):
    """['<new1>=dog', ...] -> {'<new1>': 'dog'}."""
    out = {}
    for v in values:
        k, sep, w = v.partition("=")
        if not sep or not k.strip() or not w.strip():
            raise InputError(name, f"expected TOKEN=VALUE, got {v!r}")
        out[k.strip()] = w.strip()
    return out


def cmd_import_concept(a, log):
    from . import concept as concepts

    embeds, classes = _pairs(a.embedding, "embedding"), _pairs(a.class_word, "class_word")
    for path in embeds.values():
        if not os.path.isfile(path):
            raise InputError("embedding", f"{path!r} does not exist")
    with _loaded(a, log) as pipe:
        lpb = pipe.backend.unet.config.layers_per_block
        c = concepts.from_custom_diffusion(a.weights, embeds, classes, pipe.backend, lpb,
                                           name=os.path.splitext(os.path.basename(a.out))[0])
    concepts.save(c, a.out)
    log(f"imported {c.describe()}; wrote {a.out}")


def cmd_info(a, log):
    with _loaded(a, log) as pipe:
        b = pipe.backend
        print(f"model: {pipe.source}\nfamily: {pipe.family}\nprediction: {pipe.prediction_type}\n"
              f"latent channels: {b.latent_channels}\npixel multiple: {pipe.pixel_multiple}\n"
              f"native size: {pipe.default_size} px\n"
              f"VAE scale: {b.vae_scale} px per latent cell, scaling factor {pipe.scaling_factor}\n"
              f"text width: {b.text_encoder.config.hidden_size}, vocabulary: {len(b.tokenizer.tok)}")
        for n in pipe.notes:
            print(f"note: {n}")


COMMANDS = {"edit": cmd_edit, "maps": cmd_maps, "diffedit": cmd_diffedit, "specref": cmd_specref,
            "train-concept": cmd_train_concept, "import-concept": cmd_import_concept, "dci": cmd_dci,
            "info": cmd_info}


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl
        dl.set_verbosity_error()
        dl.disable_progress_bar()
        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except Exception:   # logging tweaks only
        pass


def main(argv=None) -> int:
    """Run one command; 0 on success, 2 (with one 'error: <input>: <problem>' line) for bad input."""
    a = build_parser().parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        _check_args(a)
        _quiet()
        COMMANDS[a.command](a, log)
    except InputError as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
