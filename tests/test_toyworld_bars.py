"""The shipped toy-world model's word-local attention, colour swap and SpecRef, on scenes it never
saw (a fast subset of bench/quality.py's bars; the full table is in the README)."""
import os
import sys

import numpy as np
import pytest

from customedit_core import api
from toyworld.world import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import quality as B  # noqa: E402

FIRST = 40_000          # held out: the model trains on seeds 1000000..; the README's bench uses 20000..
OBJECT_IOU = 0.6        # issue 12's bar (bench, 10 scenes from 20000: 0.76; the v1 model: 0.11)
BACKGROUND_IOU = 0.8    # (bench: 0.95)


@pytest.fixture(scope="module")
def bench():
    pipe = api.load(None, log=lambda m: None)
    yield B.Bench(pipe, steps=20)
    pipe.close()


@pytest.fixture(scope="module")
def scenes():
    return B.source_scenes(3, FIRST)


def test_object_words_attend_to_their_object(bench, scenes):
    obj, bg = [], []
    for seed, s in scenes:
        _, masks = render(s)
        o = s.objects[0]
        ious = bench.map_iou(seed, render(s)[0], s.caption(), {o.color: masks[0], o.shape: masks[0],
                                                               s.background: ~masks[0]})
        obj += [ious[o.color], ious[o.shape]]
        bg.append(ious[s.background])
    assert np.mean(obj) >= OBJECT_IOU, obj
    assert np.mean(bg) >= BACKGROUND_IOU, bg


SWAP_SUCCESSES = 3      # of 3 scenes (bench, 20 scenes from 50000: 1.00)
SWAP_BG_DROP_DB = 1.5   # mean background PSNR below the VAE round trip's, issue 12's bar (these 3: 1.37; bench: 1.26)
SWAP_BG_DROP_MAX_DB = 3.0   # for any one scene (these 3: -0.1, 1.6, 2.6)


def test_colour_swap_with_local_blend_keeps_the_background(bench, scenes):
    """negative-prompt inversion + P2P replace + local blend, under the model's own defaults."""
    ok, drops = 0, []
    for seed, s in scenes:
        img, masks = render(s)
        tgt = s.with_object(0, color=B.target_colour(s))
        out, _, _ = bench.p2p(seed, img, s.caption(), tgt.caption(), "negative_prompt", "replace",
                              (s.objects[0].shape,))
        row = B.judge(out, img, tgt, masks[0])
        ok += row["success"]
        round_trip = bench.encode_decode(img)      # the bar's measure: the round trip's background PSNR minus the edit's
        drops.append(B.Q.psnr(round_trip, img, ~B.Q.dilate(masks[0], 1)) - row["bg_psnr"])
    assert ok >= SWAP_SUCCESSES, (ok, drops)
    assert np.mean(drops) <= SWAP_BG_DROP_DB and max(drops) <= SWAP_BG_DROP_MAX_DB, drops


SPECREF_BG_DB = 28.0    # issue 12's bar, mean over the 3 scenes (these 3: 31.6, 31.2, 32.3; bench, 20 scenes: 29.3;
                        # without the reference code's P2P control: 22.8, 23.8, 26.6)
SPECREF_COLOURS = 2     # of 3 scenes take the reference's colour (these 3: 2; bench: 0.70)


def test_specref_takes_the_reference_colour_and_keeps_the_background(bench, scenes):
    """A neutral target prompt ("a star on sand"): only the reference can give the colour."""
    ok, bg = 0, []
    for seed, s in scenes:
        img, masks = render(s)
        o = s.objects[0]
        ref = B.sample_scene(seed + B.REFERENCE_OFFSET, objects=1, held_out=False).with_object(
            0, shape=o.shape, color=B.target_colour(s), pattern="ringed")
        ref_img, ref_masks = render(ref)
        out, _ = bench.specref(seed, img, s.caption(), f"a {o.shape} on {s.background}", ref_img, ref_masks[0],
                               (o.shape,))
        row = B.judge(out, img, s.with_object(0, color=ref.objects[0].color, pattern="ringed"), masks[0])
        ok += row["colour_ok"]
        bg.append(row["bg_psnr"])
    assert ok >= SPECREF_COLOURS, (ok, bg)
    assert np.mean(bg) >= SPECREF_BG_DB, bg
