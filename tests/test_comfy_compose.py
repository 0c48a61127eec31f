"""Cooperation with other packs: what is already on the MODEL runs inside our inversions and edits.

- attn replace patches (IPAdapter-style `set_model_attn2_replace`): our controllers act inside them
  through `optimized_attention_override`; one that computes attention on its own still runs, and
  an edit that must change attention there is refused, naming it;
- `model_function_wrapper` and the patcher's APPLY_MODEL / DIFFUSION_MODEL wrappers run on every call;
- the host's MODEL is untouched afterwards (a plain KSampler gives the same bits).

Expectations are exact where an equivalent weight patch exists: doubling an attention output before
`to_out` is doubling `to_out`'s weight, doubling the UNet's output is doubling its last conv.

  COMFYUI_DIR=/tmp/ComfyUI OMP_NUM_THREADS=1 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_compose.py
"""
import comfy_support as S

S.skip_unless_comfy()

from comfy_support import expect_input_error, run_node as run  # noqa: E402

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

STEPS = 4
SOURCE = "a photo of a cat sitting on the grass"
TARGET = "a photo of a dog sitting on the grass"
EDIT = dict(target_prompt=TARGET, mode="replace", cross_replace=0.8, self_replace=0.5, reweight="dog:2",
            blend_words="cat", blend_threshold=0.5, blend_start=0.2)


@pytest.fixture(scope="module")
def models(comfy):
    with torch.inference_mode():
        return comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[:2]


@pytest.fixture(scope="module")
def latent(comfy):
    with torch.inference_mode():
        vae = comfy.CheckpointLoaderSimple().load_checkpoint(S.CKPT_NAME)[2]
        return comfy.VAEEncode().encode(vae, torch.from_numpy(S.image_array())[None])[0]


def blocks(model):
    """(ComfyUI patch key, module name) of every transformer block: ('input', 1) style keys (the
    block-wide form) for input/output blocks, the per-index form for the middle one."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    out = []
    for name, mod in model.model.diffusion_model.named_modules():
        if isinstance(mod, BasicTransformerBlock):
            part, number = name.split(".")[0], name.split(".")[1]
            if part == "middle_block":
                out.append((("middle", 0, int(name.rsplit(".", 1)[1])), name))
            else:
                out.append(((part.split("_")[0], int(number)), name))
    return out


def doubling_patch(calls, honours_override=True):
    """An attn2 replace patch that doubles the attention output, as a pack would write it: with or without
    handing its transformer_options on to ComfyUI's attention function."""
    from comfy.ldm.modules.attention import optimized_attention

    def double_attention(q, k, v, extra_options):
        calls.append(extra_options["cond_or_uncond"])
        kw = {"transformer_options": extra_options} if honours_override else {}
        return 2 * optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options["attn_precision"], **kw)

    return double_attention


def with_attn2_patch(model, calls, honours_override=True):
    m = model.clone()
    patch = doubling_patch(calls, honours_override)
    for key, _ in blocks(model):
        m.set_model_attn2_replace(patch, *key)
    return m


def with_doubled_weights(model, keys):
    m = model.clone()
    sd = model.model_state_dict()
    m.add_patches({k: ("diff", (sd[k].clone(),)) for k in keys}, 1.0)        # W + W: exactly 2W
    return m


def to_out_keys(model):
    return [f"diffusion_model.{name}.attn2.to_out.0.weight" for _, name in blocks(model)]


def invert_and_edit(comfy, model, clip, latent, method="direct"):
    inv, recon = run(comfy, "CustomEditNullTextInvert", model=model, clip=clip, latent=latent, source_prompt=SOURCE,
                     steps=STEPS, guidance=7.5, method=method, inner_steps=1)
    edited, mask = run(comfy, "CustomEditP2PEdit", model=model, clip=clip, inversion=inv, **EDIT)
    return inv, recon["samples"], edited["samples"], mask


def test_attn2_replace_patch_runs_inside_our_edit_and_inversion(comfy, models, latent):
    model, clip = models
    calls = []
    patched = with_attn2_patch(model, calls)
    inv_p, recon_p, edit_p, mask_p = invert_and_edit(comfy, patched, clip, latent)
    assert calls and [1, 0] in calls      # cfg calls name their uncond/cond halves as a KSampler does
    n_calls = len(calls)
    inv_w, recon_w, edit_w, mask_w = invert_and_edit(comfy, with_doubled_weights(model, to_out_keys(model)), clip, latent)
    _, _, edit_0, _ = invert_and_edit(comfy, model, clip, latent)
    # the patch ran at every site of every call, under our controllers: the same bits as 2x to_out
    assert all(torch.equal(a, b) for a, b in zip(inv_p.latents, inv_w.latents))
    assert torch.equal(recon_p, recon_w)
    assert torch.equal(edit_p, edit_w) and torch.equal(mask_p, mask_w)
    assert not torch.equal(edit_p, edit_0)
    assert n_calls % len(blocks(model)) == 0


def test_patch_computing_attention_itself(comfy, models, latent):
    """A patch that never consults optimized_attention_override still runs; where our controllers only
    observe (maps, inversion) its output is kept; an edit that must change attention there is refused."""
    model, clip = models
    calls = []
    legacy = with_attn2_patch(model, calls, honours_override=False)
    weights = with_doubled_weights(model, to_out_keys(model))
    inv, recon = run(comfy, "CustomEditNullTextInvert", model=legacy, clip=clip, latent=latent, source_prompt=SOURCE,
                     steps=STEPS, guidance=7.5, method="ddim", inner_steps=1)
    inv_w, recon_w = run(comfy, "CustomEditNullTextInvert", model=weights, clip=clip, latent=latent,
                         source_prompt=SOURCE, steps=STEPS, guidance=7.5, method="ddim", inner_steps=1)
    assert calls and torch.equal(recon["samples"], recon_w["samples"])
    (maps,) = run(comfy, "CustomEditAttentionMaps", model=legacy, clip=clip, inversion=inv, target_prompt="")
    (maps_w,) = run(comfy, "CustomEditAttentionMaps", model=weights, clip=clip, inversion=inv_w, target_prompt="")
    assert torch.allclose(maps, maps_w, atol=1e-4)
    msg = expect_input_error("model", run, comfy, "CustomEditP2PEdit", model=legacy, clip=clip, inversion=inv, **EDIT)
    assert "double_attention" in msg and "attn2" in msg and "optimized_attention_override" in msg


def test_model_function_wrapper_and_patcher_wrappers_run(comfy, models, latent):
    import comfy.patcher_extension as pe

    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    core = S.pack_module(comfy, "customedit_core")
    model, clip = models
    seen, applied = [], []

    def scale_eps(apply_model, args):          # eps -> 0.75 eps
        x = args["input"]
        seen.append((list(args["cond_or_uncond"]), x.shape[0], args["timestep"].shape[0]))
        return x - 0.75 * (x - apply_model(x, args["timestep"], **args["c"]))

    def count(executor, *args, **kw):
        applied.append(1)
        return executor(*args, **kw)

    def double_output(executor, *args, **kw):
        return 2 * executor(*args, **kw)

    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(scale_eps)
    wrapped.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test-count", count)
    wrapped.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test-double", double_output)
    inv, recon, edit, _ = invert_and_edit(comfy, wrapped, clip, latent, method="ddim")
    assert len(seen) == len(applied) > 0
    assert ([1, 0], 4, 4) in seen and ([0], 1, 1) in seen     # edit (cfg, 2 prompts) and inversion calls

    # expectation: the same model with its last conv doubled (= the DIFFUSION_MODEL wrapper, exactly), eps x0.75
    doubled = with_doubled_weights(model, ["diffusion_model.out.2.weight", "diffusion_model.out.2.bias"])
    predictions = []

    class ScaledEps(cb.ComfyBackend):
        def predict_eps(self, *args, **kw):
            predictions.append(1)
            return 0.75 * super().predict_eps(*args, **kw)

    with torch.inference_mode():
        b = ScaledEps(doubled, clip)
        with cb.core_context():
            exp = core.invert(b, b.to_model_latent(latent["samples"]), SOURCE, steps=STEPS, guidance=7.5, method="ddim")
            res = core.p2p_edit(b, exp, TARGET, core.P2PSettings(
                mode="replace", reweight={"dog": 2.0}, blend_source_words=("cat",), blend_source_only=True, blend_threshold=0.5))
            exp_edit = b.from_model_latent(res.edited)
    assert len(predictions) == len(seen)
    for a, e in zip(inv.latents, exp.latents):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-4)
    assert torch.allclose(edit, exp_edit, atol=1e-4, rtol=1e-3)
    inv_0, _, edit_0, _ = invert_and_edit(comfy, model, clip, latent, method="ddim")
    assert (inv.noise - inv_0.noise).abs().max() > 100 * (inv.noise - exp.noise).abs().max()
    assert (edit - edit_0).abs().max() > 10 * (edit - exp_edit).abs().max()


def test_host_model_is_untouched(comfy, models, latent):
    import comfy.patcher_extension as pe

    model, clip = models
    host = with_attn2_patch(model, [])
    host.set_model_unet_function_wrapper(lambda apply_model, a: apply_model(a["input"], a["timestep"], **a["c"]))
    host.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test-id", lambda ex, *a, **k: ex(*a, **k))

    def ksample():
        with torch.inference_mode():
            pos = comfy.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
            neg = comfy.CLIPTextEncode().encode(clip, "")[0]
            return comfy.KSampler().sample(host, 7, 3, 7.5, "euler", "normal", pos, neg, latent, denoise=0.7)[0]

    options = copy.deepcopy(host.model_options)
    wrappers = copy.deepcopy(host.wrappers)
    state = (dict(host.patches), dict(host.object_patches), dict(host.weight_wrapper_patches), host.patches_uuid)
    before = ksample()["samples"]
    invert_and_edit(comfy, host, clip, latent)
    assert torch.equal(before, ksample()["samples"])
    assert host.model_options == options and host.wrappers == wrappers
    assert state == (dict(host.patches), dict(host.object_patches), dict(host.weight_wrapper_patches), host.patches_uuid)
