"""One attention-hook signature for every backend: hook(q, k, v, site) -> out.

q: [B, heads, N, d], k/v: [B, heads, M, d], out: [B, heads, N, d]. A backend calls the
hook for every self- and cross-attention layer of the UNet; `site` says which layer it is
and, through the hook's step state, which step and which batch rows are which.
Controllers are small objects on that signature and compose as a list: the hook only
materialises attention probabilities where some controller asks for them and otherwise
uses fused attention (SDPA).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Layout:
    """Batch rows of one model call: `prompts` rows per half; with cfg, uncond half first."""
    prompts: int
    cfg: bool

    @property
    def cond(self) -> slice:
        return slice(self.prompts, 2 * self.prompts) if self.cfg else slice(0, self.prompts)

    @property
    def uncond(self) -> slice | None:
        return slice(0, self.prompts) if self.cfg else None


@dataclass(frozen=True)
class Site:
    name: str            # backend's layer name, stable within one model
    kind: str            # "self" | "cross"
    place: str           # "down" | "mid" | "up"
    height: int          # query grid of this layer
    width: int
    heads: int
    latent_height: int   # latent grid of the whole call, to choose layers by relative size
    latent_width: int
    step: int = 0
    steps: int = 1
    layout: Layout = field(default_factory=lambda: Layout(1, False))

    @property
    def queries(self) -> int:
        return self.height * self.width

    def scale_down(self) -> int:
        """How many times smaller than the latent this layer's grid is (1, 2, 4, 8...)."""
        return max(1, round(self.latent_height / self.height))


class Controller:
    """Base: does nothing. Override what you need."""

    def needs_probs(self, site: Site) -> bool:
        return False

    def kv(self, k: torch.Tensor, v: torch.Tensor, site: Site):
        """Called before attention at every site; may return new keys/values (e.g. extra tokens)."""
        return k, v

    def probs(self, p: torch.Tensor, site: Site) -> torch.Tensor:
        """Called only where needs_probs(site) is true. p: [B, heads, N, M], may be edited in place."""
        return p

    def attend(self, q: torch.Tensor, o: torch.Tensor, site: Site) -> torch.Tensor:
        """Called after attention with the queries; may mix in attention over other keys (SpecRef)."""
        return o

    def out(self, o: torch.Tensor, site: Site) -> torch.Tensor:
        return o

    def end_step(self, step: int) -> None:
        pass


def attention_probs(q, k):
    scale = q.shape[-1] ** -0.5
    return (q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)


class AttentionHook:
    """Composes controllers; the sampler sets the step and batch layout before each call."""

    def __init__(self, controllers=()):
        self.controllers = [c for c in controllers if c is not None]
        self.step, self.steps, self.layout = 0, 1, Layout(1, False)

    def begin(self, step: int, steps: int, layout: Layout):
        self.step, self.steps, self.layout = step, steps, layout

    def end_step(self):
        for c in self.controllers:
            c.end_step(self.step)

    def __call__(self, q, k, v, site: Site):
        site = replace(site, step=self.step, steps=self.steps, layout=self.layout)
        for c in self.controllers:
            k, v = c.kv(k, v, site)
        active = [c for c in self.controllers if c.needs_probs(site)]
        if active:
            p = attention_probs(q, k)
            for c in active:
                p = c.probs(p, site)
            o = (p @ v.float()).to(v.dtype)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        for c in self.controllers:
            o = c.out(c.attend(q, o, site), site)
        return o
