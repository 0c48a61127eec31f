"""What SDXL adds to a model call, kept inside the backends: the pooled CLIP-G vector and the
size/crop numbers ("time ids") that, embedded, form the UNet's added vector y.

The core passes one context tensor per prompt row and slices, stacks and optimises it without
knowing what it holds (null-text inversion optimises the unconditional one). So an SDXL backend's
encode() returns the token embeddings with one extra row that carries the pooled vector:
[B, 77 + 1, D], row 77 = (pooled [P], zeros [D - P]). Every row operation of the core then keeps
tokens and pooled vector together, and null-text inversion optimises the unconditional pooled
vector along with the unconditional tokens: both are what the unconditional branch is conditioned
on, and SDXL's y reaches every ResNet block, so leaving it fixed would leave that branch half-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token embeddings + [B, P] pooled vectors (P <= D) -> [B, L + 1, D]."""
    B, _, D = tokens.shape
    P = pooled.shape[-1]
    if P > D:
        raise ValueError(f"pooled vector of {P} does not fit a {D}-wide context row")
    row = torch.cat([pooled.to(tokens), tokens.new_zeros(B, D - P)], dim=-1)
    return torch.cat([tokens, row[:, None]], dim=1)


def unpack(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack: ([B, L, D] tokens, [B, P] pooled)."""
    return context[:, :-1], context[:, -1, :pooled_dim]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size/crop conditioning in pixels (CLIPTextEncodeSDXL's width/height, crop_w/crop_h,
    target_width/target_height). None sizes mean the image's own size, as ComfyUI's samplers fill
    them in (latent size x 8) and diffusers' SDXL pipeline does (original = target = output size)."""

    original: Optional[tuple[int, int]] = None     # (height, width)
    crop: tuple[int, int] = (0, 0)                 # (top, left)
    target: Optional[tuple[int, int]] = None       # (height, width); None: the original size

    def time_ids(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """(original h, w, crop top, left, target h, w), the order of both hosts."""
        oh, ow = self.original or (height, width)
        th, tw = self.target or (oh, ow)            # ComfyUI: target_width defaults to width
        return (int(oh), int(ow), int(self.crop[0]), int(self.crop[1]), int(th), int(tw))
