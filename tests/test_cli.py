"""Command line, end to end on tiny models (CPU, offline): PNG sizes, panels, errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from customedit_core.cli import main
from customedit_core.panels import STRIP
from testmodels.ldm_layout import tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "4", "--inner-steps", "2"]


def picture(n, w, h, rows=1, labels=True):
    """The size of n panels of w x h px in `rows` rows: each scaled by the whole factor that brings its
    shorter side to 256 px or more, a STRIP px label strip above each row."""
    f = math.ceil(256 / min(w, h))
    return (-(-n // rows) * w * f, rows * ((STRIP if labels else 0) + h * f))


def test_edit_on_the_drawn_scene(tmp_path, run_cli):
    out = tmp_path / "out.png"
    rc, err = run_cli(["edit", "--size", "32", *FAST, "--out", str(out)])
    assert rc == 0, err
    assert Image.open(out).size == picture(3, 32, 32) == (768, 256 + STRIP)     # source | reconstruction | edit
    assert "using the drawn scene (a red circle on green grass)" in err


def test_a_model_folder_ships_its_own_demo_scene(tiny_folder, tmp_path, run_cli):
    folder = tmp_path / "with-demo"
    shutil.copytree(tiny_folder, folder)
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "demo.png")
    (folder / "demo.json").write_text(json.dumps({"source": "a blue square on sand", "target": "a red square on sand"}))
    out = tmp_path / "out.png"
    rc, err = run_cli(["edit", "--model", str(folder), "--size", "32", *FAST, "--method", "direct", "--out", str(out)])
    assert rc == 0, err
    assert Image.open(out).size == picture(3, 32, 32)
    assert "demo.png resized from 64x64 to 32x32" in err and "source prompt 'a blue square on sand'" in err
    assert "editing the drawn scene to 'a red square on sand'" in err
    # one line of what really ran, every default resolved
    assert (f"edit: model {folder} (diffusers), 32x32 px, method 'direct', steps 4, guidance 7.5, "
            "source 'a blue square on sand', target 'a red square on sand', mode 'refine'") in err


def test_edit_of_an_image_resizes_it_and_shows_the_mask(tmp_path, run_cli):
    src = tmp_path / "in.png"
    Image.new("RGB", (70, 45), (200, 30, 30)).save(src)
    out = tmp_path / "out.png"
    rc, err = run_cli(["edit", "--image", str(src), "--size", "64", *FAST, "--method", "negative_prompt",
                       "--source", "a red circle on grass", "--target", "a red circle on sand",
                       "--target", "a blue circle on grass", "--mode", "replace",
                       "--blend-words", "circle", "--blend-both", "--reweight", "circle:2", "--show-mask",
                       "--out", str(out)])
    assert rc == 0, err
    assert "resized from 70x45 to 64x32" in err and "multiples of 32 px" in err
    # source | reconstruction | edit 1 | edit 2 | mask 1 | mask 2
    assert Image.open(out).size == picture(6, 64, 32) == (6 * 512, 256 + STRIP)


def test_maps_grid(tmp_path, run_cli):
    out = tmp_path / "maps.png"
    rc, err = run_cli(["maps", "--size", "32", *FAST, "--method", "direct", "--out", str(out)])
    assert rc == 0, err
    # the image, then one map per word of "a red circle on green grass"
    assert Image.open(out).size == picture(7, 32, 32)
    out2 = tmp_path / "maps2.png"
    rc, err = run_cli(["maps", "--size", "32", *FAST, "--method", "ddim", "--target", "a red circle on yellow grass",
                       "--columns", "4", "--out", str(out2)])
    assert rc == 0, err
    assert Image.open(out2).size == picture(7, 32, 32, rows=2)


def test_single_file_checkpoint_through_the_cli(tmp_path, capsys, run_cli):
    path, _ = tiny_checkpoint(str(tmp_path), "sd1")
    out = tmp_path / "out.png"
    rc, err = run_cli(["edit", "--model", path, "--size", "16", *FAST, "--method", "direct",
                       "--source", "a red circle on green grass", "--target", "a red circle on green sand",
                       "--out", str(out)])
    assert rc == 0, err
    assert Image.open(out).size == picture(3, 16, 16) == (3 * 256, 256 + STRIP)
    rc = main(["info", "--model", path])
    info = capsys.readouterr().out
    assert rc == 0 and "family: sd1" in info and "pixel multiple: 4" in info


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png", "--source", "a cat", "--target", "a dog"], "image: 'missing.png' does not exist"),
    (["--mode", "replace", "--target", "a red circle on very green grass"], "same number of words"),
    (["--reweight", "red=2"], "reweight: entry 'red=2' is not 'word:weight'"),
    (["--blend-words", "teapot"], "'teapot' does not occur"),
    (["--blend-both"], "blend_both: needs --blend-words"),
    (["--method", "null_text", "--guidance", "1"], "guidance"),
    (["--model", "model.ckpt"], "pickle"),
])
def test_bad_input_gives_a_clear_error(tmp_path, args, message, run_cli):
    if "model.ckpt" in args:
        import torch
        torch.save({}, tmp_path / "model.ckpt")
        args = ["--model", str(tmp_path / "model.ckpt")]
    out = str(tmp_path / "out.png")
    rc, err = run_cli(["edit", "--size", "32", *FAST, *args, "--out", out])
    assert rc == 2
    assert message in err, err
    assert not os.path.exists(out)


def test_out_must_be_a_png(tmp_path, run_cli):
    rc, err = run_cli(["edit", "--out", str(tmp_path / "x.jpg")])
    assert rc == 2 and "out: expected a .png" in err


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "o.png"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "customedit_core", "edit", "--size", "32", "--steps", "3",
                        "--method", "direct", "--out", str(out)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == picture(3, 32, 32)
    assert "toy-world" in r.stderr and "source prompt 'a red circle on grass'" in r.stderr   # its demo.json


def test_out_folder_is_made_before_any_work(tmp_path, run_cli):
    out = tmp_path / "new" / "deeper" / "o.png"
    rc, err = run_cli(["edit", "--size", "32", *FAST, "--method", "direct", "--out", str(out)])
    assert rc == 0, err
    assert out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_diffedit_and_specref_commands(tmp_path, run_cli):
    out = tmp_path / "d.png"
    rc, err = run_cli(["diffedit", "--size", "32", "--steps", "4", "--samples", "2", "--out", str(out)])
    assert rc == 0, err
    assert Image.open(out).size == picture(3, 32, 32) and "mask from 2 noise samples" in err     # source | mask | edit
    mask = tmp_path / "mask.png"
    half = Image.new("L", (32, 32), 0)
    half.paste(255, (0, 0, 16, 32))
    half.save(mask)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (48, 48), (20, 200, 40)).save(ref)
    out = tmp_path / "s.png"
    rc, err = run_cli(["specref", "--size", "32", "--steps", "4", "--reference", str(ref), "--reference-mask",
                       str(mask), "--mask", str(mask), "--out", str(out)])
    assert rc == 0, err
    assert Image.open(out).size == picture(4, 32, 32)            # source | reference | edit | M_t
    assert "reference resized from 48x48 to 32x32" in err and "reference K/V:" in err
    rc, err = run_cli(["specref", "--size", "32", "--steps", "4", "--edited-words", "zebra", "--out", str(out)])
    assert rc == 2 and "edited_words: 'zebra' does not occur" in err
    rc, err = run_cli(["diffedit", "--image", str(ref), "--source", "a green square", "--out", str(out)])
    assert rc == 2 and "target: give the target prompt" in err
