"""Custom Diffusion's augmentation of reference images, deterministic by seed.

Two thirds of the views shrink the image to 1/3..1 of its size on an empty canvas, a third
enlarge it 1.2-1.4x and crop; half are mirrored. As in the reference script, the prompt says so
only when it shows: "a far away" / "very small" below 0.6 of the size, "zoomed in" / "close up"
when enlarged. The loss is masked to the part of the canvas the image
covers, so the model is not taught to paint the empty border. The first view of every image
is the image itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SMALL = ("a far away ", "very small ")
LARGE = ("zoomed in ", "close up ")
SMALL_BELOW = 0.6          # the reference prefixes SMALL only below this scale


@dataclass
class View:
    image: torch.Tensor      # [H, W, 3] in 0..1
    mask: torch.Tensor       # [H, W] where the loss counts (valid canvas x user mask)
    prefix: str              # prompt prefix
    source: int              # index of the reference image
    scale: float = 1.0       # the view's size relative to the image (1: unscaled)


def _randint(g, lo, hi):     # lo..hi inclusive
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _resize(x, h, w):
    """[H, W, C] -> [h, w, C], bilinear with antialiasing."""
    y = F.interpolate(x.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0)


def views(images: torch.Tensor, masks: torch.Tensor, per_image: int, seed: int,
          scale: bool = True, flip: bool = True) -> list[View]:
    g = torch.Generator().manual_seed(int(seed))
    N, H, W, _ = images.shape
    out = []
    for i in range(N):
        img = images[i].float()
        m = masks[i].float()
        for v in range(per_image):
            x = torch.cat([img, m[..., None]], dim=-1)
            if flip and v > 0 and torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(1)
            prefix, f = "", 1.0
            if scale and v > 0:
                if _randint(g, 0, 2) < 2:
                    f = _randint(g, 33, 100) / 100.0
                    h, w = max(8, round(H * f)), max(8, round(W * f))
                    canvas = torch.zeros(H, W, 5)
                    top, left = _randint(g, 0, H - h), _randint(g, 0, W - w)
                    canvas[top:top + h, left:left + w, :4] = _resize(x, h, w)
                    canvas[top:top + h, left:left + w, 4] = 1.0     # valid region
                    x = canvas
                    x[..., 3] = x[..., 3] * x[..., 4]
                    if f < SMALL_BELOW:
                        prefix = SMALL[_randint(g, 0, 1)]
                else:
                    f = _randint(g, 120, 140) / 100.0
                    h, w = round(H * f), round(W * f)
                    big = _resize(x, h, w)
                    top, left = _randint(g, 0, h - H), _randint(g, 0, w - W)
                    x = big[top:top + H, left:left + W]
                    prefix = LARGE[_randint(g, 0, 1)]
            out.append(View(x[..., :3].clamp(0, 1), (x[..., 3] > 0.5).float(), prefix, i, f))
    return out


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask [H, W] -> latent cells fully inside it [1, H/f, W/f]."""
    cells = F.avg_pool2d(mask[None, None].float(), factor)
    return (cells > 0.999).float()[0]
