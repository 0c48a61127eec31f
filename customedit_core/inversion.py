"""Inversions of a real image's latent into one `Inversion` record any editor consumes.

- ddim: deterministic DDIM inversion with the source prompt at guidance 1; editing then
  uses the empty prompt as the unconditional branch (the baseline; drifts at high guidance).
- null_text: DDIM inversion, then per step an optimised unconditional embedding that pulls
  the guided trajectory back onto the inverted one (Mokady et al.).
- negative_prompt: the source prompt's embedding replaces the unconditional one; no
  optimisation (Miyake et al.).
- direct: the source branch is put back onto the inverted latent after every step (Ju et
  al.); the edit branches are not corrected. The paper adds the stored difference between
  the inverted latent and the source branch's guided step; setting the source row to the
  inverted latent is the same thing without a second pass at inversion time (and without
  float drift), so direct inversion costs one DDIM pass and reconstructs exactly.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .attention import AttentionHook, Layout
from .ddim import Schedule
from .errors import InputError, require_finite
from .sampling import denoise, guided_eps
from .tokens import PromptTokens, tokenize

METHODS = ("null_text", "negative_prompt", "direct", "ddim")


@dataclass
class Inversion:
    method: str
    prompt: str
    tokens: PromptTokens
    steps: int
    guidance: float
    latents: list            # latents[0] = source, latents[k] after k inverse steps; latents[-1] = z_T
    uncond: list             # per denoising step i: [1, L, D] unconditional embedding
    fingerprint: str
    reconstruction: Optional[torch.Tensor] = None
    inner_steps_used: list = field(default_factory=list)
    size: Optional[object] = None   # SDXL: the backend's SizeConditioning it was inverted under (its y)

    @property
    def source(self) -> torch.Tensor:
        return self.latents[0]

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]

    def check(self, backend, steps: Optional[int] = None, input_name: str = "inversion"):
        if backend.fingerprint() != self.fingerprint:
            raise InputError(input_name, "was made with a different model (or different patches/LoRAs) "
                                         "than the one given now; invert the image again with this model")
        if steps is not None and steps != self.steps:
            raise InputError("steps", f"the inversion was made with {self.steps} steps but {steps} were "
                                      "asked for; use the same step count or invert again")

    @contextmanager
    def conditioned(self, backend):
        """While an editor walks this record: the backend's SDXL size conditioning set to the one the
        image was inverted under. The inverted path and null-text's embeddings belong to that y;
        another size would pull the walk off them (undoing the reconstruction)."""
        if self.size is None or not hasattr(backend, "size"):
            yield
            return
        before, backend.size = backend.size, self.size
        try:
            yield
        finally:
            backend.size = before

    def walk(self, device, rows: int):
        """What `denoise` needs to walk this record down with `rows` prompts: the per-step
        unconditional embeddings and, for direct inversion, the path the source row follows."""
        uncond = [u.to(device).expand(rows, -1, -1) for u in self.uncond]
        path = None
        if self.method == "direct":
            path = [self.latents[self.steps - i - 1].to(device) for i in range(self.steps)]
        return dict(uncond_at=lambda i: uncond[i], source_path=path)


def check_latent(backend, z: torch.Tensor, input_name: str = "latent") -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise InputError(input_name, "expected a LATENT batch of shape [B, C, H, W]")
    if z.shape[1] != backend.latent_channels:
        raise InputError(input_name, f"has {z.shape[1]} channels; this model takes {backend.latent_channels}-channel "
                                     "latents (encode the image with this model's VAE)")
    m = backend.latent_multiple
    if z.shape[2] % m or z.shape[3] % m:
        px = m * backend.vae_scale
        raise InputError(input_name, f"is {z.shape[3] * backend.vae_scale}x{z.shape[2] * backend.vae_scale} px; "
                                     f"this model needs width and height that are multiples of {px} px "
                                     "(resize or crop the image)")
    return require_finite(input_name, z)


def ddim_trajectory(backend, z0, cond, schedule: Schedule, count: Optional[int] = None,
                    hook: Optional[AttentionHook] = None, tick: Optional[Callable[[int], None]] = None):
    """Inverse DDIM at guidance 1: [z0, z_t0, ..., z_T] (eps at the destination timestep).

    count: stop after that many inverse steps (DiffEdit's encoding ratio). hook: attention hook
    of every call; its step is the *denoising* index of the timestep (steps - 1 - k for the k-th
    inverse step), so what it records lines up with the walk back down (SpecRef's K/V bank).
    tick: a progress display shared with what follows (default: one of its own).
    """
    count = schedule.steps if count is None else count
    latents = [z0]
    z = z0
    tick = tick or backend.progress(count)
    with torch.no_grad():
        for k, t in enumerate(reversed(schedule.timesteps[schedule.steps - count:])):
            backend.check_interrupt()
            if hook is not None:
                hook.begin(schedule.steps - 1 - k, schedule.steps, Layout(z.shape[0], cfg=False))
            z = schedule.invert_step(z, backend.predict_eps(z, t, cond, hook), t)
            if hook is not None:
                hook.end_step()
            latents.append(z)
            tick(1)
    return latents


def at_inversion_size(editor):
    """Run editor(backend, ...) under the conditioned() of the Inversion among its arguments."""
    @functools.wraps(editor)
    def run(backend, *args, **kwargs):
        inv = next((a for a in (*args, *kwargs.values()) if isinstance(a, Inversion)), None)
        with inv.conditioned(backend) if inv is not None else nullcontext():
            return editor(backend, *args, **kwargs)
    return run


def invert(backend, latent: torch.Tensor, prompt: str, steps: int = 50, guidance: float = 7.5,
           method: str = "null_text", inner_steps: int = 10, early_stop: float = 1e-5,
           with_reconstruction: bool = True) -> Inversion:
    """Invert one model-space latent [1, C, h, w] with its source prompt.

    with_reconstruction: also walk back down with the source prompt (one more DDIM pass for
    ddim and negative_prompt; free for null_text and direct) and keep it in `reconstruction`.
    """
    if method not in METHODS:
        raise InputError("method", f"unknown inversion method {method!r}; expected one of {METHODS}")
    z0 = check_latent(backend, latent, "latent").float().to(backend.device)
    if z0.shape[0] != 1:
        raise InputError("latent", f"holds {z0.shape[0]} images; invert one image at a time")
    if not (1.0 <= guidance <= 30.0):
        raise InputError("guidance", f"expected a value between 1 and 30, got {guidance}")
    if method == "null_text" and guidance <= 1.0:
        raise InputError("guidance", "null-text inversion optimises the unconditional branch, which has no "
                                     "effect at guidance <= 1; use guidance > 1 (7.5 is usual) or method 'ddim'")
    if method == "null_text" and not (1 <= inner_steps <= 100):
        raise InputError("inner_steps", f"expected 1..100 optimisation steps per timestep, got {inner_steps}")
    tokens = tokenize(backend.tokenizer, prompt, "source_prompt")
    schedule = Schedule(backend.alphas_cumprod, steps)
    empty = tokenize(backend.tokenizer, "", allow_empty=True)
    cond, null = backend.encode([tokens, empty]).chunk(2)
    # one progress bar for the whole inversion (it used to fill once per phase and restart)
    rest = {"null_text": steps * inner_steps, "direct": 0}.get(method, steps if with_reconstruction else 0)
    tick = backend.progress(steps + rest)
    with backend.offload():
        latents = ddim_trajectory(backend, z0, cond, schedule, tick=tick)
        inv = Inversion(method, prompt, tokens, steps, float(guidance), latents, [null] * steps,
                        backend.fingerprint(), size=getattr(backend, "size", None))
        if method == "null_text":
            _optimise_null_text(backend, inv, schedule, cond, null, inner_steps, early_stop, tick)
        elif method == "direct":
            inv.reconstruction = z0.detach().cpu()     # the source row follows the inverted path
        else:
            if method == "negative_prompt":
                inv.uncond = [cond] * steps
            if with_reconstruction:
                inv.reconstruction = reconstruct(backend, inv, schedule, cond, tick)
    inv.latents = [x.detach().cpu() for x in inv.latents]
    inv.uncond = [u.detach().cpu() for u in inv.uncond]
    return inv


def reconstruct(backend, inv: Inversion, schedule: Optional[Schedule] = None, cond=None,
                tick: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Walk the record back down with its source prompt (what an edit's source branch does)."""
    schedule = schedule or Schedule(backend.alphas_cumprod, inv.steps)
    if cond is None:
        cond = backend.encode([inv.tokens])
    dev = backend.device
    return denoise(backend, schedule, inv.noise.to(dev), cond, guidance=inv.guidance, tick=tick, **inv.walk(dev, 1))


def _optimise_null_text(backend, inv, schedule, cond, null, inner_steps, early_stop, tick):
    steps = schedule.steps
    z = inv.latents[-1]
    uncond = null
    out = []
    for i, t in enumerate(schedule.timesteps):
        target = inv.latents[steps - i - 1]
        with torch.no_grad():
            ec = backend.predict_eps(z, t, cond)
        with backend.grad_enabled():
            u = uncond.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
            used = 0
            for _ in range(inner_steps):
                backend.check_interrupt()
                eu = backend.predict_eps(z, t, u)
                prev = schedule.step(z, eu + inv.guidance * (ec - eu), t)
                loss = F.mse_loss(prev, target)
                (grad,) = torch.autograd.grad(loss, [u])
                u.grad = grad
                opt.step()
                used += 1
                tick(1)
                if loss.item() < early_stop + i * 2e-5:
                    break
            uncond = u.detach()
        tick(inner_steps - used)
        inv.inner_steps_used.append(used)
        out.append(uncond)
        with torch.no_grad():
            z = schedule.step(z, guided_eps(backend, z, t, cond, uncond, inv.guidance), t)
    inv.uncond = out
    inv.reconstruction = z.detach().cpu()
