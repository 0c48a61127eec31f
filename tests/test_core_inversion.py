"""Inversion properties on a tiny SD-shaped model (CPU, fixed seeds)."""
import pytest
import torch

from customedit_core import invert, reconstruct
from customedit_core.errors import InputError

PROMPT = "a photo of a cat on grass"


def err(a, b):
    return (a - b).abs().mean().item()


@pytest.fixture(scope="module")
def ddim1(backend, z0):
    return invert(backend, z0, PROMPT, steps=10, guidance=1.0, method="ddim")


def test_ddim_inversion_reconstructs_at_guidance_one(ddim1, z0):
    assert len(ddim1.latents) == 11 and len(ddim1.uncond) == 10
    assert err(ddim1.reconstruction, z0) < 0.05
    # and the trajectory really went to noise: z_T is far from the source
    assert err(ddim1.noise, z0) > 0.5


def test_null_text_beats_ddim_at_high_guidance(backend, z0, ddim1):
    ddim = invert(backend, z0, PROMPT, steps=10, guidance=7.5, method="ddim")
    nti = invert(backend, z0, PROMPT, steps=10, guidance=7.5, method="null_text", inner_steps=30)
    e_ddim, e_nti, floor = err(ddim.reconstruction, z0), err(nti.reconstruction, z0), err(ddim1.reconstruction, z0)
    assert e_nti < 0.3 * e_ddim, (e_nti, e_ddim)
    assert e_nti < 1.5 * floor, (e_nti, floor)         # close to the inversion's own error
    # the optimised embeddings differ per step, and the sampler path gives the same result
    assert not torch.equal(nti.uncond[0], nti.uncond[-1])
    assert err(reconstruct(backend, nti), nti.reconstruction) < 1e-5


def test_null_text_early_stop(backend, z0):
    nti = invert(backend, z0, PROMPT, steps=5, guidance=1.5, method="null_text", inner_steps=10,
                 early_stop=1.0)
    assert nti.inner_steps_used == [1] * 5


def test_direct_inversion_is_exact_through_the_sampler(backend, z0):
    inv = invert(backend, z0, PROMPT, steps=10, guidance=7.5, method="direct")
    rec = reconstruct(backend, inv)
    assert err(rec, z0) < 1e-5
    without = invert(backend, z0, PROMPT, steps=10, guidance=7.5, method="ddim").reconstruction
    assert err(without, z0) > 100 * err(rec, z0)


def test_negative_prompt_inversion_tracks_ddim_floor(backend, z0, ddim1):
    inv = invert(backend, z0, PROMPT, steps=10, guidance=7.5, method="negative_prompt")
    assert err(inv.reconstruction, z0) == pytest.approx(err(ddim1.reconstruction, z0), rel=1e-3)


def test_model_untouched_by_null_text(tiny, backend, z0):
    unet, te, _ = tiny
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    invert(backend, z0, PROMPT, steps=3, guidance=7.5, method="null_text", inner_steps=2)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in list(unet.parameters()) + list(te.parameters()))


@pytest.mark.parametrize("kwargs,name", [
    (dict(guidance=1.0, method="null_text"), "guidance"),
    (dict(method="magic"), "method"),
    (dict(steps=0), "steps"),
    (dict(prompt=""), "source_prompt"),
    (dict(inner_steps=0), "inner_steps"),
])
def test_bad_settings(backend, z0, kwargs, name):
    args = dict(prompt=PROMPT, steps=3, guidance=7.5, method="null_text")
    args.update(kwargs)
    with pytest.raises(InputError) as e:
        invert(backend, z0, **args)
    assert e.value.input_name == name


def test_bad_latents(backend, z0):
    with pytest.raises(InputError, match="NaN"):
        invert(backend, z0.clone().fill_(float("nan")), PROMPT, steps=2, method="ddim")
    with pytest.raises(InputError, match="multiples of 32 px"):
        invert(backend, z0[:, :, :15, :15], PROMPT, steps=2, method="ddim")
    with pytest.raises(InputError, match="channels"):
        invert(backend, z0[:, :3], PROMPT, steps=2, method="ddim")
    with pytest.raises(InputError, match="one image at a time"):
        invert(backend, z0.expand(2, -1, -1, -1), PROMPT, steps=2, method="ddim")


def test_inversion_refuses_other_model_or_steps(tiny, ddim1):
    from customedit_core.backends.diffusers import DiffusersBackend
    from testmodels.tiny import tiny_models
    ddim1.check(DiffusersBackend(*tiny))          # same weights: fine
    other = DiffusersBackend(*tiny_models(seed=1))
    with pytest.raises(InputError, match="different model"):
        ddim1.check(other)
    with pytest.raises(InputError, match="10 steps but 20"):
        ddim1.check(DiffusersBackend(*tiny), steps=20)


@pytest.mark.parametrize("method,with_rec,calls", [("direct", True, 6), ("ddim", False, 6), ("ddim", True, 12),
                                                   ("negative_prompt", True, 12)])
def test_model_calls_per_inversion(backend, z0, monkeypatch, method, with_rec, calls):
    """direct inversion is one DDIM pass; the reconstruction pass is the only extra for ddim/NPI."""
    n = {"calls": 0}
    real = backend.predict_eps

    def counting(*a, **k):
        n["calls"] += 1
        return real(*a, **k)
    monkeypatch.setattr(backend, "predict_eps", counting)
    inv = invert(backend, z0, PROMPT, steps=6, guidance=7.5, method=method, with_reconstruction=with_rec)
    assert n["calls"] == calls
    assert (inv.reconstruction is not None) == with_rec


@pytest.mark.parametrize("steps", [1, 4, 10, 20, 50, 999])
def test_timestep_grid_is_diffusers_steps_offset_one(steps):
    """The grid the Prompt-to-Prompt reference really runs (diffusers rewrites steps_offset to 1) and
    diffusers' DDIM/DiffEdit use: 981..1 for 50 steps, 901..1 for 10; no step at t=0."""
    from diffusers import DDIMScheduler

    from customedit_core.ddim import Schedule, sd_alphas_cumprod

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    s = Schedule(sd_alphas_cumprod(), steps)
    assert s.timesteps == [int(t) for t in ref.timesteps]
    assert s.timesteps[-1] == 1 and (steps != 50 or s.timesteps[0] == 981) and (steps != 10 or s.timesteps[0] == 901)
    # one DDIM step equals diffusers' (eta 0), the last one landing on alphas_cumprod[0]
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    for t in (s.timesteps[0], s.timesteps[-1]):
        assert torch.allclose(s.step(z, eps, t), ref.step(eps, t, z).prev_sample, atol=1e-6)


def test_steps_past_the_grid_are_refused():
    from customedit_core.ddim import Schedule, sd_alphas_cumprod

    with pytest.raises(InputError, match="between 1 and 999"):
        Schedule(sd_alphas_cumprod(), 1000)


@pytest.mark.parametrize("method, with_rec", [("null_text", True), ("ddim", True), ("ddim", False), ("direct", True)])
def test_one_progress_bar_covers_the_whole_inversion(backend, z0, monkeypatch, method, with_rec):
    """ComfyUI shows one bar per progress() call: an inversion opens one and fills it exactly once
    (null-text used to fill a bar for the walk up, then restart for the optimisation)."""
    bars = []

    def progress(total):
        bars.append([total, 0])
        return lambda n=1: bars[-1].__setitem__(1, bars[-1][1] + n)
    monkeypatch.setattr(backend, "progress", progress)
    invert(backend, z0, "a red circle", steps=3, guidance=7.5, method=method, inner_steps=2,
           with_reconstruction=with_rec)
    assert len(bars) == 1 and bars[0][0] == bars[0][1] > 0, bars
