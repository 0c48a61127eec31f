"""Prompt-to-Prompt controllers (Hertz et al.), one small class per edit policy.

Batch convention: prompt 0 is the source branch, prompts 1.. are edits. Controllers act on
the conditional half only, as the reference does. Layers are chosen by their size relative
to the latent (e.g. "side <= latent/2"), never by index.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .attention import Controller, Site
from .errors import InputError


def _side_ok(site: Site, max_side: float) -> bool:
    return site.height <= max_side * site.latent_height and site.width <= max_side * site.latent_width


MAP_SIDE = 16     # masks and word maps come from the cross-attention level nearest 16x16 maps


def map_scale(sides: dict) -> int:
    """The level (downscale factor) whose maps are nearest to MAP_SIDE x MAP_SIDE, on a log scale,
    the larger maps on a tie; `sides` maps each level with cross-attention to its side (sqrt of its
    queries). By resolution, never by layer index: SD1.x at 512 px gives the reference's 16x16
    (1/4 of the 64x64 latent), a 64 px toy model with 16x16 latents its 16x16 full-size level,
    SDXL at 1024 px (cross-attention at 64x64 and 32x32 only) 32x32."""
    if not sides:
        raise InputError("model", "has no cross-attention layers whose maps could be recorded "
                                  "(is it a text-to-image UNet?)")
    return min(sides, key=lambda s: (abs(math.log(max(sides[s], 1e-9) / MAP_SIDE)), -sides[s]))


class AttentionStore(Controller):
    """Sums head-averaged cross-attention maps of the cond rows over steps, per layer, at one level.

    During the first step every cross-attention level is recorded; at its end the store keeps the
    level `map_scale` chooses and from then on records only that one, so it is a fixed-size sum
    that neither grows with the step count nor asks for probabilities where nothing reads them.
    max_side: record every level up to that fraction of the latent side instead (all of them at 1.0).
    """

    def __init__(self, max_side: Optional[float] = None):
        self.max_side = max_side
        self.sums: dict[str, torch.Tensor] = {}
        self.sites: dict[str, Site] = {}
        self.steps_seen = 0
        self.level: Optional[int] = None          # chosen downscale factor, after the first step

    def needs_probs(self, site):
        if site.kind != "cross":
            return False
        if self.max_side is not None:
            return _side_ok(site, self.max_side)
        return self.level is None or site.scale_down() == self.level

    def probs(self, p, site):
        m = p[site.layout.cond].mean(dim=1).detach().float()   # [P, N, L]
        if site.name in self.sums:
            self.sums[site.name] += m
        else:
            self.sums[site.name] = m.clone()
            self.sites[site.name] = site
        return p

    def end_step(self, step):
        self.steps_seen += 1
        if self.max_side is None and self.level is None and self.sites:
            self.level = self.map_level()
            for name in [n for n, s in self.sites.items() if s.scale_down() != self.level]:
                del self.sums[name], self.sites[name]

    def map_level(self) -> int:
        """The level masks and word maps read (see map_scale)."""
        if self.level is not None:
            return self.level
        sides = {}
        for site in self.sites.values():
            sides[site.scale_down()] = math.sqrt(site.queries)
        return map_scale(sides)

    def word_maps(self, scale_down: Optional[int] = None, places=("down", "up")) -> torch.Tensor:
        """[P, h, w, L] maps averaged over the recorded layers at one downscale factor (default map_level)."""
        scale_down = self.map_level() if scale_down is None else scale_down
        names = [n for n, s in self.sites.items() if s.scale_down() == scale_down and s.place in places]
        if not names:
            names = [n for n, s in self.sites.items() if s.scale_down() == scale_down]
        if not names:
            raise InputError("model", f"has no cross-attention layers recorded at 1/{scale_down} of the latent size")
        site = self.sites[names[0]]
        m = torch.stack([self.sums[n] for n in names]).mean(0)
        return m.reshape(m.shape[0], site.height, site.width, m.shape[-1]) / max(1, self.steps_seen)


class ReplaceSelf(Controller):
    """Edit branches take the source's self-attention probabilities in early steps."""

    def __init__(self, end_step: int, max_side: float = 0.5, start_step: int = 0):
        self.start, self.end, self.max_side = start_step, end_step, max_side

    def needs_probs(self, site):
        return (site.kind == "self" and self.start <= site.step < self.end
                and site.layout.prompts > 1 and _side_ok(site, self.max_side))

    def probs(self, p, site):
        c = site.layout.cond
        p[c.start + 1:c.stop] = p[c.start].unsqueeze(0)
        return p


class _CrossEdit(Controller):
    """Shared part of replace/refine: a per-step, per-token blend weight alpha [T, E, L]."""

    def __init__(self, alpha: torch.Tensor):
        self.alpha = alpha

    def needs_probs(self, site):
        return site.kind == "cross" and site.layout.prompts > 1 and bool(self.alpha[site.step].any())

    def mapped(self, base, own):
        raise NotImplementedError

    def probs(self, p, site):
        c = site.layout.cond
        base, own = p[c.start], p[c.start + 1:c.stop]
        a = self.alpha[site.step].to(p)[:, None, None, :]
        p[c.start + 1:c.stop] = self.mapped(base, own) * a + own * (1 - a)
        return p


class ReplaceCross(_CrossEdit):
    """Word swap: the target's tokens take the aligned source tokens' maps."""

    def __init__(self, mapper: torch.Tensor, alpha: torch.Tensor):
        super().__init__(alpha)
        self.mapper = mapper                    # [E, L, L]

    def mapped(self, base, own):
        return torch.einsum("hnw,ewm->ehnm", base, self.mapper.to(base))


class RefineCross(_CrossEdit):
    """Prompt refinement: aligned tokens take the source's maps, new tokens keep their own."""

    def __init__(self, index: torch.Tensor, token_alpha: torch.Tensor, alpha: torch.Tensor):
        super().__init__(alpha)
        self.index, self.token_alpha = index, token_alpha    # [E, L] each

    def mapped(self, base, own):
        taken = base[:, :, self.index.to(base.device)].permute(2, 0, 1, 3)   # [E, H, N, L]
        ta = self.token_alpha.to(base)[:, None, None, :]
        return taken * ta + own * (1 - ta)


class Reweight(Controller):
    """Scales the edit branches' cross-attention to chosen tokens (negative values allowed)."""

    def __init__(self, equalizer: torch.Tensor, start_step: int, end_step: int):
        self.eq, self.start, self.end = equalizer, start_step, end_step     # eq [E, L]

    def needs_probs(self, site):
        return (site.kind == "cross" and site.layout.prompts > 1 and self.start <= site.step < self.end)

    def probs(self, p, site):
        c = site.layout.cond
        p[c.start + 1:c.stop] = p[c.start + 1:c.stop] * self.eq.to(p)[:, None, None, :]
        return p


class LocalBlend:
    """After each step from `start_step` on, edit rows keep the source latent outside a mask
    made from the chosen words' cross-attention (summed over steps so far): the store's level
    (nearest 16x16 maps: the reference's 16x16 at 512 px), averaged over layers and heads, 3x3
    max-pool, upsampled, divided by the max, thresholded; the source word's mask united with
    each target's, or the source's alone (Custom-Edit's recipe).
    """

    def __init__(self, store: AttentionStore, positions: list, threshold: float = 0.3,
                 start_step: int = 0, source_only: bool = False):
        self.store, self.positions = store, positions     # positions[p]: token positions of prompt p
        self.threshold, self.start = threshold, start_step
        self.source_only = source_only
        self.mask = None

    def compute(self, size) -> torch.Tensor:
        maps = self.store.word_maps()                          # [P, h, w, L] at the store's level
        sel = torch.zeros(maps.shape[0], maps.shape[-1], device=maps.device)
        for p, pos in enumerate(self.positions):
            if pos:
                sel[p, pos] = 1.0
        m = (maps * sel[:, None, None, :]).sum(-1).unsqueeze(1)   # [P, 1, h, w]
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=size)
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        m = m > self.threshold
        src = m[:1]
        edits = src.expand(m.shape[0] - 1, -1, -1, -1) if self.source_only else (src | m[1:])
        return edits.float()

    def __call__(self, step: int, z: torch.Tensor) -> torch.Tensor:
        if step < self.start:
            return z
        self.mask = self.compute(z.shape[2:]).to(z)
        return torch.cat([z[:1], z[:1] + self.mask * (z[1:] - z[:1])])
