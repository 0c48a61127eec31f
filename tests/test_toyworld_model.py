"""The shipped toy-world model: it loads offline as the default, draws what trained captions ask for,
edits the bundled scene from the command line, and the quality benchmark runs on a small subset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from customedit_core import api, panels
from customedit_core.dci import DCISettings
from toyworld import measure as Q
from toyworld.demo import write_demo
from toyworld.model import FOLDER
from toyworld.world import DEMO_SCENE, Obj, Scene, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one-object captions whose colour stands out from the background
CAPTIONS = [Scene((Obj(shape, colour, "plain", 0.5, 0.5, 0.25),), bg, 0) for shape, colour, bg in
            (("circle", "red", "grass"), ("square", "yellow", "water"), ("triangle", "blue", "snow"),
             ("star", "red", "sand"), ("circle", "white", "grass"), ("square", "red", "sky"),
             ("triangle", "yellow", "grass"), ("circle", "blue", "sand"))]


@pytest.fixture(scope="module")
def pipe():
    p = api.load(None, log=lambda m: None)
    yield p
    p.close()


def test_the_default_is_the_shipped_model_and_it_is_small():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FOLDER) for f in fs)
    assert size <= 25 * 2 ** 20, size
    msgs = []
    p = api.load(None, log=msgs.append)
    assert p.family == "toyworld" and p.default_size == 64 and "toy-world" in msgs[0]
    assert os.path.samefile(api.TOYWORLD_FOLDER, FOLDER)      # the core's data path is the trainer's output
    assert not any(f.endswith((".bin", ".ckpt", ".pt", ".pth")) for _, _, fs in os.walk(FOLDER) for f in fs)
    info = json.load(open(os.path.join(FOLDER, "training.json")))
    assert info["unet_steps"] > 0 and info["vae_steps"] > 0


def test_the_shipped_demo_files_are_what_toyworld_demo_writes(tmp_path):
    png, js = write_demo(str(tmp_path))
    assert json.load(open(js)) == json.load(open(os.path.join(FOLDER, "demo.json")))
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(os.path.join(FOLDER, "demo.png"))))


def test_generation_gets_the_colour_of_trained_captions(pipe):
    hits = 0
    for k, scene in enumerate(CAPTIONS):
        res = pipe.dci(scene.caption(), seed=k, size=64, steps=25, settings=DCISettings(0.0))
        img = np.asarray(pipe.decode(res.latents)[0], dtype=np.float32) / 255.0
        hits += Q.check_generation(img, scene)["colour_ok"]
    assert hits >= 6, f"{hits} of {len(CAPTIONS)} generated objects have the caption's colour"


def test_the_first_command_of_the_readme_edits_the_bundled_scene(tmp_path):
    out = tmp_path / "edit.png"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "customedit_core", "edit", "--out", str(out)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    picture = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0
    k = panels.scale_factor((64, 64))                 # edited at the model's 64 px, shown upscaled
    assert picture.shape == (panels.STRIP + 64 * k, 3 * 64 * k, 3)
    native = picture[panels.STRIP::k, ::k]            # the labels sit in the strip above, not on the image
    src, rec, edit = native[:, :64], native[:, 64:128], native[:, 128:]
    _, masks = render(DEMO_SCENE)
    assert Q.colour_of(src, masks[0]) == "red" and Q.colour_of(edit, masks[0]) == "blue"
    assert Q.psnr(rec, src) > 18


def test_quality_benchmark_runs_on_a_subset(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import quality

    report = quality.run(quality.main_args(["--model", FOLDER, "--scenes", "1", "--steps", "6", "--quick",
                                            "--concept-steps", "4", "--dci-seeds", "2", "--gen-samples", "2", "--out", str(tmp_path)]),
                         log=lambda m: None)
    for name in ("quality.json", "quality.md", "grid.png", "tradeoff.png"):
        assert (tmp_path / name).is_file()
    assert set(report["reconstruction_psnr"]) == {"negative_prompt", "direct"}
    assert report["reconstruction_psnr"]["direct"] > 15
    assert 0.0 <= report["diffedit_mask_iou"] <= report["diffedit_mask_ceiling"] + 1e-9   # a grid mask can't beat it
    assert {"kv_token"} == set(report["concepts"]) and {"plain", "DCI", "DCI lambda -1"} == set(report["dci"])
    assert torch.isfinite(torch.tensor(report["vae_psnr"]))


def test_the_benchs_concept_backends_keep_the_models_settings(pipe):
    """The bench's concept pipelines sample at the size asked: a backend built without the toy VAE's
    scale (4 px a latent cell, not SD's 8) drew 32 px pictures for a 64 px request."""
    import copy

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import quality

    b = quality.sibling_backend(pipe.backend)
    try:
        for k in ("vae_scale", "latent_multiple", "prediction_type", "dtype", "device"):
            assert getattr(b, k) == getattr(pipe.backend, k), k
        assert b.vae_scale == 4 and torch.equal(b.alphas_cumprod, pipe.backend.alphas_cumprod)
        cp = copy.copy(pipe)
        cp.backend = b
        out = quality.to_np(cp.decode(cp.dci("a red circle on grass", size=64, steps=2).latents)[0])
        assert out.shape == (64, 64, 3)
    finally:
        b.close()


def test_the_grid_ceiling_is_the_best_a_latent_grid_mask_can_do():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import quality

    mask = np.zeros((64, 64), bool)
    mask[8:24, 4:16] = True                                  # on 4 px cells exactly: a grid mask covers it
    assert quality.grid_ceiling(mask, 16) == 1.0
    mask[:] = False
    mask[0, 0] = True                                        # one pixel: the best is its cell, 1/16
    assert quality.grid_ceiling(mask, 16) == 1 / 16
    mask[:] = False
    mask[2:6, 2:6] = True          # a quarter of each of 4 cells: one cell gives 4/28, all four 16/64
    assert quality.grid_ceiling(mask, 16) == 0.25
