"""DDIM schedule math on alphas_cumprod (eta = 0), forward and inverse.

Timestep convention (identical for inversion and editing): diffusers' `steps_offset=1`, which
is what the Prompt-to-Prompt / null-text reference actually runs (its code builds the scheduler
with offset 0, but diffusers' StableDiffusionPipeline rewrites `steps_offset` to 1) and what
diffusers' DiffEdit uses. For 50 steps on a 1000-step model the denoising timesteps are
981, 961, ..., 1 (901, ..., 1 for 10 steps): every step is a real step, none is spent at t=0.
The step after t=1 lands on alphas_cumprod[0] (`set_alpha_to_one=False`), so a clean latent is
treated as sitting at alphas_cumprod[0].
"""
from __future__ import annotations

import torch

from .errors import InputError

OFFSET = 1          # diffusers' steps_offset (see above)


def sd_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """SD1.x/SD2.x scaled-linear schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class Schedule:
    """DDIM timesteps and steps for one step count on one model's alphas_cumprod."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int):
        n = int(alphas_cumprod.shape[0])
        if not isinstance(steps, int) or steps < 1 or steps > n - 1:
            raise InputError("steps", f"expected an integer between 1 and {n - 1}, got {steps!r}")
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.steps = steps
        self.stride = n // steps
        # descending, offset 1: (steps-1)*stride + 1 ... 1
        self.timesteps = [i * self.stride + OFFSET for i in reversed(range(steps))]

    def alpha(self, t: int) -> float:
        # t < 0 is "before the first timestep": alphas_cumprod[0] (set_alpha_to_one=False)
        return float(self.alphas_cumprod[max(t, 0)])

    def prev(self, t: int) -> int:
        return t - self.stride

    def step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Denoise z_t -> z_{t-stride} with predicted noise eps (deterministic DDIM)."""
        return _move(z, eps, self.alpha(t), self.alpha(self.prev(t)))

    def invert_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Inverse: z_{t-stride} -> z_t, eps evaluated at the destination timestep t."""
        return _move(z, eps, self.alpha(self.prev(t)), self.alpha(t))

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Forward diffusion q(z_t | z_0) at any training timestep t (DiffEdit's mask estimate)."""
        a = self.alpha(t)
        return a ** 0.5 * z0 + (1 - a) ** 0.5 * noise


def _move(z, eps, a_from: float, a_to: float):
    x0 = (z - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps
