"""The procedural world and its measurements: deterministic, captions true to the pictures, held-out
patterns never named, and the rule-based measurements recovering the ground truth."""
import numpy as np
import pytest

from toyworld import measure as Q
from toyworld.world import BACKGROUNDS, HELD_OUT, PATTERNS, SHAPES, render, sample_scene, vocabulary


def test_a_seed_gives_the_same_scene_image_and_masks():
    for seed in (0, 7, 123456):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b and a.caption() == b.caption()
        (ia, ma), (ib, mb) = render(a), render(b)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    images = [render(sample_scene(s))[0] for s in range(6)]
    assert all(not np.array_equal(images[0], im) for im in images[1:])


def test_scenes_vary_and_captions_use_the_vocabulary_only():
    scenes = [sample_scene(s) for s in range(400)]
    seen = {(o.shape, o.color, o.pattern) for s in scenes for o in s.objects}
    assert {o[0] for o in seen} == set(SHAPES) and {o[2] for o in seen} == set(PATTERNS + HELD_OUT)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2}
    vocab = set(vocabulary())
    for s in scenes:
        words = s.caption().split()
        assert set(words) <= vocab, s.caption()
        assert not set(words) & set(HELD_OUT)
        for o in s.objects:
            if o.pattern in HELD_OUT:
                assert o.phrase() == f"a {o.shape}"


def test_masks_are_exact_and_disjoint():
    for seed in range(40):
        s = sample_scene(seed)
        img, masks = render(s)
        assert masks.shape == (len(s.objects), 64, 64) and masks.dtype == bool
        assert not (masks.sum(0) > 1).any()
        for o, m in zip(s.objects, masks):
            assert m.sum() > 20
            inside = img[m]
            assert Q.colour_of(img, m) == o.color, (seed, o)
            assert inside.shape[0] == m.sum()


def test_measurements_recover_the_ground_truth():
    n = 0
    for seed in range(60):
        s = sample_scene(seed)
        img, masks = render(s)
        o = s.objects[0]
        assert Q.shape_of(masks[0])[0] == o.shape, (seed, o)
        assert Q.pattern_of(img, o, masks[0])[0] == o.pattern, (seed, o)
        assert Q.background_of(img, masks.any(0)) == s.background
        n += 1
    assert n == 60


def test_an_edit_of_the_scene_changes_only_that_object():
    s = sample_scene(3, objects=1, held_out=False)
    t = s.with_object(0, color="blue" if s.objects[0].color != "blue" else "red", pattern="striped")
    (a, ma), (b, mb) = render(s), render(t)
    assert np.array_equal(ma, mb)
    assert Q.psnr(a, b, ~Q.dilate(ma[0])) == float("inf") and Q.psnr(a, b, ma[0]) < 20
    assert Q.colour_of(b, mb[0]) == t.objects[0].color
    assert Q.pattern_of(b, t.objects[0], mb[0])[0] == "striped"


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_templates_fit_their_own_masks_at_any_size(shape):
    for cx, cy, size in ((0.5, 0.5, 0.25), (0.3, 0.6, 0.15), (0.7, 0.35, 0.2)):
        s = sample_scene(0, objects=1)
        s = s.with_object(0, shape=shape, cx=cx, cy=cy, size=size)
        _, m = render(s)
        assert Q.shape_of(m[0])[0] == shape


def test_a_fitted_geometry_recovers_a_rotation_free_pattern():
    s = sample_scene(5, objects=1).with_object(0, shape="circle", color="yellow", pattern="ringed", cx=0.4, cy=0.55,
                                              size=0.22)
    img, m = render(s)
    o = Q.fit_object(Q.generated_object(img, "yellow"), "circle", "yellow")
    assert abs(o.cx - 0.4) < 0.03 and abs(o.cy - 0.55) < 0.03 and abs(o.size - 0.22) < 0.03
    assert Q.pattern_of(img, o, m[0])[0] == "ringed"


def test_a_colours_region_leaves_out_other_colours_shades():
    """A red object with dark patches is not a yellow one (the dark red is within 0.2 of yellow's
    shade too), while a yellow object is yellow, dark rings included; the region of a colour is the
    one holding that colour, not the largest."""
    for pattern in ("checked", "ringed"):
        red = sample_scene(5, objects=1).with_object(0, shape="circle", color="red", pattern=pattern, size=0.25)
        img, m = render(red)
        assert Q.generated_object(img, "yellow").sum() == 0
    for pattern in ("plain", "ringed"):
        img, m = render(red.with_object(0, color="yellow", pattern=pattern))
        assert Q.iou(Q.generated_object(img, "yellow"), m[0]) > 0.9
    mask = np.zeros((64, 64), bool)
    mask[:, :40] = True                         # the larger region holds none of the weight
    mask[:, 50:] = True
    weight = np.zeros((64, 64), bool)
    weight[0, 60] = True
    assert Q.largest_component(mask).sum() == 64 * 40
    assert Q.largest_component(mask, weight).sum() == 64 * 14
    assert not Q.largest_component(mask, np.zeros_like(mask)).any()
