"""Concept nodes inside a real ComfyUI, in-process: training under inference mode, the host's MODEL
and CLIP untouched, save -> load reproducing the trained predictions bit for bit, the exported LoRA
and embedding reproducing them with ComfyUI's own LoraLoader and `embedding:` syntax, errors.

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_concept.py
"""
import comfy_support as S

S.skip_unless_comfy()

from comfy_support import expect_input_error, run_node as run  # noqa: E402

import copy  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def folders(comfy, tmp_path_factory):
    """models/{concepts,loras,embeddings} of this test session, first in ComfyUI's search paths."""
    import folder_paths

    base = tmp_path_factory.mktemp("models")
    for name in ("concepts", "loras", "embeddings"):
        (base / name).mkdir()
        folder_paths.add_model_folder_path(name, str(base / name), is_default=True)
    return base


@pytest.fixture(scope="module")
def models(comfy, folders):
    # after `folders`: a CLIP captures the embeddings search path when it is loaded
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]


@pytest.fixture(scope="module")
def refs():
    """Three reference pictures of one orange disc thing at different places."""
    base = torch.from_numpy(S.image_array())
    return torch.stack([base, base.flip(1), base.flip(0)])


def train(comfy, models, refs, **kw):
    model, clip, vae = models
    args = dict(model=model, clip=clip, vae=vae, images=refs, token="<new1>", class_word="dog", steps=STEPS,
                learning_rate=1e-3, batch_size=1, prior_weight=1.0, class_images_count=2, seed=0, ico=False,
                precision="fp32", gradient_checkpointing=False)
    args.update(kw)
    return run(comfy, "CustomEditTrainConcept", **args)


_TRAINED = {}


@pytest.fixture(scope="module")
def trained(comfy, models, refs):
    if "c" not in _TRAINED:
        _TRAINED["c"] = train(comfy, models, refs)
    return _TRAINED["c"]


def pack(comfy, suffix):
    return S.pack_module(comfy, suffix)


def eps_of(comfy, model, clip, prompt="a photo of a <new1> dog"):
    """Our backend's noise prediction for a fixed latent: what an edit would see."""
    comfy_mod = pack(comfy, "customedit_core.backends.comfy")
    tokens_mod = pack(comfy, "customedit_core.tokens")
    with torch.inference_mode():
        b = comfy_mod.ComfyBackend(model, clip)
        with comfy_mod.core_context():
            z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            ctx = b.encode([tokens_mod.tokenize(b.tokenizer, prompt)])
            return b.predict_eps(z, 500, ctx).cpu(), ctx.cpu()


def ksample(comfy, model, clip, text):
    with torch.inference_mode():
        pos = comfy.CLIPTextEncode().encode(clip, text)[0]
        neg = comfy.CLIPTextEncode().encode(clip, "")[0]
        lat = {"samples": torch.zeros(1, 4, 8, 8)}
        return comfy.KSampler().sample(model, 5, 3, 7.5, "euler", "normal", pos, neg, lat, denoise=1.0)[0]["samples"]


def test_training_changes_only_kv_and_leaves_the_host_untouched(comfy, models, refs, trained):
    model, clip, _ = models
    concept, plot = trained
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    assert concept.tokens == ("<new1>",) and concept.class_words == ("dog",)
    assert len(concept.deltas) == 2 * len([k for k in model.model.state_dict() if k.endswith("attn2.to_k.weight")])
    assert all(k.endswith(("attn2.to_k", "attn2.to_v")) for k in concept.deltas)
    assert sum(float(d.abs().sum()) for d in concept.deltas.values()) > 0
    # the host objects carry no trace of training
    assert not model.weight_wrapper_patches and not model.patches and not model.object_patches
    assert not clip.patcher.weight_wrapper_patches
    assert not hasattr(getattr(clip.tokenizer, clip.tokenizer.clip), "customedit_words")


def test_loaded_concept_reproduces_training_and_the_file_round_trips(comfy, models, trained, folders):
    model, clip, _ = models
    concept, _ = trained
    m1, c1 = run(comfy, "CustomEditLoadConcept", model=model, clip=clip, concept_name="(none)", strength=1.0,
                 concept=concept)
    path, = run(comfy, "CustomEditSaveConcept", concept=concept, name="rt_dog", export_lora=True,
                export_embedding=True, overwrite=False)
    assert os.path.isfile(path) and os.path.isfile(folders / "loras" / "rt_dog.safetensors")
    assert os.path.isfile(folders / "embeddings" / "rt_dog.safetensors")
    assert not [p for p in folders.rglob("*") if p.name.startswith(".tmp-")]
    m2, c2 = run(comfy, "CustomEditLoadConcept", model=model, clip=clip, concept_name="rt_dog.safetensors",
                 strength=1.0)
    e1, ctx1 = eps_of(comfy, m1, c1)
    e2, ctx2 = eps_of(comfy, m2, c2)
    assert torch.equal(ctx1, ctx2) and torch.equal(e1, e2)
    # the concept changes predictions (its word and its K/V)
    e0, ctx0 = eps_of(comfy, model, clip, "a photo of a dog")
    assert not torch.equal(e0, e1)
    # the stock path: LoraLoader + `embedding:` in CLIPTextEncode gives the same conditioning and samples
    with torch.inference_mode():
        m3, c3 = comfy.LoraLoader().load_lora(model, clip, "rt_dog.safetensors", 1.0, 0.0)
    with torch.inference_mode():
        cond_ours = comfy.CLIPTextEncode().encode(c1, "a photo of a <new1> dog")[0][0][0]
        cond_stock = comfy.CLIPTextEncode().encode(c3, "a photo of a embedding:rt_dog dog")[0][0][0]
    assert torch.equal(cond_ours, cond_stock)
    assert torch.equal(cond_ours.float(), ctx1.to(cond_ours))
    assert sorted(m1.patches) == sorted(m3.patches)
    ours = ksample(comfy, m1, c1, "a photo of a <new1> dog")
    stock = ksample(comfy, m3, c3, "a photo of a embedding:rt_dog dog")
    assert torch.equal(ours, stock)
    plain = ksample(comfy, model, clip, "a photo of a dog")
    assert not torch.equal(ours, plain)


def test_trained_predictions_equal_the_loaded_concept(comfy, models, refs):
    """Inside training (weight wrappers W + delta) and after loading (diff patches) the UNet agrees."""
    model, clip, vae = models
    comfy_mod = pack(comfy, "customedit_core.backends.comfy")
    concept, _ = train(comfy, models, refs, steps=2, prior_weight=0.0, seed=1)
    m1, c1 = run(comfy, "CustomEditLoadConcept", model=model, clip=clip, concept_name="(none)", strength=1.0,
                 concept=concept)
    loaded, _ = eps_of(comfy, m1, c1)
    with torch.inference_mode():
        b = comfy_mod.ComfyBackend(model, clip)
        with comfy_mod.core_context():
            b.set_kv_deltas(concept.deltas)
            b.tokenizer.add_word("<new1>", concept.embeddings[0])
            tokens_mod = pack(comfy, "customedit_core.tokens")
            z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            ctx = b.encode([tokens_mod.tokenize(b.tokenizer, "a photo of a <new1> dog")])
            live = b.predict_eps(z, 500, ctx).cpu()
    assert torch.equal(live, loaded)


def test_ksampler_unchanged_after_training_and_loading(comfy, models, refs, trained):
    model, clip, _ = models
    options = copy.deepcopy(model.model_options)
    before = ksample(comfy, model, clip, "a photo of a dog")
    train(comfy, models, refs, steps=1, prior_weight=0.0, gradient_checkpointing=True, ico=True)
    run(comfy, "CustomEditLoadConcept", model=model, clip=clip, concept_name="(none)", strength=0.5,
        concept=trained[0])
    assert torch.equal(before, ksample(comfy, model, clip, "a photo of a dog"))
    assert model.model_options == options and not model.patches
    # after the host's own sampling loaded its patcher, no wrapper of ours is left on the shared modules
    assert all(not getattr(m, "weight_function", []) for m in model.model.modules())


def test_chained_concepts_and_taken_tokens(comfy, models, refs, trained):
    model, clip, _ = models
    concept, _ = trained
    m1, c1 = run(comfy, "CustomEditLoadConcept", model=model, clip=clip, concept_name="(none)", strength=1.0,
                 concept=concept)
    expect_input_error("concept", run, comfy, "CustomEditLoadConcept", model=m1, clip=c1, concept_name="(none)",
                       strength=1.0, concept=concept)
    expect_input_error("token", train, comfy, (m1, c1, models[2]), refs, steps=1)
    other, _ = train(comfy, (m1, c1, models[2]), refs, steps=1, token="<new2>", class_word="cat", prior_weight=0.0)
    m2, c2 = run(comfy, "CustomEditLoadConcept", model=m1, clip=c1, concept_name="(none)", strength=1.0,
                 concept=other)
    words = getattr(c2.tokenizer, c2.tokenizer.clip).customedit_words
    assert sorted(words) == ["<new1>", "<new2>"]
    assert len(m2.patches) == len(concept.deltas)          # same layers, two patches each
    assert all(len(v) == 2 for v in m2.patches.values())


def test_bad_inputs(comfy, models, refs, trained, folders):
    model, clip, _ = models
    expect_input_error("token", train, comfy, models, refs, token="dog")
    expect_input_error("class_word", train, comfy, models, refs, class_word=" ")
    expect_input_error("images", train, comfy, models, refs[:, :60])
    expect_input_error("mask", train, comfy, models, refs, mask=torch.ones(1, 32, 32))
    for bad in ("../evil", "/tmp/evil", "a/../../evil"):
        expect_input_error("name", run, comfy, "CustomEditSaveConcept", concept=trained[0], name=bad,
                           export_lora=False, export_embedding=False, overwrite=False)
    run(comfy, "CustomEditSaveConcept", concept=trained[0], name="dup", export_lora=False, export_embedding=False,
        overwrite=False)
    expect_input_error("name", run, comfy, "CustomEditSaveConcept", concept=trained[0], name="dup",
                       export_lora=False, export_embedding=False, overwrite=False)
    bad = folders / "concepts" / "truncated.safetensors"
    data = (folders / "concepts" / "dup.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    msg = expect_input_error("concept_name", run, comfy, "CustomEditLoadConcept", model=model, clip=clip,
                             concept_name="truncated.safetensors", strength=1.0)
    assert "corrupt or truncated" in msg
    (folders / "concepts" / "pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    assert "pickle" in expect_input_error("concept_name", run, comfy, "CustomEditLoadConcept", model=model,
                                          clip=clip, concept_name="pickled.safetensors", strength=1.0)


def test_cancel_stops_training_and_leaves_nothing_behind(comfy, models, refs, folders):
    import comfy.model_management as mm
    from comfy import utils as cutils

    model, clip, _ = models
    steps = 8
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if total == steps and value == 2:
            mm.interrupt_current_processing(True)          # what the Cancel button does

    old = cutils.PROGRESS_BAR_HOOK
    before = sorted(p.name for p in folders.rglob("*"))
    cutils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(comfy, models, refs, steps=steps, prior_weight=0.0)
    finally:
        cutils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert [v for v, total in seen if total == steps][-1] == 2     # no training step after the request
    assert sorted(p.name for p in folders.rglob("*")) == before
    assert not model.patches and not model.weight_wrapper_patches and not clip.patcher.weight_wrapper_patches
    assert not hasattr(getattr(clip.tokenizer, clip.tokenizer.clip), "customedit_words")
