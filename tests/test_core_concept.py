"""Concept training (Custom Diffusion + ICO) and the concept file, on the tiny diffusers models."""
import os

import pytest
import torch

from customedit_core import augment
from customedit_core import concept as C
from customedit_core.backends.diffusers import DiffusersBackend
from customedit_core.customize import TrainSettings, denoising_loss, train_concept
from customedit_core.errors import InputError
from testmodels.tiny import tiny_models
from customedit_core.tokens import tokenize

PROMPT = "photo of a <new1> dog"


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=0, with_vae=True)


@pytest.fixture(scope="module")
def refs():
    """Three pictures of one red-square 'thing' on noise: nothing the random model produces."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 64, 64, 3, generator=g) * 0.3
    for i, (y, x) in enumerate([(8, 8), (24, 16), (16, 30)]):
        imgs[i, y:y + 24, x:x + 24] = torch.tensor([0.9, 0.1, 0.1])
    return imgs


def encoder(vae):
    def encode(px):
        return vae.encode(px.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * 0.18215
    return encode


def make_backend(models):
    unet, te, tok, _ = models
    return DiffusersBackend(unet, te, tok)


_RUNS = {}


def trained(models, refs, **kw):
    key = tuple(sorted(kw.items()))
    if key not in _RUNS:
        b = make_backend(models)
        s = TrainSettings(class_word="dog", steps=20, learning_rate=1e-2, batch_size=2, num_class_images=2, class_steps=3,
                          seed=0, **kw)
        _RUNS[key] = train_concept(b, refs, encoder(models[3]), s)
        b.close()
    return _RUNS[key]


def eval_loss(models, refs, concept):
    """Fixed noise and timesteps on the un-augmented references: the loss the concept lowers."""
    b = make_backend(models)
    try:
        C.apply(b, concept)
        with torch.no_grad():
            z0 = encoder(models[3])(refs)
            g = torch.Generator().manual_seed(5)
            noise = torch.randn(z0.shape, generator=g)
            t = torch.tensor([100, 400, 700])
            ctx = b.encode([tokenize(b.tokenizer, PROMPT)] * 3)
            return float(denoising_loss(b, z0, ctx, noise, t).mean())
    finally:
        b.close()


def untrained(res):
    """The same concept before training: zero deltas, the token's initial vector."""
    concept = res.concept
    return C.Concept(concept.tokens, concept.class_words, res.initial_vector[None],
                     {k: torch.zeros_like(v) for k, v in concept.deltas.items()}, concept.base_probe,
                     concept.base_fingerprint, {}, "untrained")


def test_training_lowers_the_loss_and_changes_only_kv_and_the_token(models, refs):
    unet, te, _, _ = models
    before = {k: v.clone() for k, v in list(unet.state_dict().items()) + list(te.state_dict().items())}
    res = trained(models, refs)
    after = dict(list(unet.state_dict().items()) + list(te.state_dict().items()))
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    c = res.concept
    kv_names = {k[:-len(".weight")] for k in unet.state_dict() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert len(c.deltas) == len(kv_names) and all(float(d.abs().sum()) > 0 for d in c.deltas.values())
    assert not torch.equal(c.embeddings[0], res.initial_vector)
    assert len(res.losses) == 20 and all(torch.isfinite(torch.tensor(res.losses)))
    assert eval_loss(models, refs, c) < 0.98 * eval_loss(models, refs, untrained(res))


def test_backend_is_left_as_it_was(models, refs):
    b = make_backend(models)
    s = TrainSettings(class_word="dog", steps=2, batch_size=1, prior_weight=0.0, learning_rate=1e-3)
    train_concept(b, refs, encoder(models[3]), s)
    assert b.tokenizer.added == {} and b._deltas is None
    b.close()


def test_save_load_round_trip_is_exact(models, refs, tmp_path):
    c = trained(models, refs).concept
    path = C.save(c, str(tmp_path / "dog.safetensors"))
    loaded = C.load(path)
    assert loaded.tokens == c.tokens and loaded.class_words == c.class_words and loaded.settings == c.settings
    assert torch.equal(loaded.embeddings, c.embeddings)
    assert all(torch.equal(loaded.deltas[k], c.deltas[k]) for k in c.deltas)

    def eps(concept):
        b = make_backend(models)
        try:
            C.apply(b, concept)
            with torch.no_grad():
                ctx = b.encode([tokenize(b.tokenizer, PROMPT)])
                z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
                return b.predict_eps(z, 300, ctx)
        finally:
            b.close()

    assert torch.equal(eps(c), eps(loaded))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_exports_hold_the_deltas_and_the_vector(models, refs, tmp_path):
    from safetensors.torch import load_file

    c = trained(models, refs).concept
    lora = load_file(C.export_lora(c, str(tmp_path / "l.safetensors")))
    assert sorted(lora) == sorted(f"diffusion_model.{k}.diff" for k in c.deltas)
    assert all(torch.equal(lora[f"diffusion_model.{k}.diff"], v) for k, v in c.deltas.items())
    emb = load_file(C.export_embedding(c, str(tmp_path / "e.safetensors")))
    assert torch.equal(emb["emb_params"], c.embeddings)


def test_ico_trains_per_image_contexts(models, refs):
    res = trained(models, refs, ico=True)
    assert res.concept.settings["ico"] is True
    assert res.losses != trained(models, refs).losses


def test_training_is_deterministic(models, refs):
    b = make_backend(models)
    s = TrainSettings(class_word="dog", steps=3, batch_size=1, prior_weight=0.0, learning_rate=1e-3, seed=7)
    a = train_concept(b, refs, encoder(models[3]), s)
    b2 = train_concept(b, refs, encoder(models[3]), s)
    b.close()
    assert a.losses == b2.losses
    assert all(torch.equal(a.concept.deltas[k], b2.concept.deltas[k]) for k in a.concept.deltas)


def test_augmentation_is_deterministic_and_masks_the_canvas(refs):
    m = torch.ones(3, 64, 64)
    v1 = augment.views(refs, m, 6, seed=3)
    v2 = augment.views(refs, m, 6, seed=3)
    assert all(torch.equal(a.image, b.image) and a.prefix == b.prefix for a, b in zip(v1, v2))
    assert {v.prefix for v in v1} - {""} <= set(augment.SMALL + augment.LARGE)
    small = [v for v in v1 if v.scale < 1]
    assert small and all(v.mask.mean() < 1 for v in small)       # the empty border is not trained on
    assert torch.equal(v1[0].image, refs[0])


def test_size_words_only_where_the_reference_says_them(refs):
    """The reference prefixes "a far away"/"very small" only below 0.6 of the size and "zoomed in"/
    "close up" when enlarged; a mildly shrunk view keeps the plain prompt."""
    vs = augment.views(refs, torch.ones(3, 64, 64), 40, seed=0)
    shrunk = [v for v in vs if v.scale < 1]
    assert any(v.scale >= augment.SMALL_BELOW for v in shrunk) and any(v.scale < augment.SMALL_BELOW for v in shrunk)
    for v in vs:
        if v.scale < augment.SMALL_BELOW:
            assert v.prefix in augment.SMALL, v
        elif v.scale > 1:
            assert v.prefix in augment.LARGE, v
        else:
            assert v.prefix == "", v


def _one_step(models, refs, **kw):
    b = make_backend(models)
    try:
        s = TrainSettings(class_word="dog", steps=1, learning_rate=0.05, scale_lr=False, batch_size=1,
                          num_class_images=0, views_per_image=1, seed=0, **kw)
        return train_concept(b, refs[:1], encoder(models[3]), s), b.kv_weights()
    finally:
        b.close()


def test_weight_decay_shrinks_the_whole_kv_weight_as_the_reference(models, refs):
    """The reference's AdamW decays the K/V weights it trains, W + delta, not the delta alone: after one
    step the two runs differ by exactly lr * decay * W (the Adam update itself is the same)."""
    plain, kv = _one_step(models, refs, weight_decay=0.0)
    decayed, _ = _one_step(models, refs, weight_decay=0.5)
    for k, d in plain.concept.deltas.items():
        assert torch.allclose(decayed.concept.deltas[k], d - 0.05 * 0.5 * kv[k].float(), atol=1e-6), k


def test_gradients_are_clipped_as_the_reference(models, refs, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        seen.append((max_norm, len(params)))
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    res, kv = _one_step(models, refs)
    assert seen == [(1.0, 1 + len(kv))]               # the token vector and every K/V delta, at norm 1
    seen.clear()
    _one_step(models, refs, max_grad_norm=0.0)
    assert seen == []
    b = make_backend(models)
    try:
        expect("max_grad_norm", train_concept, b, refs, encoder(models[3]),
               TrainSettings(class_word="dog", max_grad_norm=float("nan")))
    finally:
        b.close()


def expect(name, fn, *a, **kw):
    with pytest.raises(InputError) as e:
        fn(*a, **kw)
    assert e.value.input_name == name, str(e.value)
    return str(e.value)


def test_bad_inputs(models, refs, tmp_path):
    b = make_backend(models)
    enc = encoder(models[3])
    try:
        expect("token", train_concept, b, refs, enc, TrainSettings(token="dog", class_word="dog", steps=1))
        expect("token", train_concept, b, refs, enc, TrainSettings(token="sks", class_word="dog", steps=1))
        expect("token", train_concept, b, refs, enc, TrainSettings(token="a b", class_word="dog", steps=1))
        expect("class_word", train_concept, b, refs, enc, TrainSettings(class_word="", steps=1))
        expect("images", train_concept, b, refs[:0], enc, TrainSettings(class_word="dog", steps=1))
        expect("images", train_concept, b, refs[:, :60], enc, TrainSettings(class_word="dog", steps=1))
        expect("mask", train_concept, b, refs, enc, TrainSettings(class_word="dog", steps=1), masks=torch.zeros(1, 64, 64))
        expect("precision", train_concept, b, refs, enc, TrainSettings(class_word="dog", steps=1, precision="fp16"))
    finally:
        b.close()
    c = trained(models, refs).concept
    path = C.save(c, str(tmp_path / "c.safetensors"))
    data = open(path, "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(data[: len(data) - 100])
    assert "corrupt or truncated" in expect("concept", C.load, str(tmp_path / "cut.safetensors"))
    open(tmp_path / "p.bin", "wb").write(b"\x80\x04junk")
    assert "pickle" in expect("concept", C.load, str(tmp_path / "p.bin"))
    assert "not a customedit concept" in expect("concept", C.load, C.export_embedding(c, str(tmp_path / "e.safetensors")))
    # a second concept with the same token on one model; a concept for another model family
    b = make_backend(models)
    try:
        C.apply(b, c)
        expect("concept", C.apply, b, c)
    finally:
        b.close()
    wide = C.Concept(c.tokens, c.class_words, torch.zeros(1, 64), c.deltas, c.base_probe, "x", {}, "wide")
    b = make_backend(models)
    try:
        expect("concept", C.apply, b, wide)
        # same shapes, other weights: applied with a warning
        other = C.Concept(c.tokens, c.class_words, c.embeddings, c.deltas, c.base_probe + 1.0, "y", {}, "other")
        warnings = C.apply(b, other)
        assert warnings and "another base model" in warnings[0]
    finally:
        b.close()


def test_gradient_checkpointing_gives_the_same_training(models, refs):
    b = make_backend(models)
    s = dict(class_word="dog", steps=2, batch_size=1, prior_weight=0.0, learning_rate=1e-3, seed=3)
    try:
        plain = train_concept(b, refs, encoder(models[3]), TrainSettings(**s))
        ckpt = train_concept(b, refs, encoder(models[3]), TrainSettings(gradient_checkpointing=True, **s))
    finally:
        b.close()
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert all(torch.allclose(ckpt.concept.deltas[k], plain.concept.deltas[k], atol=1e-6) for k in plain.concept.deltas)


def test_import_of_diffusers_custom_diffusion_output(models, refs, tmp_path):
    """diffusers' Custom Diffusion saves full trained to_k/to_v weights per processor and one
    <token>.safetensors; the import turns them into deltas against the base model."""
    from safetensors.torch import save_file

    from customedit_core.unet_names import ldm_to_diffusers

    c = trained(models, refs).concept
    b = make_backend(models)
    try:
        base = b.kv_weights()
        lpb = models[0].config.layers_per_block
        weights = {}
        for name, d in c.deltas.items():
            layer, proj = name.rsplit(".", 1)
            weights[f"{ldm_to_diffusers(layer, lpb)}.processor.{proj}_custom_diffusion.weight"] = base[name] + d
        save_file(weights, str(tmp_path / "pytorch_custom_diffusion_weights.safetensors"))
        save_file({"<new1>": c.embeddings[0]}, str(tmp_path / "<new1>.safetensors"))
        imported = C.from_custom_diffusion(str(tmp_path / "pytorch_custom_diffusion_weights.safetensors"),
                                           {"<new1>": str(tmp_path / "<new1>.safetensors")}, {"<new1>": "dog"}, b,
                                           layers_per_block=lpb)
        assert imported.tokens == ("<new1>",) and imported.class_words == ("dog",)
        assert torch.equal(imported.embeddings, c.embeddings)
        assert sorted(imported.deltas) == sorted(c.deltas)
        assert all(torch.allclose(imported.deltas[k], c.deltas[k], atol=1e-6) for k in c.deltas)
        assert C.check_base(imported, b) == []
        torch.save(weights, str(tmp_path / "pytorch_custom_diffusion_weights.bin"))
        msg = expect("weights", C.from_custom_diffusion, str(tmp_path / "pytorch_custom_diffusion_weights.bin"),
                     {}, {}, b)
        assert "pickle" in msg and "safetensors" in msg
    finally:
        b.close()


def test_token_only_training_is_textual_inversion(models, refs):
    res = trained(models, refs, train="token")
    c = res.concept
    assert all(float(d.abs().sum()) == 0 for d in c.deltas.values())
    assert not torch.equal(c.embeddings[0], res.initial_vector)
    with pytest.raises(InputError, match="train: expected one of"):
        TrainSettings(class_word="dog", train="full").check()
