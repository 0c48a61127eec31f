"""Region masks: the host's MASK at image resolution <-> the core's mask on a latent grid.

A mask at image resolution (H, W) = latent * vae_scale is averaged over each latent cell
(exact for masks the pack itself upsampled). A mask of another size with the image's aspect
ratio (within 2%) is resized to the latent grid; one of another shape is refused rather than
stretched over the image, unless it is uniform (all one value fits any shape). Values are kept
soft (0..1): blends are linear in the mask.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InputError, require_finite

ASPECT_TOLERANCE = 0.02


def resize(mask: torch.Tensor, size) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 1, h, w]: cell averages for whole-number factors, else antialiased bilinear."""
    H, W = mask.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (H, W) == (h, w):
        return mask
    if H % h == 0 and W % w == 0:
        return F.adaptive_avg_pool2d(mask, (h, w))
    if h % H == 0 and w % W == 0:
        return F.interpolate(mask, size=(h, w), mode="nearest")
    return F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False, antialias=h < H).clamp(0, 1)


def latent_mask(mask, latent_hw, vae_scale: int, input_name: str = "mask") -> torch.Tensor:
    """A host/user mask ([H, W], [1, H, W] or [1, 1, H, W], values 0..1) -> [1, 1, h, w] float."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(input_name, f"expected a MASK tensor, got {type(mask).__name__}")
    m = mask.detach().float().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise InputError(input_name, f"holds {mask.shape[0]} masks (shape {tuple(mask.shape)}); give one mask "
                                     "for the one image")
    require_finite(input_name, m)
    if m.numel() == 0 or m.min() < -1e-6 or m.max() > 1 + 1e-6:
        raise InputError(input_name, "expected values between 0 and 1 (1 = the region)")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    H, W = m.shape
    uniform = bool(m.min() == m.max())       # e.g. LoadImage's 64x64 placeholder for an image without alpha
    if not uniform and abs((W / H) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise InputError(input_name, f"is {W}x{H} px but the image is {w * vae_scale}x{h * vae_scale} px, another "
                                     "shape; give a mask of the image's size (or at least its aspect ratio)")
    return resize(m.clamp(0, 1)[None, None], (h, w))


def image_mask(mask: Optional[torch.Tensor], latent_hw, vae_scale: int) -> torch.Tensor:
    """Core mask [B, 1, h, w] (None: everything) -> host MASK [B, H, W] at image resolution (nearest)."""
    h, w = latent_hw
    if mask is None:
        return torch.ones(1, h * vae_scale, w * vae_scale)
    return F.interpolate(mask.float().cpu(), scale_factor=vae_scale, mode="nearest")[:, 0]


def check_grid_mask(mask: torch.Tensor, latent_hw, input_name: str = "mask") -> torch.Tensor:
    """A core-level mask must already be [1, 1, h, w] on the latent grid (see latent_mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or tuple(mask.shape[:2]) != (1, 1) \
            or tuple(mask.shape[2:]) != tuple(latent_hw):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(input_name, f"expected a [1, 1, {latent_hw[0]}, {latent_hw[1]}] mask on the latent grid, "
                                     f"got {shape} (convert image-size masks with masks.latent_mask)")
    require_finite(input_name, mask)
    return mask.float().clamp(0, 1)
