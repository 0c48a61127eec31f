"""The pack inside a real ComfyUI, in-process: registration, the three nodes, the backend's
attention hooks, autograd under ComfyUI's inference mode, isolation of the user's model, and
errors. Needs COMFYUI_DIR (a ComfyUI checkout) and ComfyUI's dependencies; skips otherwise.

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_nodes.py
"""
from pathlib import Path

import comfy_support as S

S.skip_unless_comfy()

from comfy_support import expect_input_error, run_node as run  # noqa: E402

import copy  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

STEPS = 10
SOURCE = "a photo of a cat sitting on the grass"


@pytest.fixture(scope="module")
def models(comfy):
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:3]


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(S.image_array())[None]


@pytest.fixture(scope="module")
def latent(comfy, models, image):
    with torch.inference_mode():
        return comfy.VAEEncode().encode(models[2], image)[0]


_INVERSIONS = {}


def inversion(comfy, models, latent, method, steps=STEPS, inner_steps=10):
    key = (method, steps, inner_steps)
    if key not in _INVERSIONS:
        model, clip, _ = models
        _INVERSIONS[key] = run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent,
                               source_prompt=SOURCE, steps=steps, guidance=7.5, method=method,
                               inner_steps=inner_steps)
    return _INVERSIONS[key]


def rel_err(a, b):
    return ((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-12)).item()


# ---- registration ----------------------------------------------------------------------------

def test_pack_registers_its_nodes(comfy):
    for node_id in S.NODE_IDS:
        assert node_id in comfy.NODE_CLASS_MAPPINGS, node_id
        schema = comfy.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.category.startswith("customedit/")
        assert schema.display_name and not schema.display_name.startswith("CustomEdit")
    info = comfy.NODE_CLASS_MAPPINGS["CustomEditNullTextInvert"].GET_NODE_INFO_V1()
    assert info["output"] == ["CE_INVERSION", "LATENT"]
    method = info["input"]["required"]["method"]
    options = method[1]["options"] if method[0] == "COMBO" else method[0]
    assert options == ["null_text", "negative_prompt", "direct", "ddim"]
    p2p = comfy.NODE_CLASS_MAPPINGS["CustomEditP2PEdit"].GET_NODE_INFO_V1()
    assert p2p["output"] == ["LATENT", "MASK"]
    assert p2p["input"]["required"]["inversion"][0] == "CE_INVERSION"


# ---- backend ---------------------------------------------------------------------------------

def test_backend_hooks_every_attention_layer(comfy, models, latent):
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    att = S.pack_module(comfy, "customedit_core.attention")
    tokens = S.pack_module(comfy, "customedit_core.tokens")
    from comfy.ldm.modules.attention import BasicTransformerBlock

    model, clip, _ = models
    blocks = [m for m in model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock)]
    seen = {}

    class Record(att.Controller):
        def out(self, o, site):
            seen[site.name] = site
            return o

    with torch.inference_mode():
        b = cb.ComfyBackend(model, clip)
        with cb.core_context():
            z = b.to_model_latent(latent["samples"])
            ctx = b.encode([tokens.tokenize(b.tokenizer, SOURCE)])
            with b.offload():
                plain = b.predict_eps(z, 500, ctx)
                hooked = b.predict_eps(z, 500, ctx, att.AttentionHook([Record()]))
                probs = b.predict_eps(z, 500, ctx, att.AttentionHook([S.pack_module(
                    comfy, "customedit_core.p2p").AttentionStore(max_side=1.0)]))
            # the stock model (no patches) gives the same eps, bit for bit, without a hook
            sigma = model.model.model_sampling.sigma(torch.tensor([500.0]))
            x = z * (sigma ** 2 + 1).sqrt()
            den = model.model.apply_model(x, sigma, c_crossattn=ctx)
            stock = (x - den) / sigma
    assert len(b.blocks) == len(blocks) and len(seen) == 2 * len(blocks)
    assert {s.kind for s in seen.values()} == {"self", "cross"}
    assert {s.place for s in seen.values()} == {"down", "mid", "up"}
    h, w = z.shape[2:]
    assert {(s.height, s.width) for s in seen.values()} == {(h, w), (h // 2, w // 2)}
    assert all((s.latent_height, s.latent_width) == (h, w) and s.heads == 8 for s in seen.values())
    assert torch.equal(plain, stock)
    assert torch.allclose(hooked, plain, atol=1e-5, rtol=1e-4)
    assert torch.allclose(probs, plain, atol=1e-4, rtol=1e-3)


def test_backend_schedule_tokenizer_and_fingerprint(comfy, models):
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    ddim = S.pack_module(comfy, "customedit_core.ddim")
    model, clip, _ = models
    b = cb.ComfyBackend(model, clip)
    assert torch.allclose(b.alphas_cumprod, ddim.sd_alphas_cumprod(), rtol=1e-5)
    assert (b.tokenizer.bos, b.tokenizer.eos, b.tokenizer.pad, b.tokenizer.max_length) == (49406, 49407, 49407, 77)
    ids = S.pack_module(comfy, "customedit_core.tokens").tokenize(b.tokenizer, SOURCE).ids
    assert list(ids) == [t[0] for t in clip.tokenize(SOURCE)["l"][0]]      # ComfyUI's own tokens
    assert b.latent_channels == 4 and b.vae_scale == 8 and b.latent_multiple == 2
    fp = b.fingerprint()
    assert cb.ComfyBackend(model.clone(), clip.clone()).fingerprint() == fp
    assert cb.ComfyBackend(model, clip).fingerprint() == fp
    patched = model.clone()
    key = next(k for k in patched.model_state_dict() if k.endswith("attn2.to_k.weight"))
    patched.add_patches({key: (torch.ones_like(patched.model_state_dict()[key]),)}, 0.1)
    assert cb.ComfyBackend(patched, clip).fingerprint() != fp
    assert not model.patches          # add_patches went to the clone only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_fingerprint_of_weights_loaded_in_any_dtype(comfy, models, dtype):
    """ComfyUI's loaders keep UNet weights in the dtype asked for (UNETLoader's weight_dtype, fp8
    included); the fingerprint samples their bits without converting whole tensors."""
    import folder_paths
    from comfy.sd import load_checkpoint_guess_config

    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    path = folder_paths.get_full_path("checkpoints", S.CKPT_NAME)
    with torch.inference_mode():
        model = load_checkpoint_guess_config(path, output_vae=False, model_options={"dtype": dtype})[0]
    weights = [p for p in model.model.diffusion_model.parameters() if p.dim() == 4]
    assert weights and all(p.dtype == dtype for p in weights)
    fp = cb.ComfyBackend(model, models[1]).fingerprint()
    assert fp == cb.ComfyBackend(model.clone(), models[1]).fingerprint()
    assert fp != cb.ComfyBackend(models[0], models[1]).fingerprint()


def test_v_prediction_is_converted_to_eps(comfy, models):
    """Same network, v-prediction sampling: eps = sqrt(a) * v + sqrt(1 - a) * z."""
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    tokens = S.pack_module(comfy, "customedit_core.tokens")
    model, clip, _ = models
    with torch.inference_mode():
        vmodel = comfy.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, "v_prediction", False)[0]
        b, bv = cb.ComfyBackend(model, clip), cb.ComfyBackend(vmodel, clip)
        assert b.fingerprint() != bv.fingerprint()
        with cb.core_context():
            ctx = b.encode([tokens.tokenize(b.tokenizer, SOURCE)])
            z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            t = 600
            out = b.predict_eps(z, t, ctx.expand(2, -1, -1))      # the raw network output (eps model)
            eps_v = bv.predict_eps(z, t, ctx.expand(2, -1, -1))
        lcm = comfy.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, "lcm", False)[0]
        expect_input_error("model", cb.ComfyBackend, lcm, clip)
    a = float(b.alphas_cumprod[t])
    assert torch.allclose(eps_v, a ** 0.5 * out + (1 - a) ** 0.5 * z, atol=1e-4, rtol=1e-4)


def test_tokens_reach_the_text_encoder_in_comfys_format(comfy, models):
    """encode() hands CLIP one [(id, 1.0)] list of 77 per prompt, under the tokenizer's key ('l' here)."""
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    tokens = S.pack_module(comfy, "customedit_core.tokens")
    model, clip, _ = models
    seen = []

    class Recording:                      # the real CLIP, recording what it is given
        def __getattr__(self, name):
            return getattr(clip, name)

        def encode_from_tokens(self, toks):
            seen.append(toks)
            return clip.encode_from_tokens(toks)

    with torch.inference_mode():
        b = cb.ComfyBackend(model, Recording())
        p = tokens.tokenize(b.tokenizer, "a photo of a teapot")
        out = b.encode([p, p])
        ref = clip.encode_from_tokens(clip.tokenize("a photo of a teapot"))
    assert out.shape == (2, 77, 768) and out.dtype == torch.float32
    assert torch.equal(out[:1], ref.float())          # the same as ComfyUI's own prompt encoding
    assert len(seen) == 2 and list(seen[0]) == ["l"] and len(seen[0]["l"]) == 1
    assert [i for i, _ in seen[0]["l"][0]] == list(p.ids) and all(w == 1.0 for _, w in seen[0]["l"][0])


def test_sd2_tokenizer_convention(comfy, models):
    """SD2's OpenCLIP tokenizer pads with 0 and is keyed 'h'; a CLIP of the wrong width is refused."""
    from comfy.text_encoders.sd2_clip import SD2Tokenizer

    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    tokens = S.pack_module(comfy, "customedit_core.tokens")
    sd2 = SD2Tokenizer()
    assert (sd2.clip_name, sd2.clip) == ("h", "clip_h")
    tok = cb.ComfyTokenizer(sd2.clip_h)
    assert (tok.bos, tok.eos, tok.pad, tok.max_length) == (49406, 49407, 0, 77)
    p = tokens.tokenize(tok, "a photo of a teapot")
    assert list(p.ids) == [t[0] for t in sd2.tokenize_with_weights("a photo of a teapot")["h"][0]]
    assert set(p.ids[p.length:]) == {0}

    class SD2Clip:
        tokenizer = sd2

        def encode_from_tokens(self, toks):
            raise AssertionError("not reached")

    msg = expect_input_error("clip", cb.ComfyBackend, models[0], SD2Clip())
    assert "1024" in msg and "768" in msg


def test_grad_flows_to_the_context_under_inference_mode(comfy, models):
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    tokens = S.pack_module(comfy, "customedit_core.tokens")
    model, clip, _ = models
    with torch.inference_mode():
        b = cb.ComfyBackend(model, clip)
        with cb.core_context():
            ctx = b.encode([tokens.tokenize(b.tokenizer, SOURCE)])
            z = torch.randn(1, 4, 8, 8)
            with b.offload(), b.grad_enabled():
                u = ctx.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(b.predict_eps(z, 400, u).square().mean(), [u])
    assert g.shape == ctx.shape and torch.isfinite(g).all() and g.abs().sum() > 0


# ---- nodes -----------------------------------------------------------------------------------

def test_direct_inversion_reconstructs_the_source(comfy, models, latent):
    inv, recon = inversion(comfy, models, latent, "direct")
    assert recon["samples"].shape == latent["samples"].shape
    assert rel_err(recon["samples"], latent["samples"]) < 1e-8
    assert inv.method == "direct" and inv.steps == STEPS and len(inv.latents) == STEPS + 1


def test_null_text_reconstructs_better_than_ddim(comfy, models, latent):
    _, ddim = inversion(comfy, models, latent, "ddim")
    inv, null = inversion(comfy, models, latent, "null_text")
    e_ddim, e_null = rel_err(ddim["samples"], latent["samples"]), rel_err(null["samples"], latent["samples"])
    # the random test model is far from smooth (plain DDIM drifts a lot); null-text must still win clearly
    assert e_null < 0.7 * e_ddim, (e_null, e_ddim)
    assert len(inv.uncond) == STEPS and len(inv.inner_steps_used) == STEPS
    _, neg = inversion(comfy, models, latent, "negative_prompt")
    assert torch.isfinite(neg["samples"]).all()


def test_p2p_with_the_source_prompt_reproduces_the_reconstruction(comfy, models, latent):
    model, clip, _ = models
    inv, recon = inversion(comfy, models, latent, "null_text")
    edited, mask = run(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv, target_prompt=SOURCE,
                       mode="refine", cross_replace=0.8, self_replace=0.5)
    assert rel_err(edited["samples"], recon["samples"]) < 1e-6
    assert mask.shape == (1, S.IMAGE_SIZE, S.IMAGE_SIZE) and bool((mask == 1).all())


def sharpened(model, factor=30.0):
    """A clone whose cross-attention keys are scaled (as UNetCrossAttentionMultiply does), so the random
    test model's nearly uniform word maps get spatial structure for a local-blend mask."""
    m = model.clone()
    for key in m.model_state_dict():
        if key.endswith("attn2.to_k.weight"):
            m.add_patches({key: (None,)}, 0.0, factor)
    return m


def test_p2p_local_blend_keeps_the_outside(comfy, models, latent):
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    core = S.pack_module(comfy, "customedit_core")
    _, clip, _ = models
    model = sharpened(models[0])
    inv, _ = run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent, source_prompt=SOURCE,
                 steps=STEPS, guidance=7.5, method="direct", inner_steps=1)
    before = [t.clone() for t in inv.latents]
    target = "a photo of a dog sitting on the grass"
    edited, mask = run(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv, target_prompt=target,
                       mode="replace", cross_replace=0.8, self_replace=0.5, reweight="dog:2", blend_words="cat",
                       blend_target_words="", blend_source_only=True, blend_threshold=0.5, blend_start=0.2)
    assert all(torch.equal(a, b) for a, b in zip(before, inv.latents))     # the input was not changed
    assert mask.shape == (1, S.IMAGE_SIZE, S.IMAGE_SIZE)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    # the same edit through the core: the node returns its edit; outside the mask it is the source branch
    with torch.inference_mode():
        b = cb.ComfyBackend(model, clip)
        with cb.core_context():
            res = core.p2p_edit(b, inv, target, core.P2PSettings(
                mode="replace", reweight={"dog": 2.0}, blend_source_words=("cat",), blend_source_only=True,
                blend_threshold=0.5))
            host = b.from_model_latent(res.edited)
    assert torch.equal(edited["samples"], host)
    assert torch.equal(mask, torch.nn.functional.interpolate(res.mask, scale_factor=8)[:, 0])
    keep = (res.mask == 0).expand_as(res.edited)
    assert keep.any() and torch.equal(res.edited[keep], res.source[keep])
    assert not torch.equal(res.edited, res.source)


def test_attention_maps(comfy, models, latent):
    model, clip, _ = models
    inv, _ = inversion(comfy, models, latent, "direct")
    (maps,) = run(comfy, "CustomEditAttentionMaps", model=model, clip=clip, inversion=inv, target_prompt="")
    assert maps.shape == (len(inv.tokens.words), S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
    assert maps.min() >= 0 and maps.max() <= 1
    (tmaps,) = run(comfy, "CustomEditAttentionMaps", model=model, clip=clip, inversion=inv,
                   target_prompt="a photo of a small cat sitting on the grass")
    assert tmaps.shape[0] == len(inv.tokens.words) + 1


def test_users_model_is_untouched(comfy, models, latent):
    """A plain KSampler run gives the same bits before and after our nodes; the patcher is unchanged."""
    model, clip, _ = models

    def ksample():
        with torch.inference_mode():
            pos = comfy.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
            neg = comfy.CLIPTextEncode().encode(clip, "")[0]
            return comfy.KSampler().sample(model, 7, 3, 7.5, "euler", "normal", pos, neg, latent, denoise=0.7)[0]

    options = copy.deepcopy(model.model_options)
    state = (dict(model.patches), dict(model.weight_wrapper_patches), dict(model.object_patches), model.patches_uuid)
    before = ksample()["samples"]
    inv, _ = run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent, source_prompt=SOURCE,
                 steps=3, guidance=7.5, method="null_text", inner_steps=2)
    run(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv, target_prompt="a photo of a dog sitting "
        "on the grass", mode="replace", cross_replace=0.8, self_replace=0.5, blend_words="cat")
    run(comfy, "CustomEditAttentionMaps", model=model, clip=clip, inversion=inv, target_prompt="")
    after = ksample()["samples"]
    assert torch.equal(before, after)
    assert model.model_options == options
    assert state == (dict(model.patches), dict(model.weight_wrapper_patches), dict(model.object_patches),
                     model.patches_uuid)
    assert all(not getattr(m, "weight_function", []) for m in model.model.modules())


def test_null_text_in_the_executor(comfy, root):
    """The real path: validate_prompt + PromptExecutor (inference mode, caching, progress)."""
    import execution
    import folder_paths

    S.write_test_image(Path(folder_paths.get_input_directory()))
    try:
        def graph(method):
            return {
                "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": S.CKPT_NAME}},
                "2": {"class_type": "LoadImage", "inputs": {"image": S.IMAGE_NAME}},
                "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
                "4": {"class_type": "CustomEditNullTextInvert",
                      "inputs": {"model": ["1", 0], "clip": ["1", 1], "latent": ["3", 0], "source_prompt": SOURCE,
                                 "steps": 6, "guidance": 7.5, "method": method, "inner_steps": 5}},
                "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 1], "vae": ["1", 2]}},
                "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
            }

        server = S.ServerStub()
        executor = execution.PromptExecutor(server)
        errors = {}
        for method in ("ddim", "null_text"):
            prompt = graph(method)
            valid, err, outputs, node_errors = __import__("asyncio").run(
                execution.validate_prompt(method, prompt, None))
            assert valid, (err, node_errors)
            executor.execute(prompt, method, {}, outputs)
            assert executor.success, executor.status_messages[-3:]
            source = executor.caches.outputs.get("3")
            recon = executor.caches.outputs.get("4")
            src = _first(source)["samples"]
            rec = _first(recon, 1)["samples"]
            errors[method] = rel_err(rec, src)
            assert executor.history_result["outputs"]["6"]["images"]
        assert errors["null_text"] < 0.8 * errors["ddim"], errors

        # a bad input fails the prompt with our message, naming the input
        prompt = graph("null_text")
        prompt["4"]["inputs"]["guidance"] = 1.0
        executor.execute(prompt, "bad", {}, ["6"])
        assert not executor.success
        failure = [d for e, d in executor.status_messages if e == "execution_error"][-1]
        assert failure["exception_type"].endswith("InputError")
        assert failure["exception_message"].startswith("guidance: ")
    finally:
        (Path(folder_paths.get_input_directory()) / S.IMAGE_NAME).unlink(missing_ok=True)


def _first(entry, slot=0):
    """Output `slot` of a cached node result (the executor caches lists per output slot)."""
    outputs = getattr(entry, "outputs", entry)
    value = outputs[slot]
    return value[0] if isinstance(value, list) else value


def test_cancel_stops_null_text_within_one_optimisation_step(comfy, models, latent):
    import comfy.model_management as mm
    from comfy import utils as cutils

    model, clip, _ = models
    steps, inner = 6, 5
    seen = []

    bar = steps + steps * inner                             # one bar: the walk up, then the optimisation
    asked = steps + 3                                       # the third optimisation step

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == asked:
            mm.interrupt_current_processing(True)          # what the Cancel button does

    old = cutils.PROGRESS_BAR_HOOK
    cutils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent, source_prompt=SOURCE,
                steps=steps, guidance=7.5, method="null_text", inner_steps=inner)
    finally:
        cutils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert {total for _, total in seen} == {bar}            # one bar for the whole inversion, never restarted
    assert [v for v, _ in seen] == sorted(v for v, _ in seen)
    assert seen[-1][0] == asked                            # no optimisation step ran after the request


# ---- errors ----------------------------------------------------------------------------------

def test_refuses_unsupported_models(comfy, models, latent):
    import comfy.supported_models as sm

    _, clip, _ = models
    refiner = types.SimpleNamespace(model=types.SimpleNamespace(model_config=object.__new__(sm.SDXLRefiner)), clone=None)
    msg = expect_input_error("model", comfy.NODE_CLASS_MAPPINGS["CustomEditNullTextInvert"].execute, model=refiner,
                             clip=clip, latent=latent, source_prompt=SOURCE, steps=2, guidance=7.5, method="ddim",
                             inner_steps=1)
    assert "SDXL refiner" in msg and "SD1.x, SD2.x and SDXL base" in msg


def test_bad_inputs_name_the_input(comfy, models, latent):
    model, clip, _ = models
    invert = dict(model=model, clip=clip, latent=latent, source_prompt=SOURCE, steps=2, guidance=7.5,
                  method="null_text", inner_steps=1)
    node = "CustomEditNullTextInvert"
    expect_input_error("latent", run, comfy, node, **{**invert, "latent": {"samples": latent["samples"] * float("nan")}})
    expect_input_error("guidance", run, comfy, node, **{**invert, "guidance": 1.0})
    expect_input_error("source_prompt", run, comfy, node, **{**invert, "source_prompt": "  "})
    expect_input_error("latent", run, comfy, node, **{**invert, "latent": {"samples": latent["samples"][:, :, :7]}})

    inv, _ = inversion(comfy, models, latent, "direct")
    edit = dict(model=model, clip=clip, inversion=inv, target_prompt="a photo of a dog sitting on the grass",
                mode="replace", cross_replace=0.8, self_replace=0.5)
    node = "CustomEditP2PEdit"
    msg = expect_input_error("target_prompt", run, comfy, node, **{**edit, "target_prompt": "a photo of a big dog sitting on the grass"})
    assert "refine" in msg
    expect_input_error("reweight", run, comfy, node, **{**edit, "reweight": "dog=2"})
    expect_input_error("reweight", run, comfy, node, **{**edit, "reweight": "dog:lots"})
    expect_input_error("reweight", run, comfy, node, **{**edit, "reweight": "horse:2"})
    expect_input_error("blend_words", run, comfy, node, **{**edit, "blend_words": "horse"})
    expect_input_error("blend_words", run, comfy, node, **{**edit, "blend_target_words": "dog"})
    expect_input_error("blend_target_words", run, comfy, node,
                       **{**edit, "blend_words": "cat", "blend_target_words": "horse", "blend_source_only": False})
    patched = model.clone()
    key = next(k for k in patched.model_state_dict() if k.endswith("attn2.to_v.weight"))
    patched.add_patches({key: (torch.ones_like(patched.model_state_dict()[key]),)}, 0.1)
    expect_input_error("inversion", run, comfy, node, **{**edit, "model": patched})
    expect_input_error("inversion", run, comfy, "CustomEditAttentionMaps", model=model, clip=clip, inversion="x")
