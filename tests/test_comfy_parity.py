"""Cross-backend parity: one checkpoint file, loaded by ComfyUI's CheckpointLoaderSimple (ComfyBackend)
and by the pack's single-file loader (DiffusersBackend), gives the same text embeddings, noise
prediction, inversion trajectories and edit latents, within the host's precision.

Tiers: "tiny" (the shared generator's 2-level SD1.x UNet with CLIP-L) and "sdxl" (make_tiny_sdxl.py:
SDXL's structure at test widths, CLIP-L + CLIP-G, the pooled vector and size conditioning in y) always
run with COMFYUI_DIR; "sd15" and "sd2" (random weights at SD1.5's and SD2.x-768-v's exact shapes, 2 GB
files generated at test time) are the real-shapes tier (`CUSTOMEDIT_REAL_SHAPES=1` or `-m realshapes`).
ComfyUI's loader knows SDXL only at SDXL's exact widths (gigabytes, and CLIP-G of 32 layers x 1280), so
the "sdxl" file loads through one test-only supported-model entry (tests/comfy_tiny_sdxl_node); the rest
of the loading, the model class and its encode_adm are ComfyUI's own.

The checkpoints hold fp16 weights, so both loaders start from the same values; on the CPU both compute
in fp32 (ComfyUI upcasts its fp16 text encoder), and everything agrees to float error: measured
RMS-relative differences are 5e-7 (text), 2e-6 (noise prediction) and 4e-6 / 2e-5 (P2P edits,
SD1.5 / tiny); on the tiny SDXL 4e-7 (text and pooled vector), 5e-6 (noise prediction, also at
CLIPTextEncodeSDXL-style sizes) and 1.3e-6 (P2P edits): well inside the tolerances below (on a GPU in
fp16 expect about 1e-3).

  COMFYUI_DIR=/tmp/comfyui OMP_NUM_THREADS=2 /tmp/comfy-venv/bin/python -m pytest tests/test_comfy_parity.py
"""
import comfy_support as S

S.skip_unless_comfy()

import gc  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

STEPS = 4
SOURCE = "a photo of a cat sitting on the grass"
TARGET = "a photo of a striped cat sitting on the grass"
PROMPTS = (SOURCE, "", "a watercolor painting of a red house by the lake, golden hour")
TIERS = [pytest.param("tiny", id="tiny"), pytest.param("sdxl", id="sdxl"),
         pytest.param("sd15", id="sd15", marks=pytest.mark.realshapes),
         pytest.param("sd2", id="sd2", marks=pytest.mark.realshapes)]
# relative tolerances (RMS of the difference / RMS of the reference), 30-50x what was measured
TEXT_TOL, EPS_TOL, WALK_TOL = 1e-4, 1e-4, 1e-3


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def report(tier, what, value):
    print(f"parity[{tier}] {what}: {value:.2e}")      # shown with -s / -rP: the measured agreement
    return value


@pytest.fixture(scope="module", params=TIERS)
def pair(request, comfy, root):
    """(tier, ComfyBackend, DiffusersBackend, the pack modules as ComfyUI imported them) on one file."""
    import folder_paths

    tier = request.param
    name = S.checkpoint(root, tier)
    cb = S.pack_module(comfy, "customedit_core.backends.comfy")
    db = S.pack_module(comfy, "customedit_core.backends.diffusers")
    sf = S.pack_module(comfy, "customedit_core.single_file")
    vocab = S.pack_module(comfy, "customedit_core.clip_vocab")
    with torch.inference_mode():
        model, clip, _ = comfy.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    comfy_b = cb.ComfyBackend(model, clip)
    # the pack's own single-file loader on the same file (UNet + text encoder; the tiny tier's TAESD
    # VAE is not an SD VAE, and parity needs no VAE)
    path = folder_paths.get_full_path("checkpoints", name)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    sd = load_file(path)               # (sf.read refuses the tiny tiers' TAESD-only files)
    family = ("sdxl" if any(k.startswith(sf.SGM) for k in sd) else
              "sd2" if any(k.startswith(sf.SD2_TEXT) for k in sd) else "sd1")
    pred, note = sf.prediction_type(sd, meta, family)
    ck = sf.Checkpoint(path, family, sf.unet_config(sd, family), sf.text_config(sd, family), {}, pred, note, sd, meta,
                       sf.text_config_2(sd, family))
    tok = vocab.clip_tokenizer("!" if family == "sd2" else "<|endoftext|>")
    unet, te = sf.build_unet(ck).requires_grad_(False), sf.build_text_encoder(ck, tok).requires_grad_(False)
    second = {}
    if family == "sdxl":                # CLIP-G's tokenizer: the same vocabulary, padded with "!"
        tok2 = vocab.clip_tokenizer("!")
        second = {"text_encoder_2": sf.build_text_encoder_2(ck, tok2).requires_grad_(False), "tokenizer_2": tok2}
    sd.clear()
    diff_b = db.DiffusersBackend(unet, te, tok, prediction_type=pred, **second)
    assert comfy_b.sdxl == (family == "sdxl")
    mods = {k: S.pack_module(comfy, f"customedit_core.{k}") for k in ("tokens", "inversion", "edit")}
    mods["cb"], mods["sdxl_cond"] = cb, S.pack_module(comfy, "customedit_core.backends.sdxl_cond")
    yield tier, comfy_b, diff_b, mods
    diff_b.close()
    del comfy_b, diff_b, unet, te, model, clip
    import comfy.model_management as mm
    mm.unload_all_models()
    mm.soft_empty_cache()
    gc.collect()


def test_tokens_and_text_embeddings_agree(pair):
    tier, c, d, m = pair
    tokenize = m["tokens"].tokenize
    for prompt in PROMPTS:
        tc = tokenize(c.tokenizer, prompt, allow_empty=True)
        td = tokenize(d.tokenizer, prompt, allow_empty=True)
        assert list(tc.ids) == list(td.ids), prompt            # ComfyUI's tokenizer files vs the vendored BPE
        with m["cb"].core_context():
            ec, ed = c.encode([tc]), d.encode([td])
        assert ec.shape == ed.shape
        assert report(tier, f"text {prompt[:20]!r}", rel(ec, ed)) < TEXT_TOL, (tier, prompt)
        if c.sdxl:                      # the pooled CLIP-G row (it makes y) on its own, and both streams
            assert report(tier, "pooled", rel(ec[:, -1], ed[:, -1])) < TEXT_TOL, prompt
            wl = c.text_widths[0]
            assert rel(ec[:, :77, :wl], ed[:, :77, :wl]) < TEXT_TOL and rel(ec[:, :77, wl:], ed[:, :77, wl:]) < TEXT_TOL


def test_noise_prediction_agrees(pair):
    tier, c, d, m = pair
    tokens = m["tokens"].tokenize(d.tokenizer, SOURCE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with m["cb"].core_context():
        ctx = d.encode([tokens]).expand(2, -1, -1)             # the same embedding into both UNets
        for t in (981, 501, 21):
            ec, ed = c.predict_eps(z, t, ctx), d.predict_eps(z, t, ctx)
            assert report(tier, f"eps t={t}", rel(ec, ed)) < EPS_TOL, (tier, t)


@pytest.mark.parametrize("method", ["ddim", "negative_prompt", "direct", "null_text"])
def test_inversion_and_edit_agree(pair, method):
    tier, c, d, m = pair
    inversion, edit = m["inversion"], m["edit"]
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.8
    out = {}
    with m["cb"].core_context():
        for name, b in (("comfy", c), ("diffusers", d)):
            inv = inversion.invert(b, z0, SOURCE, steps=STEPS, guidance=7.5, method=method, inner_steps=2)
            res = edit.p2p_edit(b, inv, TARGET, edit.P2PSettings(mode="refine"))
            out[name] = inv, res
    (ic, rc), (id_, rd) = out["comfy"], out["diffusers"]
    worst = max(rel(a, b) for a, b in zip(ic.latents, id_.latents))
    assert report(tier, f"{method} inverted latents (worst step)", worst) < WALK_TOL, (tier, method)
    if ic.reconstruction is not None:
        assert rel(ic.reconstruction, id_.reconstruction) < WALK_TOL, (tier, method, "reconstruction")
    assert report(tier, f"{method} P2P refine edit", rel(rc.edited, rd.edited)) < WALK_TOL, (tier, method)
    assert rel(rc.source, rd.source) < WALK_TOL, (tier, method, "source branch")
    # the edit changed something (otherwise agreement would say nothing)
    assert rel(rd.edited, rd.source) > 10 * rel(rc.edited, rd.edited)


def test_sdxl_size_conditioning_agrees(pair):
    """CLIPTextEncodeSDXL-style sizes (original, crop, target) reach y alike in both backends, and
    they matter (y is not left at the default size)."""
    tier, c, d, m = pair
    if not c.sdxl:
        pytest.skip("SDXL only")
    sizes = m["sdxl_cond"].SizeConditioning(original=(1024, 768), crop=(16, 32), target=(896, 1152))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with m["cb"].core_context():
        ctx = d.encode([m["tokens"].tokenize(d.tokenizer, SOURCE)])
        plain = d.predict_eps(z, 501, ctx)
        try:
            c.size = d.size = sizes
            ec, ed = c.predict_eps(z, 501, ctx), d.predict_eps(z, 501, ctx)
        finally:
            c.size = d.size = m["sdxl_cond"].SizeConditioning()
    assert report(tier, "eps at CLIPTextEncodeSDXL sizes", rel(ec, ed)) < EPS_TOL
    assert rel(ed, plain) > 100 * rel(ec, ed)
