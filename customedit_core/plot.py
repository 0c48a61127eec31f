"""A loss curve as an image (the host's IMAGE format), drawn with PIL: no plotting library."""
from __future__ import annotations

import numpy as np
import torch


def loss_curve(losses, width: int = 512, height: int = 256, title: str = "training loss") -> torch.Tensor:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 10, 22, height - 22
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    vals = np.asarray([float(x) for x in losses if np.isfinite(x)], dtype=np.float64)
    d.text((left, 4), f"{title} ({len(losses)} steps)", fill=(0, 0, 0))
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        span = hi - lo or 1.0
        smooth = np.empty_like(vals)
        acc = vals[0]
        for i, v in enumerate(vals):           # exponential moving average: the trend under the noise
            acc = 0.9 * acc + 0.1 * v if i else v
            smooth[i] = acc

        def pts(series):
            n = max(1, len(series) - 1)
            return [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span) for i, v in enumerate(series)]

        if vals.size > 1:
            d.line(pts(vals), fill=(170, 200, 240), width=1)
            d.line(pts(smooth), fill=(20, 60, 160), width=2)
        d.text((4, top), f"{hi:.3g}", fill=(0, 0, 0))
        d.text((4, bottom - 10), f"{lo:.3g}", fill=(0, 0, 0))
        d.text((left, bottom + 6), f"first {vals[0]:.4g}  last(avg) {smooth[-1]:.4g}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
