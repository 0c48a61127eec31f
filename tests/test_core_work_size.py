"""The work-size estimate and check (customedit_core.work_size): pure, no model, no ComfyUI."""
import logging

import pytest

from customedit_core import work_size as W
from customedit_core.errors import InputError


def test_unit_cost_is_one_at_512px_and_grows_faster_than_the_pixels():
    assert W.unit_cost((64, 64)) == 1.0
    assert W.unit_cost((128, 128)) == 10.0          # 4x the pixels, the attention part 16x
    assert W.unit_cost((256, 256)) == 136.0
    assert W.unit_cost((0, 0)) == 0.0
    assert W.unit_cost((64, 128)) == W.unit_cost((128, 64))


def test_evaluations_follow_what_each_method_calls():
    assert W.evaluations("p2p", 50) == 200                     # source + target rows, with and without prompt
    assert W.evaluations("attention_maps", 50, prompts=1) == 100
    assert W.evaluations("invert_direct", 50) == 50
    assert W.evaluations("invert_ddim", 50) == W.evaluations("invert_negative_prompt", 50) == 150
    assert W.evaluations("invert_null_text", 50, inner_steps=10) == 50 * (4 + 30)
    assert W.evaluations("invert_null_text", 50, inner_steps=1) < W.evaluations("invert_null_text", 50)
    assert W.evaluations("diffedit_mask", 999, samples=10) == 20          # steps are not used
    assert W.evaluations("diffedit_sample", 50, encoding_ratio=0.5) == 25 * 3
    assert W.evaluations("dci", 10, batch=2, integrate_fraction=0.3) == 2 * (3 * 4 + 7 * 2)
    assert W.evaluations("dci", 10, integrate_fraction=0.0) == 20
    assert W.evaluations("train", 250, batch=2, prior=True, class_images=16) == 250 * 2 * 2 * 3 + 16 * 25 * 2
    assert W.evaluations("train", 250, batch=2, prior=False, class_images=16) == 250 * 2 * 3   # no class images
    with pytest.raises(ValueError, match="unknown method"):
        W.evaluations("sdedit", 10)


def test_estimate_is_evaluations_times_the_unit():
    e = W.estimate("p2p", (128, 96), 50)
    assert e.latent_hw == (128, 96) and e.evaluations == 200
    assert e.units == pytest.approx(200 * W.unit_cost((128, 96)))
    text = e.describe(8)
    assert "768x1024 px" in text and "96x128 latent" in text and "200 UNet evaluations" in text
    # the documented scale: the defaults at 512 px stay below the warning
    for method, kw in (("p2p", {}), ("invert_null_text", {}), ("train", dict(batch=2, prior=True, class_images=16))):
        assert W.estimate(method, (64, 64), 250 if method == "train" else 50, **kw).units < W.WARN_UNITS
    with pytest.raises(ValueError):
        W.estimate("p2p", (64.5, 64), 50)


def test_check_refuses_above_the_side_limit_unless_allowed(monkeypatch, caplog):
    monkeypatch.delenv(W.ALLOW_ENV, raising=False)
    big = (W.MAX_LATENT_SIDE + 8, 64)
    with pytest.raises(InputError) as info:
        W.check_work_size("p2p", big, 50, input_name="inversion")
    err = info.value
    assert err.input_name == "inversion"
    assert "512x2112 px" in str(err) and f"{W.MAX_LATENT_SIDE * 8} px" in str(err) and W.ALLOW_ENV in str(err)
    with pytest.raises(InputError, match="--allow-large"):
        W.check_work_size("p2p", big, 50, allow_hint="pass --allow-large")
    # the limit itself is allowed (with a warning: it is a long run); allow / the variable lift it
    with caplog.at_level(logging.WARNING, logger="customedit"):
        W.check_work_size("p2p", (W.MAX_LATENT_SIDE, W.MAX_LATENT_SIDE), 50)
    assert "a long run" in caplog.text and "2048x2048 px" in caplog.text
    assert W.check_work_size("p2p", big, 50, allow=True).latent_hw == big
    monkeypatch.setenv(W.ALLOW_ENV, "1")
    assert W.check_work_size("p2p", big, 50).latent_hw == big
    with pytest.raises(InputError):
        W.check_work_size("p2p", big, 50, allow=False)          # an explicit no wins over the variable
    monkeypatch.setenv(W.ALLOW_ENV, "0")
    with pytest.raises(InputError):
        W.check_work_size("p2p", big, 50)


def test_check_warns_only_above_the_threshold(monkeypatch, caplog):
    monkeypatch.delenv(W.ALLOW_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="customedit"):
        quiet = W.check_work_size("invert_null_text", (64, 64), 50)
        assert caplog.text == ""
        loud = W.check_work_size("invert_null_text", (128, 128), 50)           # 1024 px: ~17,000 units
    assert quiet.units < W.WARN_UNITS < loud.units
    assert "invert_null_text at 1024x1024 px" in caplog.text and "17,000 times" in caplog.text
