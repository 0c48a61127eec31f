"""DiffEdit (mask from noise differences, masked encode/decode) and the mask conversions, on a tiny
SD-shaped model (CPU, fixed seeds)."""
import pytest
import torch

from customedit_core.diffedit import diffedit_mask, diffedit_sample, mask_from_difference
from customedit_core.errors import InputError
from customedit_core.masks import image_mask, latent_mask

SRC = "a photo of a cat on grass"
TGT = "a photo of a dog on grass"


class RegionBackend:
    """The tiny backend, except that the prompt moves the noise estimate only inside a known box:
    eps = eps_model(z, t, "") + box * (a few numbers of the prompt embedding)."""

    def __init__(self, inner, box):
        self.inner, self.box = inner, box

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_eps(self, z, t, context, hook=None):
        null = self.inner.encode([self._empty()]).expand(z.shape[0], -1, -1)
        base = self.inner.predict_eps(z, t, null)
        shift = context.mean(1)[:, :4, None, None]           # [B, 4, 1, 1]: depends on the prompt
        return base + self.box * shift

    def _empty(self):
        from customedit_core.tokens import tokenize
        return tokenize(self.inner.tokenizer, "", allow_empty=True)


def test_mask_covers_where_the_noise_estimates_differ(backend, z0):
    box = torch.zeros(1, 1, 16, 16)
    box[..., 3:9, 5:12] = 1.0                         # 42 of 256 cells: under a third of the image
    res = diffedit_mask(RegionBackend(backend, box), z0, SRC, TGT, samples=3, strength=0.5)
    assert torch.equal(res.mask, box)
    assert res.heat[box == 1].min() == 1.0 and res.heat[box == 0].max() == 0.0


def test_mask_is_empty_for_equal_prompts_and_deterministic_by_seed(backend, z0):
    same = diffedit_mask(backend, z0, SRC, "a  photo of a cat on grass", samples=2)
    assert same.mask.sum() == 0 and same.heat.sum() == 0
    a = diffedit_mask(backend, z0, SRC, TGT, samples=2, seed=3)
    b = diffedit_mask(backend, z0, SRC, TGT, samples=2, seed=3)
    c = diffedit_mask(backend, z0, SRC, TGT, samples=2, seed=4)
    assert torch.equal(a.heat, b.heat) and not torch.equal(a.heat, c.heat)
    assert 0 < a.mask.mean() < 1
    assert set(a.mask.unique().tolist()) <= {0.0, 1.0}


def test_mask_normalisation_clamps_at_three_times_the_mean():
    diff = torch.tensor([[0.0, 1.0], [2.0, 9.0]])     # mean 3: clamp at 9, threshold 0.5 = above 4.5
    res = mask_from_difference(diff, 0.5, 1.0)
    assert torch.allclose(res.heat[0, 0], diff / 9.0)
    assert res.mask[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert mask_from_difference(diff, 0.15, 1.0).mask.sum() == 2
    assert mask_from_difference(diff * 1e-7, 0.5, 1.0).mask.sum() == 0     # float noise is "equal"


@pytest.fixture(scope="module")
def region_mask():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 2:9] = 1
    return m


def test_outside_the_mask_the_latent_follows_the_encoding(backend, z0, region_mask):
    steps, seen = 10, []
    res = diffedit_sample(backend, z0, region_mask, TGT, encoding_ratio=0.8, steps=steps,
                          callback=lambda i, z: seen.append((i, z.clone())))
    assert len(res.encoded) == 9                       # z0 and 8 inverse steps
    assert [i for i, _ in seen] == list(range(2, 10))  # decoding starts where the encoding stopped
    out = region_mask == 0
    for i, z in seen:
        same_t = res.encoded[steps - i - 1]            # the inverted latent of the timestep the step reached
        assert torch.equal(z[out.expand_as(z)], same_t[out.expand_as(z)]), i
    assert torch.equal(res.edited[out.expand_as(z0)], z0[out.expand_as(z0)])
    assert (res.edited - z0)[(~out).expand_as(z0)].abs().mean() > 1e-2
    # another prompt edits differently, only inside
    other = diffedit_sample(backend, z0, region_mask, "a photo of a red car on grass", steps=steps)
    assert not torch.equal(other.edited, res.edited)


def test_empty_and_full_masks(backend, z0, region_mask):
    none = diffedit_sample(backend, z0, torch.zeros(1, 1, 16, 16), TGT, steps=6)
    assert torch.equal(none.edited, z0)
    full = diffedit_sample(backend, z0, torch.ones(1, 1, 16, 16), TGT, steps=6, encoding_ratio=1.0)
    assert len(full.encoded) == 7 and (full.edited - z0).abs().mean() > 1e-2
    # a soft mask blends linearly: half weight lands between the source and the full edit at the end
    soft = diffedit_sample(backend, z0, torch.full((1, 1, 16, 16), 0.5), TGT, steps=6, encoding_ratio=1.0)
    assert (soft.edited - z0).abs().mean() < (full.edited - z0).abs().mean()


def test_mask_from_image_resolution(backend):
    m = torch.zeros(1, 1, 16, 16)
    m[..., 2:7, 3:11] = 1
    host = image_mask(m, (16, 16), 8)                   # [1, 128, 128], what the nodes output
    assert host.shape == (1, 128, 128)
    assert torch.equal(latent_mask(host, (16, 16), 8), m)          # exact round trip
    assert torch.equal(latent_mask(host[0], (16, 16), 8), m)
    small = latent_mask(torch.nn.functional.interpolate(m, size=(32, 32))[0], (16, 16), 8)
    assert torch.equal(small, m)                        # another size of the same shape: resized
    odd = latent_mask(torch.ones(1, 100, 100), (16, 16), 8)
    assert odd.shape == (1, 1, 16, 16) and torch.allclose(odd, torch.ones_like(odd))
    with pytest.raises(InputError, match="^mask: is 128x64 px but the image is 128x128"):
        latent_mask(host[:, :64], (16, 16), 8)
    assert torch.equal(latent_mask(torch.ones(1, 64, 128), (16, 16), 8), torch.ones(1, 1, 16, 16))   # uniform
    with pytest.raises(InputError, match="^mask: holds 2 masks"):
        latent_mask(torch.ones(2, 128, 128), (16, 16), 8)
    with pytest.raises(InputError, match="^mask: expected values between 0 and 1"):
        latent_mask(torch.full((128, 128), 2.0), (16, 16), 8)
    with pytest.raises(InputError, match="^mask: contains NaN"):
        latent_mask(torch.full((128, 128), float("nan")), (16, 16), 8)


def test_bad_inputs(backend, z0, region_mask):
    with pytest.raises(InputError, match="^samples"):
        diffedit_mask(backend, z0, SRC, TGT, samples=0)
    with pytest.raises(InputError, match="^strength"):
        diffedit_mask(backend, z0, SRC, TGT, strength=0.0)
    with pytest.raises(InputError, match="^threshold"):
        diffedit_mask(backend, z0, SRC, TGT, threshold=1.0)
    with pytest.raises(InputError, match="^source_prompt"):
        diffedit_mask(backend, z0, " ", TGT)
    with pytest.raises(InputError, match="^latent: holds 2 images"):
        diffedit_mask(backend, torch.cat([z0, z0]), SRC, TGT)
    with pytest.raises(InputError, match="^encoding_ratio: 0.05 of 10 steps is less than one step"):
        diffedit_sample(backend, z0, region_mask, TGT, encoding_ratio=0.05, steps=10)
    with pytest.raises(InputError, match="^encoding_ratio"):
        diffedit_sample(backend, z0, region_mask, TGT, encoding_ratio=1.2)
    with pytest.raises(InputError, match="^mask: expected a \\[1, 1, 16, 16\\]"):
        diffedit_sample(backend, z0, region_mask[..., :8], TGT)
    with pytest.raises(InputError, match="^target_prompt"):
        diffedit_sample(backend, z0, region_mask, "")
    with pytest.raises(InputError, match="^steps"):
        diffedit_sample(backend, z0, region_mask, TGT, steps=0)
    with pytest.raises(InputError, match="^guidance"):
        diffedit_sample(backend, z0, region_mask, TGT, guidance=0.5)


class CountingBackend:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_eps(self, z, t, context, hook=None):
        self.calls.append(z.shape[0])
        return self.inner.predict_eps(z, t, context, hook)


def test_mask_batches_the_noise_samples(backend, z0):
    """All samples x both prompts go through the model in few calls (at most 10 samples each) and give
    the per-sample loop's numbers: the same CPU noise draws, one after the other."""
    from customedit_core.ddim import Schedule
    from customedit_core.tokens import tokenize

    counting = CountingBackend(backend)
    res = diffedit_mask(counting, z0, SRC, TGT, samples=12, strength=0.5, seed=5)
    assert counting.calls == [20, 4]
    cond = backend.encode([tokenize(backend.tokenizer, SRC), tokenize(backend.tokenizer, TGT)])
    n = int(backend.alphas_cumprod.shape[0])
    t, sch, gen = min(n - 1, int(0.5 * n)), Schedule(backend.alphas_cumprod, 1), torch.Generator().manual_seed(5)
    diff, size = 0, 0
    with torch.no_grad():
        for _ in range(12):
            zt = sch.add_noise(z0, torch.randn(z0.shape, generator=gen), t)
            eps = backend.predict_eps(torch.cat([zt, zt]), t, cond)
            diff, size = diff + (eps[1] - eps[0]).abs().mean(0), size + eps.abs().mean()
    ref = mask_from_difference(diff / 12, 0.5, size / 12)
    assert torch.allclose(res.heat, ref.heat, atol=1e-4)          # float error of batched vs single calls
