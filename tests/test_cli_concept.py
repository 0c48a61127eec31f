"""Concepts from the command line and the Python API, end to end on the tiny model (CPU, offline)."""
import numpy as np
import pytest
import torch
from PIL import Image

from customedit_core import api
from customedit_core import concept as C
from customedit_core.panels import STRIP
from testmodels.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    paths = []
    for i in range(3):
        a = (np.random.RandomState(i).rand(64, 64, 3) * 60).astype("uint8")
        a[10 + 5 * i:40 + 5 * i, 12:42] = [230, 40, 40]
        paths.append(str(d / f"ref{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return paths


def test_train_concept_then_edit_with_it(refs, tmp_path, run_cli):
    out = tmp_path / "dog.safetensors"
    rc, err = run_cli(["train-concept", "--images", *refs, "--class-word", "dog", "--size", "64", "--steps", "3",
                       "--num-class-images", "1", "--export", "--loss-plot", str(tmp_path / "loss.png"),
                       "--out", str(out)])
    assert rc == 0, err
    c = C.load(str(out))
    assert c.tokens == ("<new1>",) and c.class_words == ("dog",) and c.settings["steps"] == 3
    assert (tmp_path / "dog.lora.safetensors").is_file() and (tmp_path / "dog.embedding.safetensors").is_file()
    assert Image.open(tmp_path / "loss.png").size == (512, 256)
    edit = tmp_path / "edit.png"
    rc, err = run_cli(["edit", "--concept", str(out), "--size", "32", "--steps", "3", "--method", "negative_prompt",
                       "--source", "a photo of a dog", "--target", "a photo of a <new1> dog", "--blend-words", "dog",
                       "--out", str(edit)])
    assert rc == 0, err
    assert "loaded concept dog" in err and Image.open(edit).size == (3 * 256, 256 + STRIP)
    # without the concept the word is unknown to the model: it is split into ordinary pieces, and
    # the edit runs, but the same prompt now means something else; with a taken token it is an error
    rc, err = run_cli(["edit", "--concept", str(out), "--concept", str(out), "--size", "32", "--steps", "2",
                       "--source", "a photo of a dog", "--target", "a photo of a <new1> dog", "--out", str(edit)])
    assert rc == 2 and "already taken" in err


def test_concept_command_errors(refs, tmp_path, run_cli):
    rc, err = run_cli(["train-concept", "--images", *refs, "--class-word", "dog", "--out", str(tmp_path / "x.ckpt")])
    assert rc == 2 and "out:" in err
    rc, err = run_cli(["train-concept", "--images", str(tmp_path / "missing.png"), "--class-word", "dog",
                       "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "does not exist" in err
    rc, err = run_cli(["train-concept", "--images", *refs, "--class-word", "dog", "--token", "dog", "--size", "64",
                       "--steps", "1", "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "token:" in err and not (tmp_path / "x.safetensors").exists()
    rc, err = run_cli(["import-concept", "--weights", str(tmp_path / "w.bin"), "--embedding", "<new1>=e.safetensors",
                       "--class-word", "<new1>=dog", "--out", str(tmp_path / "y.safetensors")])
    assert rc == 2 and "weights:" in err


def test_python_api_train_and_load(refs):
    pipe = tiny_pipeline(log=lambda s: None)
    try:
        images = [Image.open(p) for p in refs]
        res = pipe.train_concept(images, "dog", steps=2, num_class_images=1, class_steps=2)
        assert len(res.losses) == 2 and pipe.backend.tokenizer.added == {}
        with pytest.raises(api.InputError) as e:
            pipe.train_concept(images[:1] + [images[1].resize((32, 32))], "dog", steps=1)
        assert e.value.input_name == "images"
        assert pipe.load_concept(res.concept) == []
        assert "<new1>" in pipe.backend.tokenizer.added
        inv = pipe.invert(images[0], "a photo of a dog", steps=2, method="direct")
        out = pipe.edit(inv, "a photo of a <new1> dog")
        assert torch.isfinite(out.edited).all()
    finally:
        pipe.close()


def test_dci_from_the_command_line_and_the_api(refs, tmp_path, run_cli):
    pipe = tiny_pipeline(log=lambda s: None)
    try:
        res = pipe.train_concept([Image.open(p) for p in refs], "dog", steps=1, num_class_images=1, class_steps=2)
        path = C.save(res.concept, str(tmp_path / "dog.safetensors"))
        pipe.load_concept(res.concept)
        plain = pipe.dci("a photo of a <new1> dog on grass", seed=3, size=32, steps=3, settings=api_dci(0.0))
        again = pipe.dci("a photo of a <new1> dog on grass", seed=3, size=32, steps=3)
        assert plain.latents.shape == (1, 4, 4, 4) and again.integrated_steps == 1
        assert again.auxiliary_prompt == "a photo of a dog on grass"
        assert not torch.equal(plain.latents, again.latents)
    finally:
        pipe.close()
    out = tmp_path / "dci.png"
    rc, err = run_cli(["dci", "--concept", path, "--prompt", "a photo of a <new1> dog on grass", "--size", "32",
                       "--steps", "3", "--out", str(out)])
    assert rc == 0, err
    assert Image.open(out).size == (3 * 256, 256 + STRIP) and "auxiliary prompt 'a photo of a dog on grass'" in err
    rc, err = run_cli(["dci", "--concept", path, "--prompt", "a photo of a dog on grass", "--size", "32",
                       "--steps", "3", "--out", str(out)])
    assert rc == 2 and "prompt: contains none of the loaded concept words" in err


def api_dci(fraction):
    from customedit_core.dci import DCISettings
    return DCISettings(fraction)
