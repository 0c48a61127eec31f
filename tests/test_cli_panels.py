"""The command line's picture: panels scaled up by a whole factor to >= 256 px, names in a strip above
them that never covers an image pixel; the model itself runs at its own size."""
import numpy as np
import pytest
import torch
from PIL import Image

from customedit_core import panels
from customedit_core.panels import STRIP


def noise(w, h, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, factor", [((64, 64), 4), ((32, 32), 8), ((64, 32), 8), ((40, 24), 11),
                                          ((512, 512), 1), ((300, 200), 2), ((256, 1000), 1)])
def test_the_factor_is_the_least_whole_one_reaching_256(size, factor):
    assert panels.scale_factor(size) == factor
    assert min(size) * factor >= 256 and (factor == 1 or min(size) * (factor - 1) < 256)


def test_a_row_is_the_scaled_panels_under_a_white_strip():
    tiles = [noise(40, 24, k) for k in range(3)]
    long = "a name far too long for its panel: " * 3
    pic = panels.row(tiles, [long, "edit", "mask"])
    assert pic.size == (3 * 440, STRIP + 264)
    arr = np.asarray(pic)
    for k, tile in enumerate(tiles):
        expected = np.asarray(tile.resize((440, 264), Image.NEAREST))
        assert np.array_equal(arr[STRIP:, k * 440:(k + 1) * 440], expected)    # not a pixel written over
        strip = arr[:STRIP, k * 440:(k + 1) * 440]
        assert (strip == 255).mean() > 0.6 and (strip < 128).any()           # white, with dark text on it
    # a name is clipped at its own panel: the long first one does not run on into the second's strip,
    # which holds only "edit" at its left
    assert (arr[:STRIP, 440 - 40:440] < 128).any() and (arr[:STRIP, 440 + 60:880] == 255).all()


def test_without_labels_there_is_no_strip():
    tiles = [noise(32, 32, k) for k in range(2)]
    pic = panels.row(tiles)
    assert pic.size == (2 * 256, 256)
    assert np.array_equal(np.asarray(pic)[:, 256:], np.asarray(tiles[1].resize((256, 256), Image.NEAREST)))


def test_a_grid_has_a_strip_above_every_row():
    tiles = [noise(16, 16, k) for k in range(5)]
    pic = panels.grid(tiles, [str(k) for k in range(5)], columns=2)
    assert pic.size == (2 * 256, 3 * (STRIP + 256))
    arr = np.asarray(pic)
    y = 2 * (STRIP + 256) + STRIP                  # panel 4: third row, first column
    assert np.array_equal(arr[y:y + 256, :256], np.asarray(tiles[4].resize((256, 256), Image.NEAREST)))
    assert (arr[y:, 256:] == 255).all()            # the empty cell stays white


def test_panels_must_agree_in_size_and_labels_in_number():
    with pytest.raises(ValueError, match="differ in size"):
        panels.row([noise(16, 16, 0), noise(32, 16, 1)])
    with pytest.raises(ValueError, match="2 labels for 1 panels"):
        panels.row([noise(16, 16, 0)], ["a", "b"])


def test_a_mask_panel_keeps_its_cells_sharp():
    m = torch.zeros(1, 1, 2, 2)
    m[0, 0, 0, 1] = 1.0
    img = np.asarray(panels.mask_panel(m, (8, 4)))
    assert img.shape == (4, 8, 3)
    assert (img[:2, 4:] == 255).all() and (img[:2, :4] == 0).all() and (img[2:] == 0).all()


def test_the_cli_picture_holds_the_input_unchanged_and_no_labels_only_drops_the_strip(tmp_path, run_cli):
    src = tmp_path / "in.png"
    noise(32, 32, 7).save(src)                  # the tiny model's pixel multiple divides 32: no resize
    args = ["edit", "--image", str(src), "--size", "32", "--steps", "2", "--method", "direct",
            "--source", "a red circle on grass", "--target", "a blue circle on grass"]
    rc, err = run_cli([*args, "--out", str(tmp_path / "a.png")])
    assert rc == 0, err
    assert "resized" not in err and "32x32 px" in err        # the model ran at 32 px
    pic = np.asarray(Image.open(tmp_path / "a.png"))
    assert pic.shape == (STRIP + 256, 3 * 256, 3)
    assert np.array_equal(pic[STRIP:, :256], np.asarray(Image.open(src).resize((256, 256), Image.NEAREST)))
    rc, err = run_cli([*args, "--no-labels", "--out", str(tmp_path / "b.png")])
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), pic[STRIP:])
