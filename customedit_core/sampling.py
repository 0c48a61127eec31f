"""The guided DDIM denoising loop every editor shares."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .attention import AttentionHook, Layout
from .ddim import Schedule


def guided_eps(backend, z, t, cond, uncond, guidance, hook=None, step=0, steps=1):
    """Classifier-free guided noise for P rows; one batched model call [uncond; cond]."""
    P = z.shape[0]
    if guidance == 1.0:
        if hook is not None:
            hook.begin(step, steps, Layout(P, cfg=False))
        return backend.predict_eps(z, t, cond, hook)
    if hook is not None:
        hook.begin(step, steps, Layout(P, cfg=True))
    eps = backend.predict_eps(torch.cat([z, z]), t, torch.cat([uncond, cond]), hook)
    eu, ec = eps.chunk(2)
    return eu + guidance * (ec - eu)


def denoise(backend, schedule: Schedule, z: torch.Tensor, cond: torch.Tensor,
            uncond_at: Callable[[int], torch.Tensor], guidance: float,
            hook: Optional[AttentionHook] = None,
            source_path: Optional[Sequence[torch.Tensor]] = None,
            after_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
            first_step: int = 0, end_step: Optional[int] = None,
            tick: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Walk z down from timesteps[first_step] to the clean latent (or stop before end_step).

    source_path[i] replaces row 0 (the source branch) after step i: direct inversion.
    after_step(i, z) may rewrite the latents (local blend). tick: a progress display shared
    by several walks (default: one of its own).
    """
    end = schedule.steps if end_step is None else end_step
    tick = tick or backend.progress(end - first_step)
    with torch.no_grad():
        for i in range(first_step, end):
            backend.check_interrupt()
            t = schedule.timesteps[i]
            eps = guided_eps(backend, z, t, cond, uncond_at(i), guidance, hook, i, schedule.steps)
            z = schedule.step(z, eps, t)
            if source_path is not None:
                z = z.clone()
                z[:1] = source_path[i].to(z)
            if hook is not None:
                hook.end_step()
            if after_step is not None:
                z = after_step(i, z)
            tick(1)
    return z
