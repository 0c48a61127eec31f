"""Python API of SpecRef and DiffEdit on the tiny models' pipeline: images and masks in, latents out."""
import numpy as np
import pytest
import torch
from PIL import Image

from customedit_core import api
from customedit_core.errors import InputError
from testmodels.tiny import tiny_pipeline

SRC = "a red circle on green grass"
TGT = "a yellow circle on green grass"


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(device="cpu", log=lambda m: None)
    yield p
    p.close()


def left_half_image(size=128):
    a = np.zeros((size, size), "uint8")
    a[:, : size // 2] = 255
    return Image.fromarray(a)


def test_diffedit_through_the_api(pipe):
    scene = api.demo_scene(128)
    found = pipe.diffedit_mask(scene, SRC, TGT, samples=2)
    assert found.mask.shape == (1, 1, 16, 16)
    res = pipe.diffedit(scene, left_half_image(), TGT, steps=4, encoding_ratio=0.5)
    z0 = pipe.latent(scene)
    assert torch.equal(res.edited[..., 8:], z0[..., 8:]) and not torch.equal(res.edited, z0)
    # a grid mask is taken as it is, an image-size array converted
    grid = pipe.diffedit(z0, torch.zeros(1, 1, 16, 16), TGT, steps=4)
    assert torch.equal(grid.edited, z0)
    arr = pipe.mask(np.asarray(left_half_image()), z0)
    assert torch.equal(arr, pipe.mask(left_half_image(), z0)) and arr[..., :8].eq(1).all()
    with pytest.raises(InputError, match="^mask: is 128x64 px"):
        pipe.diffedit(scene, left_half_image().crop((0, 0, 128, 64)), TGT, steps=4)


def test_specref_through_the_api(pipe):
    msgs = []
    pipe.log = msgs.append
    src = pipe.invert(api.demo_scene(128), SRC, steps=4, method="direct")
    ref = pipe.extract_reference(api.demo_scene(160).transpose(Image.FLIP_LEFT_RIGHT), source=src, steps=4,
                                 mask=left_half_image(128), step_start=0.0)
    assert any("reference resized from 160x160 to the source's 128x128" in m for m in msgs)
    assert ref.object_mask is not None and ref.latent_hw == (16, 16)
    res = pipe.specref(src, ref, TGT, mask=left_half_image(), step_start=0.0, blend_start=0.0)
    assert torch.equal(res.edited[..., 8:], src.source[..., 8:])
    words = pipe.specref(src, ref, TGT, ("yellow", "circle"), source_words=("red",), step_start=0.0)
    assert torch.isfinite(words.edited).all() and words.mask.shape == (1, 1, 16, 16)
