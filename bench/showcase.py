#!/usr/bin/env python
"""The README's picture: each method of the pack on toy-world scenes it never saw, with its numbers.

    OMP_NUM_THREADS=2 python bench/showcase.py            # writes docs/showcase.png (a few minutes on a CPU)

Columns are scenes (world seeds from --first-scene on, below the training range); rows are the
source, each method's result, and the mask or map it used. Under every result: whether the edit
succeeded (the object's colour and pattern are the target's, by the world's rules) and the
background's PSNR against the source. Panels are upscaled (nearest) and every label sits outside
the pictures.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import numpy as np  # noqa: E402

import quality as B  # noqa: E402
from customedit_core import api  # noqa: E402
from toyworld.world import render, sample_scene  # noqa: E402

CELL, LABEL_W, NOTE_H, HEAD_H = 160, 250, 18, 34


def _mask_rgb(m):
    return np.repeat(m.astype(np.float32)[..., None], 3, -1)


def rows_for(bench, seed, scene, concept_pipe=None):
    """[(row label, image, note)] for one scene."""
    img, masks = render(scene)
    mask, o = masks[0], scene.objects[0]
    rt = bench.encode_decode(img)
    src = scene.caption()
    out = [("source", img, src)]

    def edit(label, result, target):
        j = B.judge(result, img, target, mask, rt)
        out.append((label, result, f"{'ok' if j['success'] else 'miss'}  bg {j['bg_psnr']:.1f} dB"))

    colour = scene.with_object(0, color=B.target_colour(scene))
    res, _, recon = bench.p2p(seed, img, src, colour.caption(), "null_text", "replace", (o.shape,))
    out.append(("null-text reconstruction", recon, f"{B.Q.psnr(recon, img):.1f} dB"))
    edit("P2P colour swap (+ blend)", res, colour)
    striped = scene.with_object(0, pattern="striped")
    res, _, _ = bench.p2p(seed, img, src, striped.caption(), "null_text", "refine", (o.shape,))
    edit("P2P refine + 'striped' (+ blend)", res, striped)
    res, _ = bench.sdedit(img, colour.caption(), 0.6)
    edit("SDEdit 0.6 (swap)", res, colour)
    res, _, m, _ = bench.diffedit(img, src, colour.caption(), 0.7)
    out.append(("DiffEdit mask", _mask_rgb(m), f"IoU {B.Q.iou(m, mask):.2f}"))
    edit("DiffEdit (swap)", res, colour)
    ref_scene = sample_scene(seed + B.REFERENCE_OFFSET, objects=1, held_out=False).with_object(
        0, shape=o.shape, color=colour.objects[0].color, pattern="ringed")
    ref_img, ref_masks = render(ref_scene)
    out.append(("SpecRef reference (ringed)", ref_img, "held-out pattern"))
    res, _ = bench.specref(seed, img, src, f"a {o.shape} on {scene.background}", ref_img, ref_masks[0], (o.shape,))
    edit("SpecRef, prompt 'a <shape> on ..'", res, scene.with_object(0, color=ref_scene.objects[0].color,
                                                                        pattern="ringed"))
    return out


def draw(columns, path, title):
    from PIL import Image, ImageDraw

    labels = [r[0] for r in columns[0]]
    rows = len(labels)
    w, h = LABEL_W + CELL * len(columns), HEAD_H + rows * (CELL + NOTE_H)
    canvas = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(canvas)
    d.text((8, 10), title, fill=(0, 0, 0))
    for i, label in enumerate(labels):
        y = HEAD_H + i * (CELL + NOTE_H)
        d.text((8, y + CELL // 2 - 6), label, fill=(0, 0, 0))
        for j, col in enumerate(columns):
            _, img, note = col[i]
            canvas.paste(B.to_pil(img).resize((CELL, CELL), Image.NEAREST), (LABEL_W + j * CELL, y))
            d.text((LABEL_W + j * CELL + 4, y + CELL + 3), note[:26], fill=(40, 40, 40))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped toy-world model")
    ap.add_argument("--first-scene", type=int, default=7000)
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "showcase.png"))
    a = ap.parse_args(argv)
    pipe = api.load(a.model, log=lambda s: None)
    bench = B.Bench(pipe, a.steps)
    columns = [rows_for(bench, seed, s) for seed, s in B.source_scenes(a.scenes, a.first_scene)]
    draw(columns, a.out, f"customedit on the toy world: scenes {a.first_scene}.. (never trained on), "
                         f"{a.steps} DDIM steps, guidance 7.5; null-text inversion for P2P, direct for SpecRef")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
