"""Queue-time checks of every node (validate_inputs), in-process: non-finite numbers, ranges and
options (ComfyUI skips its own checks for what a node validates), and the nodes' own rules.

  COMFYUI_DIR=/tmp/comfyui /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_checks.py
"""
import comfy_support as S

S.skip_unless_comfy()

import math  # noqa: E402

import pytest  # noqa: E402

from comfy_support import expect_input_error, run_node as run  # noqa: E402


def _nodes(comfy):
    return {k: v for k, v in comfy.NODE_CLASS_MAPPINGS.items() if k in S.NODE_IDS}


def _widgets(cls):
    from comfy_api.latest import io
    return [i for i in cls.GET_SCHEMA().inputs if isinstance(i, (io.Float.Input, io.Int.Input, io.Combo.Input))]


def test_every_node_checks_its_widgets_at_queue_time(comfy):
    from comfy_api.latest import io
    checked = 0
    for node_id, cls in _nodes(comfy).items():
        assert cls.validate_inputs() is True, node_id                 # everything linked or left out: fine
        for inp in _widgets(cls):
            bad = [float("nan"), float("inf"), -float("inf")] if isinstance(inp, io.Float.Input) else []
            if isinstance(inp, (io.Float.Input, io.Int.Input)) and inp.max is not None:
                bad.append(inp.max + 1)
            if isinstance(inp, io.Combo.Input) and inp.options:
                bad.append("no such option")
            for v in bad:
                msg = cls.validate_inputs(**{inp.id: v})
                assert isinstance(msg, str) and msg.startswith(f"{inp.id}: "), (node_id, inp.id, v, msg)
                checked += 1
            if getattr(inp, "default", None) is not None:
                ok = cls.validate_inputs(**{inp.id: inp.default})
                assert ok is True or not ok.startswith(f"{inp.id}: "), (node_id, inp.id, ok)
    assert checked > 60


def test_node_rules_that_the_inputs_alone_can_tell(comfy, tmp_path):
    nodes = _nodes(comfy)
    p2p = nodes["CustomEditP2PEdit"]
    assert p2p.validate_inputs(target_prompt=" ").startswith("target_prompt: ")
    assert p2p.validate_inputs(target_prompt="a dog", reweight="dog:inf").startswith("reweight: ")
    assert p2p.validate_inputs(target_prompt="a dog", blend_words="", blend_target_words="dog").startswith("blend_words: ")
    assert p2p.validate_inputs(target_prompt=None, reweight="dog:2") is True          # a linked prompt
    assert nodes["CustomEditNullTextInvert"].validate_inputs(source_prompt="").startswith("source_prompt: ")
    train = nodes["CustomEditTrainConcept"]
    for token in ("a cat", "(x)", "", "[1]"):
        assert train.validate_inputs(token=token, class_word="dog").startswith("token: "), token
    assert train.validate_inputs(token="<new1>", class_word=" ").startswith("class_word: ")
    assert nodes["CustomEditLoadConcept"].validate_inputs(concept_name="(none)").startswith("concept_name: ")
    assert nodes["CustomEditLoadConcept"].validate_inputs(concept_name="(none)", concept=None) is True   # linked
    save = nodes["CustomEditSaveConcept"]
    for name in ("../x", "a\0b", "x" * 300, "/abs"):
        assert save.validate_inputs(name=name).startswith("name: "), name


def test_linked_values_are_checked_when_the_node_runs(comfy):
    """A NaN that arrives through a link (no widget to check at queue time) is refused by execute."""
    msg = expect_input_error("strength", run, comfy, "CustomEditLoadConcept", model=None, clip=None,
                             concept_name="(none)", strength=math.nan, concept=None)
    assert "finite" in msg


def test_rules_of_specref_diffedit_and_dci_at_queue_time(comfy):
    nodes = _nodes(comfy)
    spec = nodes["CustomEditSpecRefSample"]
    ok = dict(target_prompt="a photo of a dog", edited_words="dog")
    assert spec.validate_inputs(**ok) is True
    assert spec.validate_inputs(**{**ok, "target_prompt": " "}).startswith("target_prompt: ")
    assert spec.validate_inputs(**{**ok, "edited_words": " , "}).startswith("edited_words: ")
    assert spec.validate_inputs(**{**ok, "edited_words": "", "mask": None}) is True      # a linked M_t instead
    msg = spec.validate_inputs(**{**ok, "edited_words": "dog, red hat"})
    assert msg.startswith("edited_words: ") and "'red hat'" in msg
    assert spec.validate_inputs(**{**ok, "edited_words": "DOG", "target_prompt": "a photo of a  Dog"}) is True
    assert spec.validate_inputs(**{**ok, "target_prompt": None, "edited_words": "horse"}) is True   # linked prompt
    for node in (spec, nodes["CustomEditReferenceKVExtract"]):
        assert node.validate_inputs(level_start=1, level_end=0).startswith("level_end: ")
        assert node.validate_inputs(step_start=0.5, step_end=0.2).startswith("step_end: ")
        assert node.validate_inputs(level_start=1, level_end=1, step_start=0.2, step_end=0.2) is True

    mask = nodes["CustomEditDiffEditMask"]
    assert mask.validate_inputs(source_prompt="", target_prompt="a dog").startswith("source_prompt: ")
    assert mask.validate_inputs(source_prompt="a cat", target_prompt=" ").startswith("target_prompt: ")
    assert mask.validate_inputs(source_prompt="a  Cat", target_prompt="a cat ").startswith("target_prompt: ")
    assert mask.validate_inputs(source_prompt="a cat", target_prompt="a dog") is True
    assert mask.validate_inputs(source_prompt=None, target_prompt="a dog") is True
    assert nodes["CustomEditDiffEditSample"].validate_inputs(target_prompt="").startswith("target_prompt: ")

    dci = nodes["CustomEditDCISample"]
    assert dci.validate_inputs(prompt="  ").startswith("prompt: ")
    assert dci.validate_inputs(prompt="a <new1> dog", concept_words="<new2>").startswith("concept_words: ")
    assert dci.validate_inputs(prompt="a <new1> dog", concept_words="<new1>", latent_image=None) is True
    assert dci.validate_inputs(prompt="a dog", latent_image=None, inversion=None).startswith("latent_image: ")
    assert dci.validate_inputs(prompt="a dog", inversion=None, negative_prompt="blurry").startswith("negative_prompt: ")
    assert dci.validate_inputs(prompt="a dog", latent_image=None, negative_prompt="blurry") is True

    p2p = nodes["CustomEditP2PEdit"]
    assert p2p.validate_inputs(target_prompt="a dog", reweight="horse:2").startswith("reweight: ")
    bad_target = dict(target_prompt="a dog", blend_words="cat", blend_target_words="horse")
    assert p2p.validate_inputs(**bad_target, blend_source_only=False).startswith("blend_target_words: ")
    assert p2p.validate_inputs(**bad_target, blend_source_only=True) is True     # target words are not used then

    train = nodes["CustomEditTrainConcept"]
    long_template = " ".join(["photo"] * 80)
    assert train.validate_inputs(token="<new1>", class_word="dog", template=long_template).startswith("template: ")
    assert train.validate_inputs(token="<new1>", class_word=" ".join(["dog"] * 80),
                                 template="photo of a").startswith("class_word: ")
    assert train.validate_inputs(token="<new1>", class_word="dog", template=" ".join(["photo"] * 70)) is True


# ---- checks when the node runs, before any model work ----------------------------------------

@pytest.fixture(scope="module")
def models(comfy):
    import torch
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]


def _fake_inversion(comfy, latent_hw, steps=2):
    """An Inversion record of a given size (only its shape is looked at before the model would run)."""
    import torch
    inv = S.pack_module(comfy, "customedit_core.inversion")
    z = torch.zeros(1, 4, *latent_hw)
    return inv.Inversion("direct", "a photo of a cat", None, steps, 7.5, [z] * (steps + 1), [None] * steps, "x")


def _latent_nodes_refuse(comfy, model, clip, latent, mask):
    """DiffEdit Mask/Sample, Extract Reference K/V and DCI Sample each refuse `latent`, naming their input."""
    expect_input_error("latent", run, comfy, "CustomEditDiffEditMask", model=model, clip=clip, latent=latent,
                       source_prompt="a cat", target_prompt="a dog", samples=1, strength=0.5, threshold=0.5, seed=0)
    expect_input_error("latent", run, comfy, "CustomEditDiffEditSample", model=model, clip=clip, latent=latent,
                       mask=mask, target_prompt="a dog", encoding_ratio=0.5, steps=2, guidance=7.5)
    expect_input_error("reference", run, comfy, "CustomEditReferenceKVExtract", model=model, clip=clip,
                       reference=latent, reference_prompt="", steps=2, level_start=0, level_end=1, step_start=0.0,
                       step_end=1.0)
    expect_input_error("latent_image", run, comfy, "CustomEditDCISample", model=model, clip=clip,
                       prompt="a photo of a dog", auxiliary_prompt="", concept_words="", integrate_fraction=0.3,
                       balance=0.0, steps=2, guidance=7.5, seed=0, latent_image=latent)


def test_empty_and_odd_latents_name_the_latent_input(comfy, models):
    import torch
    model, clip, _ = models
    for shape in ((1, 4, 0, 0), (1, 4, 8, 7), (1, 4, 8)):
        bad = {"samples": torch.zeros(shape)}
        msg = expect_input_error("latent", run, comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=bad,
                                 source_prompt="a cat", steps=2, guidance=7.5, method="ddim", inner_steps=1)
        assert ("multiples of 16 px" in msg) if len(shape) == 4 else "[B, C, H, W]" in msg
        _latent_nodes_refuse(comfy, model, clip, bad, torch.ones(1, 64, 64))


def _train_args(models, **kw):
    import torch
    model, clip, vae = models
    args = dict(model=model, clip=clip, vae=vae, images=torch.zeros(3, 64, 64, 3), token="<new1>", class_word="dog",
                steps=1, learning_rate=1e-3, batch_size=1, prior_weight=1.0, class_images_count=2, seed=0, ico=False,
                precision="fp32", gradient_checkpointing=False)
    return {**args, **kw}


def test_train_concept_names_a_missing_vae_and_an_overlong_template(comfy, models):
    node = "CustomEditTrainConcept"
    assert "VAE" in expect_input_error("vae", run, comfy, node, **_train_args(models, vae=None))
    # 80 tokens: the class prompt '<template> dog' is tokenized first, but the template is what is too long
    msg = expect_input_error("template", run, comfy, node, **_train_args(models, template=" ".join(["photo"] * 80)))
    assert "80 tokens" in msg and "at most 75" in msg
    # few words but many tokens (only the tokenizer can tell): still the template
    tok = S.pack_module(comfy, "customedit_core.backends.comfy").ComfyBackend(*models[:2]).tokenizer
    template = " ".join(["zqxjkv"] * 30)
    assert len(tok.text_ids(template)) > 75
    expect_input_error("template", run, comfy, node, **_train_args(models, template=template))
    expect_input_error("class_word", run, comfy, node, **_train_args(models, class_word=" ".join(["dog"] * 80)))


def test_too_large_images_are_refused_before_any_model_work(comfy, models, monkeypatch):
    """A latent side above 256 (2048 px) would run for hours on a CPU: refused, naming the input, unless
    CUSTOMEDIT_ALLOW_LARGE=1 (then it starts, and fails here only on purpose: a zero-step check)."""
    import torch
    ws = S.pack_module(comfy, "customedit_core.work_size")
    monkeypatch.delenv(ws.ALLOW_ENV, raising=False)
    model, clip, _ = models
    side = ws.MAX_LATENT_SIDE + 8
    big = {"samples": torch.zeros(1, 4, side, 16)}
    msg = expect_input_error("latent", run, comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=big,
                             source_prompt="a cat", steps=50, guidance=7.5, method="null_text", inner_steps=10)
    assert "128x2112 px" in msg and ws.ALLOW_ENV in msg
    _latent_nodes_refuse(comfy, model, clip, big, torch.ones(1, side * 8, 128))
    inv = _fake_inversion(comfy, (side, 16))
    expect_input_error("inversion", run, comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv,
                       target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.5)
    expect_input_error("inversion", run, comfy, "CustomEditAttentionMaps", model=model, clip=clip, inversion=inv)
    expect_input_error("images", run, comfy, "CustomEditTrainConcept",
                       **_train_args(models, images=torch.zeros(1, side * 8, 64, 3)))
    # allowed: the size check lets it through to the core (which then refuses the fake record's model)
    monkeypatch.setenv(ws.ALLOW_ENV, "1")
    expect_input_error("inversion", run, comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv,
                       target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.5)
    assert "different model" in str(pytest.raises(ValueError, run, comfy, "CustomEditP2PEdit", model=model, clip=clip,
                                                  inversion=inv, target_prompt="a photo of a dog", mode="replace",
                                                  cross_replace=0.8, self_replace=0.5).value)
