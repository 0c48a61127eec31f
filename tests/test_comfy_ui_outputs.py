"""What the nodes show and hand on, inside a real ComfyUI, in-process: a tooltip on every input and output,
node-side previews of maps and masks (ui.PreviewImage / ui.PreviewMask, written to ComfyUI's temp folder),
Save Concept's paths as ui text, and the LATENT keys (noise_mask, batch_index) that edits keep.

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_ui_outputs.py
"""
import comfy_support as S

S.skip_unless_comfy()

import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

STEPS = 3
SOURCE = "a photo of a cat sitting on the grass"
TARGET = "a photo of a dog sitting on the grass"
PX = S.IMAGE_SIZE
LEVELS = dict(level_start=0, level_end=1, step_start=0.0, step_end=1.0)


def test_every_input_and_output_has_a_tooltip(comfy):
    missing = []
    for node_id in S.NODE_IDS:
        schema = comfy.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        for kind, items in (("input", schema.inputs), ("output", schema.outputs)):
            for item in items:
                tip = getattr(item, "tooltip", None)
                if not (isinstance(tip, str) and len(tip.strip()) >= 10):
                    missing.append(f"{node_id} {kind} {item.id or item.display_name}")
        # the V1 info the frontend reads carries them too
        info = comfy.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert len(info["output_tooltips"]) == len(schema.outputs) and all(info["output_tooltips"]), node_id
    assert not missing, missing


@pytest.fixture(scope="module")
def temp_dir(comfy, tmp_path_factory):
    """ComfyUI's temp folder (where previews go) for this module."""
    import folder_paths
    old = folder_paths.get_temp_directory()
    d = tmp_path_factory.mktemp("comfy-temp")
    folder_paths.set_temp_directory(str(d))
    yield d
    folder_paths.set_temp_directory(old)


@pytest.fixture(scope="module")
def models(comfy):
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]


NOISE_MASK = torch.zeros(1, 1, PX, PX)
NOISE_MASK[..., : PX // 2] = 1


@pytest.fixture(scope="module")
def latent(comfy, models):
    """The test image's latent as SetLatentNoiseMask and a batch node leave it."""
    image = torch.from_numpy(S.image_array())[None]
    with torch.inference_mode():
        lat = comfy.VAEEncode().encode(models[2], image)[0]
    return {**lat, "noise_mask": NOISE_MASK, "batch_index": [3]}


def execute(comfy, node_id, **kw):
    """The node's whole NodeOutput (outputs and ui), called as ComfyUI does."""
    with torch.inference_mode():
        return comfy.NODE_CLASS_MAPPINGS[node_id].execute(**kw)


def previews(out, temp_dir, kind):
    """The saved preview images of a node's ui (checked to be of `kind`), as arrays."""
    from comfy_api.latest import ui
    assert isinstance(out.ui, getattr(ui, kind)), type(out.ui)
    d = out.ui.as_dict()
    assert d["animated"] == (False,) and d["images"]
    from PIL import Image
    arrays = []
    for r in d["images"]:
        assert r["type"] == "temp"
        path = os.path.join(temp_dir, r["subfolder"], r["filename"])
        arrays.append(np.asarray(Image.open(path)).astype(np.float32) / 255)
    return arrays


def assert_mask_preview(out, temp_dir, mask):
    shown = previews(out, temp_dir, "PreviewMask")
    assert len(shown) == mask.shape[0]
    for img, m in zip(shown, mask):
        assert img.shape == (*m.shape, 3)
        assert np.abs(img - m.numpy()[..., None]).max() <= 1 / 255 + 1e-6    # grey: the mask itself


@pytest.fixture(scope="module")
def inverted(comfy, models, latent):
    model, clip, _ = models
    out = execute(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent, source_prompt=SOURCE,
                  steps=STEPS, guidance=7.5, method="direct", inner_steps=1)
    return out.result


def test_inversion_and_p2p_keep_the_latents_keys_and_preview_the_blend_mask(comfy, models, latent, inverted,
                                                                            temp_dir):
    model, clip, _ = models
    inv, recon = inverted
    assert recon["noise_mask"] is NOISE_MASK and recon["batch_index"] == [3]
    out = execute(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv, target_prompt=TARGET,
                  mode="replace", cross_replace=0.8, self_replace=0.5, blend_words="cat", blend_threshold=0.5)
    edited, mask = out.result
    assert edited["noise_mask"] is NOISE_MASK and edited["batch_index"] == [3]
    assert_mask_preview(out, temp_dir, mask)
    # an inversion of a plain LATENT hands on no keys
    plain = execute(comfy, "CustomEditNullTextInvert", model=model, clip=clip,
                    latent={"samples": latent["samples"]}, source_prompt=SOURCE, steps=STEPS, guidance=7.5,
                    method="direct", inner_steps=1).result
    assert set(plain[1]) == {"samples"}
    edited2 = execute(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=plain[0], target_prompt=TARGET,
                      mode="replace", cross_replace=0.8, self_replace=0.5).result[0]
    assert set(edited2) == {"samples"}


def test_attention_maps_are_previewed(comfy, models, inverted, temp_dir):
    model, clip, _ = models
    out = execute(comfy, "CustomEditAttentionMaps", model=model, clip=clip, inversion=inverted[0])
    (maps,) = out.result
    shown = previews(out, temp_dir, "PreviewImage")
    assert len(shown) == maps.shape[0]
    assert np.abs(shown[0] - maps[0].numpy()).max() <= 1 / 255 + 1e-6


def test_specref_previews_m_t_and_keeps_the_keys(comfy, models, latent, inverted, temp_dir):
    model, clip, _ = models
    bank, _ = execute(comfy, "CustomEditReferenceKVExtract", model=model, clip=clip,
                      reference={"samples": latent["samples"].flip(3)}, reference_prompt="", steps=STEPS,
                      **LEVELS).result
    out = execute(comfy, "CustomEditSpecRefSample", model=model, clip=clip, inversion=inverted[0], reference_kv=bank,
                  target_prompt=TARGET, edited_words="dog", blend_threshold=0.5, **LEVELS)
    edited, mask_t = out.result
    assert edited["noise_mask"] is NOISE_MASK and edited["batch_index"] == [3]
    assert_mask_preview(out, temp_dir, mask_t)


def test_diffedit_previews_its_mask_and_the_sample_keeps_the_keys(comfy, models, latent, temp_dir):
    model, clip, _ = models
    out = execute(comfy, "CustomEditDiffEditMask", model=model, clip=clip, latent=latent, source_prompt=SOURCE,
                  target_prompt=TARGET, samples=2, strength=0.5, threshold=0.5, seed=0)
    (mask,) = out.result
    assert_mask_preview(out, temp_dir, mask)
    (edited,) = execute(comfy, "CustomEditDiffEditSample", model=model, clip=clip, latent=latent, mask=mask,
                        target_prompt=TARGET, encoding_ratio=0.5, steps=STEPS, guidance=7.5).result
    assert edited["noise_mask"] is NOISE_MASK and edited["batch_index"] == [3]
    assert edited["samples"].shape == latent["samples"].shape


def test_dci_previews_the_concept_weight_and_keeps_the_batch_keys(comfy, models, temp_dir):
    model, clip, _ = models
    empty = {"samples": torch.zeros(2, 4, 8, 8), "batch_index": [5, 6]}
    out = execute(comfy, "CustomEditDCISample", model=model, clip=clip, prompt="a photo of a dog",
                  auxiliary_prompt="", concept_words="", integrate_fraction=0.3, balance=0.0, steps=2, guidance=7.5,
                  seed=0, latent_image=empty)
    samples, weight = out.result
    assert samples["batch_index"] == [5, 6] and samples["samples"].shape == (2, 4, 8, 8)
    assert_mask_preview(out, temp_dir, weight)


def test_latent_keys_are_dropped_for_another_batch_size(comfy):
    edit = S.pack_module(comfy, "nodes._shared")
    like = {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": NOISE_MASK, "batch_index": [3], "other": 1}
    same = edit.latent_out(torch.ones(1, 4, 8, 8), like)
    assert same["noise_mask"] is NOISE_MASK and same["batch_index"] == [3]
    assert "other" not in same                              # only the keys known to still apply
    assert set(edit.latent_out(torch.ones(2, 4, 8, 8), like)) == {"samples"}


def test_save_concept_shows_where_it_wrote(comfy, models, tmp_path):
    import folder_paths
    from comfy_api.latest import ui

    for name in ("concepts", "loras", "embeddings"):
        (tmp_path / name).mkdir()
        folder_paths.add_model_folder_path(name, str(tmp_path / name), is_default=True)
    model, clip, _ = models
    C = S.pack_module(comfy, "customedit_core.concept")
    backend = S.pack_module(comfy, "customedit_core.backends.comfy").ComfyBackend(model, clip)
    with torch.inference_mode(False):
        kv = backend.kv_weights()
        probe = C.probe(backend)
        width = backend.token_embedding_table().shape[1]
        concept = C.Concept(("<new1>",), ("dog",), torch.zeros(1, width), {k: torch.zeros(w.shape) for k, w in kv.items()},
                            probe, C.fingerprint_of(probe), {}, "ui-test")
    out = execute(comfy, "CustomEditSaveConcept", concept=concept, name="ui_dog", export_lora=True,
                  export_embedding=False, overwrite=False)
    (path,) = out.result
    assert isinstance(out.ui, ui.PreviewText)
    (text,) = out.ui.as_dict()["text"]
    lines = text.split("\n")
    assert lines == [path, str(tmp_path / "loras" / "ui_dog.safetensors")] and all(os.path.isfile(p) for p in lines)


def test_in_the_executor_checks_run_at_queue_time_and_previews_reach_the_history(comfy, temp_dir):
    """The real path, where ComfyUI runs validate_inputs and execute on locked clones of the node class."""
    import asyncio
    from pathlib import Path

    import execution
    import folder_paths

    S.write_test_image(Path(folder_paths.get_input_directory()))
    try:
        def graph(target):
            return {
                "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": S.CKPT_NAME}},
                "2": {"class_type": "LoadImage", "inputs": {"image": S.IMAGE_NAME}},
                "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
                "4": {"class_type": "CustomEditDiffEditMask",
                      "inputs": {"model": ["1", 0], "clip": ["1", 1], "latent": ["3", 0], "source_prompt": SOURCE,
                                 "target_prompt": target, "samples": 1, "strength": 0.5, "threshold": 0.5,
                                 "seed": 0}},
                "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
                "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
            }

        valid, err, outputs, node_errors = asyncio.run(execution.validate_prompt("same", graph(SOURCE), None))
        assert not valid
        details = node_errors["4"]["errors"][0]["details"]
        assert "target_prompt: is the same as source_prompt" in details, details
        prompt = graph(TARGET)
        valid, err, outputs, node_errors = asyncio.run(execution.validate_prompt("ok", prompt, None))
        assert valid, (err, node_errors)
        executor = execution.PromptExecutor(S.ServerStub())
        executor.execute(prompt, "ok", {}, outputs)
        assert executor.success, executor.status_messages[-3:]
        shown = executor.history_result["outputs"]["4"]["images"]
        assert len(shown) == 1 and shown[0]["type"] == "temp"
        assert os.path.isfile(os.path.join(temp_dir, shown[0]["subfolder"], shown[0]["filename"]))
    finally:
        (Path(folder_paths.get_input_directory()) / S.IMAGE_NAME).unlink(missing_ok=True)
