"""DiffEdit (Couairon et al.): a mask from where two prompts' noise estimates differ, then
DDIM encoding to a ratio and decoding with the target prompt inside the mask only.

Mask and sampling are separate steps, each usable alone (the mask can come from elsewhere).
- mask: the image is noised `samples` times at `strength` (seeded); per sample the model
  predicts the noise under the source (query) and the target prompt; |difference| averaged
  over samples and channels, clamped at 3x its mean, divided by that, thresholded (so the
  default 0.5 keeps cells above 1.5x the mean). With classifier-free guidance both prompts
  share the unconditional branch, which cancels in the difference: guided difference =
  guidance * (eps_target - eps_source), and the normalisation removes the factor, so only the
  two conditional rows are computed.
- sampling: DDIM encoding (guidance 1, the empty prompt as in the paper, or a given one) for
  round(ratio * steps) of `steps` steps, then guided decoding with the target prompt; after
  every step the latent outside the mask is replaced by the encoded latent of the *same*
  timestep, so the last step puts the source back exactly outside the mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ddim import Schedule
from .errors import InputError
from .inversion import check_latent, ddim_trajectory
from .masks import check_grid_mask
from .sampling import denoise
from .tokens import tokenize

# below this mean |difference| (relative to the noise estimates' own size) the prompts are taken
# as equal: normalising would otherwise blow float noise up into a random mask
EQUAL_PROMPTS = 1e-4


@dataclass
class DiffEditMask:
    mask: torch.Tensor      # [1, 1, h, w] in {0, 1}: 1 = edit here
    heat: torch.Tensor      # [1, 1, h, w] the normalised difference in 0..1, before thresholding


@dataclass
class DiffEditResult:
    edited: torch.Tensor            # [1, C, h, w] model-space latent
    encoded: list                   # [z0, ..., z_k]: the encoded trajectory outside the mask follows


def _one_latent(backend, latent, input_name="latent"):
    z0 = check_latent(backend, latent, input_name).float()
    if z0.shape[0] != 1:
        raise InputError(input_name, f"holds {z0.shape[0]} images; give one image at a time")
    return z0.to(backend.device)


SAMPLES_PER_CALL = 10      # noise samples per model call (x2 prompts), as diffusers batches them all


def diffedit_mask(backend, latent: torch.Tensor, source_prompt: str, target_prompt: str, samples: int = 10,
                  strength: float = 0.5, threshold: float = 0.5, seed: int = 0) -> DiffEditMask:
    """Where the target prompt would change the image (one latent [1, C, h, w])."""
    z0 = _one_latent(backend, latent)
    if not isinstance(samples, int) or not 1 <= samples <= 100:
        raise InputError("samples", f"expected 1..100 noise samples, got {samples!r}")
    if not 0.0 < strength <= 1.0:
        raise InputError("strength", f"expected a noise strength in (0, 1], got {strength}")
    if not 0.0 < threshold < 1.0:
        raise InputError("threshold", f"expected a value in (0, 1), got {threshold}")
    src = tokenize(backend.tokenizer, source_prompt, "source_prompt")
    tgt = tokenize(backend.tokenizer, target_prompt, "target_prompt")
    cond = backend.encode([src, tgt])
    n = int(backend.alphas_cumprod.shape[0])
    t = min(n - 1, int(strength * n))
    schedule = Schedule(backend.alphas_cumprod, 1)
    gen = torch.Generator().manual_seed(int(seed))
    noises = [torch.randn(z0.shape, generator=gen) for _ in range(samples)]    # CPU draws: same on every device
    diff = torch.zeros(z0.shape[2:], device=z0.device)
    size = torch.zeros((), device=z0.device)
    tick = backend.progress(samples)
    with backend.offload(), torch.no_grad():
        for lo in range(0, samples, SAMPLES_PER_CALL):     # the samples x both prompts in one model call
            backend.check_interrupt()
            noise = torch.cat(noises[lo:lo + SAMPLES_PER_CALL]).to(z0.device)
            k = noise.shape[0]
            zt = schedule.add_noise(z0, noise, t).repeat_interleave(2, dim=0)    # [s0 src, s0 tgt, s1 src, ...]
            eps = backend.predict_eps(zt, t, cond.repeat(k, 1, 1)).view(k, 2, *z0.shape[1:])
            diff += (eps[:, 1] - eps[:, 0]).abs().mean(1).sum(0)
            size += eps.abs().mean(dim=(1, 2, 3, 4)).sum()
            tick(k)
    return mask_from_difference(diff / samples, threshold, size / samples)


def mask_from_difference(diff: torch.Tensor, threshold: float, scale_of_eps) -> DiffEditMask:
    """[h, w] mean |eps difference| -> clamp at 3x its mean, normalise, threshold."""
    clamp = 3.0 * diff.mean()
    if clamp <= 3.0 * EQUAL_PROMPTS * float(scale_of_eps):
        heat = torch.zeros_like(diff)
    else:
        heat = diff.clamp(max=clamp) / clamp
    heat = heat.float().cpu()[None, None]
    return DiffEditMask((heat > threshold).float(), heat)


def diffedit_sample(backend, latent: torch.Tensor, mask: torch.Tensor, target_prompt: str,
                    encoding_ratio: float = 0.8, steps: int = 50, guidance: float = 7.5,
                    encode_prompt: str = "",
                    callback: Optional[Callable[[int, torch.Tensor], None]] = None) -> DiffEditResult:
    """Edit one latent inside `mask` ([1, 1, h, w] on the latent grid, 1 = edit).

    An all-zero mask returns the source latent itself (nothing to edit); an all-one mask is a
    plain DDIM encode-decode with the target prompt. callback(i, z) sees each decoded latent.
    """
    z0 = _one_latent(backend, latent)
    m = check_grid_mask(mask, z0.shape[2:], "mask").to(z0.device)
    schedule = Schedule(backend.alphas_cumprod, steps)
    if not 0.0 < encoding_ratio <= 1.0:
        raise InputError("encoding_ratio", f"expected a fraction of the steps in (0, 1], got {encoding_ratio}")
    count = round(encoding_ratio * steps)
    if count < 1:
        raise InputError("encoding_ratio", f"{encoding_ratio} of {steps} steps is less than one step; raise the "
                                           "ratio or the step count")
    if not 1.0 <= guidance <= 30.0:
        raise InputError("guidance", f"expected a value between 1 and 30, got {guidance}")
    tgt = tokenize(backend.tokenizer, target_prompt, "target_prompt")
    enc = tokenize(backend.tokenizer, encode_prompt or "", "encode_prompt", allow_empty=True)
    empty = tokenize(backend.tokenizer, "", allow_empty=True)
    if not bool(m.gt(0).any()):
        return DiffEditResult(z0.detach().cpu().clone(), [z0.detach().cpu()])
    cond_enc, cond, null = backend.encode([enc, tgt, empty]).chunk(3)
    first = steps - count

    def keep_outside(i, z):
        # after step i the walk is at the timestep the encoding reached after steps - i - 1 steps;
        # lerp is exact at 0 and 1, so a binary mask copies the encoded latent bit for bit
        z = torch.lerp(path[steps - i - 1].to(z), z, m)
        if callback is not None:
            callback(i, z)
        return z

    with backend.offload():
        path = ddim_trajectory(backend, z0, cond_enc, schedule, count=count)
        z = denoise(backend, schedule, path[count], cond, lambda i: null, guidance, after_step=keep_outside,
                    first_step=first)
    return DiffEditResult(z.detach().cpu(), [p.detach().cpu() for p in path])
