"""The toy-world trainer: resumable runs, caption labels, the cross-attention supervision."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from toyworld import attn_supervision as S
from toyworld import captions as C
from toyworld import train
from toyworld.model import build_tokenizer
from toyworld.world import Obj, Scene

RUN = "--arch test --size 32 --scenes 12 --vae-steps 2 --vae-batch 2 --unet-steps 5 --batch 3 --checkpoint-every 2"


def _weights(folder):
    return {**{f"unet.{k}": v for k, v in load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors").items()},
            **{f"te.{k}": v for k, v in load_file(f"{folder}/text_encoder/model.safetensors").items()}}


def test_a_run_split_in_two_equals_one_run(tmp_path):
    train.main(f"{RUN} --checkpoint {tmp_path}/ck1 --out {tmp_path}/one".split())
    train.main(f"{RUN} --checkpoint {tmp_path}/ck2 --stop-after 3 --out {tmp_path}/two".split())
    assert not (tmp_path / "two").exists()              # nothing is written before the last step
    train.main(f"{RUN} --checkpoint {tmp_path}/ck2 --out {tmp_path}/two".split())
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    # ... and the run did train: the weights moved from the seeded initialisation
    with pytest.raises(SystemExit, match="other settings"):      # a checkpoint only resumes its own run
        train.main(f"{RUN} --lr 1e-3 --checkpoint {tmp_path}/ck2 --out {tmp_path}/three".split())


def test_resumed_run_draws_fresh_batches(tmp_path):
    """The generator's state travels with the checkpoint: steps after a resume are not a replay."""
    train.main(f"{RUN} --checkpoint {tmp_path}/ck --stop-after 2 --out {tmp_path}/x".split())
    g = torch.Generator()
    from toyworld import checkpoint as K
    tensors, meta = K.load(f"{tmp_path}/ck")
    assert meta["step"] == 2 and len(meta["losses"]) == 2
    g.set_state(tensors["generator"])
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    assert {k.split(".")[0] for k in tensors} >= {"unet", "te", "vae", "opt", "generator"}


def test_caption_labels_name_each_objects_words(tmp_path):
    tok = build_tokenizer(str(tmp_path / "tok"))
    s = Scene((Obj("circle", "red", "striped", .3, .3, .15), Obj("star", "blue", "plain", .7, .7, .15)), "grass", 0)
    rng = np.random.default_rng(0)
    while True:                                        # the plain caption (no template) of this scene
        words = C.words(s, rng)
        if words[0][0] == "a":
            break
    assert " ".join(w for w, _ in words) == s.caption()
    ids, labels = C.token_labels(tok, words)
    named = {tok.convert_ids_to_tokens(i).replace("</w>", ""): lab for i, lab in zip(ids, labels) if lab}
    assert named == {"red": 1, "striped": 1, "circle": 1, "blue": 2, "star": 2, "grass": C.BACKGROUND}
    assert len(ids) == len(labels) == 77


def test_view_prefixes_follow_the_objects_size():
    big = Scene((Obj("circle", "red", "plain", .5, .5, 0.29),), "sand", 0)
    small = Scene((Obj("circle", "red", "plain", .5, .5, 0.14),), "sand", 0)
    said = lambda s: {" ".join(w for w, _ in C.words(s, np.random.default_rng(k))) for k in range(200)}  # noqa: E731
    assert any(c.startswith(("zoomed in photo of", "close up photo of")) for c in said(big))
    assert not any(c.startswith(("a far away", "very small")) for c in said(big))
    assert any(c.startswith(("a far away photo of", "very small photo of")) for c in said(small))
    assert "photo of a red circle on sand" in said(small)


def test_supervision_prefers_maps_on_their_region():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, 1:4, 1:4] = 1
    masks[0, 1, 5:8, 4:8] = 1
    labels = torch.zeros(1, 5, dtype=torch.long)
    labels[0, 1], labels[0, 2], labels[0, 3] = 1, 2, C.BACKGROUND
    reg = S.regions(masks).flatten(2)[0]                           # [4, 64]
    right = torch.stack([reg[0] + 1e-3, reg[1], reg[2], reg[3], reg[0] + 1e-3], -1)
    wrong = torch.stack([reg[0] + 1e-3, reg[2], reg[1], reg[3], reg[0] + 1e-3], -1)
    as_maps = lambda a: [(a / a.sum(-1, keepdim=True))[None, None]]          # noqa: E731  [1, 1, 64, 5]
    uniform = [torch.full((1, 1, 64, 5), 0.2)]
    lr, lw, lu = (float(S.loss(m, labels, masks)) for m in (as_maps(right), as_maps(wrong), uniform))
    assert lr < lu < lw
    assert S.map_iou(as_maps(right), labels, masks, 8) == pytest.approx(1.0)
    assert S.map_iou(as_maps(wrong), labels, masks, 8) == pytest.approx(1 / 3)     # only the background is right
    # a coarser layer is judged against the masks pooled to its side
    assert float(S.loss([torch.full((1, 1, 16, 5), 0.2)], labels, masks)) > 0


def test_recorder_keeps_the_unets_output(tmp_path):
    from toyworld.model import build_unet
    unet = build_unet("test", 32).eval()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 16)
    with torch.no_grad():
        before = unet(x, t, c).sample
        rec = S.install(unet)
        rec.active = True
        during = unet(x, t, c).sample
        S.uninstall(unet, rec)
        after = unet(x, t, c).sample
    assert torch.allclose(before, during, atol=1e-5) and torch.equal(before, after)
    sides = sorted({int(round(m.shape[2] ** 0.5)) for m in rec.maps})
    assert sides == [2, 4, 8] and all(torch.allclose(m.sum(-1), torch.ones(())) for m in rec.maps)


def test_a_run_cut_short_can_be_exported(tmp_path):
    train.main(f"{RUN} --checkpoint {tmp_path}/ck --stop-after 2 --out {tmp_path}/m".split())
    train.main(f"{RUN} --checkpoint {tmp_path}/ck --export --out {tmp_path}/m".split())
    import json
    info = json.load(open(tmp_path / "m" / "training.json"))
    assert info["unet_stages"][-1]["steps"] == 2 and info["unet_stages"][-1]["planned_steps"] == 5
    with pytest.raises(SystemExit, match="no state"):
        train.main(f"{RUN} --checkpoint {tmp_path}/empty --export --out {tmp_path}/n".split())


def test_fp16_export_halves_the_weights_and_loads_as_float32(tmp_path):
    """The shipped folder may be written in fp16 (the 25 MB budget); the pack computes in float32 on the CPU."""
    from customedit_core import api

    train.main(f"{RUN} --checkpoint {tmp_path}/ck --stop-after 2 --out {tmp_path}/m".split())
    train.main(f"{RUN} --checkpoint {tmp_path}/ck --export --out {tmp_path}/m32".split())
    train.main(f"{RUN} --checkpoint {tmp_path}/ck --export --save-dtype fp16 --out {tmp_path}/m16".split())
    w32, w16 = _weights(tmp_path / "m32"), _weights(tmp_path / "m16")
    assert w16.keys() == w32.keys() and {v.dtype for v in w16.values()} == {torch.float16}
    assert all(torch.equal(w16[k], w32[k].half()) for k in w32)
    pipe = api.load(str(tmp_path / "m16"), device="cpu", log=lambda s: None)
    assert {p.dtype for p in pipe.backend.unet.parameters()} == {torch.float32}
