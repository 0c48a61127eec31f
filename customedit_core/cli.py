"""Command line: `python -m customedit_core edit|maps|diffedit|specref|info ...`, fully offline.

    python -m customedit_core edit --model sd15.safetensors --image cat.png \\
        --source "a photo of a cat" --target "a photo of a striped cat" --blend-words cat --out out.png

writes one PNG: source | reconstruction | edit (| mask). Without --model the shipped toy-world
model is used (trained on procedural scenes); without --image the model folder's demo scene is
used when it ships one (demo.png + demo.json, as the toy-world model does), else a drawn scene
of a red circle on grass.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

SCENE_PROMPT = "a red circle on green grass"
SCENE_TARGET = "a yellow circle on green grass"
DEMO_FILES = ("demo.json", "demo.png")     # a model folder's own demo: {"source", "target"} and its image


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
    out = {}
    for item in items or ():
        for part in item.split(","):
            if not part.strip():
                continue
            word, sep, value = part.rpartition(":")
            if not sep or not word.strip():
                raise _Bad("reweight", f"expected WORD:WEIGHT (e.g. striped:2), got {part!r}")
            try:
                out[word.strip()] = float(value)
            except ValueError:
                raise _Bad("reweight", f"the weight in {part!r} is not a number") from None
            if not math.isfinite(out[word.strip()]):
                raise _Bad("reweight", f"the weight in {part!r} must be a finite number")
    return out


class _Bad(Exception):
    def __init__(self, name, msg):
        super().__init__(f"{name}: {msg}")


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", help="diffusers-format folder or SD1.x/SD2.x .safetensors checkpoint "
                                   "(default: the shipped toy-world model)")
    g.add_argument("--tokenizer", help="CLIP tokenizer folder for a single-file checkpoint (default: a "
                                       "'tokenizer' folder next to it, else CLIP's vocabulary built in)")
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override what is read from the model or inferred")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="UNet/text encoder precision "
                                                                    "(default fp16 on cuda, fp32 on cpu)")
    g.add_argument("--concept", action="append", metavar="FILE",
                   help="load a concept (.safetensors from train-concept or ComfyUI's Save Concept) so its word "
                        "works in the prompts; repeatable")


def _add_inversion_args(p):
    g = p.add_argument_group("image and inversion")
    g.add_argument("--image", help="input image (default: the model's demo scene, else a drawn red circle on grass)")
    g.add_argument("--size", type=int, help="resize so the longer side is SIZE px, sides rounded to the "
                                            "model's pixel multiple (default: the model's native size)")
    g.add_argument("--source", help="prompt describing the input image (default for the drawn scene: "
                                    f"{SCENE_PROMPT!r})")
    g.add_argument("--method", default="null_text", choices=["null_text", "negative_prompt", "direct", "ddim"],
                   help="inversion method (default null_text)")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    g.add_argument("--inner-steps", type=int, default=10,
                   help="null-text optimisation steps per timestep (default 10)")


def _add_edit_args(p, required_target: bool):
    g = p.add_argument_group("Prompt-to-Prompt edit")
    g.add_argument("--target", action="append", required=required_target, metavar="PROMPT",
                   help="edited prompt (repeat for several edits in one batch)"
                   + ("" if required_target else "; without it the source prompt's maps are shown"))
    g.add_argument("--mode", default="refine", choices=["refine", "replace"],
                   help="refine: words added/changed (global token alignment); replace: word swap with the "
                        "same number of words (default refine)")
    g.add_argument("--cross-replace", type=_window, default=0.8, metavar="F|START,END",
                   help="fraction of steps with injected cross-attention (default 0.8)")
    g.add_argument("--self-replace", type=_window, default=0.5, metavar="F|START,END",
                   help="fraction of steps with injected self-attention (default 0.5)")
    g.add_argument("--self-max-side", type=float, metavar="F",
                   help="inject self-attention in layers up to this fraction of the latent side (1: all; default "
                        "0.5, the reference's, unless the model folder's customedit.json says otherwise)")
    g.add_argument("--edit-uncond", choices=["inversion", "empty"],
                   help="the edit rows' unconditional embedding: the inversion's (the reference) or the empty "
                        "prompt's (default: the model folder's customedit.json, else inversion)")
    g.add_argument("--blend-words", nargs="+", metavar="WORD",
                   help="local blend: source word(s) whose attention masks the edit region; alone they give "
                        "Custom-Edit's source-only mask")
    g.add_argument("--blend-target-words", nargs="+", metavar="WORD",
                   help="target word(s) whose mask is united with the source words' mask")
    g.add_argument("--blend-both", action="store_true",
                   help="unite the source mask with the same words' mask in the target (P2P's recipe)")
    g.add_argument("--blend-threshold", type=float, default=0.3, help="mask threshold (default 0.3)")
    g.add_argument("--blend-start", type=float, default=0.2,
                   help="fraction of steps after which blending starts (default 0.2)")
    g.add_argument("--reweight", action="append", metavar="WORD:W",
                   help="scale the edit's attention to a target word, e.g. striped:2 (repeatable, or "
                        "comma-separated)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m customedit_core",
                                 description="Text-driven image editing (inversion + Prompt-to-Prompt), offline.")
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("edit", help="invert an image and edit it; writes source | reconstruction | edit(s)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(e)
    _add_inversion_args(e)
    _add_edit_args(e, required_target=False)
    e.add_argument("--show-mask", action="store_true", help="append the local-blend mask(s) as panels")
    e.add_argument("--no-labels", action="store_true", help="do not write panel names on the images")
    e.add_argument("--out", required=True, help="output PNG")
    m = sub.add_parser("maps", help="per-word cross-attention maps of the source (or of an edit) as a PNG grid")
    _add_model_args(m)
    _add_inversion_args(m)
    _add_edit_args(m, required_target=False)
    m.add_argument("--columns", type=int, default=0, help="grid columns (default: all in one row up to 8)")
    m.add_argument("--no-labels", action="store_true", help="do not write the words on the maps")
    m.add_argument("--out", required=True, help="output PNG")
    d = sub.add_parser("diffedit", help="DiffEdit: find the region a target prompt changes, edit only there; "
                                        "writes source | mask | edit", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(d)
    g = d.add_argument_group("image and prompts")
    g.add_argument("--image", help="input image (default: the model's demo scene, else a drawn red circle on grass)")
    g.add_argument("--size", type=int, help="longer side in px (default: the model's native size)")
    g.add_argument("--source", help=f"query prompt: what is in the image (default for the drawn scene: {SCENE_PROMPT!r})")
    g.add_argument("--target", help=f"target prompt (default for the drawn scene: {SCENE_TARGET!r})")
    g = d.add_argument_group("mask")
    g.add_argument("--mask", help="a mask image (white = edit) instead of finding one")
    g.add_argument("--samples", type=int, default=10, help="noise samples for the mask")
    g.add_argument("--strength", type=float, default=0.5, help="noise strength of the samples")
    g.add_argument("--threshold", type=float, default=0.5, help="mask threshold (0.5 = above 1.5x the mean)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise samples")
    g = d.add_argument_group("sampling")
    g.add_argument("--encoding-ratio", type=float, default=0.8, help="fraction of the steps encoded and decoded")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of the decoding")
    d.add_argument("--no-labels", action="store_true", help="do not write panel names on the images")
    d.add_argument("--out", required=True, help="output PNG")
    r = sub.add_parser("specref", help="SpecRef: edit a region after a reference image; writes source | "
                                       "reference | edit | M_t", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(r)
    _add_inversion_args(r)
    r.set_defaults(method="direct")
    g = r.add_argument_group("reference and edit")
    g.add_argument("--reference", help="reference image, resized to the source's size (default: the drawn "
                                       "scene mirrored)")
    g.add_argument("--reference-prompt", default="", help="prompt of the reference (may be empty)")
    g.add_argument("--reference-mask", help="mask image of the reference object M_s (white = object)")
    g.add_argument("--target", help=f"edited prompt (default for the drawn scene: {SCENE_TARGET!r})")
    g.add_argument("--edited-words", nargs="+", metavar="WORD",
                   help="target word(s) whose region takes the reference (default for the drawn scene: circle)")
    g.add_argument("--source-words", nargs="+", metavar="WORD", help="source word(s) whose region joins the blend")
    g.add_argument("--mask", help="a mask image (white = edit) as M_t instead of the words' attention")
    g.add_argument("--threshold", type=float, default=0.3, help="M_t threshold: 0.3 added words, 0.5 a swapped word")
    g.add_argument("--level-start", type=int, default=0, help="first decoder level (0 = finest resolution)")
    g.add_argument("--level-end", type=int, default=1, help="last decoder level (inclusive)")
    g.add_argument("--step-start", type=float, default=0.08, help="fraction of steps where the reference starts")
    g.add_argument("--step-end", type=float, default=1.0, help="fraction of steps where the reference ends")
    g.add_argument("--blend-start", type=float, default=0.2, help="fraction of steps after which the outside "
                                                                  "is kept")
    r.add_argument("--no-labels", action="store_true", help="do not write panel names on the images")
    r.add_argument("--out", required=True, help="output PNG")
    c = sub.add_parser("train-concept", help="teach the model a new word from 3-5 reference images (Custom "
                                             "Diffusion); writes a concept file", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(c)
    g = c.add_argument_group("concept")
    g.add_argument("--images", nargs="+", required=True, help="reference images of one thing")
    g.add_argument("--masks", nargs="+", help="object masks, one per image (white = object)")
    g.add_argument("--class-word", required=True, help="what it is: dog, teapot, dress...")
    g.add_argument("--token", default="<new1>", help="the new word")
    g.add_argument("--class-images", nargs="+", help="your class images (default: generated by the model)")
    g.add_argument("--size", type=int, help="longer side in px (default: the model's native size)")
    g.add_argument("--steps", type=int, default=250)
    g.add_argument("--lr", type=float, default=1e-5, help="learning rate before scaling by batch size")
    g.add_argument("--batch-size", type=int, default=2)
    g.add_argument("--prior-weight", type=float, default=1.0)
    g.add_argument("--num-class-images", type=int, default=16, help="generated class images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ico", action="store_true", help="image-specific context optimisation")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--export", action="store_true", help="also write <out>.lora.safetensors (LoraLoader) and "
                                                         "<out>.embedding.safetensors (embedding:) for ComfyUI")
    g.add_argument("--loss-plot", help="write the loss curve to this PNG")
    c.add_argument("--out", required=True, help="concept file (.safetensors)")
    x = sub.add_parser("dci", help="DCI: sample a loaded concept with its context kept (Divide, Conquer, then "
                                   "Integrate); writes plain | DCI | concept weight", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(x)
    g = x.add_argument_group("DCI")
    g.add_argument("--prompt", required=True, help="prompt with the concept word, e.g. 'a photo of a <new1> dog on "
                                                   "the beach'")
    g.add_argument("--auxiliary-prompt", default="", help="the plain prompt of the auxiliary branch (default: the "
                                                          "concept word dropped before, or replaced by, its class word)")
    g.add_argument("--concept-words", nargs="+", metavar="WORD", help="which concept words (default: every loaded "
                                                                      "one in the prompt)")
    g.add_argument("--fraction", type=float, default=0.3, help="share of the steps with both branches")
    g.add_argument("--balance", type=float, default=0.0, help="lambda: > 0 favours the concept, < 0 the context")
    g.add_argument("--negative", default="", help="negative prompt (not with --image)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, help="side in px (default: the model's native size: 512 for SD1.x, 64 for "
                                            "the toy-world model); with --image its longer side")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--image", help="edit this image from its inversion instead of sampling from noise")
    g.add_argument("--source", help="prompt describing --image")
    g.add_argument("--method", default="null_text", choices=["null_text", "negative_prompt", "direct", "ddim"],
                   help="inversion method for --image")
    g.add_argument("--inner-steps", type=int, default=10, help="null-text optimisation steps per timestep")
    x.add_argument("--no-labels", action="store_true", help="do not write panel names on the images")
    x.add_argument("--out", required=True, help="output PNG")
    im = sub.add_parser("import-concept", help="convert diffusers' Custom Diffusion output (safetensors) into a "
                                               "concept file; needs the base model")
    _add_model_args(im)
    im.add_argument("--weights", required=True, help="pytorch_custom_diffusion_weights.safetensors")
    im.add_argument("--embedding", action="append", required=True, metavar="TOKEN=FILE",
                    help="<token>.safetensors of each modifier token, e.g. '<new1>=out/<new1>.safetensors'")
    im.add_argument("--class-word", action="append", required=True, metavar="TOKEN=WORD",
                    help="class word of each token, e.g. '<new1>=dog'")
    im.add_argument("--out", required=True, help="concept file (.safetensors)")
    i = sub.add_parser("info", help="load a model and print what was detected")
    _add_model_args(i)
    return ap


def _settings(a, model_defaults=None):
    """The edit's P2PSettings: the command line's values over the model's own defaults."""
    from .edit import P2PSettings

    target_words = tuple(a.blend_target_words or ())
    if a.blend_both:
        if not a.blend_words:
            raise _Bad("blend_both", "needs --blend-words")
        target_words = target_words or tuple(a.blend_words)
    if target_words and not a.blend_words:
        raise _Bad("blend_target_words", "local blend needs at least one source word (--blend-words)")
    given = {k: getattr(a, k) for k in ("self_max_side", "edit_uncond") if getattr(a, k, None) is not None}
    return P2PSettings(**{**(model_defaults or {}), **given}, mode=a.mode, cross_replace=a.cross_replace,
                       self_replace=a.self_replace, reweight=_reweight(a.reweight),
                       blend_source_words=tuple(a.blend_words or ()), blend_target_words=target_words,
                       blend_threshold=a.blend_threshold, blend_start=a.blend_start)


def _load(a, log):
    import torch

    from . import api

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[a.dtype]
    t = time.time()
    pipe = api.load(a.model, device=a.device, dtype=dtype, tokenizer=a.tokenizer,
                    prediction_type=a.prediction_type, log=log)
    log(f"loaded {pipe.source} ({pipe.family}, {pipe.prediction_type}, {pipe.device}) in {time.time() - t:.1f} s")
    for path in getattr(a, "concept", None) or ():
        from . import concept as concepts

        c = concepts.load(path, "concept")
        pipe.load_concept(c)
        log(f"loaded {c.describe()}")
    return pipe


def cmd_train_concept(a, log):
    from . import api
    from . import concept as concepts
    from .plot import loss_curve

    if not a.out.lower().endswith(".safetensors"):
        raise _Bad("out", f"expected a .safetensors file name, got {a.out!r}")
    for p in (a.images or []) + (a.masks or []) + (a.class_images or []):
        if not os.path.isfile(p):
            raise _Bad("images", f"{p!r} does not exist")
    pipe = _load(a, log)
    size = a.size or pipe.default_size
    t = time.time()
    last = [t]

    def progress(step, loss):
        if time.time() - last[0] > 10 or step + 1 == a.steps:
            last[0] = time.time()
            log(f"step {step + 1}/{a.steps} loss {loss:.4f}")

    from .customize import TrainSettings, train_concept

    refs = pipe._image_batch([api.open_image(p, "images") for p in a.images], size, "images")
    cls = None if not a.class_images else pipe._image_batch([api.open_image(p, "class_images") for p in a.class_images],
                                                            size, "class_images", like=refs)
    masks = None if not a.masks else pipe._mask_batch([api.open_image(p, "masks") for p in a.masks], refs)
    s = TrainSettings(token=a.token, class_word=a.class_word, steps=a.steps, learning_rate=a.lr,
                      batch_size=a.batch_size, prior_weight=a.prior_weight, num_class_images=a.num_class_images,
                      seed=a.seed, ico=a.ico, precision=a.precision, gradient_checkpointing=a.gradient_checkpointing,
                      name=os.path.splitext(os.path.basename(a.out))[0])
    res = train_concept(pipe.backend, refs, pipe._encode_pixels, s, masks=masks, class_images=cls, on_step=progress)
    concepts.save(res.concept, a.out)
    log(f"trained {res.concept.describe()} in {time.time() - t:.1f} s; wrote {a.out}")
    stem = a.out[: -len(".safetensors")]
    if a.export:
        log(f"wrote {concepts.export_lora(res.concept, stem + '.lora.safetensors')} and "
            f"{concepts.export_embedding(res.concept, stem + '.embedding.safetensors')}")
    if a.loss_plot:
        from .api import tensor_to_pil
        tensor_to_pil(loss_curve(res.losses)[0].permute(2, 0, 1)).save(a.loss_plot)
        log(f"wrote {a.loss_plot}")


def cmd_import_concept(a, log):
    from . import concept as concepts

    def pairs(values, name):
        out = {}
        for v in values:
            k, sep, w = v.partition("=")
            if not sep or not k.strip() or not w.strip():
                raise _Bad(name, f"expected TOKEN=VALUE, got {v!r}")
            out[k.strip()] = w.strip()
        return out

    embeds, classes = pairs(a.embedding, "embedding"), pairs(a.class_word, "class_word")
    pipe = _load(a, log)
    lpb = pipe.backend.unet.config.layers_per_block
    c = concepts.from_custom_diffusion(a.weights, embeds, classes, pipe.backend, lpb,
                                       name=os.path.splitext(os.path.basename(a.out))[0])
    concepts.save(c, a.out)
    log(f"imported {c.describe()}; wrote {a.out}")


def _image_and_prompts(a, pipe, log):
    from . import api

    size = a.size or pipe.default_size
    if a.image:
        if not a.source:
            raise _Bad("source", "describe the input image with --source (the inversion needs its prompt)")
        image = pipe.prepare_image(api.open_image(a.image), size, "image")
        source = a.source
    else:
        m = pipe.pixel_multiple
        side = max(m, round(size / m) * m)
        if side != size:
            log(f"note: the drawn scene is {side} px (a multiple of {m} px, as this model needs)")
        image = _scene_image(pipe, side)
        scene = _scene_prompts(pipe)[0]
        source = a.source or scene
        log(f"no --image: using the drawn scene ({scene}), source prompt {source!r}")
    return image, source


def _precheck(pipe, source, targets, settings, steps):
    """Check prompts and word choices before a possibly long inversion."""
    from .edit import build_controllers
    from .tokens import tokenize

    tok = pipe.backend.tokenizer
    src = tokenize(tok, source, "source_prompt")
    tgts = [tokenize(tok, t, "target_prompt") for t in targets]
    if steps < 1:
        raise _Bad("steps", f"expected a positive number of steps, got {steps}")
    build_controllers(settings, src, tgts, steps)


def _invert(a, pipe, image, source, log):
    t = time.time()
    inv = pipe.invert(image, source, steps=a.steps, guidance=a.guidance, method=a.method,
                      inner_steps=a.inner_steps)
    log(f"inverted with {a.method} ({a.steps} steps) in {time.time() - t:.1f} s")
    return inv


def _label(img, text):
    from PIL import ImageDraw
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 6 * len(text) + 6, 13], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 0))
    return img


def _row(panels, labels=None):
    from PIL import Image

    w, h = panels[0].size
    out = Image.new("RGB", (w * len(panels), h))
    for k, p in enumerate(panels):
        p = p.convert("RGB")
        if labels:
            p = _label(p.copy(), labels[k])
        out.paste(p, (k * w, 0))
    return out


def cmd_edit(a, log):
    import torch
    import torch.nn.functional as F

    from . import api

    _check_out(a.out)
    _settings(a)                       # its errors before the model loads
    pipe = _load(a, log)
    settings = _settings(a, pipe.edit_defaults)
    image, source = _image_and_prompts(a, pipe, log)
    targets = a.target or ([_scene_prompts(pipe)[1]] if not a.image else None)
    if not targets:
        raise _Bad("target", "give the edited prompt with --target")
    if not a.target:
        log(f"no --target: editing the drawn scene to {targets[0]!r}")
    _precheck(pipe, source, targets, settings, a.steps)
    inv = _invert(a, pipe, image, source, log)
    t = time.time()
    res = pipe.edit(inv, targets, settings)
    log(f"edited in {time.time() - t:.1f} s")
    decoded = pipe.decode(torch.cat([res.source, res.edited]))
    panels = [image] + decoded
    labels = ["source", "reconstruction"] + (["edit"] if len(targets) == 1 else
                                             [f"edit {k + 1}" for k in range(len(targets))])
    if a.show_mask:
        if res.mask is None:
            log("note: no mask to show (local blend is off; give --blend-words)")
        else:
            h, w = image.size[1], image.size[0]
            m = F.interpolate(res.mask.float(), size=(h, w), mode="nearest")
            for k in range(m.shape[0]):
                panels.append(api.tensor_to_pil(m[k].expand(3, -1, -1)))
                labels.append("mask" if m.shape[0] == 1 else f"mask {k + 1}")
    out = _row(panels, None if a.no_labels else labels)
    _save(out, a.out)
    log(f"wrote {a.out} ({out.size[0]}x{out.size[1]}: {' | '.join(labels)})")
    pipe.close()


def cmd_maps(a, log):
    from PIL import Image

    _check_out(a.out)
    settings = _settings(a) if a.target else None
    if a.target and len(a.target) > 1:
        raise _Bad("target", "maps are drawn for one target prompt; give --target once")
    pipe = _load(a, log)
    image, source = _image_and_prompts(a, pipe, log)
    if a.target:
        _precheck(pipe, source, a.target, settings, a.steps)
    inv = _invert(a, pipe, image, source, log)
    maps = pipe.attention_maps(inv, a.target[0] if a.target else None, settings, label=not a.no_labels)
    tiles = [image] + [Image.fromarray((m.numpy() * 255).round().astype("uint8")) for m in maps]
    cols = a.columns if a.columns > 0 else min(len(tiles), 8)
    rows = -(-len(tiles) // cols)
    w, h = image.size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, tile in enumerate(tiles):
        grid.paste(tile.resize((w, h)), ((k % cols) * w, (k // cols) * h))
    _save(grid, a.out)
    words = inv.tokens.words if not a.target else None
    log(f"wrote {a.out} ({grid.size[0]}x{grid.size[1]}: the image and {len(maps)} word maps"
        + (f" for {list(words)})" if words else ")"))
    pipe.close()


def _mask_panel(mask, size):
    import torch.nn.functional as F

    from . import api

    m = F.interpolate(mask.float(), size=(size[1], size[0]), mode="nearest")[0]
    return api.tensor_to_pil(m.expand(3, -1, -1))


def _begin(a, log):
    """Checks before any work, then the model, the image and the prompts: (pipe, image, source, target)."""
    _check_out(a.out)
    if a.image and not a.target:
        raise _Bad("target", "give the target prompt with --target")
    pipe = _load(a, log)
    image, source = _image_and_prompts(a, pipe, log)
    return pipe, image, source, a.target or _scene_prompts(pipe)[1]


def cmd_diffedit(a, log):
    from . import api

    pipe, image, source, target = _begin(a, log)
    z = pipe.latent(image)
    t = time.time()
    if a.mask:
        mask = pipe.mask(api.open_image(a.mask, "mask").convert("L"), z)
    else:
        mask = pipe.diffedit_mask(z, source, target, samples=a.samples, strength=a.strength,
                                  threshold=a.threshold, seed=a.seed).mask
        log(f"mask from {a.samples} noise samples in {time.time() - t:.1f} s: {100 * mask.mean():.0f}% of the image")
    t = time.time()
    res = pipe.diffedit(z, mask, target, encoding_ratio=a.encoding_ratio, steps=a.steps, guidance=a.guidance)
    log(f"edited in {time.time() - t:.1f} s")
    out = _row([image, _mask_panel(mask, image.size), pipe.decode(res.edited)[0]],
               None if a.no_labels else ["source", "mask", "edit"])
    _save(out, a.out)
    log(f"wrote {a.out} ({out.size[0]}x{out.size[1]}: source | mask | edit)")
    pipe.close()


def cmd_specref(a, log):
    from PIL import Image

    from . import api
    from .tokens import tokenize

    pipe, image, source, target = _begin(a, log)
    words = tuple(a.edited_words or (() if a.image or a.mask else ("circle",)))
    if not words and not a.mask:
        raise _Bad("edited_words", "name the target word(s) whose region takes the reference (or give --mask)")
    reference = api.open_image(a.reference, "reference") if a.reference else image.transpose(Image.FLIP_LEFT_RIGHT)
    ref_mask = api.open_image(a.reference_mask, "reference_mask").convert("L") if a.reference_mask else None
    tgt = tokenize(pipe.backend.tokenizer, target, "target_prompt")      # before a possibly long inversion
    for w in words:
        tgt.positions(w, "edited_words")
    for w in a.source_words or ():
        tokenize(pipe.backend.tokenizer, source, "source_prompt").positions(w, "source_words")
    inv = _invert(a, pipe, image, source, log)
    t = time.time()
    if ref_mask is not None and ref_mask.size != reference.size:
        ref_mask = ref_mask.resize(reference.size)
    if reference.size != image.size:
        if ref_mask is not None:
            ref_mask = ref_mask.resize(image.size)
        log(f"note: reference resized from {reference.size[0]}x{reference.size[1]} to {image.size[0]}x{image.size[1]}")
        reference = reference.resize(image.size, Image.LANCZOS)
    bank = pipe.extract_reference(reference, a.reference_prompt, steps=a.steps, mask=ref_mask,
                                  level_start=a.level_start, level_end=a.level_end, step_start=a.step_start,
                                  step_end=a.step_end)
    log(f"{bank.describe()} in {time.time() - t:.1f} s")
    t = time.time()
    mask = pipe.mask(api.open_image(a.mask, "mask").convert("L"), inv.source) if a.mask else None
    res = pipe.specref(inv, bank, target, words, mask=mask, source_words=tuple(a.source_words or ()),
                       threshold=a.threshold, level_start=a.level_start, level_end=a.level_end,
                       step_start=a.step_start, step_end=a.step_end, blend_start=a.blend_start)
    log(f"edited in {time.time() - t:.1f} s")
    out = _row([image, reference, pipe.decode(res.edited)[0], _mask_panel(res.mask, image.size)],
               None if a.no_labels else ["source", "reference", "edit", "M_t"])
    _save(out, a.out)
    log(f"wrote {a.out} ({out.size[0]}x{out.size[1]}: source | reference | edit | M_t)")
    pipe.close()


def cmd_dci(a, log):
    from . import api
    from .dci import DCISettings

    _check_out(a.out)
    if a.image and not a.source:
        raise _Bad("source", "describe --image with --source (it is inverted with that prompt)")
    pipe = _load(a, log)
    kw = dict(auxiliary_prompt=a.auxiliary_prompt, concept_words=tuple(a.concept_words or ()), steps=a.steps,
              guidance=a.guidance)
    dci = DCISettings(a.fraction, a.balance)
    dci.check()
    if a.image:
        image = pipe.prepare_image(api.open_image(a.image), a.size)
        inv = _invert(a, pipe, image, a.source, log)
        start = dict(inversion=inv)
        panels, labels = [image], ["source"]
    else:
        start = dict(seed=a.seed, size=a.size or pipe.default_size, negative_prompt=a.negative)
        panels, labels = [], []
    t = time.time()
    plain = pipe.dci(a.prompt, settings=DCISettings(0.0), **start, **kw)
    log(f"plain sampling in {time.time() - t:.1f} s")
    t = time.time()
    res = pipe.dci(a.prompt, settings=dci, **start, **kw)
    log(f"DCI ({res.integrated_steps} of {a.steps} steps integrated, auxiliary prompt {res.auxiliary_prompt!r}) "
        f"in {time.time() - t:.1f} s")
    out_plain, out_dci = pipe.decode(plain.latents)[0], pipe.decode(res.latents)[0]
    panels += [out_plain, out_dci]
    labels += ["plain", "DCI"]
    if res.weights is not None:
        panels.append(_mask_panel(res.weights, out_dci.size))
        labels.append("concept weight")
    out = _row(panels, None if a.no_labels else labels)
    _save(out, a.out)
    log(f"wrote {a.out} ({out.size[0]}x{out.size[1]}: {' | '.join(labels)})")
    pipe.close()


def cmd_info(a, log):
    pipe = _load(a, log)
    b = pipe.backend
    print(f"model: {pipe.source}\nfamily: {pipe.family}\nprediction: {pipe.prediction_type}\n"
          f"latent channels: {b.latent_channels}\npixel multiple: {pipe.pixel_multiple}\n"
          f"VAE scale: {b.vae_scale} px per latent cell, scaling factor {pipe.scaling_factor}\n"
          f"text width: {b.text_encoder.config.hidden_size}, vocabulary: {len(b.tokenizer.tok)}")
    for n in pipe.notes:
        print(f"note: {n}")
    pipe.close()


def _check_out(path):
    """Before any work: a .png name whose folder exists or can be made."""
    if not path.lower().endswith(".png"):
        raise _Bad("out", f"expected a .png file name, got {path!r}")
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise _Bad("out", f"cannot create the folder {d!r}: {e.strerror}")


def _save(img, path):
    """Atomic: a finished PNG or nothing (write beside it, then rename)."""
    _check_out(path)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        img.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    from .errors import InputError

    a = build_parser().parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    images = a.command not in ("info", "train-concept", "import-concept")
    if getattr(a, "size", None) is not None and a.size <= 0:
        log("error: size: expected a positive number of pixels")
        return 2
    if images and a.out and not a.out.lower().endswith(".png"):
        log(f"error: out: expected a .png file name, got {a.out!r}")
        return 2
    if images and a.image and not os.path.isfile(a.image):
        log(f"error: image: {a.image!r} does not exist")
        return 2
    _quiet()
    try:
        {"edit": cmd_edit, "maps": cmd_maps, "diffedit": cmd_diffedit, "specref": cmd_specref,
         "train-concept": cmd_train_concept, "import-concept": cmd_import_concept, "dci": cmd_dci,
         "info": cmd_info}[a.command](a, log)
    except (InputError, _Bad) as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
