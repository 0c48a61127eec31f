"""The command line refuses bad input and unwritable outputs before any model is loaded, names the
file, and closes the model however a command ends."""
import os

import pytest

from customedit_core import api
from testmodels.ldm_layout import tiny_checkpoint

FAST = ["--size", "32", "--steps", "2", "--method", "direct"]


class Loaded(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """api.load raises: a check that passes reaches it, so a refusal must come before any work."""
    def load(*a, **k):
        raise Loaded("the model was loaded")
    monkeypatch.setattr(api, "load", load)


def test_a_truncated_checkpoint_is_named_as_such(tmp_path, run_cli):
    path, _ = tiny_checkpoint(str(tmp_path), "sd1")
    data = open(path, "rb").read()
    for cut, name in ((len(data) // 2, "half.safetensors"), (100, "head.safetensors")):
        short = tmp_path / name
        short.write_bytes(data[:cut])
        rc, err = run_cli(["info", "--model", str(short)])
        assert rc == 2, err
        assert f"error: model: {str(short)!r} is truncated or corrupt" in err
        assert "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["edit"], ["maps"], ["diffedit"], ["specref"], ["dci", "--prompt", "a red circle"],
])
def test_an_out_that_is_a_folder_is_refused_before_the_model_loads(command, tmp_path, run_cli, no_model):
    folder = tmp_path / "out.png"
    folder.mkdir()
    rc, err = run_cli([*command, "--size", "32", "--out", str(folder)])
    assert rc == 2 and f"out: {str(folder)!r} is a folder" in err


def test_an_out_under_a_file_is_refused_before_the_model_loads(tmp_path, run_cli, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = run_cli(["edit", *FAST, "--out", str(blocker / "sub" / "o.png")])
    assert rc == 2 and f"out: cannot write {str(blocker / 'sub' / 'o.png')!r}: {str(blocker)!r} is a file" in err


def test_a_missing_out_folder_is_made_before_the_model_loads(tmp_path, run_cli, no_model):
    out = tmp_path / "new" / "deeper" / "o.png"
    with pytest.raises(Loaded):
        run_cli(["edit", *FAST, "--out", str(out)])
    assert out.parent.is_dir() and not out.exists()


@pytest.fixture
def refs(tmp_path):
    from PIL import Image

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"r{i}.png"))
        Image.new("RGB", (32, 32), (200, 20 * i, 20)).save(paths[-1])
    return paths


def test_train_concept_outputs_are_checked_before_training(refs, tmp_path, run_cli, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["train-concept", "--images", *refs, "--class-word", "dog", "--steps", "1"]
    rc, err = run_cli([*base, "--loss-plot", str(blocker / "loss.png"), "--out", str(tmp_path / "c.safetensors")])
    assert rc == 2 and "loss_plot: cannot write" in err and "is a file" in err
    rc, err = run_cli([*base, "--loss-plot", str(tmp_path / "loss.jpg"), "--out", str(tmp_path / "c.safetensors")])
    assert rc == 2 and "loss_plot: expected a .png file name" in err
    (tmp_path / "d.safetensors").mkdir()
    rc, err = run_cli([*base, "--out", str(tmp_path / "d.safetensors")])
    assert rc == 2 and "is a folder" in err
    (tmp_path / "e.lora.safetensors").mkdir()
    rc, err = run_cli([*base, "--export", "--out", str(tmp_path / "e.safetensors")])
    assert rc == 2 and "e.lora.safetensors' is a folder" in err
    with pytest.raises(Loaded):           # a missing plot folder is made, like --out's
        run_cli([*base, "--loss-plot", str(tmp_path / "plots" / "loss.png"), "--out", str(tmp_path / "c.safetensors")])
    assert (tmp_path / "plots").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--image", "{img}"], "source: describe --image with --source"),
    (["--image", "{img}", "--source", "a red square"], "target: give the target prompt with --target"),
    (["--concept", "{missing}"], "concept: '{missing}' does not exist"),
    (["--steps", "0"], "steps: expected a positive number, got 0"),
    (["--size", "-8"], "size: expected a positive number, got -8"),
])
def test_edit_arguments_are_checked_before_the_model_loads(args, message, tmp_path, run_cli, no_model):
    from PIL import Image

    img, missing = str(tmp_path / "in.png"), str(tmp_path / "missing.safetensors")
    Image.new("RGB", (32, 32)).save(img)
    fill = lambda s: s.format(img=img, missing=missing)     # noqa: E731
    rc, err = run_cli(["edit", "--out", str(tmp_path / "o.png"), *map(fill, args)])
    assert rc == 2 and fill(message) in err, err


def test_specref_and_dci_combinations_are_checked_before_the_model_loads(tmp_path, run_cli, no_model):
    from PIL import Image

    img = str(tmp_path / "in.png")
    Image.new("RGB", (32, 32)).save(img)
    out = str(tmp_path / "o.png")
    rc, err = run_cli(["specref", "--image", img, "--source", "a cat", "--target", "a dog", "--out", out])
    assert rc == 2 and "edited_words: name the target word(s)" in err
    for flag, value in (("--cross-replace", "1.5"), ("--self-replace", "nan")):
        rc, err = run_cli(["specref", "--image", img, "--source", "a cat", "--target", "a dog", "--edited-words",
                           "dog", flag, value, "--out", out])
        name = flag[2:].replace("-", "_")
        assert rc == 2 and f"{name}: expected a fraction of the steps in [0, 1], got {value}" in err, err
    rc, err = run_cli(["dci", "--prompt", "a <new1> dog", "--image", img, "--source", "a dog", "--negative", "blur",
                       "--out", out])
    assert rc == 2 and "negative: an inversion brings its own" in err
    rc, err = run_cli(["maps", "--target", "a", "--target", "b", "--out", out])
    assert rc == 2 and "target: maps are drawn for one target prompt" in err


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e9"])
def test_reweight_refuses_non_finite_and_huge_weights(weight, tmp_path, run_cli):
    rc, err = run_cli(["edit", *FAST, "--reweight", f"circle:{weight}", "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "reweight: weight of" in err and "finite number in [-100, 100]" in err


def test_the_model_is_closed_when_a_command_fails(tmp_path, run_cli, monkeypatch):
    closed = []
    close = api.Pipeline.close
    monkeypatch.setattr(api.Pipeline, "close", lambda self: (closed.append(True), close(self))[1])
    rc, err = run_cli(["edit", *FAST, "--blend-words", "teapot", "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "'teapot' does not occur" in err      # found after the model loaded
    assert closed == [True]
    assert not os.path.exists(tmp_path / "o.png")


def test_dci_without_a_concept_samples_once_and_says_so_once(tmp_path, run_cli):
    from PIL import Image

    from customedit_core.panels import STRIP

    out = tmp_path / "dci.png"
    rc, err = run_cli(["dci", "--prompt", "a red circle on green grass", "--size", "32", "--steps", "2",
                       "--out", str(out)])
    assert rc == 0, err
    assert err.count("no concept is loaded") == 1
    assert Image.open(out).size == (256, STRIP + 256)           # the plain sample alone
    assert "dci: model" in err and "32x32 px" in err and "steps 2" in err


def test_an_image_over_2048_px_is_refused_before_any_model_call(tmp_path, run_cli, monkeypatch):
    from PIL import Image

    def invert(*a, **k):
        raise AssertionError("the inversion started")
    monkeypatch.setattr(api.Pipeline, "invert", invert)
    big = tmp_path / "big.png"
    Image.new("RGB", (2112, 2112), "white").save(big)
    args = ["edit", "--image", str(big), "--size", "2112", "--steps", "2", "--method", "ddim",
            "--source", "a circle", "--target", "a red circle", "--out", str(tmp_path / "o.png")]
    rc, err = run_cli(args)
    assert rc == 2 and "image: is" in err and "--allow-large" in err, err
