#!/usr/bin/env python
"""The templates browser's thumbnails: workflows/<name>.jpg, a real result of each workflow's method.

    OMP_NUM_THREADS=1 python bench/thumbnails.py                 # all of them, about 2 min on one core
    OMP_NUM_THREADS=1 python bench/thumbnails.py p2p_edit sdedit  # some of them

ComfyUI's frontend (1.27) shows a custom node's template <name>.json with the picture
/api/workflow_templates/<pack>/<name>.jpg: a JPEG with the workflow's file name beside it. The
workflows need an SD checkpoint, which cannot ship, so each thumbnail is the same method run by the
pack's Python API on the bundled toy-world model (toyworld/weights, 64 px): its demo scene "a red
circle on grass" stands in for the workflow's example.png, a ringed blue circle for the reference
picture, a yellow ringed circle (learned from three pictures in a short Custom Diffusion run, 120
steps) for the concept, "a <new1> circle on grass" (seed 1) for DCI's prompt. Every method runs at
the workflows' 50 DDIM steps. Edits show the source beside the result (each 128 px); SpecRef's the source, the
reference and the result; the pictures are upscaled (nearest) into the browser's 256x256 card
(object-contain); attention_maps shows the source and its colour, shape and background
words' maps, concept_train its three reference pictures and a plain sample of the learned concept.
The toy model is small: these are its real results, not SD's (see the README's quality numbers).
The SDXL twins (*_sdxl) run the same method, so they show the same picture: no SDXL model ships either.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402

import quality as B  # noqa: E402
from customedit_core import api  # noqa: E402
from toyworld.world import DEMO_SCENE, render, sample_scene  # noqa: E402

WORKFLOWS = os.path.join(ROOT, "workflows")
SIDE = 256
CONCEPT = dict(shape="circle", color="yellow", pattern="ringed")
DCI_SEED = 1                      # the concept's samples (concept_train's fourth cell, dci_sample)
CONCEPT_WORKFLOWS = ("concept_train", "custom_edit", "custom_edit_sdedit", "custom_edit_sdxl", "dci_sample")


def upscale(img, side=SIDE):
    from PIL import Image
    return B.to_pil(img).resize((side, side), Image.NEAREST)


def grid2x2(images, side=SIDE):
    from PIL import Image
    canvas = Image.new("RGB", (side, side), "white")
    half = side // 2
    for k, img in enumerate(images[:4]):
        canvas.paste(upscale(img, half), ((k % 2) * half, (k // 2) * half))
    return canvas


def before_after(source, result, side=SIDE):
    """The source beside the result, each half the card's width (an edit's thumbnail)."""
    from PIL import Image
    canvas = Image.new("RGB", (side, side), "white")
    half = side // 2
    for k, img in enumerate((source, result)):
        canvas.paste(upscale(img, half), (k * half, half // 2))
    return canvas


class Thumbnails:
    """One method per workflow; every result is an RGB float array at the model's 64 px."""

    def __init__(self, pipe, steps, concept_steps, log, concept_lr=4e-5):
        self.pipe, self.steps, self.concept_steps, self.log = pipe, steps, concept_steps, log
        self.concept_lr = concept_lr
        self.bench = B.Bench(pipe, steps, log=log)
        self.scene = DEMO_SCENE
        self.img, masks = render(self.scene)
        self.mask = masks[0]
        self.src = self.scene.caption()                                    # "a red circle on grass"
        self.shape = self.scene.objects[0].shape
        self.target = self.scene.with_object(0, color="blue").caption()     # "a blue circle on grass"
        self._concept = None

    # the reference picture of SpecRef: the same shape, blue and ringed (a pattern no caption names)
    def reference(self):
        ref = sample_scene(7 + B.REFERENCE_OFFSET, objects=1, held_out=False).with_object(
            0, shape=self.shape, color="blue", pattern="ringed")
        img, masks = render(ref)
        return img, masks[0]

    def p2p_edit(self):
        res, _, _ = self.bench.p2p("demo", self.img, self.src, self.target, "null_text", "replace", (self.shape,))
        return before_after(self.img, res)

    def p2p_edit_sdxl(self):
        return self.p2p_edit()

    def attention_maps(self):
        inv, _ = self.bench.invert("demo", self.img, self.src, "null_text")
        maps = self.pipe.attention_maps(inv, label=False).numpy()         # one map per word of the prompt
        words = list(inv.tokens.words)
        pick = [words.index(w) for w in (self.scene.objects[0].color, self.shape, self.scene.background)]
        return grid2x2([self.img] + [maps[k] for k in pick])

    def sdedit(self):
        return before_after(self.img, self.bench.sdedit(self.img, self.target, 0.6)[0])

    def specref(self):
        ref, ref_mask = self.reference()
        res, _ = self.bench.specref("demo", self.img, self.src, f"a {self.shape} on {self.scene.background}", ref,
                                    ref_mask, (self.shape,))
        return grid2x2([self.img, ref, res])

    def diffedit(self):
        return before_after(self.img, self.bench.diffedit(self.img, self.src, self.target, 0.8)[0])

    def diffedit_mask_specref(self):
        ref, ref_mask = self.reference()
        p = self.pipe
        mask = p.diffedit_mask(B.to_pil(self.img), self.src, self.target, seed=0).mask
        inv, _ = self.bench.invert("demo", self.img, self.src, "direct")
        bank = p.extract_reference(B.to_pil(ref), "", steps=self.steps, mask=ref_mask.astype(np.float32))
        res = p.specref(inv, bank, f"a {self.shape} on {self.scene.background}", mask=mask)
        return grid2x2([self.img, ref, B.to_np(p.decode(res.edited)[0])])

    # --- concepts ---------------------------------------------------------------------------
    def concept(self):
        if self._concept is None:
            refs = B.concept_refs(CONCEPT, 7000, n=3)
            cp, seconds = B.concept_pipeline(self.pipe, "kv_token", refs, CONCEPT["shape"], self.concept_steps,
                                             self.concept_lr, self.log)
            self.log(f"concept trained in {seconds:.0f} s")
            self._concept = (refs, cp)
        return self._concept

    def _concept_prompt(self, background=None):
        return f"a <new1> {self.shape} on {background or self.scene.background}"

    def concept_train(self):
        from customedit_core.dci import DCISettings
        refs, cp = self.concept()
        res = cp.dci(self._concept_prompt(), seed=DCI_SEED, size=64, steps=self.steps, settings=DCISettings(0.0))
        return grid2x2(list(refs) + [B.to_np(cp.decode(res.latents)[0])])

    def custom_edit(self):
        _, cp = self.concept()
        out, _, _ = B.Bench(cp, self.steps, log=self.log).p2p("demo", self.img, self.src, self._concept_prompt(),
                                                              "null_text", "refine", (self.shape,), source_only=True)
        return before_after(self.img, out)

    def custom_edit_sdxl(self):
        return self.custom_edit()

    def custom_edit_sdedit(self):
        _, cp = self.concept()
        return before_after(self.img, B.Bench(cp, self.steps, log=self.log).sdedit(self.img, self._concept_prompt(), 0.6)[0])

    def dci_sample(self):
        from customedit_core.dci import DCISettings
        _, cp = self.concept()
        res = cp.dci(self._concept_prompt(), seed=DCI_SEED, size=64, steps=self.steps, settings=DCISettings(0.3))
        return B.to_np(cp.decode(res.latents)[0])


def names():
    return sorted(f[: -len(".json")] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))


def save(picture, path, quality):
    from PIL import Image
    pil = picture if isinstance(picture, Image.Image) else upscale(picture)
    pil.convert("RGB").save(path, "JPEG", quality=quality, optimize=True)
    return os.path.getsize(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflows", nargs="*", help="names in workflows/ (default: every one)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of every method (default 50, the workflows')")
    ap.add_argument("--concept-steps", type=int, default=120, help="Custom Diffusion steps (default 120)")
    ap.add_argument("--concept-lr", type=float, default=4e-5, help="Custom Diffusion learning rate (default 4e-5)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--out", default=WORKFLOWS, help="folder of the .jpg files (default: workflows/)")
    a = ap.parse_args(argv)
    todo = a.workflows or names()
    unknown = [n for n in todo if n not in names()]
    if unknown:
        ap.error(f"no such workflow: {', '.join(unknown)} (have: {', '.join(names())})")
    t0 = time.perf_counter()
    pipe = api.load(None, log=lambda s: None)
    th = Thumbnails(pipe, a.steps, a.concept_steps, log=print, concept_lr=a.concept_lr)
    os.makedirs(a.out, exist_ok=True)
    for name in sorted(todo, key=lambda n: (n in CONCEPT_WORKFLOWS, n)):
        t = time.perf_counter()
        method = getattr(th, name, None)
        if method is None:
            raise SystemExit(f"{name}: no thumbnail method in bench/thumbnails.py; add one")
        path = os.path.join(a.out, f"{name}.jpg")
        size = save(method(), path, a.quality)
        print(f"{name}: {path} ({size} bytes, {time.perf_counter() - t:.0f} s)", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
